"""`hubquant eval` for encoders (BERT): pseudo-perplexity of a masked-LM head, or the agreement of
an embedder's sentence vectors with the base's; encode throughput and memory for both.

`run_eval` calls `run_encoder_eval` when the checkpoint's family builds an encoder (its config's
kind is "encoder"); everything else is the decoders' pipeline, shared: each variant is made with
`quantize_checkpoint` into OUT/variants/NAME as it would ship, loaded as any checkpoint is, measured
against the base (only the base and one variant resident), and written as one row of the same
results.json (atomically, resumable). The header's `task` says which figures the rows hold:
"masked-lm" or "embedding" (decoders: "causal-lm").

Masked LM (the checkpoint has an MLM head: BertForMaskedLM, BertForPreTraining)
    windows    The dataset text's tokens (no special tokens) are cut into consecutive pieces of
               ctx - 2 tokens (a shorter leftover is dropped), each put between the tokenizer's
               own [CLS] and [SEP]: windows of `ctx` tokens (default 128, at most the model's
               positions).
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
    agreement  The base's forward on the same masked windows (recomputed per variant, as for
               decoders): KL(base || variant), top-1 agreement and the RMS change of the original
               token's probability, over the masked positions. The verdict judges these
               (`max_kld`, `min_top1`), exactly as for decoders.

Embedder (no MLM head: BertModel, e.g. a sentence-transformers folder)
    sentences  `SENTENCE_RULE`: the text's paragraphs (blocks between blank lines, so that
               hard-wrapped lines join up), whitespace collapsed, split after . ! or ? followed by
               a space; a piece of 20..300 characters with at least 3 words is kept the first time
               it occurs; the first `max_sentences` (default 512) are used.
    vectors    `hubquant.embed` with the base checkpoint's declared pipeline (pooling,
               normalisation, truncation, lower-casing) for the base and every variant: the
               variants are the same model, so the base's pipeline and tokenizer are applied to
               each (a variant folder declaring another pipeline gets a note in its row).
    cosine     Per sentence, cos(base vector, variant vector) in float64: mean and minimum.
    neighbours For each sentence, its k = min(10, sentences - 1) nearest other sentences by cosine,
               under the base's vectors and under the variant's; |overlap| / k, averaged over the
               sentences (`nn_agreement`, 0..1).
    verdict    A variant passes when its mean cosine is at least `min_cosine` (default 0.99).

Speed and memory (both)
    encode     Sequences/s of one forward (the model's call: MLM logits with a head, else the last
               hidden state) over a batch of 32 x 128 tokens (the length capped at the model's
               positions): ids drawn at random (seed 0) from the dataset text's own tokens, [CLS]
               first and [SEP] last, attention mask all ones; one warm-up, then the median of 3
               timed runs (± their standard deviation), on the device of the run.
    memory     As for decoders: disk bytes of the variant's safetensors, runtime weight bytes, peak
               RSS (and CUDA peaks) while the variant was measured, load time.
"""

from __future__ import annotations

import gc
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hubquant.errors import HubquantError
from hubquant.models import load
from hubquant.models.checkpoint import read_config
from hubquant.models.encoder import Encoder
from hubquant.models.tokenizer import read_tokenizer_config
from hubquant.reports import write_report

from .driver import environment, folder_bytes, resume, start_row
from .results import Row, results_header, save_results, verdict
from .scoring import Scores
from .speed import measure_encode_speed, peak_rss_bytes, weight_bytes

if TYPE_CHECKING:
    from hubquant.models.tokenizer import Tokenizer

    from .data import Text

MASK_SEED = 0
MASK_RATE = 0.15
DEFAULT_ENCODER_CTX = 128
DEFAULT_MAX_SENTENCES = 512
SENTENCE_CHARS = (20, 300)
NN_K = 10
ENCODE_BATCH, ENCODE_LENGTH = 32, 128
SPEED_RUNS = 3
SCORE_BATCH = 8  # windows per forward when scoring (all windows have the same length)

PPPL_METHOD = (
    "pseudo-perplexity, 15% masked per pass, one pass per window: BERT's masked-LM objective "
    "(all picked tokens of a window masked at once, every masked token scored); not Salazar et "
    "al.'s pseudo-log-likelihood, which masks one token at a time"
)
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


# -- the run ------------------------------------------------------------------------------------------------


