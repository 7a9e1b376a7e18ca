"""Perplexity and agreement with the base model, in one pass over the same windows.

Two ways to cut the text into windows:
- `chunks` (llama.cpp's perplexity tool): non-overlapping windows of `ctx` tokens (a leftover
  shorter than `ctx` is dropped), BOS put first in each window when the model expects one, and the
  second half of each window scored, so every scored token has at least ctx/2 tokens of context.
- `sliding` (the transformers guide): windows of `ctx` tokens starting every `stride` tokens; each
  window scores only the tokens no earlier window scored.

For every scored token the variant's log-probabilities (log-softmax in fp32, whatever the model's
dtype) are compared with the base model's on the same window: KL(base || variant), whether both
pick the same top token, and the change in the probability of the correct token. The base's
forward is recomputed for each variant rather than stored, so only the base and one variant are
ever resident, and no file of logits is written; the cost is one extra forward per window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hubquant.errors import HubquantError

PPL_METHODS = ("chunks", "sliding")


@dataclass(frozen=True)
class Window:
    """One forward's input and which of its positions are scored."""

    ids: torch.Tensor  # [length] token ids
    first: int  # index of the first scored token: tokens first..length-1 are predicted


def windows(
    ids: torch.Tensor,
    *,
    method: str = "chunks",
    ctx: int = 512,
    stride: int | None = None,
    max_chunks: int | None = None,
    bos_id: int | None = None,
) -> list[Window]:
    """Cut a 1-D token sequence into scoring windows.

    Args:
        ids: the whole text's tokens (no BOS: it is placed per window for `chunks`).
        method: "chunks" or "sliding".
        ctx: tokens per window.
        stride: `sliding` only: tokens between window starts (default ctx // 2).
        max_chunks: keep at most this many windows (the first ones).
        bos_id: for `chunks`, put this token first in each window (as llama.cpp does), or None.
    """
    if method not in PPL_METHODS:
        raise HubquantError(f"--ppl-method '{method}' is unknown; use one of {', '.join(PPL_METHODS)}")
    if ctx < 4:
        raise HubquantError(f"--ctx must be at least 4 tokens (got {ctx})")
    if max_chunks is not None and max_chunks < 1:
        raise HubquantError(f"--max-chunks must be at least 1 (got {max_chunks})")
    out: list[Window] = []
    n = ids.numel()
    if method == "chunks":
        if stride is not None:
            raise HubquantError("--stride applies to --ppl-method sliding only")
        for start in range(0, n - ctx + 1, ctx):
            chunk = ids[start : start + ctx].clone()
            if bos_id is not None:
                chunk[0] = bos_id
            out.append(Window(chunk, ctx // 2))
            if max_chunks is not None and len(out) >= max_chunks:
                break
    else:
        stride = ctx // 2 if stride is None else stride
        if not 0 < stride <= ctx:
            raise HubquantError(f"--stride must be in 1..ctx ({ctx}), got {stride}")
        prev_end = 0
        for begin in range(0, n, stride):
            end = min(begin + ctx, n)
            first = max(prev_end, begin + 1) - begin
            if end - begin > first:
                out.append(Window(ids[begin:end], first))
            prev_end = end
            if end == n or (max_chunks is not None and len(out) >= max_chunks):
                break
    if not out:
        raise HubquantError(
            f"the text has {n} tokens, fewer than one window of --ctx {ctx}; use a longer text or a smaller --ctx"
        )
    return out


@dataclass
class Scores:
    """Per-token figures of one model (and, with a base, its agreement) over the scored tokens."""

    nll: torch.Tensor  # [tokens] negative log-likelihood of the correct token, nats
    kld: torch.Tensor | None = None  # [tokens] KL(base || variant), nats
    same_top1: torch.Tensor | None = None  # [tokens] bool
    dp: torch.Tensor | None = None  # [tokens] p_variant(correct) - p_base(correct)

    def summary(self) -> dict[str, float | None]:
        """Perplexity with its standard error (as llama.cpp states it), and agreement statistics."""
        n = self.nll.numel()
        mean = self.nll.double().mean().item()
        ppl = math.exp(mean)
        sd = self.nll.double().std().item() if n > 1 else 0.0
        out: dict[str, float | None] = {"ppl": ppl, "ppl_err": ppl * sd / math.sqrt(n), "nll": mean}
        if self.kld is not None:
            kld = self.kld.double()
            out.update(
                kld_mean=kld.mean().item(),
                kld_err=(kld.std().item() / math.sqrt(n)) if n > 1 else 0.0,
                kld_median=kld.median().item(),
                kld_p99=torch.quantile(kld, 0.99).item() if n > 1 else kld.item(),
                kld_max=kld.max().item(),
                top1_agreement=self.same_top1.double().mean().item(),
                dp_rms=self.dp.double().pow(2).mean().sqrt().item(),
            )
        return out


Forward = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def score(
    model: Forward,
    wins: list[Window],
    *,
    base: Forward | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "scoring",
) -> Scores:
    """Score `wins` with `model` (called as `model(ids[None])` -> logits `[1, len, vocab]`), and,
    given `base`, compare each window's log-probabilities with the base's on the same window.

    Args:
        model: the model (or variant) to score.
        wins: from `windows()`.
        base: the base model, for agreement; None scores `model` alone.
        device: where the ids go.
        progress: show a progress bar.
        desc: the progress bar's label.
    """
    from tqdm.auto import tqdm

    nll, kld, same, dp = [], [], [], []
    for win in tqdm(wins, desc=desc, disable=not progress, leave=False):
        ids = win.ids.to(device)[None]
        targets = ids[0, win.first :]
        logp = _logprobs(model, ids, win.first)
        nll.append(-logp.gather(-1, targets[:, None])[:, 0].cpu())
        if base is not None:
            base_logp = logp if base is model else _logprobs(base, ids, win.first)
            # KL(base || variant) = sum_v p_base (log p_base - log p_variant); 0 * log 0 counts 0.
            kld.append(F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1).cpu())
            same.append((logp.argmax(-1) == base_logp.argmax(-1)).cpu())
            p_var = logp.gather(-1, targets[:, None])[:, 0].exp()
            p_base = base_logp.gather(-1, targets[:, None])[:, 0].exp()
            dp.append((p_var - p_base).cpu())
    cat = torch.cat
    if base is None:
        return Scores(cat(nll))
    return Scores(cat(nll), cat(kld), cat(same), cat(dp))


def _logprobs(model: Forward, ids: torch.Tensor, first: int) -> torch.Tensor:
    """fp32 log-probabilities of the tokens at positions first.. (predicted from first-1..)."""
    logits = model(ids)[0, first - 1 : ids.shape[1] - 1]
    return torch.log_softmax(logits.float(), dim=-1)
