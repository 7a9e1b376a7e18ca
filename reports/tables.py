"""The figures of a results.json as a table: one row per variant, units in the column names.

Nothing is computed here beyond unit conversions (bytes to MB, fractions to %): every number comes
from results.json as it is, and a figure that was not measured stays empty. Which figures a run
has, with their columns, labels and units, is its task's word (`Task.figures`, in
`hubquant/evaluate/tasks/`): `figures_for(task)` reads them by the results' `task`, for the CSV and
the HTML report alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import HubquantError
from hubquant.evaluate.results import COMMON, Row, rows_of, task_of
from hubquant.evaluate.tasks import Figure, get_task, registered_tasks
from hubquant.files import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd


def figures_for(tasks: str | list[str]) -> tuple[Figure, ...]:
    """The figures of a run's task (`Task.figures`), or of several runs' tasks together (each
    column once, in first-seen order).

    Args:
        tasks: one task's name, or the names of the runs' tasks in one table.
    """
    out: dict[str, Figure] = {}
    for task in [tasks] if isinstance(tasks, str) else tasks:
        for figure in get_task(task).figures:
            out.setdefault(figure.column, figure)
    return tuple(out.values())


def method_columns_for(tasks: str | list[str]) -> tuple[tuple[str, str, str], ...]:
    """The run-wide settings repeated on CSV rows for a task (`Task.method_columns`), or for
    several tasks (each column once).

    Args:
        tasks: one task's name, or the names of the runs' tasks in one table.
    """
    out: dict[str, tuple[str, str, str]] = {}
    for task in [tasks] if isinstance(tasks, str) else tasks:
        for item in get_task(task).method_columns:
            out.setdefault(item[2], item)
    return tuple(out.values())


def _numeric() -> set[str]:
    """The row keys that must hold numbers: every registered task's figures and their errors."""
    figures = [f for task in registered_tasks() for f in task.figures]
    return {f.key for f in figures} | {f.err_key for f in figures if f.err_key}


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
    numeric = _numeric()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("variant"), str) or not row["variant"]:
            raise HubquantError(f"results.json: rows[{i}] has no variant name; rerun `hubquant eval`")
        for key, value in row.items():
            if value is None:
                continue
            if key in numeric and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise HubquantError(
                    f"results.json: rows[{i}].{key} is {value!r}, not a finite number or null; "
                    "rerun `hubquant eval`"
                )
            if key in COMMON and isinstance(COMMON[key], dict) and not isinstance(value, dict):
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
            record[figure.column] = scaled(row.get(figure.key), figure)
            if figure.err_key:
                record[figure.err_column] = scaled(row.get(figure.err_key), figure)
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
