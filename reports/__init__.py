"""Reports: views of results.json, nothing more.

`write_report(results, out_dir)` writes `report.csv` (pandas) and `report.html` (one self-contained
page: verdict, method, table, inline SVG charts) for one run; `compare(paths, out_dir)` does the
same for several runs side by side (`hubquant report A/results.json B/results.json --out DIR`).
Both are pure functions of the results: every figure is read from results.json, converted to its
display unit at most. Files are written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError
from hubquant.evaluate.results import read_results
from hubquant.files import write_text_atomic

from .html import render_comparison_html, render_html, write_html
from .tables import checked_rows, combined_frame, frame_csv, to_frame, write_csv

__all__ = ["compare", "render_html", "to_frame", "write_csv", "write_html", "write_report"]

CSV_NAME = "report.csv"
HTML_NAME = "report.html"


def write_report(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write the CSV and HTML reports of one run.

    Args:
        results: a results.json as a dict (as `hubquant.evaluate.results.read_results` returns it).
        out_dir: the folder to write `report.csv` and `report.html` into (created if missing).

    Returns:
        The paths of the CSV and the HTML file.
    """
    out = Path(out_dir)
    # Render both before writing either, so that bad results leave no half-made report behind.
    csv_text, html_text = frame_csv(to_frame(results)), render_html(results)
    return write_text_atomic(out / CSV_NAME, csv_text), write_text_atomic(out / HTML_NAME, html_text)


def compare(results_paths: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Put several runs side by side: one CSV with a leading `model` column, and one HTML page with
    every verdict, a combined table and a section per run. With one path, the one run's report.

    Args:
        results_paths: results.json files of `hubquant eval` runs (or the folders holding them).
        out_dir: the folder to write `report.csv` and `report.html` into (created if missing).

    Returns:
        The paths of the CSV and the HTML file.

    Raises:
        HubquantError: a file is missing, is not JSON, or is not a results.json of this schema.
    """

    if not results_paths:
        raise HubquantError("no results.json given; pass one or more results.json files of `hubquant eval`")
    runs = []
    for path in map(Path, results_paths):
        if path.is_dir():  # a run's folder stands for its results.json
            path = path / "results.json"
        results = read_results(path)
        try:
            checked_rows(results)
        except HubquantError as error:
            raise HubquantError(f"{path}: {str(error).removeprefix('results.json: ')}") from None
        runs.append(results)
    if len(runs) == 1:
        return write_report(runs[0], out_dir)
    out = Path(out_dir)
    csv_text, html_text = frame_csv(combined_frame(runs)), render_comparison_html(runs)
    return write_text_atomic(out / CSV_NAME, csv_text), write_text_atomic(out / HTML_NAME, html_text)
