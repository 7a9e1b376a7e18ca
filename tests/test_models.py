"""hubquant's decoder against transformers, family by family, on perturbed sharded checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CASES, sample_ids

import hubquant
from hubquant.models.families import family_for, rope_from_hf
from hubquant.models.layers import decode_attention

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    made = {}

    def get(case: str):
        if case not in made:
            folder, hf = hf_checkpoint(case)
            model, _ = hubquant.load(folder, dtype=torch.float32, progress=False)
            made[case] = (folder, hf, model)
        return made[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_is_sharded(case, loaded):
    folder, _, _ = loaded(case)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, loaded):
    _, hf, model = loaded(case)
    ids = sample_ids(batch=2, seq=24)  # 24 > 16: dynamic NTK grows its base, llama3 bands matter
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    assert got.shape == want.shape == (2, 24, hf.config.vocab_size)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_bf16_logits_equal_transformers_bit_for_bit(case, loaded):
    """Same ops in the same order and precision as the reference, so bf16 matches exactly too."""
    import transformers

    folder, _, _ = loaded(case)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model, _ = hubquant.load(folder, dtype=torch.bfloat16, progress=False)
    ids = sample_ids(batch=2, seq=24)
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


@pytest.mark.parametrize("length", [7, 80, 300])
def test_bf16_decode_attention_is_fp32_attention_cast_back(length):
    """One query in bf16 on the CPU: attention in fp32 over the bf16 cache, cast back (torch's bf16
    kernel is 3-5x slower there); as exact as torch's bf16 kernel or more, against float64."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (
        torch.randn(2, h, n, 16, generator=gen).bfloat16() for h, n in ((6, 1), (2, length), (2, length))
    )
    mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
    mask[1, ..., : length // 3] = False  # a left-padded row
    got = decode_attention(q, k, v, mask, 0.25, gqa=True)
    want = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=0.25, enable_gqa=True
    )
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    exact = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25, enable_gqa=True
    )
    torch_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert (got.double() - exact).abs().mean() <= (torch_bf16.double() - exact).abs().mean()


def test_bf16_decode_steps_use_decode_attention_and_prefill_does_not(loaded, monkeypatch):
    """Every layer's one-query bf16 step goes through `decode_attention`; the prompt (bit for bit
    transformers' in bf16, above) and fp32 steps keep torch's kernel in the model's dtype."""
    import hubquant.models.layers as layers

    calls: list[torch.dtype] = []

    def counting(q, *args, **kwargs):
        calls.append(q.dtype)
        return decode_attention(q, *args, **kwargs)

    monkeypatch.setattr(layers, "decode_attention", counting)
    folder, _, fp32 = loaded("llama_gqa")
    bf16, _ = hubquant.load(folder, dtype=torch.bfloat16, progress=False)
    prompt = sample_ids(batch=1, seq=8, seed=3)
    fp32.generate(prompt, max_new_tokens=4, eos_ids=[])
    assert calls == []
    bf16.generate(prompt, max_new_tokens=4, eos_ids=[])
    assert calls == [torch.bfloat16] * (3 * bf16.config.num_layers)  # 3 steps after the prompt


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(case, loaded):
    _, hf, model = loaded(case)
    prompt = sample_ids(batch=1, seq=8, seed=3)
    hf.generation_config.eos_token_id = None  # compare all 20 tokens, no early stop
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    got = model.generate(prompt, max_new_tokens=20, eos_ids=[])
    assert got.shape == (1, 28)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_equals_unpadded(case, loaded):
    _, _, model = loaded(case)
    ids = sample_ids(batch=2, seq=20, seed=5)
    short = ids[1, 6:]  # row 1 is 14 real tokens, left-padded by 6
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    padded = ids.clone()
    padded[1, :6] = 0
    with torch.no_grad():
        batch = model(padded, attention_mask=mask)
        alone = model(short[None])
        full = model(ids[:1])
    assert (batch[1, 6:] - alone[0]).abs().max().item() <= 1e-5
    assert (batch[0] - full[0]).abs().max().item() <= 1e-5
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("case", ["llama_gqa", "phi_partial", "phi_plain"])
def test_right_padding_and_cache_steps_match_full_forward(case, loaded):
    _, _, model = loaded(case)
    ids = sample_ids(batch=2, seq=16, seed=7)
    with torch.no_grad():
        full = model(ids)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0
        right = model(ids, attention_mask=mask)
        cache = hubquant.KVCache(model.config, 2, 16, model.dtype, "cpu")
        steps = [model(ids[:, :10], cache=cache)] + [
            model(ids[:, i : i + 1], cache=cache) for i in range(10, 16)
        ]
    assert (right[1, :12] - full[1, :12]).abs().max().item() <= 1e-5
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_batched_left_padded_generation_equals_single(loaded):
    _, _, model = loaded("gemma_mqa")
    long, short = sample_ids(1, 10, seed=11)[0], sample_ids(1, 6, seed=12)[0]
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 4:], mask[1, 4:] = short, 1
    batch = model.generate(ids, mask, max_new_tokens=12, eos_ids=[])
    assert torch.equal(batch[0, 10:], model.generate(long[None], max_new_tokens=12, eos_ids=[])[0, 10:])
    assert torch.equal(batch[1, 10:], model.generate(short[None], max_new_tokens=12, eos_ids=[])[0, 6:])


