"""Sampling filters and sampled generation against transformers' own logits warpers and generate."""

from __future__ import annotations

import pytest
import torch
from conftest import sample_ids

import hubquant
from hubquant.errors import HubquantError
from hubquant.models.generate import _pick, filter_logits

pytestmark = pytest.mark.filterwarnings("ignore")

TEMPERATURES = [1.0, 0.7, 1.6]
TOP_K = [None, 1, 2, 7, 49, 50, 51, 1000]  # 49/50/51 straddle the 50-wide vocabulary
TOP_P = [None, 0.0, 1e-9, 0.05, 0.3, 0.5, 0.9, 0.95, 0.999999, 1.0 - 1e-9, 1.0]


def reference_filter(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """transformers' warpers, chosen and ordered as `generate(do_sample=True)` does, on fp32 logits."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    scores = logits.to(dtype=torch.float32, copy=True)  # as `_sample` copies the last logits
    input_ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores


def logit_batches() -> dict[str, torch.Tensor]:
    """Several kinds of `[batch, vocab]` logits, ties and -inf included."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 50, generator=gen) * 3
    ties = (torch.randn(6, 50, generator=gen) * 2).round()  # few distinct values: many ties
    ties[0] = 0.0  # one row all equal
    ties[1, :10] = 5.0  # ten tied at the top
    ties[2, 1::2] = ties[2, ::2]  # every value twice
    peaked = torch.randn(3, 50, generator=gen)
    peaked[:, 3] += 30.0  # one token holds nearly all the mass
    peaked[1, 4] = peaked[1, 3]  # two such tokens, tied
    masked = torch.randn(3, 50, generator=gen) * 4
    masked[:, ::3] = float("-inf")  # already filtered earlier
    bf16 = (torch.randn(4, 50, generator=gen) * 4).bfloat16()  # a model's own dtype: coarse, ties
    big = torch.randn(2, 49152, generator=gen) * 2.5  # SmolLM2's vocabulary size
    return {"wide": wide, "ties": ties, "peaked": peaked, "masked": masked, "bf16": bf16, "big": big}


BATCHES = logit_batches()


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_filter_logits_equals_transformers_warpers(name: str, temperature: float) -> None:
    logits = BATCHES[name]
    filtered = 0
    for top_k in TOP_K:
        for top_p in TOP_P:
            got = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            want = reference_filter(logits, temperature, top_k, top_p)
            where = f"{name}, temperature={temperature}, top_k={top_k}, top_p={top_p}"
            assert got.dtype == torch.float32, where
            assert torch.equal(got.isfinite(), want.isfinite()), where  # the same kept set
            assert torch.equal(got, want), where  # the same kept values, -inf elsewhere
            assert bool(got.isfinite().any(-1).all()), where  # at least one token always stays
            filtered += int((want.isfinite() != logits.isfinite()).any())
    assert filtered > 0  # the grid really exercises the filters


def test_top_p_threshold_and_ties_follow_transformers() -> None:
    """The corner cases themselves: mass exactly at the threshold, ties across it."""
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    logits = probs.log()  # exact powers of two: cumulative sums hit top_p exactly
    for top_p in (0.5, 0.75, 0.875, 0.25, 0.7, 0.8, 0.0):
        for top_k in (None, 1, 2, 3, 4):
            got = filter_logits(logits, top_k=top_k, top_p=top_p)
            want = reference_filter(logits, 1.0, top_k, top_p)
            assert torch.equal(got, want), (top_k, top_p)


def test_filter_logits_rejects_bad_settings() -> None:
    logits = BATCHES["wide"]
    for kwargs in (
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"top_k": -1},
        {"top_p": 1.5},
        {"top_p": -0.1},
    ):
        with pytest.raises(HubquantError):
            filter_logits(logits, **kwargs)


@pytest.fixture(scope="module")
def llama(hf_checkpoint):
    folder, hf = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype=torch.float32, progress=False)
    return model, hf


SETTINGS = [
    {"temperature": 0.8, "top_k": 8, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 0, "top_p": 0.5},
    {"temperature": 1.0, "top_k": 3, "top_p": 1.0},
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampling_is_reproducible_and_draws_only_kept_tokens(llama, settings) -> None:
    model, hf = llama
    prompt = sample_ids(batch=2, seq=6, seed=7)

    def sample(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(
            prompt, max_new_tokens=16, do_sample=True, eos_ids=[], generator=gen, **settings
        )

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))
    # Every drawn token is one transformers' warpers keep, given transformers' own logits.
    with torch.no_grad():
        logits = hf(first).logits[:, prompt.shape[1] - 1 : -1]
    for step in range(logits.shape[1]):
        kept = reference_filter(logits[:, step], **settings).isfinite()
        drawn = first[:, prompt.shape[1] + step]
        assert bool(kept.gather(1, drawn[:, None]).all()), step
        if settings["top_k"]:
            assert int(kept.sum(-1).max()) <= settings["top_k"]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampled_tokens_equal_transformers_generate_with_the_same_seed(llama, settings) -> None:
    """Same filters, same softmax, same `torch.multinomial` draws from the global generator."""
    model, hf = llama
    prompt = sample_ids(batch=2, seq=6, seed=9)
    hf.generation_config.eos_token_id = None
    torch.manual_seed(1234)
    with torch.no_grad():
        want = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=16,
            do_sample=True,
            min_p=None,
            typical_p=None,
            **settings,
        )
    torch.manual_seed(1234)
    got = model.generate(prompt, max_new_tokens=16, do_sample=True, eos_ids=[], **settings)
    assert torch.equal(got, want)


def test_top_k_one_is_greedy(llama) -> None:
    model, _ = llama
    prompt = sample_ids(batch=2, seq=6, seed=3)
    gen = torch.Generator().manual_seed(0)
    sampled = model.generate(
        prompt, max_new_tokens=12, do_sample=True, temperature=1.7, top_k=1, eos_ids=[], generator=gen
    )
    assert torch.equal(sampled, model.generate(prompt, max_new_tokens=12, eos_ids=[]))


def test_generate_checks_sampling_settings_before_running(llama) -> None:
    model, _ = llama
    with pytest.raises(HubquantError, match="top_p"):
        model.generate(sample_ids(1, 4), max_new_tokens=2, do_sample=True, top_p=2.0)


def test_greedy_pick_of_bf16_logits_is_their_argmax_ties_first() -> None:
    """Greedy decoding picks in fp32 (faster on the CPU): the same index as bf16's own argmax,
    the first of tied maxima included."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 49152, generator=gen) * 4).bfloat16()  # coarse: many ties
    logits[0, 7] = logits[0, 9000] = logits[0].max() + 1  # an exact tie at the top
    picked = _pick(logits, False, 1.0, None, None, None)
    assert torch.equal(picked, logits.argmax(-1))
    assert picked[0].item() == 7
