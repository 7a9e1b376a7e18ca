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

A row (`Row` below) is one variant: the fields every task's rows have (`COMMON`: the variant,
how it was made, size, load time, memory, lm-eval scores, notes) and the task's own figures
(`Task.figures` in `hubquant/evaluate/tasks/`: perplexity and KLD for "causal-lm", pseudo-
perplexity for "masked-lm", cosine and neighbours for "embedding"), written out flat in one object.
`task` says which task wrote the file, and so which figures its rows have; the method and budget
are the task's own keys (an embedding run's budget is `{"min_cosine": 0.99}`). A figure that was
not measured is absent or null, never made up. Files written before the tasks existed held every
task's figure in every row (null where another task's): they read, resume and render as before.
"""

from __future__ import annotations

import copy
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError
from hubquant.files import read_json, remove_temporary_files, write_json_atomic

from .settings import DEFAULT_MAX_KLD, DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1
from .tasks import get_task

SCHEMA_VERSION = 1
RESULTS_ROOT = Path("results")  # where `hubquant eval` writes without --out
__all__ = ["DEFAULT_MAX_KLD", "DEFAULT_MIN_COSINE", "DEFAULT_MIN_TOP1", "Row", "verdict"]


def task_of(results: dict[str, Any]) -> str:
    """The task of a run, by name: results.json's `task` when it names a registered task, else
    "causal-lm" (decoders, and files written before the key existed).

    Args:
        results: a results.json as a dict.
    """
    return get_task(results.get("task")).name


# What every row holds whatever its task: the variant, how it was made, and what the driver
# measures itself (size, load time, memory, lm-eval scores, notes). Units: bytes and seconds.
COMMON: dict[str, Any] = {
    "variant": "",
    "method_settings": {},
    "disk_bytes": None,  # the variant's safetensors on disk
    "weight_bytes": None,  # runtime bytes of the weights
    "peak_rss_bytes": None,
    "cuda_peak_allocated_bytes": None,
    "cuda_peak_reserved_bytes": None,
    # With a device map: the peak memory of each device the model was spread over, bytes
    # ("cpu": peak RSS; "cuda:N": allocated).
    "device_peak_bytes": {},
    "load_s": None,
    "tasks": {},  # lm-eval: task -> metric -> value
    "skipped_layers": None,
    "notes": [],
}


class Row:
    """One variant's row: the common fields (`COMMON`) as attributes, and the task's figures
    (perplexity, KLD, cosine... as the task names them, `evaluate/tasks/`) in `figures`. Written
    to results.json flat, one object per row; a figure that was not measured is absent or null,
    never made up.

    Args:
        variant: "base", "int4", "nf4", "int8", "fp8", "gguf:Q4_K_M"...
        method_settings: how the variant was made.
        **values: common fields and figures by name.
    """

    def __init__(self, variant: str, method_settings: dict[str, Any] | None = None, **values: Any) -> None:
        for key, default in COMMON.items():
            setattr(self, key, copy.copy(default))
        self.variant = variant
        self.method_settings = dict(method_settings or {})
        self.figures: dict[str, Any] = {}
        self.update(values)

    def get(self, key: str) -> Any:
        """A common field or a figure by name (None when the row has neither)."""
        return getattr(self, key) if key in COMMON else self.figures.get(key)

    def update(self, values: dict[str, Any]) -> None:
        """Set common fields and figures by name (a task's `measure` result)."""
        for key, value in values.items():
            if key in COMMON:
                setattr(self, key, value)
            else:
                self.figures[key] = value

    def __getattr__(self, name: str) -> Any:
        # A figure reads as an attribute too (row.ppl); an unknown name is still an error.
        figures = self.__dict__.get("figures", {})
        if name in figures:
            return figures[name]
        raise AttributeError(f"row has no {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The row as results.json holds it: variant, settings, the figures, then the common fields."""
        data = {"variant": self.variant, "method_settings": self.method_settings, **self.figures}
        data.update({key: getattr(self, key) for key in COMMON if key not in data})
        return copy.deepcopy(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        values = dict(data)
        return cls(values.pop("variant", ""), values.pop("method_settings", None), **values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Row) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Row({self.to_dict()!r})"


def verdict(rows: list[Row], budget: dict[str, Any], task: str | None = None) -> dict[str, Any]:
    """The smallest variant (by disk bytes, else runtime bytes) within the quality budget, or a
    plain statement that none is. The base model is not a candidate: the question is which
    quantized variant to ship. The task judges each row (`Task.passes`) and words the budget.

    Args:
        rows: the run's rows.
        budget: the run's budget (results.json's `budget`).
        task: the run's task name (None: causal-lm).
    """
    judge = get_task(task)
    candidates = [r for r in rows if r.variant != "base" and judge.passes(r, budget)]

    def size(r: Row) -> float:
        return r.disk_bytes or r.weight_bytes or math.inf

    if not candidates:
        measured = [r.variant for r in rows if r.variant != "base"]
        if not measured:
            return {"variant": None, "text": "No quantized variant was measured."}
        return {
            "variant": None,
            "text": f"No variant is within the budget ({judge.budget_text(budget)}); ship the base model.",
        }
    best = min(candidates, key=size)
    return {
        "variant": best.variant,
        "text": f"Ship {best.variant}: the smallest variant within the budget ({judge.budget_text(budget)}): "
        f"{judge.verdict_figures(best)}.",
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

    results = {**header, "rows": [r.to_dict() for r in rows], "verdict": judged}
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
    return row.to_dict()
