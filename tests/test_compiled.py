"""The compiled decode step (`generate(..., compile=True)`): the same tokens as eager decoding,
its static-shape step the same logits, and a second call reusing the compiled graph."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import sample_ids

import hubquant
from hubquant.errors import HubquantError
from hubquant.models.compiled import advance, static_step

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def gemma(hf_checkpoint):
    """Gemma: embedding scale, unit-offset norms, MQA: the step's every special path."""
    folder, _ = hf_checkpoint("gemma_mqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    return model


def test_static_step_equals_the_eager_step(gemma):
    """The fixed-shape step (every slot read, a mask of the written ones) gives the eager step's
    logits, for a left-padded batch."""
    ids = sample_ids(batch=2, seq=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = hubquant.KVCache(gemma.config, 2, 32, gemma.dtype, "cpu")
    with torch.no_grad():
        gemma(ids, mask, cache)
        static_cache = copy.deepcopy(cache)
        token = torch.tensor([[5], [9]])
        eager = gemma(token, None, cache, last_only=True)[:, -1]
        slot = torch.tensor([static_cache.length])
        static = static_step(gemma, token, static_cache, slot)
        advance(static_cache, slot)
        assert (static - eager).abs().max().item() <= 1e-5
        again_eager = gemma(token, None, cache, last_only=True)[:, -1]
        again_static = static_step(gemma, token, static_cache, slot)
        advance(static_cache, slot)
    assert (again_static - again_eager).abs().max().item() <= 1e-5
    assert static_cache.length == cache.length and torch.equal(static_cache.next_pos, cache.next_pos)


def test_compiled_generation_equals_eager(gemma):
    ids = sample_ids(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    eager = gemma.generate(ids, mask, max_new_tokens=12, eos_ids=[])
    compiled = gemma.generate(ids, mask, max_new_tokens=12, eos_ids=[], compile=True)
    assert torch.equal(eager, compiled)
    start = time.perf_counter()  # another length in the same cache bucket: no new compile
    longer = gemma.generate(ids, mask, max_new_tokens=20, eos_ids=[], compile=True)
    assert time.perf_counter() - start < 5, "the second call compiled again"
    assert torch.equal(longer[:, : eager.shape[1]], eager)


def test_compile_refuses_dynamic_rope(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_dynamic")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    with pytest.raises(HubquantError, match="dynamic-NTK"):
        model.generate(sample_ids(batch=1, seq=4), max_new_tokens=2, compile=True)
