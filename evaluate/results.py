"""`results.json`: the one record of an evaluation run. CSV, HTML, the model card's table and
`hubquant report` are pure functions of it; nothing in a report is computed twice.

Layout (schema version 1):

    {
      "schema_version": 1,
      "task": "causal-lm" | "masked-lm" | "embedding",   # absent in older files: causal-lm
      "model": {"id": "swiss-ai/Apertus-8B", "commit": "abc123..." | null, "family": "apertus"},
      "dataset": {"name": "python-docs", "sha256": "<hash of the text>", "chars": 1234567},
      "method": {"ppl_method": "chunks", "ctx": 512, "stride": null, "max_chunks": 64,
                 "tokens_scored": 16384, "bos": "prepended" | "none" | "fixed: ...",
                 "dtype": "bf16", "speed_runs": 3, "decode_tokens": 128},
      "environment": {"hubquant": "0.1.0", "torch": "2.13.0", "torchao": "...", "bitsandbytes": "...",
                      "transformers": null, "device": "cpu", "device_name": "...", "threads": 2,
                      "python": "3.11.7"},
      "budget": {"max_kld": 0.05, "min_top1": 0.90},
      "rows": [Row, ...],            # one per variant, in the order they were measured
      "verdict": {"variant": "int4" | null, "text": "..."},
      "created": "2026-11-22T03:00:00Z"
    }

A row (`Row` below) holds every figure of one variant with the settings that made it; a figure
that was not measured is null, never made up.

Encoders (BERT) use the same file and the same `Row` (see `hubquant.evaluate.encoder`): `task`
says which figures a run has. A masked-LM run ("masked-lm") fills `pppl`, `pppl_err`,
`masked_tokens`, `nll` and the KLD / top-1 figures (over the masked positions); an embedder run
("embedding") fills `cos_mean`, `cos_min` and `nn_agreement`; both fill `encode_seq_s` instead of
the decoder's prefill / decode speeds, and their `method` holds their own keys (mask seed, rate and
count, or the sentence rule and count). The encoder fields were added as optional: older files read
as before, and decoder rows hold null there. An embedding run's budget is `{"min_cosine": 0.99}`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError
from hubquant.files import read_json, remove_temporary_files, write_json_atomic

SCHEMA_VERSION = 1
RESULTS_ROOT = Path("results")  # where `hubquant eval` writes without --out
DEFAULT_MAX_KLD = 0.05
DEFAULT_MIN_TOP1 = 0.90
DEFAULT_MIN_COSINE = 0.99  # embedders: the mean cosine to the base's sentence vectors
TASKS = ("causal-lm", "masked-lm", "embedding")


def task_of(results: dict[str, Any]) -> str:
    """The kind of run a results.json holds: "causal-lm" (decoders, and files written before the
    marker existed), "masked-lm" or "embedding" (encoders).

    Args:
        results: a results.json as a dict.
    """
    task = results.get("task")
    return task if task in TASKS else "causal-lm"


@dataclass
class Row:
    """One variant's figures. Units: perplexity and KLD in nats per token, agreement as a fraction
    0..1, speeds in tokens/s, times in seconds, sizes in bytes."""

    variant: str  # "base", "int4", "nf4", "int8", "fp8", "gguf:Q4_K_M"...
    method_settings: dict[str, Any] = field(default_factory=dict)
    ppl: float | None = None
    ppl_err: float | None = None  # standard error of the perplexity
    nll: float | None = None  # mean negative log-likelihood, nats/token
    kld_mean: float | None = None  # KL(base || variant), nats/token, mean over scored tokens
    kld_err: float | None = None  # standard error of kld_mean
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None  # fraction of scored tokens with the same argmax as base
    dp_rms: float | None = None  # RMS change of the correct token's probability
    prefill_tok_s: float | None = None
    prefill_sd: float | None = None
    decode_tok_s: float | None = None
    decode_sd: float | None = None
    ttft_s: float | None = None  # time to first token
    disk_bytes: int | None = None
    weight_bytes: int | None = None  # runtime bytes of the weights
    peak_rss_bytes: int | None = None
    cuda_peak_allocated_bytes: int | None = None
    cuda_peak_reserved_bytes: int | None = None
    # With a device map: the peak memory of each device the model was spread over, bytes
    # ("cpu": peak RSS; "cuda:N": allocated).
    device_peak_bytes: dict[str, int] = field(default_factory=dict)
    load_s: float | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    skipped_layers: int | None = None
    notes: list[str] = field(default_factory=list)
    # Encoders only (None for decoders). Masked LM: pseudo-perplexity over the masked tokens.
    pppl: float | None = None  # exp(mean NLL of the masked tokens)
    pppl_err: float | None = None  # standard error of the pseudo-perplexity
    masked_tokens: int | None = None  # tokens masked and scored
    # Embedders: each sentence's vector against the base's.
    cos_mean: float | None = None  # mean cosine similarity to the base's vector of the same sentence
    cos_min: float | None = None  # the smallest of those cosines
    nn_agreement: float | None = None  # mean overlap (0..1) of each sentence's top-k neighbours with base's
    encode_seq_s: float | None = None  # sequences/s, one forward at batch 32 x length 128 (median of runs)
    encode_sd: float | None = None  # standard deviation of the timed runs' sequences/s

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def verdict(
    rows: list[Row],
    max_kld: float = DEFAULT_MAX_KLD,
    min_top1: float = DEFAULT_MIN_TOP1,
    *,
    min_cosine: float | None = None,
) -> dict[str, Any]:
    """The smallest variant (by disk bytes, else runtime bytes) within the quality budget, or a
    plain statement that none is. The base model is not a candidate: the question is which
    quantized variant to ship.

    Args:
        rows: the run's rows.
        max_kld, min_top1: the budget of decoders and masked-LM encoders (KLD and top-1 agreement
            against the base, over the scored or masked tokens).
        min_cosine: given, the budget of an embedder instead: the mean cosine similarity of the
            variant's sentence vectors to the base's must be at least this.
    """
    if min_cosine is not None:
        candidates = [
            r for r in rows if r.variant != "base" and r.cos_mean is not None and r.cos_mean >= min_cosine
        ]
        budget = f"mean cosine to the base's sentence vectors >= {min_cosine:g}"
    else:
        candidates = [
            r
            for r in rows
            if r.variant != "base"
            and r.kld_mean is not None
            and r.top1_agreement is not None
            and r.kld_mean <= max_kld
            and r.top1_agreement >= min_top1
        ]
        budget = f"mean KLD <= {max_kld:g} nats and top-1 agreement >= {min_top1:.0%}"

    def size(r: Row) -> float:
        return r.disk_bytes or r.weight_bytes or math.inf

    if not candidates:
        measured = [r.variant for r in rows if r.variant != "base"]
        if not measured:
            return {"variant": None, "text": "No quantized variant was measured."}
        return {"variant": None, "text": f"No variant is within the budget ({budget}); ship the base model."}
    best = min(candidates, key=size)
    if min_cosine is not None:
        figures = (
            f"mean cosine {best.cos_mean:.4f}"
            + (f", min cosine {best.cos_min:.4f}" if best.cos_min is not None else "")
            + (
                f", nearest-neighbour agreement {best.nn_agreement:.1%}"
                if best.nn_agreement is not None
                else ""
            )
        )
    else:
        figures = f"mean KLD {best.kld_mean:.4f}, top-1 agreement {best.top1_agreement:.1%}"
    return {
        "variant": best.variant,
        "text": f"Ship {best.variant}: the smallest variant within the budget ({budget}): {figures}.",
    }


def results_header(
    *,
    task: str,
    model_id: str,
    folder: Path,
    family: str,
    text: Any,
    method: dict[str, Any],
    environment: dict[str, Any],
    budget: dict[str, Any],
) -> dict[str, Any]:
    """Everything of a results.json but its rows and verdict, the same for every kind of model.

    Args:
        task: "causal-lm", "masked-lm" or "embedding".
        model_id: the model as the user named it.
        folder: the checkpoint folder (a 40-hex name is the Hub commit).
        family: the family's name.
        text: the dataset (`evaluate.data` text: name, sha256, text).
        method, environment, budget: as measured and judged.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "task": task,
        "model": {
            "id": model_id,
            "commit": folder.name if len(folder.name) == 40 else None,
            "family": family,
        },
        "dataset": {"name": text.name, "sha256": text.sha256, "chars": len(text.text)},
        "method": method,
        "environment": environment,
        "budget": budget,
    }


