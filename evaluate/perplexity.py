"""Sliding-window perplexity of one model, the method transformers documents: the public face of
`scoring`, which `hubquant eval` uses too (one implementation of windows and scoring).

Windows of `window` tokens start every `stride` tokens; each window scores only the tokens that
no earlier window scored, so every token after the first is scored once, with up to
`window - stride` tokens of context before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hubquant.errors import HubquantError

from .scoring import score, windows


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


def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 512,
    stride: int = 256,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on the 1-D token sequence `ids`.

    Args:
        model: called as `model(input_ids)` -> logits `[batch, seq, vocab]`.
        ids: token ids, BOS included if the model expects one.
        window: tokens per forward, 4 or more (`scoring.windows` needs that).
        stride: tokens between window starts, 1 to `window`.
        progress: show a progress bar.

    Raises:
        HubquantError: a window or stride out of range, or a text shorter than two tokens.
    """
    # Named as this function's arguments; `windows` checks the rest (a text shorter than a window).
    if window < 4:
        raise HubquantError(f"perplexity window is {window} tokens; it must be 4 or more (--window)")
    if not 1 <= stride <= window:
        raise HubquantError(
            f"perplexity stride is {stride} tokens; it must be between 1 and the window, {window} "
            "(--stride, --window)"
        )
    wins = windows(ids, method="sliding", ctx=window, stride=stride)
    device = next(model.parameters()).device
    scores = score(model, wins, device=device, progress=progress, desc="perplexity")
    summary = scores.summary()
    return PerplexityResult(summary["ppl"], summary["nll"], scores.nll.numel(), len(wins), window, stride)
