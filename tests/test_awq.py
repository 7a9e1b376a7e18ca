"""`int4-awq`: folding the scales leaves the full-precision layer unchanged (norms, Gemma's unit
offset, LayerNorm, up and v rows with their biases, skipped projections), the saved folder is the
`int4` format plus changed norms that transformers loads with hubquant's logits, and its output
error on the calibration text is never above round-to-nearest's for the groups it scales."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import hubquant
from hubquant.quantize import awq
from hubquant.quantize.awq import Int4AWQ
from hubquant.quantize.calibration import CalibrationSettings, InputStats
from hubquant.quantize.core import quantize_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = ("llama_gqa", "llama_bias_tied", "gemma_mqa", "phi_plain", "apertus")


def _layer_inputs(model, batch: int = 2, seq: int = 12):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, model.config.hidden_size, generator=gen)
    x = x * torch.logspace(-1, 1, model.config.hidden_size)  # channels of unequal size, as in a model
    positions, mask = model._positions_and_mask(batch, seq, 0, None, None, x.device)
    return x, model._rope(positions, torch.float32), mask


@pytest.mark.parametrize("case", CASES)
def test_folded_scales_leave_the_full_precision_layer_unchanged(case, hf_checkpoint, monkeypatch):
    folder, _ = hf_checkpoint(case)
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    block = model.layers[0]
    for module in block.modules():  # the fused q/k/v and gate/up products of a loaded model
        module.__dict__.pop("_fused", None)
    x, rope, mask = _layer_inputs(model)
    with torch.no_grad():
        want = block(x, rope, mask, None)
    targets = [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    stats = InputStats([(f"layers.0.{n}", m) for n, m in targets])
    with torch.no_grad():
        block(x, rope, mask, None)
    stats.remove()
    gen = torch.Generator().manual_seed(1)
    # A scale far from 1 for every group, whatever the search would pick: the folds are what is tested.
    monkeypatch.setattr(
        awq,
        "_search",
        lambda linears, group, size: (
            torch.rand(linears[0].in_features, generator=gen) * 3 + 0.2,
            0.5,
            [1.0] * len(linears),
            [1.0] * len(linears),
        ),
    )
    folded = copy.deepcopy(block)
    method = Int4AWQ(group_size=32)
    with torch.no_grad():
        method.calibrate(folded, "layers.0.", stats.groups())
        for name, (col, row) in method.scales.items():
            linear = folded.get_submodule(name.removeprefix("layers.0."))
            if name in method.solutions:  # planned: put the scaled weights back unrounded
                w = linear.weight.data * (col if col is not None else 1)
                linear.weight.data = w / (row[:, None] if row is not None else 1)
        got = folded(x, rope, mask, None)
    local = {n.removeprefix("layers.0.") for n in method.scales}
    assert {"attn.q", "attn.k", "attn.v"} <= local  # into the attention norm
    if model.config.mlp == "gated":
        assert {"mlp.gate", "mlp.up", "mlp.down"} <= local  # into the MLP norm; down into up's rows
    else:
        assert "mlp.down" not in local  # an activation sits between up and down
    assert ("attn.o" in local) == (model.config.num_heads == model.config.num_kv_heads)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def awq_folders(hf_checkpoint, tmp_path_factory):
    made = {}
    for case in ("llama_bias_tied", "gemma_mqa", "phi_plain"):
        folder, hf = hf_checkpoint(case)
        out = tmp_path_factory.mktemp("awq") / case
        quantize_checkpoint(
            folder,
            out,
            "int4-awq:g32",
            progress=False,
            calibration=CalibrationSettings(samples=16, length=32),
        )
        made[case] = (folder, hf, out)
    return made


@pytest.mark.parametrize("case", ("llama_bias_tied", "gemma_mqa", "phi_plain"))
def test_transformers_loads_the_awq_folder_with_hubquants_logits(case, awq_folders):
    import transformers
    from conftest import sample_ids

    folder, _, out = awq_folders[case]
    ids = sample_ids()
    mine, _ = hubquant.load(out, dtype="bf16", progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = mine(ids).float(), theirs(ids).logits.float()
    assert mine.quant_report.method == "int4-awq"
    assert (a - b).abs().max().item() <= 0.02 * b.abs().max().item()  # bf16 products, the same weights
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"


@pytest.mark.parametrize("case", ("llama_bias_tied", "gemma_mqa", "phi_plain"))
def test_awq_scales_some_groups_and_never_does_worse_than_rounding_where_it_scales(case, awq_folders):
    _, _, out = awq_folders[case]
    report = json.loads((out / "quantization_report.json").read_text())
    calibration = report["settings"]["calibration"]
    assert report["method"] == "int4-awq" and calibration["samples"] == 16
    assert calibration["scaled_groups"] > 0
    assert 0 < calibration["clipped_weight_groups"] < 1 and 0.5 < calibration["clip_share_mean"] < 1
    assert calibration["output_error_vs_rtn_median"] <= 1.0
    card = (out / "README.md").read_text()
    assert "AWQ" in card and "### Calibration" in card
    assert f"AWQ scaled {calibration['scaled_groups']} input groups" in card
    assert "its clipping search narrowed the grid of" in card


def test_awq_refuses_settings_that_are_not_its_own():
    from hubquant.errors import HubquantError
    from hubquant.quantize.registry import get_method

    for option, flag in (("hqq", "--hqq"), ("act_order", "--act-order")):
        with pytest.raises(HubquantError, match=f"int4-awq chooses its own rounding; {flag}"):
            get_method("int4-awq", **{option: True})


def test_building_a_case_leaves_the_shared_cases_unchanged():
    """transformers writes into the rope_scaling dict it is given; the apertus case built before
    llama3_rope once changed llama3_rope's config (rope_theta) and broke test_convert."""
    from conftest import CASES, build_hf_model

    before = copy.deepcopy(CASES)
    build_hf_model("apertus")
    assert CASES == before


