"""The HTML report: one self-contained file, rendered from results.json by one jinja2 template.

The file needs nothing else to be read: no script, no stylesheet, font or image to fetch (a
Content-Security-Policy forbids loading any), charts as inline SVG. It opens offline and prints.
The template (`templates/report.html.j2`) runs with autoescape on; Python computes the values and
the chart coordinates, the template writes every piece of markup, so any text from results.json
(a model id holding `<script>`, quotes, a note) is shown as text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hubquant.evaluate.results import Row, task_of
from hubquant.evaluate.tasks import Figure, Label, get_task, setting_text
from hubquant.files import write_text_atomic

from .charts import Chart, cosine_vs_size, decode_speed, encode_speed, quality_vs_size
from .tables import checked_rows, figures_for, scaled, task_columns

TEMPLATE = "report.html.j2"

# Labels of the sections every run has; a run's method and budget are labelled by its task
# (`Task.method_labels`, `Task.budget_labels`). A key not labelled is shown as named.
_LABELS: dict[str, dict[str, Label]] = {
    "model": {"id": Label("model"), "commit": Label("commit"), "family": Label("family")},
    "dataset": {"name": Label("dataset"), "sha256": Label("text sha256"), "chars": Label("characters")},
    "environment": {
        "device": Label("device"),
        "device_name": Label("device name"),
        "threads": Label("threads"),
        "python": Label("python"),
    },
}


@dataclass
class Cell:
    """One table cell: its text, the ± part if any, whether it is a number (right-aligned) or missing."""

    text: str
    err: str | None = None
    numeric: bool = True
    missing: bool = False


@dataclass
class TableRow:
    """One variant's row of the HTML table."""

    variant: str
    settings: list[str]  # `key=value` of the variant's method settings
    cells: list[Cell]
    base: bool = False
    chosen: bool = False


@dataclass
class Table:
    """The HTML table: headers (label, unit), its rows in groups (one per model when several
    runs are compared; the group's heading is then the model id), and the figures no row has."""

    id: str
    headers: list[tuple[str, str]]
    groups: list[tuple[str | None, list[TableRow]]]
    with_model: bool = False
    not_measured: list[str] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (variant, note)
    glossary: list[tuple[str, str]] = field(default_factory=list)  # (label, meaning) of the columns shown


@dataclass
class RunView:
    """What the template shows of one results.json."""

    id: str
    model_id: str
    verdict_text: str
    verdict_variant: str | None
    bos_note: str | None
    groups: list[tuple[str, list[tuple[str, str, str]]]]  # heading, [(label, value, unit)]
    summary: dict[str, str]
    table: Table
    charts: list[Chart]
    created: str
    caption: str | None = None  # the table's method line; None: the template's decoder caption


def number(value: float, digits: int = 4) -> str:
    """`value` to at most `digits` significant digits, with thousands separators, no exponent and
    no trailing zeros (which would claim a precision the stored value does not have).

    Args:
        value: the number.
        digits: significant digits.
    """
    if value == 0:
        return "0"
    if isinstance(value, int) and abs(value) >= 10 ** (digits - 1):
        return f"{value:,}"
    decimals = min(12, max(0, digits - 1 - math.floor(math.log10(abs(value)))))
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def with_error(value: float, error: float | None, digits: int = 4) -> tuple[str, str | None]:
    """`value` and `± error`: the error to two significant digits, the value to the same decimals.

    Args:
        value: the figure.
        error: its standard error or deviation (None: the value alone, at most `digits` significant).
        digits: significant digits when there is no error, or the error is 0.

    Returns:
        The value's text and the error's (`± 0.057`), or None when there is no error.
    """
    if error is None:
        return number(value, digits), None
    if error == 0:
        return number(value, digits), "± 0"
    decimals = min(12, max(0, 1 - math.floor(math.log10(abs(error)))))
    return f"{value:,.{decimals}f}", f"± {abs(error):,.{decimals}f}"


