"""Masked LM (encoders with an MLM head: BertForMaskedLM, BertForPreTraining): pseudo-perplexity
of the masked tokens, and agreement with the base over the masked positions.

    windows    The text's tokens (no special tokens) cut into consecutive pieces of ctx - 2 tokens
               (a shorter leftover is dropped), each between the tokenizer's own [CLS] and [SEP]:
               windows of `ctx` tokens (default 128, at most the model's positions).
    masking    One generator seeded with 0, drawn from in window order: in each window,
               max(1, round(0.15 * n)) of its n text positions are masked at once
               (`hubquant.evaluate.encoder.mask_windows`).
    scoring    One forward per window; PPPL = exp(mean NLL of the masked tokens) ± its standard
               error. BERT's own objective, not Salazar et al.'s one-token-at-a-time PLL (see
               `PPPL_METHOD`).
    agreement  The base's forward on the same masked windows: KL(base || variant), top-1 agreement
               and the RMS change of the original token's probability, over the masked positions;
               the verdict judges these as for decoders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from hubquant.errors import HubquantError

from .base import (
    DATASET_COLUMNS,
    MB,
    MEMORY,
    SIZE,
    AgreementBudget,
    Figure,
    Label,
    agreement_figures,
    fmt,
    shared,
)
from .encoders import ENCODE, SPEED_COLUMNS, EncoderTask, encode_caption, values

if TYPE_CHECKING:
    from hubquant.evaluate.data import Text
    from hubquant.evaluate.results import Row

DEFAULT_ENCODER_CTX = 128
PPPL_METHOD = (
    "pseudo-perplexity, 15% masked per pass, one pass per window: BERT's masked-LM objective "
    "(all picked tokens of a window masked at once, every masked token scored); not Salazar et "
    "al.'s pseudo-log-likelihood, which masks one token at a time"
)

FIGURES: tuple[Figure, ...] = (
    Figure(
        "pppl",
        "pppl",
        "PPPL",
        err_key="pppl_err",
        err_column="pppl_err",
        meaning="pseudo-perplexity: exp of the mean NLL of the masked tokens (15% masked per pass)",
    ),
    *agreement_figures("masked-token", "masked token", "masked (original) token"),
    Figure("nll", "nll (nats/token)", "NLL", "nats/token", meaning="mean NLL of the masked tokens (ln PPPL)"),
    Figure("masked_tokens", "masked_tokens", "masked", "tokens", meaning="tokens masked and scored"),
)


class MaskedLM(AgreementBudget, EncoderTask):
    """Encoders with a masked-LM head, scored on masked windows (see the module docstring)."""

    name = "masked-lm"
    mlm_head = True
    figures = (*FIGURES, *SIZE, ENCODE, *MEMORY)
    method_labels: ClassVar[dict[str, Label]] = {
        **shared("ctx", "windows", "max_chunks", "max_tokens", "dtype", "log_softmax", "speed_runs", "kld"),
        "pppl_method": Label("pseudo-perplexity method"),
        "mask_rate": Label("masked per window", "% of its text tokens"),
        "mask_seed": Label("mask seed"),
        "tokens_masked": Label("tokens masked and scored"),
        **shared("encode_batch", "encode_length"),
    }
    method_columns = (
        *DATASET_COLUMNS,
        ("method", "ctx", "ctx (tokens)"),
        ("method", "windows", "windows"),
        ("method", "mask_rate", "mask_rate"),
        ("method", "mask_seed", "mask_seed"),
        ("method", "tokens_masked", "tokens_masked"),
        *SPEED_COLUMNS,
    )

    def check(self) -> None:
        super().check()
        s, positions = self.settings, self.checkpoint.spec.max_position
        if s.max_sentences is not None:
            raise HubquantError(
                "--max-sentences applies to embedders; this encoder has a masked-LM head, scored on "
                "windows: use --max-chunks"
            )
        if s.ctx is not None and s.ctx > positions:
            raise HubquantError(
                f"--ctx {s.ctx} is longer than the model's {positions} positions; pass --ctx {positions} or less"
            )

    def prepare(self, base: Any, tokenizer: Any, text: Text) -> dict[str, Any]:
        import torch

        from hubquant.evaluate.encoder import MASK_RATE, MASK_SEED, mask_token_id, mask_windows

        s = self.settings
        self.frame(base, tokenizer)
        mask_id = mask_token_id(tokenizer, self.checkpoint.folder)
        ctx = min(DEFAULT_ENCODER_CTX, self.checkpoint.spec.max_position) if s.ctx is None else s.ctx
        ids = torch.tensor(tokenizer.encode(text.text, add_special_tokens=False), dtype=torch.long)
        if s.max_tokens is not None:
            ids = ids[: s.max_tokens]
        self.windows = mask_windows(
            ids, ctx=ctx, prefix=self.prefix, suffix=self.suffix, mask_id=mask_id, max_chunks=s.max_chunks,
            rate=MASK_RATE, seed=MASK_SEED,
        )  # fmt: skip
        masked = sum(w.positions.numel() for w in self.windows)
        self._headline = (
            f"{len(self.windows)} windows of {ctx} tokens, {masked} tokens masked "
            f"({MASK_RATE:.0%} per window, seed {MASK_SEED})"
        )
        self.time_ids(ids)
        return {
            "pppl_method": PPPL_METHOD, "ctx": ctx, "windows": len(self.windows), "max_chunks": s.max_chunks,
            "max_tokens": s.max_tokens, "mask_rate": MASK_RATE, "mask_seed": MASK_SEED,
            "tokens_masked": masked, "dtype": s.dtype, "log_softmax": "fp32",
            "kld": "KL(base || variant) over the masked positions, base forward recomputed per variant",
            **self.speed_method(),
        }  # fmt: skip

    def headline(self) -> str:
        return self._headline

    def measure(self, model: Any, base: Any, variant: str = "variant") -> dict[str, Any]:
        from hubquant.evaluate.encoder import score_masked

        s = score_masked(
            model, self.windows, base=base, device=self.device, progress=self.settings.progress,
            desc=f"score {variant}",
        )  # fmt: skip
        figures = s.summary()
        figures["pppl"], figures["pppl_err"] = figures.pop("ppl"), figures.pop("ppl_err")
        figures["masked_tokens"] = s.nll.numel()
        return {**figures, **self.measure_speed(model)}

    @classmethod
    def line(cls, row: Row) -> str:
        top1 = row.get("top1_agreement")
        return (
            f"{row.variant:10} PPPL {fmt(row.get('pppl'), '.3f')} ± {fmt(row.get('pppl_err'), '.3f')}  "
            f"KLD {fmt(row.get('kld_mean'), '.5f')} nats  top-1 {fmt(top1 and top1 * 100, '.1f')}%  "
            f"encode {fmt(row.get('encode_seq_s'), '.1f')} seq/s  "
            f"disk {fmt(row.disk_bytes and row.disk_bytes / MB, '.1f')} MB"
        )

    @classmethod
    def caption(cls, results: Any) -> str | None:
        method = results.get("method") or {}
        dataset = (results.get("dataset") or {}).get("name", "—")
        rate = method.get("mask_rate")
        rate_text = f"{100 * rate:g}%" if isinstance(rate, (int, float)) else "—"
        v = values(method)
        return (
            f"PPPL: {v('pppl_method')}. {v('windows')} windows of {v('ctx')} tokens of {dataset} "
            f"([CLS] text [SEP]); {rate_text} of each window's text tokens masked at once, positions "
            f"drawn with seed {v('mask_seed')}; {v('tokens_masked')} masked tokens scored, {v('dtype')}. "
            "KLD is KL(base ‖ variant) and top-1 agreement is over the masked positions; "
            "± is the standard error (PPPL, KLD) or the standard deviation (speed). "
            + encode_caption(results)
        )
