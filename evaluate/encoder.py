"""The numerics of the encoder tasks (`evaluate/tasks/masked_lm.py`, `evaluate/tasks/embedding.py`):
masked windows and their scoring, sentences and the agreement of their vectors, the timed batch.

Masked LM
    windows    The dataset text's tokens (no special tokens) are cut into consecutive pieces of
               ctx - 2 tokens (a shorter leftover is dropped), each put between the tokenizer's
               own [CLS] and [SEP]: windows of `ctx` tokens.
    masking    One `torch.Generator` seeded with `MASK_SEED` (0), drawn from in window order: in
               each window, k = max(1, round(0.15 * n)) of its n non-special positions are picked
               (`torch.randperm(n)[:k]`), and all k are replaced by [MASK] at once.
    scoring    One forward pass per window; every masked token is scored: its negative
               log-likelihood under the MLM head's log-softmax (fp32) at its position.
               PPPL = exp(mean NLL over the masked tokens), with the standard error
               PPPL * sd(NLL) / sqrt(count), as the decoders' perplexity states it.
               This is BERT's own objective, "pseudo-perplexity, 15% masked per pass, one pass per
               window"; it is NOT Salazar et al.'s (2020) pseudo-log-likelihood, which masks one
               token at a time (one pass per token, every token scored with all others visible).
               Here each masked token is predicted with the window's other masked tokens hidden
               too, so the figure is higher than a PLL-based one; it compares variants, not papers.
    agreement  The base's log-probabilities at the same masked positions: KL(base || variant),
               top-1 agreement and the change of the original token's probability.

Embedder
    sentences  `SENTENCE_RULE`: the text's paragraphs (blocks between blank lines, so that
               hard-wrapped lines join up), whitespace collapsed, split after . ! or ? followed by
               a space; a piece of 20..300 characters with at least 3 words is kept the first time
               it occurs.
    cosine     Per sentence, cos(base vector, variant vector) in float64: mean and minimum.
    neighbours For each sentence, its k = min(10, sentences - 1) nearest other sentences by cosine,
               under the base's vectors and under the variant's; |overlap| / k, averaged over the
               sentences (`nn_agreement`, 0..1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hubquant.errors import HubquantError
from hubquant.models.encoder import Encoder
from hubquant.models.tokenizer import read_tokenizer_config

from .scoring import Scores

if TYPE_CHECKING:
    from hubquant.models.tokenizer import Tokenizer


MASK_SEED = 0
MASK_RATE = 0.15
DEFAULT_MAX_SENTENCES = 512
SENTENCE_CHARS = (20, 300)
NN_K = 10
SCORE_BATCH = 8  # windows per forward when scoring (all windows have the same length)

SENTENCE_WORDS = 3
SENTENCE_RULE = (
    "paragraphs of the text (blocks between blank lines), whitespace collapsed, split after . ! or ? "
    f"and a space; pieces of {SENTENCE_CHARS[0]}..{SENTENCE_CHARS[1]} characters and at least "
    f"{SENTENCE_WORDS} words, each kept once, in text order"
)


# -- masked LM ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedWindow:
    """One forward's input with its masked positions.

    Attributes:
        ids: `[ctx]` the window with [MASK] at `positions`.
        positions: `[k]` the masked positions (ascending), indices into `ids`.
        targets: `[k]` the original tokens at those positions.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor


