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


# --- arguments: dtype, device, head counts, perplexity windows, the KV cache ---------------------


def test_load_takes_dtype_names_like_convert(ckpt):
    for name, expected in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("float32", torch.float32)]:
        model, _ = hubquant.load(ckpt, dtype=name, progress=False)
        assert model.dtype == expected and model.embed.weight.dtype == expected
    model, _ = hubquant.load(ckpt, dtype=torch.float16, device=torch.device("cpu"), progress=False)
    assert model.dtype == torch.float16


@pytest.mark.parametrize("dtype", ["int8", "fp64", torch.int8, torch.float64, None])
def test_bad_dtype_names_the_value_and_the_accepted_ones(dtype):
    # A Hub id that is never contacted: the dtype is checked before anything is downloaded.
    message = load_error_with("org/not-contacted", dtype=dtype)
    assert str(dtype).removeprefix("torch.") in message and "bf16, fp16, fp32" in message


def test_bad_device_is_one_line():
    message = load_error_with("org/not-contacted", device="xyz")
    assert message == "device 'xyz' is not valid; use cpu, cuda, cuda:N"
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in load_error_with("org/not-contacted", device="cuda:0")


def test_cli_dtype_choices_are_the_dtype_rule(capsys):
    from hubquant.models.config import DTYPE_NAMES, torch_dtype

    assert [torch_dtype(name) for name in DTYPE_NAMES] == [torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--dtype", "fp64"])
    assert exit_info.value.code == 2
    assert "choose from 'bf16', 'fp16', 'fp32'" in capsys.readouterr().err.replace('"', "'")


def load_error_with(source: Path | str, **kwargs) -> str:
    with pytest.raises(HubquantError) as info:
        hubquant.load(source, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_heads_that_do_not_divide_name_the_config_keys(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_key_value_heads"] = 3  # 4 query heads cannot be grouped over 3
    (ckpt / "config.json").write_text(json.dumps(config))
    message = load_error(ckpt)
    assert "num_attention_heads (4)" in message and "num_key_value_heads (3)" in message


def test_odd_rotary_dims_name_the_config_keys():
    from hubquant.models.config import ModelConfig

    sizes = dict(vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2)
    with pytest.raises(HubquantError) as info:
        ModelConfig(**sizes, head_dim=12, rotary_fraction=0.25)  # 3 dims: RoPE rotates pairs
    message = str(info.value)
    assert "\n" not in message and "3" in message
    assert "head_dim" in message and "partial_rotary_factor" in message
    with pytest.raises(HubquantError, match="num_key_value_heads=0"):
        ModelConfig(**{**sizes, "num_kv_heads": 0}, head_dim=12)


@pytest.mark.parametrize(
    ("window", "stride", "expected"),
    [(8, 0, "stride is 0"), (8, 9, "stride is 9"), (8, -1, "stride is -1"), (1, 1, "window is 1")],
)
def test_bad_perplexity_window_or_stride(window, stride, expected):
    from hubquant.evaluate import perplexity

    with pytest.raises(HubquantError) as info:
        perplexity(torch.nn.Linear(1, 1), torch.arange(32), window=window, stride=stride, progress=False)
    message = str(info.value)
    assert expected in message and "\n" not in message and ("--stride" in message or "--window" in message)


def test_kv_cache_overflow_says_how_long_the_cache_must_be(ckpt):
    model, _ = hubquant.load(ckpt, dtype="fp32", progress=False)
    cache = hubquant.KVCache(model.config, 1, 4, model.dtype, "cpu")
    model(torch.tensor([[3, 4, 5]]), cache=cache)
    with pytest.raises(HubquantError) as info:
        model(torch.tensor([[6, 7]]), cache=cache)
    message = str(info.value)
    assert "holds 4 tokens" in message and "needs 5" in message and "max_new_tokens" in message
    assert "\n" not in message


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


def test_hub_revision_not_found_is_one_line(hub, tmp_path):
    hub.known_revisions = {"main"}
    line = one_error_line(run_cli(["generate", "org/tiny", "--revision", "nope"], hub, tmp_path / "home"))
    assert "revision 'nope' not found in org/tiny" in line and "--revision" in line
    assert not hub.fetched("org/tiny")


def test_hub_repo_with_extra_files_downloads_only_the_needed_ones(hub, tmp_path):
    repo = hub.repos["org/tiny"]
    (repo / "README.md").write_text("# tiny\n")
    (repo / "unrelated.txt").write_text("not part of the checkpoint")
    (repo / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model.bin"}}))
    (repo / "onnx").mkdir()
    (repo / "onnx" / "config.json").write_text("{}")  # same name as a needed file, in a subfolder
    (repo / "onnx" / "model.onnx").write_bytes(b"onnx")
    args = ["generate", "org/tiny", "--prompt", "hello", "--max-new-tokens", "2", "--dtype", "fp32"]
    result = run_cli(args, hub, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    shards = set(index_of(repo)["weight_map"].values())
    wanted = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert hub.fetched("org/tiny") == wanted | shards | {"model.safetensors.index.json"}
    gets = [f for m, r, f in hub.requests if m == "GET" and r == "org/tiny"]
    assert len(gets) == len(set(gets))  # each file once
    # The converter's mode: safetensors still win over the pickles beside them.
    converted = run_cli(["convert", "org/tiny", "--out", str(tmp_path / "out")], hub, tmp_path / "home")
    assert converted.returncode == 0, converted.stderr
    assert not {f for f in hub.fetched("org/tiny") if f.endswith(".bin") or "onnx" in f or "README" in f}


def test_hub_pickle_repo_is_fetched_for_convert(hub, ckpt, tmp_path):
    tensors = {}
    for shard in set(index_of(ckpt)["weight_map"].values()):
        tensors.update(load_file(ckpt / shard))
    pickles = tmp_path / "bins"
    pickles.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(ckpt / name, pickles / name)
    torch.save(tensors, pickles / "pytorch_model.bin")
    (pickles / "README.md").write_text("# pickles\n")
    hub.repos["org/bins"] = pickles
    result = run_cli(["convert", "org/bins", "--out", str(tmp_path / "out")], hub, tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert hub.fetched("org/bins") == {"config.json", "generation_config.json", "pytorch_model.bin"}
    model, _ = hubquant.load(tmp_path / "out", dtype="fp32", progress=False)
    assert model.dtype == torch.float32


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"metadata": {"total_size": 1}}), "has no weight_map"),
        (json.dumps({"weight_map": {"lm_head.weight": "../../escape.safetensors"}}), "not a shard file name"),
    ],
    ids=["not-json", "no-weight-map", "path-outside"],
)
def test_hub_malformed_index_is_one_line(hub, tmp_path, index, expected):
    (hub.repos["org/tiny"] / "model.safetensors.index.json").write_text(index)
    line = one_error_line(run_cli(["generate", "org/tiny"], hub, tmp_path / "home"))
    assert "model.safetensors.index.json of org/tiny" in line and expected in line
    assert not {f for f in hub.fetched("org/tiny") if f.endswith(".safetensors")}


def test_hub_shard_listed_but_missing_is_one_line(hub, tmp_path):
    repo = hub.repos["org/tiny"]
    shards = sorted(set(index_of(repo)["weight_map"].values()))
    (repo / shards[-1]).unlink()
    line = one_error_line(run_cli(["generate", "org/tiny"], hub, tmp_path / "home"))
    assert f"shard {shards[-1]} listed in model.safetensors.index.json is missing" in line
    assert not {f for f in hub.fetched("org/tiny") if f.endswith(".safetensors")}
