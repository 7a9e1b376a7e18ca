"""`int4-gptq`: the solver against a plain column-by-column GPTQ, the classic property (lower output
error on the calibration inputs than round-to-nearest, every layer), the saved folder being exactly
the `int4` format (transformers loads it with hubquant's logits), and calibration data that no
eval scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hubquant
from hubquant.errors import HubquantError
from hubquant.quantize.calibration import CalibrationSettings, calibration_ids
from hubquant.quantize.core import quantize_checkpoint
from hubquant.quantize.gptq import Int4GPTQ, gptq
from hubquant.quantize.registry import get_method, parse_variant, variant_folder
from hubquant.quantize.solved import rtn_codes
from hubquant.quantize.torchao_methods import _exact_asymmetric_qparams
from hubquant.texts import calibration_split

pytestmark = pytest.mark.filterwarnings("ignore")


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose columns are correlated and of unequal scale, as a layer's activations are."""
    gen = torch.Generator().manual_seed(seed)
    rank = cols // 8  # most of the variance in a few directions, a little noise in all
    mix = torch.randn(rank, cols, generator=gen, dtype=torch.float64) / rank**0.5
    low = torch.randn(n, rank, generator=gen, dtype=torch.float64) @ mix
    noise = 0.1 * torch.randn(n, cols, generator=gen, dtype=torch.float64)
    return (low + noise + 0.3) * torch.logspace(-1, 1, cols, dtype=torch.float64)


