"""The figures of a results.json as a table: one row per variant, units in the column names.

Nothing is computed here beyond unit conversions (bytes to MB, fractions to %): every number comes
from results.json as it is, and a figure that was not measured stays empty. `FIGURES` is the one
list of a decoder run's columns, with their units; `MASKED_LM_FIGURES` and `EMBEDDING_FIGURES`
are an encoder run's (pseudo-perplexity, or sentence-vector cosine and neighbour agreement, and
encode throughput in place of perplexity and decode speed). `figures_for(task)` picks the list by
the results' `task`; the CSV and the HTML report both read it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import HubquantError
from hubquant.evaluate.results import Row, rows_of, task_of
from hubquant.files import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

MB = 1e6  # a megabyte here is 10^6 bytes


@dataclass(frozen=True)
class Figure:
    """One measured figure of a row, with its unit.

    Args:
        key: the `Row` field it comes from.
        column: the CSV column name, its unit in parentheses.
        label: the HTML table's header.
        unit: the unit as shown after a value ("" when the figure has none).
        scale: multiplies the stored value (bytes -> MB, fraction -> %).
        err_key: the `Row` field of its standard error or standard deviation, if any.
        err_column: the CSV column name of that error.
        meaning: what the figure is, for the HTML report's glossary ("" when the label says it).
        digits: significant digits shown when the figure has no error (cosines need more than 4).
    """

    key: str
    column: str
    label: str
    unit: str = ""
    scale: float = 1.0
    err_key: str | None = None
    err_column: str | None = None
    meaning: str = ""
    digits: int = 4


# Quality first (what the budget judges), then size, speed and memory.
FIGURES: tuple[Figure, ...] = (
    Figure("ppl", "ppl", "PPL", err_key="ppl_err", err_column="ppl_err", meaning="perplexity of the text"),
    Figure(
        "kld_mean",
        "kld_mean (nats)",
        "KLD mean",
        "nats",
        err_key="kld_err",
        err_column="kld_err (nats)",
        meaning="KL(base ‖ variant) of the next-token distributions, per scored token",
    ),
    Figure(
        "top1_agreement",
        "top1_agreement (%)",
        "top-1 agree",
        "%",
        scale=100,
        meaning="share of scored tokens where the variant's most likely token is the base's",
    ),
    Figure("kld_median", "kld_median (nats)", "KLD median", "nats"),
    Figure("kld_p99", "kld_p99 (nats)", "KLD p99", "nats", meaning="99th percentile of the per-token KLD"),
    Figure("kld_max", "kld_max (nats)", "KLD max", "nats"),
    Figure(
        "dp_rms",
        "dp_rms (%)",
        "RMS Δp",
        "%",
        scale=100,
        meaning="root mean square change in the probability of the correct token, percentage points",
    ),
    Figure("nll", "nll (nats/token)", "NLL", "nats/token", meaning="mean negative log-likelihood (ln PPL)"),
    Figure("disk_bytes", "disk (MB)", "disk", "MB", scale=1 / MB, meaning="size of the saved variant"),
    Figure(
        "weight_bytes",
        "weights (MB)",
        "weights",
        "MB",
        scale=1 / MB,
        meaning="bytes of the weights in memory once loaded",
    ),
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
    Figure("load_s", "load (s)", "load", "s", meaning="time to load the variant"),
    Figure(
        "peak_rss_bytes",
        "peak_rss (MB)",
        "peak RSS",
        "MB",
        scale=1 / MB,
        meaning="largest resident memory of the process while the variant was measured",
    ),
    Figure(
        "cuda_peak_allocated_bytes",
        "cuda_peak_allocated (MB)",
        "CUDA alloc.",
        "MB",
        scale=1 / MB,
        meaning="peak CUDA memory allocated by tensors",
    ),  # fmt: skip
    Figure(
        "cuda_peak_reserved_bytes",
        "cuda_peak_reserved (MB)",
        "CUDA reserved",
        "MB",
        scale=1 / MB,
        meaning="peak CUDA memory reserved by the caching allocator",
    ),  # fmt: skip
    Figure(
        "skipped_layers",
        "skipped_layers",
        "skipped",
        "layers",
        meaning="layers the method left unquantized",
    ),
)

_BY_KEY = {f.key: f for f in FIGURES}
_MEMORY = tuple(
    _BY_KEY[key]
    for key in (
        "load_s",
        "peak_rss_bytes",
        "cuda_peak_allocated_bytes",
        "cuda_peak_reserved_bytes",
        "skipped_layers",
    )
)
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

# Encoders with a masked-LM head: pseudo-perplexity and agreement over the masked tokens.
MASKED_LM_FIGURES: tuple[Figure, ...] = (
    Figure(
        "pppl",
        "pppl",
        "PPPL",
        err_key="pppl_err",
        err_column="pppl_err",
        meaning="pseudo-perplexity: exp of the mean NLL of the masked tokens (15% masked per pass)",
    ),
    Figure(
        "kld_mean",
        "kld_mean (nats)",
        "KLD mean",
        "nats",
        err_key="kld_err",
        err_column="kld_err (nats)",
        meaning="KL(base ‖ variant) of the masked-token distributions, per masked token",
    ),
    Figure(
        "top1_agreement",
        "top1_agreement (%)",
        "top-1 agree",
        "%",
        scale=100,
        meaning="share of masked tokens where the variant's most likely token is the base's",
    ),
    _BY_KEY["kld_median"],
    Figure("kld_p99", "kld_p99 (nats)", "KLD p99", "nats", meaning="99th percentile of the per-token KLD"),
    _BY_KEY["kld_max"],
    Figure(
        "dp_rms",
        "dp_rms (%)",
        "RMS Δp",
        "%",
        scale=100,
        meaning="root mean square change in the probability of the masked (original) token, percentage points",
    ),
    Figure("nll", "nll (nats/token)", "NLL", "nats/token", meaning="mean NLL of the masked tokens (ln PPPL)"),
    Figure("masked_tokens", "masked_tokens", "masked", "tokens", meaning="tokens masked and scored"),
    _BY_KEY["disk_bytes"],
    _BY_KEY["weight_bytes"],
    ENCODE,
    *_MEMORY,
)

# Encoders without a head (sentence embedders): each sentence's vector against the base's.
EMBEDDING_FIGURES: tuple[Figure, ...] = (
    Figure(
        "cos_mean",
        "cos_mean",
        "cosine mean",
        meaning="mean cosine similarity of each sentence's vector to the base's vector of it",
        digits=6,
    ),
    Figure("cos_min", "cos_min", "cosine min", meaning="the least of those cosines", digits=6),
    Figure(
        "nn_agreement",
        "nn_agreement (%)",
        "NN@k agree",
        "%",
        scale=100,
        meaning="share of each sentence's k nearest neighbours (by cosine, among the other sentences; "
        "k = 10 unless there are fewer) that are also its nearest under the base, averaged",
    ),
    _BY_KEY["disk_bytes"],
    _BY_KEY["weight_bytes"],
    ENCODE,
    *_MEMORY,
)

_FIGURES_BY_TASK = {"causal-lm": FIGURES, "masked-lm": MASKED_LM_FIGURES, "embedding": EMBEDDING_FIGURES}


def figures_for(tasks: str | list[str]) -> tuple[Figure, ...]:
    """The figures of a run's task ("causal-lm", "masked-lm", "embedding"), or of several runs'
    tasks together (each column once, in first-seen order).

    Args:
        tasks: one task, or the tasks of the runs in one table.
    """
    out: dict[str, Figure] = {}
    for task in [tasks] if isinstance(tasks, str) else tasks:
        for figure in _FIGURES_BY_TASK.get(task, FIGURES):
            out.setdefault(figure.column, figure)
    return tuple(out.values())


# Run-wide settings repeated on every CSV row, so that a row carries its method next to its
# numbers: (section of results.json, key, column).
METHOD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "name", "dataset"),
    ("dataset", "sha256", "text_sha256"),
    ("method", "ppl_method", "ppl_method"),
    ("method", "ctx", "ctx (tokens)"),
    ("method", "stride", "stride (tokens)"),
    ("method", "tokens_scored", "tokens_scored"),
    ("method", "bos", "bos"),
    ("method", "dtype", "dtype"),
    ("method", "speed_runs", "speed_runs"),
    ("method", "decode_tokens", "decode_tokens"),
    ("environment", "device", "device"),
    ("environment", "device_name", "device_name"),
    ("environment", "threads", "threads"),
)
_ENCODER_SPEED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "dtype", "dtype"),
    ("method", "speed_runs", "speed_runs"),
    ("method", "encode_batch", "encode_batch"),
    ("method", "encode_length", "encode_length (tokens)"),
    ("environment", "device", "device"),
    ("environment", "device_name", "device_name"),
    ("environment", "threads", "threads"),
)
MASKED_LM_METHOD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "name", "dataset"),
    ("dataset", "sha256", "text_sha256"),
    ("method", "ctx", "ctx (tokens)"),
    ("method", "windows", "windows"),
    ("method", "mask_rate", "mask_rate"),
    ("method", "mask_seed", "mask_seed"),
    ("method", "tokens_masked", "tokens_masked"),
    *_ENCODER_SPEED_COLUMNS,
)
EMBEDDING_METHOD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "name", "dataset"),
    ("dataset", "sha256", "text_sha256"),
    ("method", "sentences", "sentences"),
    ("method", "nn_k", "nn_k"),
    ("method", "pooling", "pooling"),
    *_ENCODER_SPEED_COLUMNS,
)
_METHOD_COLUMNS_BY_TASK = {
    "causal-lm": METHOD_COLUMNS,
    "masked-lm": MASKED_LM_METHOD_COLUMNS,
    "embedding": EMBEDDING_METHOD_COLUMNS,
}


def method_columns_for(tasks: str | list[str]) -> tuple[tuple[str, str, str], ...]:
    """The run-wide settings repeated on CSV rows for a task (or several tasks, each column once).

    Args:
        tasks: one task, or the tasks of the runs in one table.
    """
    out: dict[str, tuple[str, str, str]] = {}
    for task in [tasks] if isinstance(tasks, str) else tasks:
        for item in _METHOD_COLUMNS_BY_TASK.get(task, METHOD_COLUMNS):
            out.setdefault(item[2], item)
    return tuple(out.values())


_ALL_FIGURES = FIGURES + MASKED_LM_FIGURES + EMBEDDING_FIGURES
_NUMERIC = {f.key for f in _ALL_FIGURES} | {f.err_key for f in _ALL_FIGURES if f.err_key}


def scaled(value: float | None, figure: Figure) -> float | None:
    """A stored value in the unit the reports show (None stays None).

    Args:
        value: the value as results.json stores it.
        figure: the figure it belongs to.
    """
    if value is None or figure.scale == 1:
        return value
    # 12 significant digits: the conversion's float noise (0.07 * 100 = 7.000000000000001) goes.
    return float(f"{value * figure.scale:.12g}")


def checked_rows(results: dict[str, Any]) -> list[Row]:
    """The rows of `results`, checked for the types a report relies on (one-line errors).

    Args:
        results: a results.json as a dict.

    Raises:
        HubquantError: when `rows` is not a list of objects with a `variant` name and numbers.
    """
    rows = results.get("rows", [])
    if not isinstance(rows, list):
        raise HubquantError("results.json: 'rows' is not a list; rerun `hubquant eval`")
    known = {f.name for f in fields(Row)}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("variant"), str) or not row["variant"]:
            raise HubquantError(f"results.json: rows[{i}] has no variant name; rerun `hubquant eval`")
        for key, value in row.items():
            if key not in known or value is None:
                continue
            if key in _NUMERIC and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise HubquantError(
                    f"results.json: rows[{i}].{key} is {value!r}, not a finite number or null; "
                    "rerun `hubquant eval`"
                )
            if key in ("tasks", "method_settings") and not isinstance(value, dict):
                raise HubquantError(f"results.json: rows[{i}].{key} is not an object; rerun `hubquant eval`")
            if key == "notes" and not isinstance(value, list):
                raise HubquantError(f"results.json: rows[{i}].notes is not a list; rerun `hubquant eval`")
    for section in ("model", "dataset", "method", "environment", "budget", "verdict"):
        if not isinstance(results.get(section, {}), (dict, type(None))):
            raise HubquantError(f"results.json: '{section}' is not an object; rerun `hubquant eval`")
    return rows_of(results)


def task_columns(rows: list[Row]) -> list[tuple[str, str]]:
    """The (task, metric) pairs any row has, in first-seen order.

    Args:
        rows: the rows of one or more runs.
    """
    pairs: dict[tuple[str, str], None] = {}
    for row in rows:
        for task, metrics in row.tasks.items():
            for metric in metrics if isinstance(metrics, dict) else {}:
                pairs[(str(task), str(metric))] = None
    return list(pairs)


def settings_text(settings: dict[str, Any]) -> str:
    """A variant's method settings as one line: `key=value, ...` (JSON values, keys in order).

    Args:
        settings: the row's `method_settings`.
    """
    return ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in settings.items())


def _records(
    results: dict[str, Any],
    pairs: list[tuple[str, str]],
    figures: tuple[Figure, ...],
    method_columns: tuple[tuple[str, str, str], ...],
) -> list[dict[str, Any]]:
    records = []
    for row in checked_rows(results):
        record: dict[str, Any] = {"variant": row.variant}
        for figure in figures:
            record[figure.column] = scaled(getattr(row, figure.key), figure)
            if figure.err_key:
                record[figure.err_column] = scaled(getattr(row, figure.err_key), figure)
        for task, metric in pairs:
            metrics = row.tasks.get(task)
            value = metrics.get(metric) if isinstance(metrics, dict) else None
            record[f"{task}/{metric}"] = value
        record["notes"] = "; ".join(str(note) for note in row.notes) or None
        record["method_settings"] = settings_text(row.method_settings) or None
        for section, key, column in method_columns:
            record[column] = (results.get(section) or {}).get(key)
        records.append(record)
    return records


def _columns(
    pairs: list[tuple[str, str]],
    figures: tuple[Figure, ...],
    method_columns: tuple[tuple[str, str, str], ...],
) -> list[str]:
    columns = ["variant"]
    for figure in figures:
        columns.append(figure.column)
        if figure.err_column:
            columns.append(figure.err_column)
    columns += [f"{task}/{metric}" for task, metric in pairs]
    columns += ["notes", "method_settings"]
    columns += [column for _, _, column in method_columns]
    return columns


def _frame(records: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame.from_records(records, columns=columns)
    # Whole numbers stay integers where some rows lack them (pandas' nullable Int64), not 1.0.
    for column in columns:
        values = [r.get(column) for r in records if r.get(column) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            frame[column] = frame[column].astype("Int64")
    return frame


def to_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per variant, in measured order: its figures (units in the column names; the run's
    task decides which: perplexity for decoders, pseudo-perplexity or cosine for encoders), task
    scores as `task/metric`, notes, settings, and the run's method.

    Args:
        results: a results.json as a dict.

    Returns:
        The table; a figure that was not measured is missing (NaN / <NA>), never made up.
    """
    pairs = task_columns(checked_rows(results))
    task = task_of(results)
    figures, method_columns = figures_for(task), method_columns_for(task)
    return _frame(_records(results, pairs, figures, method_columns), _columns(pairs, figures, method_columns))