def check_encoder_settings(
    task: str,
    *,
    ctx: int | None,
    max_position: int,
    ppl_method: str,
    stride: int | None,
    max_chunks: int | None,
    max_tokens: int | None,
    max_sentences: int | None,
    tasks: list[str] | None,
    variants: list[str],
) -> None:
    """The flags that mean nothing for this encoder, refused with the fix (one line each)."""
    if ppl_method != "chunks" or stride is not None:
        raise HubquantError(
            "--ppl-method/--stride apply to decoders; an encoder is scored by pseudo-perplexity "
            "(masked-LM) or sentence-vector agreement: drop them"
        )
    if tasks:
        raise HubquantError("--tasks (lm-eval) needs a causal LM; drop --tasks for an encoder")
    gguf = [v for v in variants if v.startswith("gguf:")]
    if gguf:
        raise HubquantError(f"variant {gguf[0]}: GGUF variants are decoders only; drop it for an encoder")
    if task == "embedding":
        given = [
            f for f, v in (("--ctx", ctx), ("--max-chunks", max_chunks), ("--max-tokens", max_tokens)) if v
        ]
        if given:
            raise HubquantError(
                f"{given[0]} applies to text windows, and this encoder has no masked-LM head (an embedder, "
                "judged on sentences); drop it, or use --max-sentences"
            )
        if max_sentences is not None and max_sentences < 2:
            raise HubquantError(f"--max-sentences {max_sentences}: neighbours need at least 2 sentences")
    else:
        if max_sentences is not None:
            raise HubquantError(
                "--max-sentences applies to embedders; this encoder has a masked-LM head, scored on "
                "windows: use --max-chunks"
            )
        if ctx is not None and ctx > max_position:
            raise HubquantError(
                f"--ctx {ctx} is longer than the model's {max_position} positions; pass --ctx {max_position} or less"
            )


def run_encoder_eval(
    *,
    folder: Path,
    model_id: str,
    family: Any,
    text: Text,
    out_path: Path,
    variants: list[str],
    ctx: int | None,
    max_chunks: int | None,
    max_tokens: int | None,
    max_sentences: int | None,
    ppl_method: str,
    stride: int | None,
    tasks: list[str] | None,
    dtype: str,
    target_dtype: torch.dtype,
    device: torch.device,
    speed: bool,
    force: bool,
    max_kld: float,
    min_top1: float,
    min_cosine: float,
    progress: bool,
) -> dict[str, Any]:
    """The encoder branch of `run_eval` (see the module docstring): same arguments, same files.

    Returns:
        The results, as written to OUT/results.json.
    """

    cfg = family.config(read_config(folder))
    task = "masked-lm" if cfg.mlm_head else "embedding"
    check_encoder_settings(
        task,
        ctx=ctx,
        max_position=cfg.max_position,
        ppl_method=ppl_method,
        stride=stride,
        max_chunks=max_chunks,
        max_tokens=max_tokens,
        max_sentences=max_sentences,
        tasks=tasks,
        variants=variants,
    )
    start = time.perf_counter()
    base, tokenizer = load(folder, dtype=target_dtype, device=device, progress=progress)
    base_load_s = time.perf_counter() - start
    if not isinstance(base, Encoder) or tokenizer is None:
        raise HubquantError(f"{model_id} did not load as an encoder with a tokenizer; check its config.json")
    prefix, suffix = framing(tokenizer)
    length = min(ENCODE_LENGTH, cfg.max_position)

    method: dict[str, Any]
    wins: list[MaskedWindow] = []
    sentences: list[str] = []
    if task == "masked-lm":
        mask_id = mask_token_id(tokenizer, folder)
        ctx = min(DEFAULT_ENCODER_CTX, cfg.max_position) if ctx is None else ctx
        ids = torch.tensor(tokenizer.encode(text.text, add_special_tokens=False), dtype=torch.long)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        wins = mask_windows(
            ids, ctx=ctx, prefix=prefix, suffix=suffix, mask_id=mask_id, max_chunks=max_chunks
        )
        masked = sum(w.positions.numel() for w in wins)
        method = {
            "pppl_method": PPPL_METHOD, "ctx": ctx, "windows": len(wins), "max_chunks": max_chunks,
            "max_tokens": max_tokens, "mask_rate": MASK_RATE, "mask_seed": MASK_SEED,
            "tokens_masked": masked, "dtype": dtype, "log_softmax": "fp32",
            "kld": "KL(base || variant) over the masked positions, base forward recomputed per variant",
        }  # fmt: skip
        budget: dict[str, float] = {"max_kld": max_kld, "min_top1": min_top1}
        text_ids = ids
        summary = (
            f"{len(wins)} windows of {ctx} tokens, {masked} tokens masked "
            f"({MASK_RATE:.0%} per window, seed {MASK_SEED})"
        )
    else:
        limit = DEFAULT_MAX_SENTENCES if max_sentences is None else max_sentences
        sentences = split_sentences(text.text, limit)
        if len(sentences) < 2:
            raise HubquantError(
                f"{text.name} has {len(sentences)} sentences of {SENTENCE_CHARS[0]}..{SENTENCE_CHARS[1]} "
                "characters; an embedder needs at least 2: use a longer --dataset"
            )
        sentence = getattr(base, "sentence", None)
        method = {
            "sentence_rule": SENTENCE_RULE, "sentences": len(sentences), "max_sentences": limit,
            "pooling": sentence.describe() if sentence is not None else None,
            "nn_k": min(NN_K, len(sentences) - 1), "cosine": "per sentence against the base's vector, float64",
            "dtype": dtype,
        }  # fmt: skip
        budget = {"min_cosine": min_cosine}
        text_ids = torch.tensor(
            tokenizer.encode(" ".join(sentences), add_special_tokens=False), dtype=torch.long
        )
        summary = f"{len(sentences)} sentences, top-{method['nn_k']} neighbours"
    method.update(speed_runs=SPEED_RUNS if speed else 0, encode_batch=ENCODE_BATCH, encode_length=length)
    header = results_header(
        task=task, model_id=model_id, folder=folder, family=family.name, text=text, method=method,
        environment=environment(device), budget=budget,
    )  # fmt: skip
    results_path = out_path / "results.json"
    rows = resume(results_path, header, force)
    done = {r.variant for r in rows}

    def save() -> dict[str, Any]:
        judged = verdict(rows, max_kld, min_top1, min_cosine=min_cosine if task == "embedding" else None)
        return save_results(results_path, header, rows, judged)

    print(
        f"hubquant eval {model_id} ({task}): {summary}; {text.name} sha256 {text.sha256[:12]}; {dtype} on {device}"
    )
    base_vectors = None
    if task == "embedding":
        from hubquant.models.embed import embed

        base_vectors = embed(base, sentences, batch_size=ENCODE_BATCH, progress=progress)
    timing_ids = speed_ids(text_ids, prefix, suffix, ENCODE_BATCH, length) if speed else None
    results = save()
    for variant in variants:
        if variant in done:
            print(f"{variant:10} already in {results_path}; skipped (use --force to redo)")
            continue
        row = _measure_encoder(
            variant,
            task=task,
            base=base,
            base_load_s=base_load_s,
            folder=folder,
            out=out_path,
            wins=wins,
            sentences=sentences,
            base_vectors=base_vectors,
            timing_ids=timing_ids,
            dtype=target_dtype,
            device=device,
            progress=progress,
        )
        rows.append(row)
        results = save()
        print(encoder_line(row, task))
    write_report(results, out_path)
    print(results["verdict"]["text"])
    print(f"results: {results_path}")
    return results


