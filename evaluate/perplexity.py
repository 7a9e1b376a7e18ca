"""Sliding-window perplexity, the method transformers documents and llama.cpp's tool resembles.

Windows of `window` tokens start every `stride` tokens; each window scores only the tokens that
no earlier window scored, so every token after the first is scored once, with up to
`window - stride` tokens of context before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hubquant.errors import HubquantError


def pydoc_text() -> str:
    """Real English text that ships with CPython: its own documentation topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored
    windows: int
    window: int
    stride: int

    def method(self) -> str:
        return (
            f"{self.tokens} tokens scored, window {self.window}, stride {self.stride}, {self.windows} windows"
        )


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on the 1-D token sequence `ids`.

    Args:
        model: called as `model(input_ids, attention_mask)` -> logits `[batch, seq, vocab]`.
        ids: token ids, bos included if the model expects one.
        window: tokens per forward, 2 or more.
        stride: tokens between window starts, 1 to `window`.
        batch_size: windows per forward; the last, shorter window is right-padded.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    # A window scores each token from the ones before it, so it needs two tokens at least; a
    # stride past the window would leave tokens between windows unscored.
    if window < 2:
        raise HubquantError(f"perplexity window is {window} tokens; it must be 2 or more (--window)")
    if not 1 <= stride <= window:
        raise HubquantError(
            f"perplexity stride is {stride} tokens; it must be between 1 and the window, {window} "
            "(--stride, --window)"
        )
    n = ids.numel()
    if n < 2:
        raise HubquantError(f"perplexity needs at least 2 tokens of text, got {n}; pass more text")
    spans = []  # (begin, end, tokens to score at the end of the window)
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        spans.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", disable=not progress, leave=False):
        group = spans[i : i + batch_size]
        width = max(end - begin for begin, end, _ in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, (begin, end, _) in enumerate(group):
            batch[row, : end - begin], mask[row, : end - begin] = ids[begin:end], 1
        logits = model(batch.to(device), mask.to(device)).float()
        for row, (begin, end, scored) in enumerate(group):
            length = end - begin
            pred, target = logits[row, length - 1 - scored : length - 1], batch[row, length - scored : length]
            total_nll += F.cross_entropy(pred, target.to(device), reduction="sum").item()
            total_tokens += scored
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, len(spans), window, stride)
