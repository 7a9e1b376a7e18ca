"""Fused projections (q/k/v and gate/up as one product each): the same logits and tokens as the
separate products, canonical names and state_dict unchanged, for plain and quantized weights."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, packed_nf4_kernel, sample_ids

import hubquant
from hubquant.models.layers import FusedView, fuse_projections, unfuse_views
from hubquant.quantize.registry import get_method

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_plain_equals_separate(case, dtype, hf_checkpoint):
    folder, _ = hf_checkpoint(case)
    model, _ = hubquant.load(folder, dtype=dtype, progress=False)
    views = [m.__dict__.get("_fused") for m in model.modules()]
    assert sum(v is not None for v in views) >= model.config.num_layers  # every attention at least
    ids = sample_ids(batch=2, seq=24)
    with torch.no_grad():
        fused = model(ids)
        unfuse_views(model)
        separate = model(ids)
    assert torch.equal(fused, separate)


def test_fusion_keeps_names_and_bytes(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    attn = model.layers[0].attn
    view = attn.__dict__["_fused"]
    assert isinstance(view, FusedView)
    # q, k and v are row slices of one tensor: nothing is stored twice.
    assert attn.q.weight.untyped_storage().data_ptr() == view.weight.untyped_storage().data_ptr()
    assert attn.v.weight.untyped_storage().data_ptr() == view.weight.untyped_storage().data_ptr()
    names = set(model.state_dict())
    assert "layers.0.attn.q.weight" in names and not any("qkv" in n or "gate_up" in n for n in names)
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()) - (
        model.embed.weight.numel() if model.config.tie_embeddings else 0
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp32_fused_weights_are_stored_input_major_on_the_cpu(hf_checkpoint, dtype):
    """fp32 on the CPU: the fused tensor is the transpose of a contiguous [inputs, outputs], the
    layout torch's fp32 one-row product streams fastest (1.4x here); bf16 stays row-major (it is
    slower input-major). Either way each part views it with the checkpoint's shape and values."""
    folder, hf = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype=dtype, progress=False)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    layer, hf_layer = model.layers[1], hf.model.layers[1]
    for module in (layer.attn, layer.mlp):
        view = module.__dict__["_fused"]
        assert view.weight.t().is_contiguous() == (dtype == "fp32")
        assert view.weight.is_contiguous() == (dtype == "bf16")
    pairs = [(layer.attn.q, hf_layer.self_attn.q_proj), (layer.attn.v, hf_layer.self_attn.v_proj),
             (layer.mlp.gate, hf_layer.mlp.gate_proj), (layer.mlp.up, hf_layer.mlp.up_proj)]  # fmt: skip
    for ours, theirs in pairs:
        assert torch.equal(ours.weight, theirs.weight.detach().to(torch_dtype))


def test_replacing_a_part_turns_the_fused_product_off(hf_checkpoint):
    """A quantizer (or anyone) swapping q for another module must be obeyed, not bypassed."""
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    ids = sample_ids(batch=1, seq=8)
    attn = model.layers[0].attn
    with torch.no_grad():
        before = model(ids)
        new_q = torch.nn.Linear(attn.q.in_features, attn.q.out_features, bias=False)
        new_q.weight.copy_(attn.q.weight * 2)
        attn.q = new_q
        after = model(ids)
    assert not torch.equal(before, after)


def test_generation_identical_fused_and_separate(hf_checkpoint):
    folder, _ = hf_checkpoint("llama3_rope")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    prompt = sample_ids(batch=1, seq=6)
    fused = model.generate(prompt, max_new_tokens=20, eos_ids=[])
    unfuse_views(model)
    assert torch.equal(fused, model.generate(prompt, max_new_tokens=20, eos_ids=[]))


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A Llama wide enough for every method to quantize every projection (nf4 wants input widths
    that are multiples of 64; int4 groups of 32+)."""
    import transformers
    from conftest import perturb_

    config = transformers.LlamaConfig(
        vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    perturb_(model)
    folder = tmp_path_factory.mktemp("wide")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["int4", "int8", "fp8", "nf4"])
def test_fused_quantized_equals_separate(method, wide_checkpoint, monkeypatch):
    """Each method's `fuse` stacks its runtime tensors so that every output is unchanged."""
    ids = sample_ids(batch=2, seq=12)
    fused_model, _ = hubquant.load(wide_checkpoint, dtype="bf16", progress=False)
    hubquant.quantize(fused_model, method, progress=False)
    fused = [m.__dict__.get("_fused") for m in fused_model.modules()]
    # Where bitsandbytes runs its AVX512-BF16 kernel, each Linear4bit repacks itself on its first
    # call (the layout transformers runs too), and nf4 stays one product per projection.
    groups = 0 if method == "nf4" and packed_nf4_kernel() else 2 * fused_model.config.num_layers
    assert sum(f is not None for f in fused) == groups, f"{method}: not all fused"
    separate_model, _ = hubquant.load(wide_checkpoint, dtype="bf16", progress=False)
    monkeypatch.setattr(type(get_method(method)), "fuse", lambda self, modules: None)
    hubquant.quantize(separate_model, method, progress=False)
    assert "_fused" not in separate_model.layers[0].attn.__dict__
    with torch.no_grad():
        a, b = fused_model(ids), separate_model(ids)
    assert torch.equal(a, b)


