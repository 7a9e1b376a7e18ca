"""The example reports in reports/examples/ are views of their results.json: rendering them again
gives the very bytes in the repository. Any change to how reports are built is held to this."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubquant.evaluate.results import read_results
from hubquant.reports import write_report

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "reports" / "examples").glob("*/results.json"))


def test_there_are_examples():
    assert {p.parent.name for p in EXAMPLES} >= {"SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"}


@pytest.mark.parametrize("results_path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_reports_render_byte_identical(results_path: Path, tmp_path: Path):
    csv_path, html_path = write_report(read_results(results_path), tmp_path)
    for written in (csv_path, html_path):
        shipped = results_path.parent / written.name
        assert written.read_bytes() == shipped.read_bytes(), (
            f"{shipped} no longer renders from its results.json"
        )