def _measure_encoder(
    variant: str,
    *,
    task: str,
    base: Encoder,
    base_load_s: float,
    folder: Path,
    out: Path,
    wins: list[MaskedWindow],
    sentences: list[str],
    base_vectors: torch.Tensor | None,
    timing_ids: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
) -> Row:
    row, model, vfolder = start_row(variant, base, base_load_s, folder, out, dtype, device, progress)
    if variant != "base":
        if not isinstance(model, Encoder):
            raise HubquantError(
                f"variant {variant} in {vfolder} did not load as an encoder; remake it with --force"
            )
        # The same model: the base's tokenizer and sentence pipeline apply to every variant.
        declared = getattr(model, "sentence", None)
        if task == "embedding" and declared is not None and declared != base.sentence:
            row.notes.append(
                f"the variant's folder declares {declared.describe()}; measured with the base's "
                f"{base.sentence.describe()}"
            )
        model.sentence = base.sentence
        model.tokenizer = base.tokenizer
    if task == "masked-lm":
        s = score_masked(model, wins, base=base, device=device, progress=progress, desc=f"score {variant}")
        summary = s.summary()
        row.pppl, row.pppl_err = summary.pop("ppl"), summary.pop("ppl_err")
        row.masked_tokens = s.nll.numel()
        for key, value in summary.items():
            setattr(row, key, value)
    else:
        from hubquant.models.embed import embed

        assert base_vectors is not None
        vectors = (
            base_vectors
            if model is base
            else embed(model, sentences, batch_size=ENCODE_BATCH, progress=progress)
        )
        for key, value in embedding_agreement(base_vectors, vectors).items():
            setattr(row, key, value)
    if timing_ids is not None:
        for key, value in measure_encode_speed(model, timing_ids, runs=SPEED_RUNS, device=device).items():
            setattr(row, key, value)
    row.disk_bytes = folder_bytes(vfolder)
    row.weight_bytes = weight_bytes(model)
    row.peak_rss_bytes = peak_rss_bytes()
    if device.type == "cuda":
        row.cuda_peak_allocated_bytes = torch.cuda.max_memory_allocated(device)
        row.cuda_peak_reserved_bytes = torch.cuda.max_memory_reserved(device)
    if model is not base:
        del model
        gc.collect()
    return row


def encoder_line(row: Row, task: str) -> str:
    """One printed line per measured variant."""

    def f(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    if task == "masked-lm":
        quality = (
            f"PPPL {f(row.pppl, '.3f')} ± {f(row.pppl_err, '.3f')}  KLD {f(row.kld_mean, '.5f')} nats  "
            f"top-1 {f(row.top1_agreement and row.top1_agreement * 100, '.1f')}%"
        )
    else:
        quality = (
            f"cosine mean {f(row.cos_mean, '.5f')} min {f(row.cos_min, '.5f')}  "
            f"NN agreement {f(row.nn_agreement and row.nn_agreement * 100, '.1f')}%"
        )
    return (
        f"{row.variant:10} {quality}  encode {f(row.encode_seq_s, '.1f')} seq/s  "
        f"disk {f(row.disk_bytes and row.disk_bytes / 1e6, '.1f')} MB"
    )