def test_saved_quantized_variant_loads_fused(wide_checkpoint, tmp_path):
    from hubquant.quantize.core import quantize_checkpoint

    out, _ = quantize_checkpoint(wide_checkpoint, tmp_path / "int8", "int8", progress=False)
    model, _ = hubquant.load(out, dtype="bf16", progress=False)
    attn = model.layers[0].attn
    fused = attn.__dict__["_fused"]
    assert fused.valid((attn.q, attn.k, attn.v)) and "_fused" in model.layers[0].mlp.__dict__
    # The parts view the fused module's values: stored once.
    q_values = attn.q.weight.qdata.untyped_storage().data_ptr()
    assert q_values == fused.module.weight.qdata.untyped_storage().data_ptr()


def test_fuse_projections_is_idempotent(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    first = model.layers[0].attn.__dict__["_fused"]
    fuse_projections(model)  # again: a new view over the same parts, same values
    ids = sample_ids(batch=1, seq=5)
    with torch.no_grad():
        out = model(ids)
        unfuse_views(model)
        assert torch.equal(out, model(ids))
    assert first is not None


@pytest.mark.parametrize(
    ("width", "outs", "fuses"),
    [(128, (64, 32, 32), False), (128, (128, 64, 32), True), (64, (576, 192, 192), True)],
)
def test_int4_fuses_only_on_packing_blocks(width, outs, fuses):
    """The CPU int4 packing interleaves 64-row blocks: a part that ends mid-block cannot be
    followed by another, and where fusing is allowed the outputs are unchanged."""
    method = get_method("int4")
    torch.manual_seed(0)
    modules = []
    for n in outs:
        linear = torch.nn.Linear(width, n, bias=False).to(torch.bfloat16)
        modules.append(method.to_runtime(method.quantize(linear, method.plan("layers.0.attn.q", linear))))
    assert all(type(m.weight).__name__ == "Int4OpaqueTensor" for m in modules)
    fused = method.fuse(modules)
    assert (fused is not None) == fuses
    if fused is not None:
        x = torch.randn(3, width, dtype=torch.bfloat16)
        assert torch.equal(fused(x), torch.cat([m(x) for m in modules], dim=-1))


def test_int4_runs_with_bf16_activations_in_an_fp32_model(wide_checkpoint, tmp_path):
    """An int4 variant loaded in fp32 still uses the packed CPU kernel, in bf16 (its only fast
    activation dtype), and hands fp32 back: the same products as the bf16-loaded variant's."""
    from hubquant.quantize.core import quantize_checkpoint
    from hubquant.quantize.torchao_methods import Bf16Linear

    out, _ = quantize_checkpoint(wide_checkpoint, tmp_path / "int4", "int4", progress=False)
    fp32, _ = hubquant.load(out, dtype="fp32", progress=False)
    bf16, _ = hubquant.load(out, dtype="bf16", progress=False)
    up32, up16 = fp32.layers[0].mlp.up, bf16.layers[0].mlp.up
    assert isinstance(up32, Bf16Linear) and type(up32.weight).__name__ == "Int4OpaqueTensor"
    x = torch.randn(2, 3, up32.in_features)
    with torch.no_grad():
        got = up32(x)
        assert got.dtype == torch.float32
        assert torch.equal(got, up16(x.to(torch.bfloat16)).float())
        ids = sample_ids(batch=1, seq=10)
        a, b = fp32(ids), bf16(ids).float()
    assert "_fused" in fp32.layers[0].attn.__dict__
    assert (a - b).norm() / b.norm() < 0.05  # fp32 elsewhere vs bf16 elsewhere: close, not equal


@pytest.mark.parametrize("method", ["int4", "int8", "fp8", "nf4"])
def test_quantizing_input_major_fp32_weights_equals_quantizing_contiguous_ones(method, wide_checkpoint):
    """A model loaded in fp32 on the CPU holds its fused parts as input-major views; quantizing it
    in memory gives the same model, to the last bit, as quantizing contiguous copies."""
    ids = sample_ids(batch=2, seq=12)
    fused, _ = hubquant.load(wide_checkpoint, dtype="fp32", progress=False)
    assert not fused.layers[0].attn.q.weight.is_contiguous()
    plain, _ = hubquant.load(wide_checkpoint, dtype="fp32", progress=False)
    unfuse_views(plain)
    for module in plain.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(module.weight.detach().contiguous(), requires_grad=False)
    hubquant.quantize(fused, method, progress=False)
    hubquant.quantize(plain, method, progress=False)
    with torch.no_grad():
        assert torch.equal(fused(ids), plain(ids))
