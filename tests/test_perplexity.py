"""Perplexity against transformers' own loss on the same windows of the same text."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB

import hubquant
from hubquant.evaluate import perplexity, pydoc_text

pytestmark = pytest.mark.filterwarnings("ignore")


def text_ids(n: int) -> torch.Tensor:
    """Real text (CPython's docs) folded into the tiny vocabulary, byte by byte."""
    data = pydoc_text().encode()[:n]
    return torch.tensor([b % (VOCAB - 3) + 3 for b in data])


def transformers_perplexity(hf, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """transformers' documented recipe: labels masked to -100 outside each window's new tokens."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, : -(end - prev_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += hf(x, labels=labels).loss.item() * scored
        count += scored
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize(
    "case,window,stride", [("llama_gqa", 32, 16), ("phi_partial", 24, 24), ("gemma_mqa", 40, 7)]
)
def test_perplexity_matches_transformers(case, window, stride, hf_checkpoint):
    folder, hf = hf_checkpoint(case)
    model, _ = hubquant.load(folder, dtype=torch.float32, progress=False)
    ids = text_ids(301)
    ours = perplexity(model, ids, window=window, stride=stride, progress=False)
    want, count = transformers_perplexity(hf, ids, window, stride)
    assert ours.tokens == count
    if stride < window:
        assert count == 300  # every token after the first is scored exactly once
    assert ours.perplexity == pytest.approx(want, rel=1e-5)
    assert ours.perplexity > 1.0