@pytest.mark.parametrize("keep_inputs", [False, True], ids=["hessian", "inputs"])
def test_the_error_record_is_each_projections_own_error_and_round_to_nearests(hf_checkpoint, keep_inputs):
    """What `calibrate` records per projection, measured again from scratch on the same inputs
    (through X^T X, in float64): round-to-nearest's error (which the search's exponent 0 also
    gives) and AWQ's own; whether the search measured through X^T X or through the inputs X."""
    from hubquant.quantize.solved import gram, output_error, rounded

    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    block = model.layers[0]
    for module in block.modules():  # the fused q/k/v and gate/up products of a loaded model
        module.__dict__.pop("_fused", None)
    x, rope, mask = _layer_inputs(model)  # 24 tokens: fewer than any projection's input channels
    targets = [(f"layers.0.{n}", m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    stats = InputStats(targets, keep_inputs=keep_inputs)
    with torch.no_grad():
        block(x, rope, mask, None)
    stats.remove()
    groups = stats.groups()
    assert all((group.inputs is not None) == keep_inputs for group in groups)
    assert all((group.hessian is None) == keep_inputs for group in groups)
    hessians = {
        name: group.hessian.clone() if group.hessian is not None else gram(group.inputs)
        for group in groups
        for name in group.names
    }
    weights = {name: linear.weight.detach().clone() for name, linear in targets}
    method = Int4AWQ(group_size=32)
    with torch.no_grad():
        errors = method.calibrate(block, "layers.0.", groups)
    assert set(errors) == set(weights)
    for name, (mine, rtn) in errors.items():
        again = output_error(weights[name], hessians[name], rounded(32))
        assert rtn == again if not keep_inputs else rtn == pytest.approx(again, rel=1e-5), name
        solution = method.solutions[name]
        col, row = method.scales.get(name, (None, None))
        q = solution.dequantized(32)
        q = q / col if col is not None else q
        q = q * row[:, None] if row is not None else q
        d = (weights[name] - q).double()
        assert mine == pytest.approx(float(((d @ hessians[name].double()) * d).sum()), rel=1e-4), name
    assert any(mine < rtn for mine, rtn in errors.values())


def test_kept_inputs_give_the_hessians_own_errors_until_they_outgrow_it():
    """`InputStats(keep_inputs=True)` keeps X while there are no more tokens than channels: its
    X^T X is the very Hessian the other statistics build, and output errors through X equal those
    through X^T X; past that many tokens it turns into that same Hessian, bit for bit."""
    from hubquant.quantize.solved import gram, output_error, rounded

    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(64, 96, bias=False)
    chunks = [torch.randn(2, 16, 64, generator=gen) * torch.logspace(-1, 1, 64) for _ in range(3)]
    kept = InputStats([("layers.0.mlp.up", linear)], keep_inputs=True)
    plain = InputStats([("layers.0.mlp.up", linear)])
    with torch.no_grad():
        for chunk in chunks[:2]:  # 64 tokens: as many as channels
            linear(chunk)
        chunks[0].zero_()  # the kept inputs are copies: what fed the forward may change after it
        (group,) = kept.groups()
        (reference,) = plain.groups()
        assert group.hessian is None and sum(c.shape[0] for c in group.inputs) == 64
        assert torch.equal(gram(group.inputs), reference.hessian)
        assert torch.equal(group.abs_mean, reference.abs_mean)
        through_x = group.error(linear.weight, rounded(32))
        through_h = output_error(linear.weight, reference.hessian, rounded(32))
        assert through_x == pytest.approx(through_h, rel=1e-5)
        assert through_x != output_error(linear.weight.roll(1, 1), reference.hessian, rounded(32))
        linear(chunks[2])  # 96 tokens: more than channels
        (group,) = kept.groups()
        (reference,) = plain.groups()
    assert group.inputs is None and torch.equal(group.hessian, reference.hessian)
    kept.remove()
    plain.remove()


def test_a_clip_of_one_everywhere_is_plain_rounding():
    from hubquant.quantize.solved import rtn_codes

    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(5))
    plain, clipped = rtn_codes(w, 64), rtn_codes(w, 64, torch.ones(300, 4))
    assert torch.equal(plain.codes, clipped.codes) and torch.equal(plain.scale, clipped.scale)
    assert torch.equal(plain.zero_point, clipped.zero_point)
    shrunk = rtn_codes(w, 64, torch.full((300, 4), 0.6))
    assert (shrunk.scale < plain.scale).all()  # every group's grid spans less
    assert shrunk.codes.min() == -8 and shrunk.codes.max() == 7  # the clipped weights take the ends


def test_the_clipping_search_picks_each_groups_lowest_own_error():
    """Per row and group, the share `_search_clip` picks has the lowest error of that group's own
    share of the output, d H_gg d^T, among the 10 candidates: checked by brute force in float64."""
    from hubquant.quantize.solved import rtn_codes

    gen = torch.Generator().manual_seed(6)
    size, rows, cols = 32, 300, 128  # 300 rows: two blocks of the search, the second partial
    w = torch.randn(rows, cols, generator=gen)
    w[:, 5] *= 8  # outliers, which clipping is for
    x = torch.randn(512, cols, generator=gen) * torch.logspace(-1, 1, cols)
    h = x.T @ x
    n = cols // size
    blocks = torch.stack([h[g * size : (g + 1) * size, g * size : (g + 1) * size] for g in range(n)])
    chosen = awq._search_clip(w, blocks, size)
    shares = [1 - i / awq.CLIP_GRID for i in range(awq.CLIP_STEPS)]
    errors = []
    for share in shares:
        d = (w - rtn_codes(w, size, torch.full((rows, n), share)).dequantized(size)).double()
        d = d.view(rows, n, size)
        errors.append(torch.einsum("rgi,gij,rgj->rg", d, blocks.double(), d))
    errors = torch.stack(errors)  # [candidates, rows, groups]
    index = (chosen[..., None] - torch.tensor(shares)).abs().argmin(-1)  # [rows, groups]
    picked = errors.gather(0, index[None])
    assert torch.allclose(picked[0], errors.min(0).values, rtol=1e-4)
    assert (chosen < 1).any() and (chosen == 1).any()


def test_the_diagonal_blocks_from_the_inputs_are_the_hessians():
    linear = torch.nn.Linear(64, 8, bias=False)
    kept = InputStats([("layers.0.mlp.up", linear)], keep_inputs=True)
    plain = InputStats([("layers.0.mlp.up", linear)])
    with torch.no_grad():
        linear(torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(7)))
    (group,), (reference,) = kept.groups(), plain.groups()
    assert group.inputs is not None and reference.hessian is not None
    h = reference.hessian
    assert torch.allclose(group.blocks(16), reference.blocks(16), rtol=1e-5, atol=1e-4)
    assert torch.equal(reference.blocks(16)[2], h[32:48, 32:48])


