"""What the two encoder tasks (masked LM, embedding) share: the flags that mean nothing for an
encoder, the variant taking the base's tokenizer and sentence pipeline, and encode throughput.

    encode     Sequences/s of one forward (the model's call: MLM logits with a head, else the last
               hidden state) over a batch of 32 x 128 tokens (the length capped at the model's
               positions): ids drawn at random (seed 0) from the text's own tokens, [CLS] first and
               [SEP] last, attention mask all ones; one warm-up, then the median of 3 timed runs
               (± their standard deviation), on the device of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hubquant.errors import HubquantError

from .base import DEVICE_COLUMNS, Figure, MethodColumn, Task, setting_text

if TYPE_CHECKING:
    from hubquant.models.checkpoint import Checkpoint

ENCODE_BATCH, ENCODE_LENGTH = 32, 128
SPEED_RUNS = 3

ENCODE = Figure(
    "encode_seq_s",
    "encode (seq/s)",
    "encode",
    "seq/s",
    err_key="encode_sd",
    err_column="encode_sd (seq/s)",
    meaning="sequences encoded per second, one forward over the timed batch (its shape is in the method), "
    "median of the timed runs",
)
SPEED_COLUMNS: tuple[MethodColumn, ...] = (
    ("method", "dtype", "dtype"),
    ("method", "speed_runs", "speed_runs"),
    ("method", "encode_batch", "encode_batch"),
    ("method", "encode_length", "encode_length (tokens)"),
    *DEVICE_COLUMNS,
)


class EncoderTask(Task):
    """The part of an encoder task that is not its quality measure."""

    mlm_head: bool  # which encoders the task applies to

    @classmethod
    def applies(cls, checkpoint: Checkpoint) -> bool:
        spec = checkpoint.spec
        return spec.kind == "encoder" and bool(spec.mlm_head) == cls.mlm_head

    def check(self) -> None:
        s = self.settings
        if s.device_map is not None:
            raise HubquantError("--device-map applies to decoders; an encoder fits on one device")
        if s.ppl_method != "chunks" or s.stride is not None:
            raise HubquantError(
                "--ppl-method/--stride apply to decoders; an encoder is scored by pseudo-perplexity "
                "(masked-LM) or sentence-vector agreement: drop them"
            )
        if s.tasks:
            raise HubquantError("--tasks (lm-eval) needs a causal LM; drop --tasks for an encoder")
        gguf = [v for v in s.variant_list if v.startswith("gguf:")]
        if gguf:
            raise HubquantError(f"variant {gguf[0]}: GGUF variants are decoders only; drop it for an encoder")

    def frame(self, base: Any, tokenizer: Any) -> None:
        """Check that the base is an encoder with a tokenizer and note its special tokens."""
        from hubquant.evaluate.encoder import framing
        from hubquant.models.encoder import Encoder

        if not isinstance(base, Encoder) or tokenizer is None:
            raise HubquantError(
                f"{self.checkpoint.source} did not load as an encoder with a tokenizer; check its config.json"
            )
        self.prefix, self.suffix = framing(tokenizer)
        self.length = min(ENCODE_LENGTH, self.checkpoint.spec.max_position)
        self.timing_ids = None

    def speed_method(self) -> dict[str, Any]:
        return {
            "speed_runs": SPEED_RUNS if self.settings.speed else 0,
            "encode_batch": ENCODE_BATCH,
            "encode_length": self.length,
        }

    def time_ids(self, text_ids: Any) -> None:
        """The timed batch, drawn from the text's tokens (when speed is measured)."""
        from hubquant.evaluate.encoder import speed_ids

        if self.settings.speed:
            self.timing_ids = speed_ids(text_ids, self.prefix, self.suffix, ENCODE_BATCH, self.length)

    def adopt(self, model: Any, base: Any, variant: str) -> list[str]:
        from hubquant.models.encoder import Encoder

        if not isinstance(model, Encoder):
            raise HubquantError(f"variant {variant} did not load as an encoder; remake it with --force")
        # The same model: the base's tokenizer and sentence pipeline apply to every variant.
        notes = []
        declared = getattr(model, "sentence", None)
        if not self.mlm_head and declared is not None and declared != base.sentence:
            notes.append(
                f"the variant's folder declares {declared.describe()}; measured with the base's "
                f"{base.sentence.describe()}"
            )
        model.sentence = base.sentence
        model.tokenizer = base.tokenizer
        return notes

    def measure_speed(self, model: Any) -> dict[str, Any]:
        from hubquant.evaluate.speed import measure_encode_speed

        if self.timing_ids is None:
            return {}
        return measure_encode_speed(model, self.timing_ids, runs=SPEED_RUNS, device=self.device)


def values(section: Mapping[str, Any]) -> Callable[[str], str]:
    """A section of results.json (its method, its environment) as a key -> shown text lookup."""
    return lambda key: setting_text(section.get(key))


def encode_caption(results: Mapping[str, Any]) -> str:
    """The speed part of an encoder run's caption (read from results.json's method)."""
    v, env = values(results.get("method") or {}), values(results.get("environment") or {})
    return (
        f"Encode: sequences/s of one forward over {v('encode_batch')} sequences of {v('encode_length')} "
        f"tokens (random tokens of the text, attention mask all ones), median of {v('speed_runs')} "
        f"timed runs after a warm-up, on {env('device')} with {env('threads')} "
        "threads. MB = 10^6 bytes; — = not measured."
    )
