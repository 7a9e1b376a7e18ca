"""Causal LM (decoders): perplexity of the text, and agreement with the base's next-token
distributions on the same windows; decode and prefill speed; lm-eval task scores when asked.

    windows    `evaluate.scoring.windows`: "chunks" (llama.cpp's: non-overlapping windows of ctx
               tokens, the second half of each scored, BOS first when the model needs it) or
               "sliding" (transformers' guide: windows moved by the stride, each token scored once).
    agreement  The base's forward on the same windows, recomputed per variant: KL(base || variant),
               top-1 agreement and the RMS change of the correct token's probability, per scored
               token (log-softmax in fp32). The verdict judges mean KLD and top-1 agreement.
    speed      `evaluate.speed.measure_speed`: prefill and decode tokens/s at batch 1 and time to
               first token, 3 timed runs (mean ± sd) of 128 decode tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from hubquant.errors import HubquantError
from hubquant.texts import TokenSplit

from .base import (
    DATASET_COLUMNS,
    DEVICE_COLUMNS,
    MB,
    MEMORY,
    SIZE,
    AgreementBudget,
    Figure,
    Label,
    Task,
    agreement_figures,
    fmt,
    shared,
)

if TYPE_CHECKING:
    from hubquant.evaluate.data import Text
    from hubquant.evaluate.results import Row
    from hubquant.models.checkpoint import Checkpoint

DEFAULT_CTX = 512
SPEED_RUNS = 3
DECODE_TOKENS = 128

PPL_METHODS = {
    "chunks": "non-overlapping windows of ctx tokens, the second half of each scored (llama.cpp's method)",
    "sliding": "windows of ctx tokens moved by the stride, each token scored once (the transformers guide's method)",
}

QUALITY: tuple[Figure, ...] = (
    Figure("ppl", "ppl", "PPL", err_key="ppl_err", err_column="ppl_err", meaning="perplexity of the text"),
    *agreement_figures("next-token", "scored token", "correct token"),
    Figure("nll", "nll (nats/token)", "NLL", "nats/token", meaning="mean negative log-likelihood (ln PPL)"),
)
SPEED: tuple[Figure, ...] = (
    Figure(
        "decode_tok_s",
        "decode (tok/s)",
        "decode",
        "tok/s",
        err_key="decode_sd",
        err_column="decode_sd (tok/s)",
        meaning="new tokens per second at batch 1",
    ),
    Figure(
        "prefill_tok_s",
        "prefill (tok/s)",
        "prefill",
        "tok/s",
        err_key="prefill_sd",
        err_column="prefill_sd (tok/s)",
        meaning="prompt tokens per second",
    ),
    Figure("ttft_s", "ttft (s)", "TTFT", "s", meaning="time to first token"),
)


class CausalLM(AgreementBudget, Task):
    """Decoders, scored on windows of the text against the base (see the module docstring)."""

    name = "causal-lm"
    figures = (*QUALITY, *SIZE, *SPEED, *MEMORY)
    method_labels: ClassVar[dict[str, Label]] = {
        "ppl_method": Label("perplexity method", values=PPL_METHODS),
        **shared("ctx"),
        "stride": Label("stride", "tokens"),
        **shared("windows", "max_chunks", "max_tokens"),
        "tokens_scored": Label("tokens scored"),
        "bos": Label("BOS handling"),
        **shared("dtype", "log_softmax", "speed_runs"),
        "decode_tokens": Label("tokens per decode run", "tokens"),
        **shared("kld"),
        "text_tokens": Label("text tokens: scored from [0, a), calibration slice [a, b)"),
        "decode": Label("decode timed with"),
    }
    method_columns = (
        *DATASET_COLUMNS,
        ("method", "ppl_method", "ppl_method"),
        ("method", "ctx", "ctx (tokens)"),
        ("method", "stride", "stride (tokens)"),
        ("method", "tokens_scored", "tokens_scored"),
        ("method", "bos", "bos"),
        ("method", "dtype", "dtype"),
        ("method", "speed_runs", "speed_runs"),
        ("method", "decode_tokens", "decode_tokens"),
        *DEVICE_COLUMNS,
    )

    @classmethod
    def applies(cls, checkpoint: Checkpoint) -> bool:
        return checkpoint.spec.kind != "encoder"

    def check(self) -> None:
        if self.settings.max_sentences is not None:
            raise HubquantError("--max-sentences applies to embedders (encoders); drop it for a decoder")

    def prepare(self, base: Any, tokenizer: Any, text: Text) -> dict[str, Any]:
        import torch

        from hubquant.evaluate.scoring import windows

        s = self.settings
        self.tokenizer = tokenizer
        ctx = DEFAULT_CTX if s.ctx is None else s.ctx
        ids = torch.tensor(tokenizer.encode(text.text, add_special_tokens=False))
        self.tokens = TokenSplit(text, ids.numel())
        total, split = self.tokens.total, self.tokens.split
        ids = ids[:split]  # the scoring part: the calibration slice (the tail) is never scored
        if s.max_tokens is not None:
            ids = ids[: s.max_tokens]
        bos_id, bos_note = self._bos(tokenizer)
        if s.ppl_method == "sliding" and bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        self.windows = windows(ids, method=s.ppl_method, ctx=ctx, stride=s.stride, max_chunks=s.max_chunks,
                               bos_id=bos_id if s.ppl_method == "chunks" else None)  # fmt: skip
        scored = sum(w.ids.numel() - w.first for w in self.windows)
        self._headline = (
            f"{len(self.windows)} windows of {ctx} tokens ({s.ppl_method}), {scored} tokens scored"
        )
        self._bos_note = bos_note
        method = {
            "ppl_method": s.ppl_method, "ctx": ctx, "stride": s.stride if s.ppl_method == "sliding" else None,
            "windows": len(self.windows), "max_chunks": s.max_chunks, "max_tokens": s.max_tokens,
            "tokens_scored": scored, "bos": bos_note, "dtype": s.dtype, "log_softmax": "fp32",
            "speed_runs": SPEED_RUNS if s.speed else 0, "decode_tokens": DECODE_TOKENS,
            "kld": "KL(base || variant), base forward recomputed per variant",
            "text_tokens": [0, split, total],
        }  # fmt: skip
        if self.compiled:
            graphs = ", CUDA graphs" if getattr(self.device, "type", "") == "cuda" else ""
            method["decode"] = f"compiled step (torch.compile, fixed shapes{graphs}); prefill eager"
        return method

    @property
    def compiled(self) -> bool:
        """Whether decode is timed with the compiled step: as asked, else on a GPU only."""
        compile = self.settings.compile
        return compile if compile is not None else getattr(self.device, "type", "") == "cuda"

    def headline(self) -> str:
        return f"{self._headline}; BOS {self._bos_note}"

    def adopt(self, model: Any, base: Any, variant: str) -> list[str]:
        """A calibrated variant must have learnt from this text's calibration slice only."""
        report = getattr(model, "quant_report", None)
        calibration = report.settings.get("calibration") if report is not None else None
        if calibration and self.tokens.scores_any_of(calibration):
            raise HubquantError(
                f"variant {variant} was calibrated on tokens {calibration['token_range'][0]}.. of "
                f"{self.tokens.text.name}, which this eval scores (up to {self.tokens.split}); remake it with --force"
            )
        return []

    def _bos(self, tokenizer: Any) -> tuple[int | None, str]:
        """The BOS to put first in each window, and what was done about it (said in the report)."""
        family = self.checkpoint.family
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            return tokenizer.bos_id, f"prepended (id {tokenizer.bos_id}), as the tokenizer does"
        if getattr(family, "bos_required", False) and tokenizer.bos_id is not None:
            return tokenizer.bos_id, (
                f"fixed: the tokenizer does not prepend BOS, which {family.name} models need; "
                f"prepended (id {tokenizer.bos_id})"
            )
        return None, "none (the tokenizer adds none)"

    def measure(self, model: Any, base: Any, variant: str = "variant") -> dict[str, Any]:
        from hubquant.evaluate.scoring import score
        from hubquant.evaluate.speed import measure_speed

        s, device = self.settings, self.device
        figures: dict[str, Any] = score(
            model, self.windows, base=base, device=device, progress=s.progress, desc=f"score {variant}"
        ).summary()
        if s.speed:
            speed = measure_speed(
                model, vocab_size=model.config.vocab_size, device=device, compile=self.compiled
            )
            warmup = speed.pop("decode_warmup_s", None)
            if self.compiled and warmup is not None:
                figures["notes"] = [
                    f"decode compiled: the first run took {warmup:.1f} s (compiling), left out of the figures"
                ]
            figures.update(speed)
        if s.tasks:
            from hubquant.evaluate.lm_eval import run_tasks

            # Every variant shares the base's tokenizer.
            figures["tasks"] = run_tasks(model, list(s.tasks), self.tokenizer)
        return figures

    @classmethod
    def line(cls, row: Row) -> str:
        top1 = row.get("top1_agreement")
        return (
            f"{row.variant:10} ppl {fmt(row.get('ppl'), '.3f')} ± {fmt(row.get('ppl_err'), '.3f')}  "
            f"KLD {fmt(row.get('kld_mean'), '.5f')} nats  top-1 {fmt(top1 and top1 * 100, '.1f')}%  "
            f"decode {fmt(row.get('decode_tok_s'), '.1f')} tok/s  "
            f"disk {fmt(row.disk_bytes and row.disk_bytes / MB, '.1f')} MB"
        )

    @classmethod
    def caption(cls, results: Any) -> str | None:
        return None  # the report's decoder caption (its template), which marks up 10^6
