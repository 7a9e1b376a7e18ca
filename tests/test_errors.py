"""Bad input: one line that names the thing and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakehub import FakeHub
from safetensors.torch import load_file, save_file

import hubquant
from hubquant.cli import main
from hubquant.errors import HubquantError

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def ckpt(hf_checkpoint, tmp_path) -> Path:
    """A private, editable copy of the tiny sharded Llama checkpoint."""
    folder, _ = hf_checkpoint("llama_gqa")
    return Path(shutil.copytree(folder, tmp_path / "ckpt"))


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def edit_shard(folder: Path, tensor: str, change) -> str:
    """Rewrite the shard holding `tensor` with `change(tensors)` applied; return the shard name."""
    shard = index_of(folder)["weight_map"][tensor]
    tensors = load_file(folder / shard)
    change(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return shard


def load_error(folder: Path | str) -> str:
    with pytest.raises(HubquantError) as info:
        hubquant.load(folder, dtype=torch.float32, progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


Q = "model.layers.0.self_attn.q_proj.weight"


def test_unknown_architecture_is_named_with_the_supported_ones(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    message = load_error(ckpt)
    assert "MambaForCausalLM" in message and "LlamaForCausalLM" in message and "GemmaForCausalLM" in message


def test_missing_tensor(ckpt):
    edit_shard(ckpt, Q, lambda t: t.pop(Q))
    index = index_of(ckpt)
    del index["weight_map"][Q]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    message = load_error(ckpt)
    assert Q in message and "missing" in message


def test_tensor_listed_in_index_but_absent_from_shard(ckpt):
    shard = edit_shard(ckpt, Q, lambda t: t.pop(Q))
    message = load_error(ckpt)
    assert Q in message and shard in message


def test_duplicate_tensor_names_both_files(ckpt):
    shards = sorted(set(index_of(ckpt)["weight_map"].values()))
    home = index_of(ckpt)["weight_map"][Q]
    other = next(s for s in shards if s != home)
    value = load_file(ckpt / home)[Q]
    tensors = load_file(ckpt / other)
    tensors[Q] = value
    save_file(tensors, ckpt / other, metadata={"format": "pt"})
    message = load_error(ckpt)
    assert Q in message and "twice" in message and home in message and other in message


def test_unexpected_tensor(ckpt):
    extra = "model.layers.0.self_attn.q_proj.bias"  # config.json says attention_bias=false
    shard = edit_shard(ckpt, Q, lambda t: t.__setitem__(extra, torch.zeros(32)))
    message = load_error(ckpt)
    assert extra in message and shard in message and "unexpected" in message


def test_wrongly_shaped_tensor(ckpt):
    shard = edit_shard(ckpt, Q, lambda t: t.__setitem__(Q, torch.zeros(8, 32)))
    message = load_error(ckpt)
    assert Q in message and shard in message and "[8, 32]" in message and "[32, 32]" in message


def test_truncated_shard(ckpt):
    shard = ckpt / index_of(ckpt)["weight_map"][Q]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    message = load_error(ckpt)
    assert shard.name in message and "truncated or corrupt" in message


def test_corrupt_shard_header(ckpt):
    shard = ckpt / index_of(ckpt)["weight_map"][Q]
    shard.write_bytes(b"\xff" * 64)
    assert "truncated or corrupt" in load_error(ckpt)


def test_shard_listed_in_index_missing(ckpt):
    shard = ckpt / index_of(ckpt)["weight_map"][Q]
    shard.unlink()
    message = load_error(ckpt)
    assert shard.name in message and "missing" in message


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    assert "config.json" in load_error(ckpt)


def test_pickle_checkpoint_points_to_convert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    message = load_error(tmp_path)
    assert "hubquant convert" in message and "pytorch_model" in message


def test_gguf_file_points_to_convert(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    assert "hubquant convert" in load_error(file)


def test_cli_prints_one_line_and_exits_nonzero(ckpt, capsys):
    (ckpt / "config.json").unlink()
    assert main(["generate", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hubquant: error: ") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(HubquantError):
        main(["--debug", "generate", str(ckpt)])


# --- the Hub, served by a local stand-in ------------------------------------------------------


@pytest.fixture
def hub(hf_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder, _ = hf_checkpoint("llama_gqa")
    repo = Path(shutil.copytree(folder, tmp_path / "repo"))
    words = ["<pad>", "<s>", "</s>", "hello", "world", "the", "cat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(repo / "tokenizer.json"))
    (repo / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True})
    )
    (repo / "pytorch_model.bin").write_bytes(b"never fetched")  # a stale pickle beside the safetensors
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text((repo / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickles / "pytorch_model.bin")
    server = FakeHub()
    server.repos = {"org/tiny": repo, "org/pickles": pickles}
    server.gated = {"org/gated"}
    yield server
    server.close()


def run_cli(args: list[str], hub: FakeHub, home: Path, offline: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_XET": "1",
        "PYTHONSAFEPATH": "1",
    }
    env.pop("HF_TOKEN", None)
    code = "import sys; from hubquant.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hubquant: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_hub_download_fetches_only_what_is_needed_then_works_offline(hub, tmp_path):
    args = ["generate", "org/tiny", "--prompt", "hello world", "--max-new-tokens", "3", "--dtype", "fp32"]
    result = run_cli(args, hub, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello world")
    shards = set(index_of(hub.repos["org/tiny"])["weight_map"].values())
    wanted = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert hub.fetched("org/tiny") == wanted | shards | {"model.safetensors.index.json"}
    before = len(hub.requests)
    again = run_cli(args, hub, tmp_path / "home", offline=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout and len(hub.requests) == before
    assert hub.revisions == {"main"}
    pinned = run_cli([*args, "--revision", "v1.0"], hub, tmp_path / "home2")
    assert pinned.returncode == 0, pinned.stderr
    assert hub.revisions == {"main", "v1.0"}


def test_hub_errors_are_one_line_with_the_fix(hub, tmp_path):
    home = tmp_path / "home"
    missing = one_error_line(run_cli(["generate", "org/nothing"], hub, home))
    assert "no Hub repo" in missing and "org/nothing" in missing and "HF_TOKEN" in missing
    gated = one_error_line(run_cli(["generate", "org/gated"], hub, home))
    assert "gated" in gated and "HF_TOKEN" in gated
    offline = one_error_line(run_cli(["generate", "org/tiny"], hub, home, offline=True))
    assert "cache" in offline and "HF_HUB_OFFLINE" in offline
    pickles = one_error_line(run_cli(["generate", "org/pickles"], hub, home))
    assert "hubquant convert org/pickles" in pickles
    assert "pytorch_model.bin" not in hub.fetched("org/pickles")