def test_generation_stops_at_eos_and_pads(loaded):
    _, _, model = loaded("llama_gqa")
    prompt = sample_ids(2, 8, seed=3)
    free = model.generate(prompt, max_new_tokens=10, eos_ids=[])
    stop_id = int(free[0, 10])  # the third new token of row 0 becomes "eos"
    out = model.generate(prompt, max_new_tokens=10, eos_ids=[stop_id], pad_id=0)
    row0 = out[0, 8:].tolist()
    assert row0[: row0.index(stop_id) + 1] == free[0, 8 : 8 + row0.index(stop_id) + 1].tolist()
    assert all(t == 0 for t in row0[row0.index(stop_id) + 1 :])


def test_sampling_is_reproducible_and_respects_top_k(loaded):
    _, _, model = loaded("llama_gqa")
    prompt = sample_ids(1, 8, seed=3)

    def sample(seed: int, **kw) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(prompt, max_new_tokens=12, do_sample=True, eos_ids=[], generator=gen, **kw)

    assert torch.equal(sample(0, temperature=0.8, top_p=0.9), sample(0, temperature=0.8, top_p=0.9))
    assert not torch.equal(sample(0, temperature=5.0), sample(1, temperature=5.0))
    greedy = model.generate(prompt, max_new_tokens=12, eos_ids=[])
    assert torch.equal(sample(4, top_k=1), greedy)


def test_bf16_load_is_close_to_fp32(loaded, hf_checkpoint):
    folder, hf, _ = loaded("llama_gqa")
    model, _ = hubquant.load(folder, dtype=torch.bfloat16, progress=False)
    assert model.embed.weight.dtype == torch.bfloat16
    ids = sample_ids()
    with torch.no_grad():
        got, want = model(ids).float(), hf(ids).logits
    assert (got - want).abs().max().item() < 0.1


def test_tied_head_shares_embedding(loaded):
    _, _, model = loaded("llama_bias_tied")
    assert model.lm_head.weight is model.embed.weight
    _, _, untied = loaded("llama_gqa")
    assert untied.lm_head.weight is not untied.embed.weight


def test_projections_are_plain_linears(loaded):
    _, _, model = loaded("apertus")
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    for layer in (attn.q, attn.k, attn.v, attn.o, mlp.up, mlp.down):
        assert type(layer) is torch.nn.Linear


def test_old_and_new_rope_config_layouts_agree():
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}  # fmt: skip
    old = {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}  # fmt: skip
    assert rope_from_hf(new) == rope_from_hf(old)
    assert rope_from_hf(new)[0].type == "llama3" and rope_from_hf(new)[0].theta == 5e5


def test_families_read_their_quirks_from_config():
    gemma = family_for({"architectures": ["GemmaForCausalLM"]}).config(
        {"vocab_size": 8, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "hidden_act": "gelu"}
    )  # fmt: skip
    assert gemma.norm_unit_offset and gemma.tie_embeddings and gemma.act == "gelu_tanh"
    assert gemma.head_dim == 32 and gemma.embedding_scale == 4.0


def test_dynamic_rope_keeps_no_per_length_state(loaded):
    """Generating past the context must not leave one cached table per length behind."""
    _, _, model = loaded("llama_dynamic")  # max_position_embeddings 16
    model.generate(sample_ids(1, 8), max_new_tokens=30, eos_ids=[])
    assert len(model._rope_cache) <= 1