def save_results(
    path: Path, header: dict[str, Any], rows: list[Row], judged: dict[str, Any]
) -> dict[str, Any]:
    """The header, the rows and the verdict, stamped with the time, written atomically to `path`."""

    results = {**header, "rows": [asdict(r) for r in rows], "verdict": judged}
    results["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_results(path, results)
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write `results` atomically (`hubquant.files.write_json_atomic`): a reader, or a rerun after
    `kill -9`, sees the previous results.json or the new one, never part of one; a killed write
    leaves at most a temporary file beside it, which the next run holding OUT's lock removes
    (`clear_temporary_files`).

    Raises:
        HubquantError: the file cannot be written (disk full...): one line naming it and the fix;
            the previous results.json is left as it was and the temporary file is removed.
    """
    write_json_atomic(path, results)


def clear_temporary_files(folder: Path) -> list[Path]:
    """Remove the temporary files that killed writes left in an eval run's OUT (results.json's and
    the reports'); call it holding OUT's lock. Returns what was removed.

    Args:
        folder: an eval run's OUT.
    """
    return remove_temporary_files(folder, ["results.json", "report.csv", "report.html"])


def model_folder_name(model: str) -> str:
    """The results folder name of a model (a Hub id or a local folder): the folder's own name, or
    the id with `/` as `__` (`hubquant eval` writes to RESULTS_ROOT / it; a sweep below its root)."""
    path = Path(model)
    name = path.name if path.is_dir() else model
    return name.strip("/").replace("/", "__")


def read_results(path: Path) -> dict[str, Any]:
    """A results.json, checked for its schema version (one-line errors)."""
    data = read_json(path, "results.json of a `hubquant eval` run", fix="rerun `hubquant eval`")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise HubquantError(
            f"{path} is not a hubquant results.json of schema version {SCHEMA_VERSION}; rerun `hubquant eval`"
        )
    return data


def rows_of(results: dict[str, Any]) -> list[Row]:
    return [Row.from_dict(r) for r in results.get("rows", [])]


def row_dict(row: Row) -> dict[str, Any]:
    return asdict(row)