@pytest.mark.parametrize("method", ["int4-awq:g32", "int4-gptq:g32"])
def test_awq_calibrates_on_the_inputs_themselves_and_gptq_on_the_hessian(
    method, hf_checkpoint, tmp_path, monkeypatch
):
    """Through a whole quantize: AWQ's groups carry X where there are no more tokens than channels
    (2 x 16 tokens, 64 channels here), GPTQ's always X^T X, which it solves with."""
    from hubquant.quantize import calibration

    seen: list[tuple[bool, bool]] = []  # per group: (has inputs, has a Hessian)

    class Watched(calibration.InputStats):
        def groups(self):
            made = super().groups()
            seen.extend((g.inputs is not None, g.hessian is not None) for g in made)
            return made

    monkeypatch.setattr(calibration, "InputStats", Watched)
    folder, _ = hf_checkpoint("llama_gqa")
    quantize_checkpoint(
        folder,
        tmp_path / "out",
        method,
        progress=False,
        calibration=CalibrationSettings(samples=2, length=16),
    )
    assert seen
    if method.startswith("int4-awq"):
        assert all(inputs and not hessian for inputs, hessian in seen)
    else:
        assert all(hessian and not inputs for inputs, hessian in seen)


def test_clip_record_counts_groups_clipped_and_their_shares():
    record = awq.ClipRecord()
    record.add(4, torch.tensor([1.0, 0.9, 0.7, 1.0]))
    record.add(2, None)
    assert (record.groups, record.clipped) == (6, 2)
    assert record.share_sum == pytest.approx(1.6)
