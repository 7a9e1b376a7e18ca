"""`EvalSettings`: everything an evaluation run is told, in one value.

The CLI (`hubquant eval`), the Python API (`hubquant.evaluate.run_eval`) and the sweep
(`hubquant sweep`, a file's `eval:` mapping) all build one; the driver and the tasks read it and
nothing else. A setting is added here once and reaches every door. Checks that need no checkpoint
(ranges, variant names) run in `check()`, before anything is downloaded or loaded; whether a
setting means anything for the model at hand is the task's check (`evaluate/tasks/`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError
from hubquant.quantize.registry import default_variants, get_method, method_names, parse_variant

DEFAULT_MAX_KLD = 0.05
DEFAULT_MIN_TOP1 = 0.90
DEFAULT_MIN_COSINE = 0.99  # embedders: the mean cosine to the base's sentence vectors
DEFAULT_CTX = 512  # decoders; masked-LM encoders default to 128 (evaluate/tasks/masked_lm.py)
DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_LEN = 16, 128  # as hubquant.quantize.calibration's defaults


@dataclass(frozen=True)
class EvalSettings:
    """The settings of one evaluation run (the CLI's flags, by the same names).

    Attributes:
        model: a Hub repo id or local folder; None: the embedded SmolLM2-135M-Instruct.
        variants: "base", quantization methods (`hubquant.quantize.registry`), "gguf:PATH"
            (None: the base and the methods marked `default_eval`).
        task: the evaluation task by name ("causal-lm", "masked-lm", "embedding", or one registered
            with `hubquant.evaluate.tasks.register_task`); None: the first registered task that
            applies to the checkpoint.
        dataset: "python-docs", "wikitext2" or a .txt path.
        ctx: tokens per window (None: the task's default: 512; 128 for a masked-LM encoder).
        max_chunks: score at most this many windows (None: all; 16 for the embedded model).
        ppl_method: "chunks" (llama.cpp's) or "sliding" (transformers' guide).
        stride: `sliding` only: tokens between windows (None: ctx // 2).
        max_tokens: use only the text's first `max_tokens` tokens.
        max_sentences: embedders: judge on the text's first N sentences (None: 512).
        dtype: the base model's dtype and the activations' of every variant ("bf16", "fp32").
        tasks: lm-eval task names, scored per variant (causal LMs).
        speed: measure speed (decode and prefill, or encode throughput).
        compile: decoders: time decode with the compiled step (CUDA graphs on a GPU) or eagerly
            (False); None: compiled on a GPU, where a deployment runs it so, eager on the CPU.
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:N".
        device_map, max_memory: decoders: spread the base over GPUs, CPU and disk (as `hubquant.load`).
        out: the results folder (None: results/<org>__<name>).
        force: start over even if OUT holds results (of these or other settings).
        max_kld, min_top1: the verdict's budget for decoders and masked-LM encoders.
        min_cosine: the verdict's budget for embedders (least mean cosine to the base's vectors).
        revision: Hub branch, tag or commit.
        progress: show progress bars.
        calib_samples, calib_len: calibrated variants (`int4-gptq`, `int4-awq`): sequences and tokens per
            sequence drawn from the calibration slice of `dataset` (never scored).
    """

    model: str | None = None
    variants: tuple[str, ...] | None = None
    task: str | None = None
    dataset: str = "python-docs"
    ctx: int | None = None
    max_chunks: int | None = None
    ppl_method: str = "chunks"
    stride: int | None = None
    max_tokens: int | None = None
    max_sentences: int | None = None
    dtype: str = "bf16"
    tasks: tuple[str, ...] | None = None
    speed: bool = True
    compile: bool | None = None
    device: str = "auto"
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[Any, Any] | None = None
    out: str | Path | None = None
    force: bool = False
    max_kld: float = DEFAULT_MAX_KLD
    min_top1: float = DEFAULT_MIN_TOP1
    min_cosine: float = DEFAULT_MIN_COSINE
    revision: str | None = None
    progress: bool = True
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_len: int = DEFAULT_CALIB_LEN

    def __post_init__(self) -> None:
        # Lists from the CLI, a YAML file or a caller become tuples: the value stays immutable.
        for name in ("variants", "tasks"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                if isinstance(value, str) or not isinstance(value, Sequence):
                    raise HubquantError(f"{name} must be a list of names, not {value!r}")
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every setting's name, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "settings") -> EvalSettings:
        """Settings from a mapping (a sweep file's `eval:`), refusing unknown names in one line.

        Args:
            values: setting name -> value.
            where: what holds them, for the error message.
        """
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise HubquantError(
                f"{where}: setting '{unknown[0]}' is unknown; use any of {', '.join(cls.names())}"
            )
        return cls(**values)

    def with_(self, **changes: Any) -> EvalSettings:
        """A copy with some settings changed."""
        return replace(self, **changes)

    @property
    def variant_list(self) -> tuple[str, ...]:
        """The variants to measure, in order (the defaults when none were named)."""
        return self.variants if self.variants is not None else tuple(default_variants())

    def check(self) -> None:
        """The checks that need no checkpoint, run before anything is downloaded or loaded; each
        error names the flag and the fix."""
        check_variants(self.variant_list)
        ctx, stride = self.ctx, self.stride
        if ctx is not None and ctx < 4:
            raise HubquantError(f"--ctx {ctx}: a window needs at least 4 tokens")
        if self.ppl_method not in ("chunks", "sliding"):
            raise HubquantError(f"--ppl-method {self.ppl_method}: use chunks or sliding")
        if stride is not None and self.ppl_method != "sliding":
            raise HubquantError(f"--stride {stride} applies to --ppl-method sliding only")
        window = DEFAULT_CTX if ctx is None else ctx
        if stride is not None and not 1 <= stride <= window:
            raise HubquantError(f"--stride {stride} must be between 1 and --ctx ({window})")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise HubquantError(f"--max-chunks {self.max_chunks}: score at least 1 window")
        if self.max_tokens is not None and self.max_tokens < 4:
            raise HubquantError(f"--max-tokens {self.max_tokens}: perplexity needs at least 4 tokens")
        if self.max_kld < 0 or not 0 <= self.min_top1 <= 1:
            raise HubquantError(
                f"--max-kld {self.max_kld} --min-top1 {self.min_top1}: KLD must be >= 0, top-1 in 0..1"
            )
        for flag, value in (("--calib-samples", self.calib_samples), ("--calib-len", self.calib_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise HubquantError(f"{flag} {value!r}: give a whole number of at least 2")
        if not -1 <= self.min_cosine <= 1:
            raise HubquantError(f"--min-cosine {self.min_cosine}: a cosine similarity lies in -1..1")


def check_variants(variants: Sequence[str]) -> None:
    """Every variant name known (or a GGUF file that exists), each named once.

    Args:
        variants: the names, as `--variants` gives them.
    """
    for v in variants:
        if v == "base" or v in method_names():
            continue
        if v.startswith("gguf:"):
            path = Path(v[5:]).expanduser()
            if not path.is_file():
                raise HubquantError(f"variant {v}: GGUF file {path} not found; check the path")
            continue
        if v.split(":")[0] in method_names():
            name, options = parse_variant(v)  # options after the method: gN, hqq, act, head-M
            if options:
                get_method(name, **options)  # the method checks their values (one line)
            continue
        known = ", ".join(("base", *method_names(), "gguf:PATH"))
        raise HubquantError(
            f"variant '{v}' is unknown; use any of {known} (settings after a colon: int4:g64)"
        )
    if len(set(variants)) != len(variants):
        raise HubquantError("--variants names a variant twice; name each once")