def combined_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows of several runs in one table, with a leading `model` column.

    Args:
        runs: results.json dicts, in the order their rows should appear.
    """
    pairs = task_columns([row for results in runs for row in checked_rows(results)])
    tasks = [task_of(results) for results in runs]
    figures, method_columns = figures_for(tasks), method_columns_for(tasks)
    records = []
    for results in runs:
        model = (results.get("model") or {}).get("id")
        records += [
            {"model": model, **record} for record in _records(results, pairs, figures, method_columns)
        ]
    return _frame(records, ["model", *_columns(pairs, figures, method_columns)])


# A cell a spreadsheet would run as a formula starts with one of these (OWASP's CSV injection list,
# and their full-width forms, which some spreadsheets read the same way).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def defuse(value: Any) -> Any:
    """A text cell made inert for spreadsheets: one starting like a formula gets a leading `'`
    (OWASP's advice), which spreadsheets show as text. A carriage return becomes a line feed: the
    CSV writer quotes a cell holding a line feed, but would leave a lone carriage return bare, and
    readers take that for the end of the row (a new row, starting with whatever followed). Numbers
    and other values are unchanged, so a negative figure stays a number.

    Args:
        value: a cell or a column name.
    """
    if not isinstance(value, str):
        return value
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def frame_csv(frame: pd.DataFrame) -> str:
    """A table as CSV text: empty cells for missing figures, full precision.

    Text from results.json (model and variant names, settings, notes, task names...) cannot run as a
    formula when the file is opened in a spreadsheet, nor end its row early: a text cell (or column
    name) that starts with `=`, `+`, `-`, `@` or a tab is written with a leading `'`, and carriage
    returns in text become line feeds (see `defuse`).

    Args:
        frame: from `to_frame` or `combined_frame`.
    """
    from pandas.api.types import is_object_dtype, is_string_dtype

    safe = frame.rename(columns=defuse)
    for column in safe.columns:
        if is_object_dtype(safe[column]) or is_string_dtype(safe[column]):
            safe[column] = safe[column].map(defuse)
    return safe.to_csv(index=False, na_rep="", lineterminator="\n")


def write_csv(results: dict[str, Any], path: str | Path) -> Path:
    """Write `to_frame(results)` as CSV, atomically (temporary file, then rename).

    Args:
        results: a results.json as a dict.
        path: the CSV file to write.

    Returns:
        The path written.
    """
    return write_text_atomic(Path(path), frame_csv(to_frame(results)))