def _figure_cell(row: Row, figure: Figure) -> Cell:
    value = scaled(row.get(figure.key), figure)
    if value is None:
        return Cell("—", missing=True)
    if figure.key == "skipped_layers":
        return Cell(f"{value:,}")
    if figure.unit == "MB":
        return Cell(f"{value:,.1f}")
    error = scaled(row.get(figure.err_key), figure) if figure.err_key else None
    if figure.unit in ("tok/s", "seq/s") and error is None:
        return Cell(f"{value:,.1f}")
    return Cell(*with_error(value, error, figure.digits))


def _labels(results: dict[str, Any], section: str) -> Mapping[str, Label]:
    task = get_task(results.get("task"))
    if section == "method":
        return task.method_labels
    if section == "budget":
        return task.budget_labels
    return _LABELS.get(section, {})


def _group(results: dict[str, Any], section: str) -> list[tuple[str, str, str]]:
    data = results.get(section) or {}
    labels = _labels(results, section)
    order = [k for k in labels if k in data] + [k for k in data if k not in labels]
    items = []
    for key in order:
        label = labels.get(key, Label(key))
        value = data[key]
        unit = label.values.get(value, label.unit) if isinstance(value, str) else label.unit
        items.append((label.label, setting_text(value, label.percent), unit if value is not None else ""))
    return items


def _model_id(results: dict[str, Any]) -> str:
    model_id = (results.get("model") or {}).get("id")
    return str(model_id) if model_id not in (None, "") else "unnamed model"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def task_scores(pairs: list[tuple[str, str]]) -> list[tuple[str, str, str | None]]:
    """lm-eval's (task, metric) pairs as table columns: a metric's standard error (`acc_stderr,none`
    beside `acc,none`) goes into its metric's cell as `± error` instead of a column of its own.

    Args:
        pairs: (task, metric) as `task_columns` finds them.

    Returns:
        (task, metric, the metric holding its standard error or None), in the pairs' order.
    """
    present = set(pairs)
    errors = set()
    scores = []
    for task, metric in pairs:
        name, comma, tail = metric.partition(",")
        err = f"{name}_stderr{comma}{tail}"
        if (task, err) in present:
            errors.add((task, err))
            scores.append((task, metric, err))
        else:
            scores.append((task, metric, None))
    return [score for score in scores if (score[0], score[1]) not in errors and score[1] != "alias"]


def build_table(runs: list[tuple[dict[str, Any], list[Row]]], table_id: str, with_model: bool) -> Table:
    """The HTML table of one or more runs: columns no row has are left out (and named).

    Args:
        runs: (results, its checked rows) per run.
        table_id: the element id.
        with_model: whether rows are grouped under their model's id (a comparison of several runs).
    """
    all_rows = [row for _, rows in runs for row in rows]
    candidates = figures_for([task_of(results) for results, _ in runs])
    figures = [f for f in candidates if any(r.get(f.key) is not None for r in all_rows)]
    missing = [f.label for f in candidates if f not in figures]
    scores = task_scores(task_columns(all_rows))
    headers = [(f.label, f.unit) for f in figures]
    headers += [(f"{task}: {metric.removesuffix(',none')}", "") for task, metric, _ in scores]
    glossary = [(f.label, f.meaning) for f in figures if f.meaning]
    table = Table(table_id, headers, [], with_model=with_model, not_measured=missing, glossary=glossary)
    for results, rows in runs:
        chosen = (results.get("verdict") or {}).get("variant")
        model = _model_id(results)
        group: list[TableRow] = []
        table.groups.append((model if with_model else None, group))
        for row in rows:
            cells = [_figure_cell(row, f) for f in figures]
            for task, metric, err_metric in scores:
                metrics = row.tasks.get(task)
                metrics = metrics if isinstance(metrics, dict) else {}
                value, error = metrics.get(metric), metrics.get(err_metric) if err_metric else None
                if _is_number(value):
                    cells.append(Cell(*with_error(value, error if _is_number(error) else None)))
                else:
                    cells.append(Cell("—" if value is None else str(value), missing=value is None))
            group.append(
                TableRow(
                    variant=row.variant,
                    settings=[
                        f"{key}={value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
                        for key, value in row.method_settings.items()
                    ],
                    cells=cells,
                    base=row.variant == "base",
                    chosen=row.variant == chosen,
                )
            )
            prefix = f"{model}, {row.variant}" if with_model else row.variant
            table.notes += [(prefix, str(note)) for note in row.notes]
    return table


