"""Models bigger than one device (`hubquant.load(..., device_map=...)`), on the CPU: a map that
keeps half the layers on the CPU and offloads the rest to disk gives the plain model's logits and
tokens; a `max_memory` too small is refused before anything is read."""

from __future__ import annotations

import pytest
import torch
from conftest import sample_ids

import hubquant
from hubquant.errors import HubquantError

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("case", ["llama_gqa", "llama_bias_tied", "gemma_mqa"])
def test_half_cpu_half_disk_equals_the_plain_model(case, hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint(case)
    plain, _ = hubquant.load(folder, dtype="fp32", progress=False)
    layers = plain.config.num_layers
    device_map = {"embed": "cpu", "norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"layers.{i}": ("cpu" if i < layers // 2 else "disk") for i in range(layers)})
    offload = tmp_path / "offload"
    split, _ = hubquant.load(
        folder, dtype="fp32", progress=False, device_map=device_map, offload_folder=offload
    )
    assert split.layers[-1].attn.q.weight.device.type == "meta"  # on disk, read in per forward
    assert any(offload.glob("*.dat"))  # accelerate's offload format
    ids = sample_ids(batch=2, seq=12)
    with torch.no_grad():
        assert (split(ids) - plain(ids)).abs().max().item() <= 1e-6
    prompt = sample_ids(batch=1, seq=5)
    assert torch.equal(
        split.generate(prompt, max_new_tokens=8, eos_ids=[]),
        plain.generate(prompt, max_new_tokens=8, eos_ids=[]),
    )


def test_auto_plan_with_disk(hf_checkpoint, tmp_path):
    """ "auto" with a CPU budget smaller than the model offloads the rest to disk."""
    folder, _ = hf_checkpoint("llama_gqa")
    plain, _ = hubquant.load(folder, dtype="fp32", progress=False)
    split, _ = hubquant.load(
        folder, dtype="fp32", progress=False, device_map="auto", max_memory={"cpu": 60_000, "disk": "1GiB"}
    )
    assert "disk" in split.hf_device_map.values() and "cpu" in split.hf_device_map.values()
    ids = sample_ids(batch=1, seq=9)
    with torch.no_grad():
        assert (split(ids) - plain(ids)).abs().max().item() <= 1e-6


def test_max_memory_too_small_is_refused_before_loading(hf_checkpoint, monkeypatch):
    from hubquant.models import loading

    folder, _ = hf_checkpoint("llama_gqa")
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(HubquantError) as info:
        hubquant.load(folder, dtype="fp32", progress=False, device_map="auto", max_memory={"cpu": "10KB"})
    message = str(info.value)
    assert "max_memory allows" in message and "add 'disk'" in message and "\n" not in message


def test_a_map_that_leaves_modules_out_is_refused(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    with pytest.raises(HubquantError, match="device_map leaves modules out"):
        hubquant.load(folder, progress=False, device_map={"embed": "cpu"})


def test_generate_cli_with_a_device_map(hf_checkpoint, capsys, tmp_path):
    from test_sweep import with_tokenizer

    from hubquant.cli import main

    folder = with_tokenizer(hf_checkpoint("llama_gqa")[0], tmp_path / "tiny")
    args = ["generate", str(folder), "--prompt", "x", "--max-new-tokens", "3", "--dtype", "fp32"]
    assert main([*args, "--device-map", "auto", "--max-memory", "cpu=60000,disk=1GiB"]) == 0
    split = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == split
    assert main([*args, "--device-map", "auto", "--max-memory", "cpu"]) == 1
    assert "give DEVICE=SIZE pairs" in capsys.readouterr().err


def test_eval_records_the_device_map_and_peaks(hf_checkpoint, tmp_path):
    from test_sweep import with_tokenizer

    from hubquant.evaluate.run import run_eval

    folder = with_tokenizer(hf_checkpoint("llama_gqa")[0], tmp_path / "tiny")
    device_map = {"embed": "cpu", "norm": "cpu", "lm_head": "cpu", "layers.0": "cpu", "layers.1": "disk"}
    results = run_eval(
        str(folder), variants=["base", "int8"], ctx=16, max_chunks=2, max_tokens=200, speed=False,
        dtype="fp32", device="cpu", out=tmp_path / "out", device_map=device_map, progress=False,
    )  # fmt: skip
    assert results["environment"]["device_map"] == "cpu: embed, layer 0, norm, lm_head; disk: layer 1"
    base, int8 = results["rows"]
    assert base["device_peak_bytes"]["cpu"] > 0 and any("peak memory per device" in n for n in base["notes"])
    assert int8["kld_mean"] is not None and not int8["device_peak_bytes"]  # the variant runs on one device
    html = (tmp_path / "out" / "report.html").read_text()
    assert "disk: layer 1" in html
    plain = run_eval(
        str(folder), variants=["base"], ctx=16, max_chunks=2, max_tokens=200, speed=False,
        dtype="fp32", device="cpu", out=tmp_path / "plain", progress=False,
    )  # fmt: skip
    assert abs(plain["rows"][0]["ppl"] - base["ppl"]) <= 1e-4 * base["ppl"]


def test_quantize_with_a_device_map_writes_the_same_folder(hf_checkpoint, tmp_path):
    import hashlib

    from hubquant.quantize.core import quantize_checkpoint

    folder, _ = hf_checkpoint("llama_gqa")
    device_map = {"embed": "cpu", "norm": "cpu", "lm_head": "cpu", "layers.0": "cpu", "layers.1": "disk"}
    plain, _ = quantize_checkpoint(folder, tmp_path / "plain", "int8", progress=False)
    mapped, _ = quantize_checkpoint(
        folder, tmp_path / "mapped", "int8", progress=False, device_map=device_map
    )

    def digests(out):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.glob("*.safetensors"))}

    assert digests(plain) == digests(mapped) and len(digests(plain)) == 3
    with pytest.raises(HubquantError, match="max_memory allows"):
        quantize_checkpoint(
            folder, tmp_path / "x", "int8", progress=False, device_map="auto", max_memory={"cpu": 100}
        )