def reference_gptq(w: torch.Tensor, h: torch.Tensor, group: int, act_order: bool, damp: float = 0.01):
    """GPTQ as the paper states it, one column at a time, no blocks: round column i, then move
    every later column by the rounding error times the row of the inverse Hessian's Cholesky
    factor. Groups: parameters from the current weights at each group's first column, or (with
    activation order) from the original weights."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(cols)
    static = _exact_asymmetric_qparams(w.float(), group) if act_order else None
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(cols):
        g = int(perm[i]) // group
        if static is not None:
            s, z = static[0][:, g].double(), static[1][:, g].double()
        else:
            if i % group == 0:
                s2, z2 = _exact_asymmetric_qparams(w[:, i : i + group].float(), group)
                params[g] = (s2[:, 0].double(), z2[:, 0].double())
            s, z = params[g]
        q = torch.clamp(torch.round(w[:, i] / s) + z, -8, 7)
        codes[:, i] = q
        err = (w[:, i] - (q - z) * s) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return codes[:, torch.argsort(perm)].to(torch.int8)


@pytest.mark.parametrize("act_order", [False, True])
def test_solver_equals_the_plain_column_by_column_gptq(act_order: bool):
    torch.manual_seed(0)
    rows, cols, group = 24, 128, 32
    w = torch.randn(rows, cols, dtype=torch.float64) * 0.05
    x = correlated_inputs(512, cols)
    h = x.T @ x
    h[:, 5] = h[5, :] = 0  # a column that never sees an input: set to zero, as GPTQ does
    mine = gptq(w, h, group, act_order=act_order, block=64, precision=torch.float64)
    want = reference_gptq(w, h, group, act_order)
    assert (mine.codes == want).float().mean().item() == 1.0  # blocks and lazy updates change nothing
    assert mine.codes.dtype == torch.int8 and mine.codes.min() >= -8 and mine.codes.max() <= 7
    # The default runs in fp32: a few codes on rounding ties may differ, the output error may not.
    fast = gptq(w, h, group, act_order=act_order, block=64)
    assert (fast.codes == want).float().mean().item() >= 0.99
    errors = [
        torch.linalg.matrix_norm(x @ (w - q).T).item()
        for q in (fast.dequantized(group).double(), mine.dequantized(group).double())
    ]
    assert errors[0] <= 1.01 * errors[1], errors


def test_layers_sharing_an_input_are_solved_together_as_if_alone():
    """q/k/v (and gate/up) share one Hessian and one solve; each layer's rows come out as a solve
    of it alone would give them."""
    torch.manual_seed(2)
    x = correlated_inputs(512, 128, seed=2)
    layers = [torch.nn.Linear(128, rows, bias=False) for rows in (32, 16, 16)]
    method = Int4GPTQ(group_size=32)
    method.solve([(f"layers.0.attn.{n}", lin) for n, lin in zip("qkv", layers, strict=True)], x.T @ x, 32)
    for n, lin in zip("qkv", layers, strict=True):
        alone = gptq(lin.weight.detach().float(), x.T @ x, 32)
        assert torch.equal(method.solutions[f"layers.0.attn.{n}"].codes, alone.codes)
        assert torch.equal(method.solutions[f"layers.0.attn.{n}"].scale, alone.scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_on_the_calibration_inputs(act_order: bool):
    torch.manual_seed(1)
    w = torch.randn(64, 256, dtype=torch.float64) * 0.05
    x = correlated_inputs(1024, 256, seed=1)
    solved = gptq(w, x.T @ x, 64, act_order=act_order).dequantized(64).double()
    rtn = rtn_codes(w, 64).dequantized(64).double()
    err = torch.linalg.matrix_norm(x @ (w - solved).T)
    err_rtn = torch.linalg.matrix_norm(x @ (w - rtn).T)
    assert err < 0.8 * err_rtn, (err.item(), err_rtn.item())


def test_variant_names_carry_settings():
    assert parse_variant("int4") == ("int4", {})
    assert parse_variant("int4:g64") == ("int4", {"group_size": 64})
    assert parse_variant("int4:hqq") == ("int4", {"hqq": True})
    assert parse_variant("int4-gptq:g64:act") == ("int4-gptq", {"group_size": 64, "act_order": True})
    assert variant_folder("int4-gptq:g64") == "int4-gptq_g64"
    for bad, words in (("int5", "unknown"), ("int4:x", "option 'x'")):
        with pytest.raises(HubquantError, match=words):
            parse_variant(bad)
    with pytest.raises(HubquantError, match="chooses its own rounding; --hqq"):
        get_method("int4-gptq", hqq=True)
    assert isinstance(get_method("int4-gptq", group_size=64), Int4GPTQ)


@pytest.fixture(scope="module")
def gptq_folder(hf_checkpoint, tmp_path_factory):
    folder, hf = hf_checkpoint("llama_gqa")  # no tokenizer: calibrates on seeded random ids
    out = tmp_path_factory.mktemp("gptq") / "int4-gptq"
    quantize_checkpoint(
        folder, out, "int4-gptq:g32", progress=False, calibration=CalibrationSettings(samples=16, length=32)
    )
    rtn = tmp_path_factory.mktemp("rtn") / "int4"
    quantize_checkpoint(folder, rtn, "int4:g32", progress=False)
    return folder, hf, out, rtn


def test_the_folder_is_the_int4_format_with_its_calibration_recorded(gptq_folder):
    from safetensors import safe_open

    _, _, out, rtn = gptq_folder
    config, rtn_config = (json.loads((f / "config.json").read_text()) for f in (out, rtn))
    assert config["quantization_config"] == rtn_config["quantization_config"]
    changed = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as a, safe_open(rtn / shard.name, "pt") as b:
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                assert (x.shape, x.dtype) == (y.shape, y.dtype), key
                changed += not torch.equal(x, y)
    assert changed > 0  # other values, same format
    report = json.loads((out / "quantization_report.json").read_text())
    calibration = report["settings"]["calibration"]
    assert report["method"] == "int4-gptq" and calibration["samples"] == 16 and calibration["length"] == 32
    assert "random" in calibration["text"]
    better, total = map(int, calibration["layers_better_than_rtn"].split("/"))
    assert better == total > 0  # the classic property, every layer of the model
    assert calibration["output_error_vs_rtn_worst"] < 1
    card = (out / "README.md").read_text()
    assert "GPTQ" in card and "### Calibration" in card and "{'samples'" not in card
    assert "16 sequences of 32 tokens, seed 0" in card and f"in {better}/{total} layers" in card
    print(card[card.index("### Calibration") :][:800])


def test_transformers_loads_it_with_hubquants_logits(gptq_folder):
    import transformers
    from conftest import sample_ids

    folder, hf, out, _ = gptq_folder
    ids = sample_ids()
    mine, _ = hubquant.load(out, dtype="bf16", progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = mine(ids).float(), theirs(ids).logits.float()
    assert mine.quant_report.method == "int4-gptq"
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 0.02 * scale  # bf16 products, the same int4 weights


def test_calibration_draws_from_the_slice_no_eval_scores(smollm2_folder: Path):
    from hubquant.models.families import family_for
    from hubquant.models.tokenizer import Tokenizer
    from hubquant.texts import load_text

    config = json.loads((smollm2_folder / "config.json").read_text())
    family = family_for(config)
    settings = CalibrationSettings(samples=4, length=64, seed=3)
    ids, record = calibration_ids(smollm2_folder, family, config, settings)
    tokenizer = Tokenizer.from_folder(smollm2_folder, family.with_defaults(config), {})
    all_ids = torch.tensor(tokenizer.encode(load_text("python-docs").text, add_special_tokens=False))
    split = calibration_split(all_ids.numel())
    assert record["token_range"] == [split, all_ids.numel()] and ids.shape == (4, 64)
    tail = all_ids[split:]
    for row in ids:  # every sequence lies in the tail, none in the scored part
        starts = [i for i in range(tail.numel() - 63) if torch.equal(tail[i : i + 64], row)]
        assert starts, "a calibration sequence is not in the calibration slice"
    again, _ = calibration_ids(smollm2_folder, family, config, settings)
    assert torch.equal(ids, again)  # seeded


def test_an_eval_refuses_a_variant_calibrated_on_tokens_it_scores():
    """The split both sides read: a calibration's own record is never scored by an eval of its
    text; a record drawn from the scoring part of the same text is refused in one line; another
    text, or seeded random ids, is no concern of this eval."""
    from types import SimpleNamespace

    from hubquant.evaluate.tasks.causal_lm import CausalLM
    from hubquant.texts import Text, TokenSplit

    text = Text("notes.txt", "some text to split")
    tokens = TokenSplit(text, 1000)
    assert tokens.split == calibration_split(1000) == 750
    task = CausalLM(settings=None, checkpoint=None)  # type: ignore[arg-type]
    task.tokens = tokens

    def variant(record):
        return SimpleNamespace(quant_report=SimpleNamespace(settings={"calibration": record}))

    assert task.adopt(variant(tokens.record()), None, "int4-gptq") == []
    assert task.adopt(variant({"text": "seeded random token ids"}), None, "int4-gptq") == []
    other = TokenSplit(Text("other.txt", "another text"), 1000).record()
    assert task.adopt(variant({**other, "token_range": [0, 1000]}), None, "int4-gptq") == []
    scored = {**tokens.record(), "token_range": [749, 1000]}
    with pytest.raises(
        HubquantError, match=r"int4-gptq was calibrated on tokens 749\.\. of notes.txt.*--force"
    ):
        task.adopt(variant(scored), None, "int4-gptq")


def test_quantize_cli_calibration_flags(hf_checkpoint, tmp_path, capsys):
    from hubquant.cli import main

    folder, _ = hf_checkpoint("llama_gqa")
    out = tmp_path / "q"
    argv = ["quantize", str(folder), "--method", "int4-gptq", "--group-size", "32", "--act-order"]
    assert main([*argv, "--calib-samples", "3", "--calib-len", "16", "--out", str(out)]) == 0
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["settings"]["act_order"] is True and report["settings"]["group_size"] == 32
    assert (report["settings"]["calibration"]["samples"], report["settings"]["calibration"]["length"]) == (
        3,
        16,
    )
    capsys.readouterr()
    for bad, words in (
        (["--method", "int4", "--calib-len", "64"], "--calib-len applies to calibrated methods"),
        (["--method", "nf4", "--act-order"], "--act-order applies to int4-gptq"),
        (["--method", "int4-gptq"], "add --out DIR"),
        (
            ["--method", "int4-gptq", "--calib-len", "1", "--out", str(tmp_path / "x")],
            "--calib-len 1: a sequence needs at least 2 tokens",
        ),
    ):
        assert main(["quantize", str(folder), *bad]) != 0
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_gptq_calibrates_each_input_with_the_projections_before_it_quantized(
    hf_checkpoint, tmp_path, monkeypatch
):
    """Sequential: q/k/v first, then o on what the quantized q/k/v give, then gate/up, then down,
    one Hessian at a time; the loaded weights are never written to."""
    folder, _ = hf_checkpoint("llama_gqa")
    seen: list[tuple[list[str], bool]] = []
    calibrate = Int4GPTQ.calibrate

    def spy(self, block, prefix, groups):
        names = [n for g in groups for n in g.names]
        q = block.get_submodule("attn.q").weight
        solved_q = self.solutions.get(prefix + "attn.q")
        seen.append((names, solved_q is not None and torch.equal(q, solved_q.dequantized(32).to(q.dtype))))
        return calibrate(self, block, prefix, groups)

    monkeypatch.setattr(Int4GPTQ, "calibrate", spy)
    quantize_checkpoint(folder, tmp_path / "q", "int4-gptq:g32", progress=False,
                        calibration=CalibrationSettings(samples=4, length=16))  # fmt: skip
    layer0 = [([n.removeprefix("layers.0.") for n in names], q_done) for names, q_done in seen[:4]]
    assert layer0 == [
        (["attn.q", "attn.k", "attn.v"], False),
        (["attn.o"], True),
        (["mlp.gate", "mlp.up"], True),
        (["mlp.down"], True),
    ]
    assert len(seen) == 8  # two layers, four inputs each


@pytest.mark.parametrize("act_order", [False, True])
def test_the_solvers_loss_record_is_the_output_error(act_order: bool):
    """What `solved_error` reads from the solver (its per-row loss less the damping's share)
    equals trace((W - Q) H (W - Q)^T) computed from the Hessian, which the solver may consume."""
    from hubquant.quantize.gptq import solved_error

    torch.manual_seed(0)
    w = torch.randn(24, 128, dtype=torch.float64) * 0.05
    x = correlated_inputs(512, 128)
    h = x.T @ x
    h[:, 5] = h[5, :] = 0
    solution = gptq(w, h, 32, act_order=act_order, precision=torch.float64)
    d = w.clone()
    d[:, 5] = 0  # what the solver rounds in a dead column: zero
    d -= solution.dequantized(32).double()
    want = float(((d @ h) * d).sum())
    assert solved_error(w, solution) == pytest.approx(want, rel=1e-6)  # fp32 dequantized values
    taken = h.clone()
    consumed = gptq(w, lambda: taken, 32, act_order=act_order, precision=torch.float64)
    assert torch.equal(consumed.codes, solution.codes)


@pytest.mark.parametrize("variant", ["int4:g32", "int4-gptq:g32", "int8", "nf4"])
def test_each_layers_tensors_are_freed_before_the_next_layer_is_read(
    hf_checkpoint, tmp_path, monkeypatch, variant
):
    """The streaming writer holds one layer at a time: once a layer is written, nothing keeps its
    tensors (the weights it was read with, the worked-out weights that replaced them, the
    quantized modules it wrote) alive while the next layer is read, with Python's automatic cyclic
    collector off. (The writer's loop variables once kept the last projection alive, with the
    layer's largest matrices, through the next layer's calibration; torchao's and bitsandbytes'
    modules sit in reference cycles that only a collection frees.)"""
    import gc
    import weakref

    from hubquant.quantize import core

    folder, _ = hf_checkpoint("llama_gqa")
    seen: list[tuple[str, weakref.ref]] = []
    alive: list[str] = []
    release, materialize, quantize_one = (
        core._LayerStreamer.release,
        core._LayerStreamer.materialize,
        core._quantize_one,
    )

    def watch_release(self, layer):
        if layer is not None:
            for name, tensor in self.model.layers[layer].state_dict(keep_vars=True).items():
                seen.append((f"layers.{layer}.{name}", weakref.ref(tensor)))
        release(self, layer)

    def watch_materialize(self, names):
        alive.extend(name for name, ref in seen if ref() is not None)
        seen.clear()
        materialize(self, names)

    def watch_quantize_one(method, target, runtime):
        module, record = quantize_one(method, target, runtime)
        if module is not None:
            seen.append((f"{target.name} (quantized)", weakref.ref(module)))
        return module, record

    monkeypatch.setattr(core._LayerStreamer, "release", watch_release)
    monkeypatch.setattr(core._LayerStreamer, "materialize", watch_materialize)
    monkeypatch.setattr(core, "_quantize_one", watch_quantize_one)
    settings = CalibrationSettings(samples=4, length=16)
    gc.collect()
    gc.disable()
    try:
        quantize_checkpoint(folder, tmp_path / "out", variant, progress=False, calibration=settings)
    finally:
        gc.enable()
    assert alive == []
    assert len(seen) > 0 and all(ref() is None for _, ref in seen)


def test_dequantized_a_block_of_rows_at_a_time_equals_the_whole_matrix_formula():
    from hubquant.quantize.solved import ROWS

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS + 37, 96, generator=gen)  # more rows than a block, and a partial block
    solution = rtn_codes(w, 32)
    scale = solution.scale.float().repeat_interleave(32, dim=1)
    zero = solution.zero_point.float().repeat_interleave(32, dim=1)
    whole = (solution.codes.float() - zero) * scale
    assert torch.equal(solution.dequantized(32), whole)
    assert torch.equal(solution.dequantized(32, torch.bfloat16), whole.to(torch.bfloat16))
    assert torch.equal(solution.codes.float(), torch.clamp(torch.round(w / scale) + zero, -8, 7))