def run_view(results: dict[str, Any], index: int = 0) -> RunView:
    """Everything the template shows of one run, as text and coordinates.

    Args:
        results: a results.json as a dict.
        index: the run's position in a comparison (makes element ids unique).
    """
    rows = checked_rows(results)
    verdict = results.get("verdict") or {}
    chosen = verdict.get("variant")
    budget = results.get("budget") or {}
    method = results.get("method") or {}
    environment = results.get("environment") or {}
    dataset = results.get("dataset") or {}
    bos = method.get("bos")
    prefix = f"run{index}-"
    percent = {key for key, label in _labels(results, "method").items() if label.percent}
    summary = {
        key: setting_text(value, key in percent)
        for key, value in {**method, **environment, "dataset": dataset.get("name")}.items()
    }
    max_kld = budget.get("max_kld")
    task = task_of(results)
    charts: list[Chart] = []
    if rows and task == "causal-lm":
        charts = [
            quality_vs_size(
                rows, max_kld if isinstance(max_kld, (int, float)) else None, chosen, prefix + "quality-size"
            ),
            decode_speed(rows, chosen, prefix + "decode-speed"),
        ]
    elif rows and task in ("masked-lm", "embedding"):
        min_cosine = budget.get("min_cosine")
        quality = (
            quality_vs_size(
                rows,
                max_kld if isinstance(max_kld, (int, float)) else None,
                chosen,
                prefix + "quality-size",
                per="masked token",
            )
            if task == "masked-lm"
            else cosine_vs_size(
                rows,
                min_cosine if isinstance(min_cosine, (int, float)) else None,
                chosen,
                prefix + "quality-size",
            )
        )
        speed = encode_speed(
            rows,
            chosen,
            prefix + "encode-speed",
            method.get("encode_batch", "—"),
            method.get("encode_length", "—"),
        )
        charts = [quality, speed]
    return RunView(
        id=f"run{index}",
        model_id=_model_id(results),
        verdict_text=str(
            verdict.get("text")
            or "No verdict recorded: this results.json has none (the run may not have finished)."
        ),
        verdict_variant=chosen,
        bos_note=str(bos) if isinstance(bos, str) and bos.startswith("fixed") else None,
        groups=[
            ("Model", _group(results, "model")),
            ("Dataset", _group(results, "dataset")),
            ("Method", _group(results, "method")),
            ("Environment", _group(results, "environment")),
            ("Quality budget", _group(results, "budget")),
        ],
        summary=summary,
        table=build_table([(results, rows)], prefix + "results", with_model=False),
        charts=charts,
        created=str(results.get("created") or "—"),
        caption=get_task(task).caption(results),
    )


def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _render(runs: list[RunView], combined: Table | None, title: str) -> str:
    source = resources.files(__package__).joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    return _environment().from_string(source).render(runs=runs, combined=combined, title=title)


def render_html(results: dict[str, Any]) -> str:
    """The report of one run as one self-contained HTML page.

    Args:
        results: a results.json as a dict.

    Returns:
        The page: the verdict first, then model, data and method, the table, the charts.
    """
    view = run_view(results)
    return _render([view], None, f"hubquant report: {view.model_id}")


def render_comparison_html(runs: list[dict[str, Any]]) -> str:
    """Several runs side by side: their verdicts, one combined table, then a section per run.

    Args:
        runs: results.json dicts, in the order to show them.
    """
    views = [run_view(results, i) for i, results in enumerate(runs)]
    combined = build_table(
        [(results, checked_rows(results)) for results in runs], "combined-results", with_model=True
    )
    title = "hubquant report: " + ", ".join(v.model_id for v in views)
    return _render(views, combined, title)


def write_html(results: dict[str, Any], path: str | Path) -> Path:
    """Write `render_html(results)` atomically (temporary file, then rename).

    Args:
        results: a results.json as a dict.
        path: the HTML file to write.

    Returns:
        The path written.
    """
    return write_text_atomic(Path(path), render_html(results))