def framing(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """What the tokenizer puts before and after a text: ([CLS], [SEP]) for BERT, as its
    post-processor adds them (found by encoding a word with and without special tokens).

    Args:
        tokenizer: the checkpoint's tokenizer.
    """
    backend = tokenizer.backend
    plain = backend.encode("hello", add_special_tokens=False).ids
    full = backend.encode("hello", add_special_tokens=True).ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    return full[:start], full[start + len(plain) :]


def mask_token_id(tokenizer: Tokenizer, folder: Path) -> int:
    """The [MASK] id: the token tokenizer_config.json names as mask_token, else "[MASK]".

    Args:
        tokenizer: the checkpoint's tokenizer.
        folder: the checkpoint folder.

    Raises:
        HubquantError: the tokenizer has no mask token.
    """

    mask = read_tokenizer_config(folder).get("mask_token")
    mask = mask.get("content") if isinstance(mask, dict) else mask
    mask_id = tokenizer.backend.token_to_id(mask) if isinstance(mask, str) else None
    if mask_id is None:
        mask_id = tokenizer.backend.token_to_id("[MASK]")
    if mask_id is None:
        raise HubquantError(
            f"the tokenizer in {folder} has no mask token; set mask_token in its tokenizer_config.json "
            "to score the masked-LM head"
        )
    return int(mask_id)


def mask_windows(
    ids: torch.Tensor,
    *,
    ctx: int,
    prefix: list[int],
    suffix: list[int],
    mask_id: int,
    rate: float = MASK_RATE,
    seed: int = MASK_SEED,
    max_chunks: int | None = None,
) -> list[MaskedWindow]:
    """Cut a text's tokens into windows and mask them (the rule in the module docstring).

    Args:
        ids: the whole text's tokens, no special tokens.
        ctx: tokens per window, special tokens included.
        prefix, suffix: the special tokens put before and after each window's text ([CLS], [SEP]).
        mask_id: the [MASK] token.
        rate: share of each window's text tokens masked.
        seed: the generator's seed; the same seed gives the same masks.
        max_chunks: keep at most this many windows (the first ones).
    """
    width = ctx - len(prefix) - len(suffix)
    if width < 1:
        raise HubquantError(
            f"--ctx {ctx} leaves no room for text between the special tokens; use a larger --ctx"
        )
    gen = torch.Generator().manual_seed(seed)
    head, tail = torch.tensor(prefix, dtype=torch.long), torch.tensor(suffix, dtype=torch.long)
    out: list[MaskedWindow] = []
    for start in range(0, ids.numel() - width + 1, width):
        if max_chunks is not None and len(out) >= max_chunks:
            break
        window = torch.cat([head, ids[start : start + width].long(), tail])
        k = max(1, round(rate * width))
        positions = torch.randperm(width, generator=gen)[:k].sort().values + len(prefix)
        targets = window[positions].clone()
        window[positions] = mask_id
        out.append(MaskedWindow(window, positions, targets))
    if not out:
        raise HubquantError(
            f"the text has {ids.numel()} tokens, fewer than one window of --ctx {ctx}; "
            "use a longer text or a smaller --ctx"
        )
    return out


def _masked_logprobs(
    model: Encoder, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """fp32 log-probabilities `[masked, vocab]` of the MLM head at the masked positions only (the
    head is applied to those positions alone: the vocabulary projection of every token is waste)."""
    hidden = model.hidden_states(ids)
    logits = model.mlm_logits(hidden[rows, cols])
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def score_masked(
    model: Encoder,
    wins: list[MaskedWindow],
    *,
    base: Encoder | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = SCORE_BATCH,
    progress: bool = True,
    desc: str = "scoring",
) -> Scores:
    """Score every masked token of `wins` with `model`'s MLM head and, given `base`, compare its
    log-probabilities with the base's at the same positions (KLD, top-1, change in p(target)).

    Args:
        model: the encoder (or variant) to score; it needs an MLM head.
        wins: from `mask_windows()`.
        base: the base model, for agreement; None scores `model` alone.
        device: where the ids go.
        batch_size: windows per forward.
        progress: show a progress bar.
        desc: the progress bar's label.
    """
    from tqdm.auto import tqdm

    nll, kld, same, dp = [], [], [], []
    starts = range(0, len(wins), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        group = wins[start : start + batch_size]
        ids = torch.stack([w.ids for w in group]).to(device)
        rows = torch.cat([torch.full_like(w.positions, i) for i, w in enumerate(group)]).to(device)
        cols = torch.cat([w.positions for w in group]).to(device)
        targets = torch.cat([w.targets for w in group]).to(device)[:, None]
        logp = _masked_logprobs(model, ids, rows, cols)
        nll.append(-logp.gather(-1, targets)[:, 0].cpu())
        if base is not None:
            base_logp = logp if base is model else _masked_logprobs(base, ids, rows, cols)
            kld.append(F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1).cpu())
            same.append((logp.argmax(-1) == base_logp.argmax(-1)).cpu())
            dp.append(
                (logp.gather(-1, targets)[:, 0].exp() - base_logp.gather(-1, targets)[:, 0].exp()).cpu()
            )
    if base is None:
        return Scores(torch.cat(nll))
    return Scores(torch.cat(nll), torch.cat(kld), torch.cat(same), torch.cat(dp))


# -- embedder -----------------------------------------------------------------------------------------------


def split_sentences(text: str, limit: int | None = DEFAULT_MAX_SENTENCES) -> list[str]:
    """The sentences an embedder is judged on (`SENTENCE_RULE`), at most `limit` of them.

    Args:
        text: the dataset's text.
        limit: keep the first `limit` (None: all).
    """
    low, high = SENTENCE_CHARS
    out: list[str] = []
    seen: set[str] = set()
    for paragraph in re.split(r"\n\s*\n", text):
        for piece in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
            if low <= len(piece) <= high and len(piece.split()) >= SENTENCE_WORDS and piece not in seen:
                seen.add(piece)
                out.append(piece)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def nearest(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's `k` nearest other rows by cosine similarity `[n, k]` (float64, self excluded).

    Args:
        vectors: `[n, dim]` sentence vectors.
        k: neighbours per row, below n.
    """
    v = F.normalize(vectors.double(), dim=1)
    sims = v @ v.T
    sims.fill_diagonal_(-math.inf)
    return sims.topk(k, dim=1).indices


def embedding_agreement(base: torch.Tensor, variant: torch.Tensor, k: int = NN_K) -> dict[str, float]:
    """Cosine of each sentence's variant vector to its base vector (mean, min) and the mean overlap
    of their top-k neighbour sets (0..1).

    Args:
        base: `[n, dim]` the base's vectors.
        variant: `[n, dim]` the variant's vectors of the same sentences.
        k: neighbours compared per sentence (capped at n - 1).
    """
    cos = F.cosine_similarity(base.double(), variant.double(), dim=1).clamp(-1.0, 1.0)
    k = min(k, base.shape[0] - 1)
    a, b = nearest(base, k), nearest(variant, k)
    overlap = (a[:, :, None] == b[:, None, :]).any(-1).double().sum(-1) / k
    return {
        "cos_mean": cos.mean().item(),
        "cos_min": cos.min().item(),
        "nn_agreement": overlap.mean().item(),
    }


# -- speed --------------------------------------------------------------------------------------------------


def speed_ids(
    text_ids: torch.Tensor, prefix: list[int], suffix: list[int], batch: int, length: int, seed: int = 0
) -> torch.Tensor:
    """`[batch, length]` ids for the encode timing: drawn at random (seeded) from the text's tokens,
    between the tokenizer's special tokens."""
    width = length - len(prefix) - len(suffix)
    gen = torch.Generator().manual_seed(seed)
    body = text_ids[torch.randint(text_ids.numel(), (batch, width), generator=gen)].long()
    head = torch.tensor(prefix, dtype=torch.long).expand(batch, -1)
    tail = torch.tensor(suffix, dtype=torch.long).expand(batch, -1)
    return torch.cat([head, body, tail], dim=1)
