"""Reports are views of results.json: the CSV, the HTML page, `hubquant report`, and the page as a
browser renders it (headless Chromium; skipped with a reason where none is installed, failed in CI).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from hubquant.cli import main
from hubquant.evaluate.results import Row, row_dict, verdict, write_results
from hubquant.reports import compare, render_html, to_frame, write_csv, write_html, write_report
from hubquant.reports.charts import decode_speed, nice_ticks, quality_vs_size, tick_text
from hubquant.reports.html import number, with_error

EVIL = "acme/\"tiny\" 'q' <script>alert(1)</script>"
VARIANTS = ["base", "int4", "nf4", "int8", "fp8"]


def make_results(model_id: str = EVIL, **budget: float) -> dict[str, Any]:
    """A plausible results.json of a 135M model: base, int4, nf4 (some figures missing), int8, and
    fp8, which failed and has no figures at all."""
    rows = [
        Row("base", {"dtype": "bfloat16"}, ppl=12.3456, ppl_err=0.0567, nll=2.5133, kld_mean=0.0, kld_err=0.0,
            kld_median=0.0, kld_p99=0.0, kld_max=0.0, top1_agreement=1.0, dp_rms=0.0, prefill_tok_s=446.2,
            prefill_sd=5.1, decode_tok_s=24.6, decode_sd=0.4, ttft_s=0.061, disk_bytes=269_060_096,
            weight_bytes=269_060_096, peak_rss_bytes=812_000_000, load_s=1.58,
            tasks={"arc_easy": {"acc": 0.4123, "acc_stderr": 0.01}}),
        Row("int4", {"method": "int4", "library": "torchao", "group_size": 128, "hqq": False}, ppl=13.0112,
            ppl_err=0.0612, nll=2.5658, kld_mean=0.0412, kld_err=0.0011, kld_median=0.021, kld_p99=0.41,
            kld_max=2.3, top1_agreement=0.912, dp_rms=0.0412, prefill_tok_s=301.0, prefill_sd=3.2,
            decode_tok_s=41.3, decode_sd=0.9, ttft_s=0.09, disk_bytes=98_000_000, weight_bytes=80_100_000,
            peak_rss_bytes=612_000_000, load_s=0.9, skipped_layers=1,
            tasks={"arc_easy": {"acc": 0.401, "acc_stderr": 0.01}}, notes=["lm_head kept in <b>bf16</b>"]),
        Row("nf4", {"method": "nf4", "library": "bitsandbytes", "blocksize": 64}, ppl=12.9, ppl_err=0.06,
            kld_mean=0.0335, kld_err=0.0009, top1_agreement=0.925, disk_bytes=101_000_000,
            weight_bytes=90_000_000, load_s=1.1),
        Row("int8", {"method": "int8"}, ppl=12.36, ppl_err=0.0568, nll=2.5145, kld_mean=0.00051,
            kld_err=0.00002, kld_median=0.0002, kld_p99=0.004, kld_max=0.05, top1_agreement=0.991,
            dp_rms=0.004, prefill_tok_s=390.0, prefill_sd=4.0, decode_tok_s=33.0, decode_sd=0.5, ttft_s=0.07,
            disk_bytes=160_000_000, weight_bytes=150_000_000, peak_rss_bytes=700_000_000, load_s=1.0),
        Row("fp8", {"method": "fp8"}, notes=["failed: no float8 kernel for this CPU"]),
    ]  # fmt: skip
    budget = {"max_kld": 0.05, "min_top1": 0.9, **budget}
    return {
        "schema_version": 1,
        "model": {"id": model_id, "commit": "0123456789abcdef0123456789abcdef01234567", "family": "llama"},
        "dataset": {"name": "python-docs", "sha256": "5e" * 32, "chars": 1_234_567},
        "method": {
            "ppl_method": "chunks",
            "ctx": 512,
            "stride": None,
            "windows": 16,
            "max_chunks": 16,
            "tokens_scored": 4096,
            "bos": "fixed: the tokenizer does not prepend BOS; prepended (id 1)",
            "dtype": "bf16",
            "log_softmax": "fp32",
            "speed_runs": 3,
            "decode_tokens": 128,
        },  # fmt: skip
        "environment": {
            "hubquant": "0.1.0",
            "torch": "2.13.0",
            "torchao": "0.18.0",
            "bitsandbytes": "0.48.1",
            "transformers": None,
            "device": "cpu",
            "device_name": "x86_64",
            "threads": 2,
            "python": "3.11.7",
        },  # fmt: skip
        "budget": budget,
        "rows": [row_dict(r) for r in rows],
        "verdict": verdict(rows, budget),
        "created": "2026-11-22T03:00:00Z",
    }


class Page(HTMLParser):
    """The parts of a page the tests look at: elements (tag, attributes), visible text, and the
    variant rows of each table."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.rows: dict[str, list[str]] = {}  # table id -> data-variant of each variant row
        self._table: str | None = None
        self._skip = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag == "table":
            self._table = a.get("id", "")
            self.rows[self._table] = []
        if tag == "tr" and "variant-row" in a.get("class", "").split() and self._table is not None:
            self.rows[self._table].append(a["data-variant"])
        if tag in ("style", "title"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        if tag in ("style", "title"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())

    def tags(self, name: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == name]


def assert_self_contained(html: str) -> None:
    """Nothing to load: no script, no element that fetches anything, no URL anywhere in the file."""
    low = html.lower()
    assert "http://" not in low and "https://" not in low and "file:" not in low
    page = Page(html)
    loaders = {
        "script",
        "link",
        "img",
        "iframe",
        "object",
        "embed",
        "base",
        "audio",
        "video",
        "source",
        "image",
    }
    assert not [tag for tag, _ in page.elements if tag in loaders]
    fetching = {"src", "href", "xlink:href", "srcset", "action", "data", "poster", "background"}
    assert not [(tag, a) for tag, a in page.elements if fetching & set(a)]
    styles = low.split("<style>")[1].split("</style>")[0]
    assert "url(" not in styles and "@import" not in styles and low.count("<style>") == 1
    csp = [a["content"] for a in page.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and csp[0].startswith("default-src 'none'")  # and the browser would refuse any load


# -- CSV ----------------------------------------------------------------------------------------------------


def test_frame_has_one_row_per_variant_units_in_names_and_empty_missing_figures(tmp_path):
    results = make_results()
    frame = to_frame(results)
    assert list(frame["variant"]) == VARIANTS
    columns = list(frame.columns)
    assert columns[:6] == [
        "variant",
        "ppl",
        "ppl_err",
        "kld_mean (nats)",
        "kld_err (nats)",
        "top1_agreement (%)",
    ]
    for column in ("disk (MB)", "weights (MB)", "decode (tok/s)", "decode_sd (tok/s)", "prefill (tok/s)",
                   "ttft (s)", "load (s)", "peak_rss (MB)", "kld_p99 (nats)", "nll (nats/token)",
                   "arc_easy/acc", "notes", "method_settings", "ctx (tokens)", "tokens_scored", "device",
                   "threads", "text_sha256", "bos"):  # fmt: skip
        assert column in columns, column
    assert columns.index("arc_easy/acc") > columns.index("skipped_layers")

    int4 = frame.set_index("variant").loc["int4"]
    assert int4["ppl"] == 13.0112 and int4["kld_mean (nats)"] == 0.0412
    assert int4["top1_agreement (%)"] == 91.2  # fraction -> %, float noise rounded away
    assert int4["disk (MB)"] == 98.0 and int4["peak_rss (MB)"] == 612.0  # bytes -> 10^6 bytes
    assert int4["skipped_layers"] == 1 and str(frame["skipped_layers"].dtype) == "Int64"
    assert int4["method_settings"] == 'method="int4", library="torchao", group_size=128, hqq=false'
    assert int4["ctx (tokens)"] == 512 and int4["device"] == "cpu"

    fp8 = frame.set_index("variant").loc["fp8"]
    assert fp8[["ppl", "kld_mean (nats)", "decode (tok/s)", "disk (MB)"]].isna().all()
    nf4 = frame.set_index("variant").loc["nf4"]
    assert pd.isna(nf4["decode (tok/s)"]) and pd.isna(nf4["kld_p99 (nats)"]) and nf4["disk (MB)"] == 101.0

    path = write_csv(results, tmp_path / "out" / "report.csv")
    text = path.read_text()
    back = pd.read_csv(path)
    assert list(back.columns) == columns and list(back["variant"]) == VARIANTS
    fp8_line = text.splitlines()[1 + VARIANTS.index("fp8")]
    assert fp8_line.startswith("fp8," + "," * 10)  # empty cells, not 0 or NaN
    assert "nan" not in text.lower()


def test_frame_of_results_without_rows_is_empty_with_all_columns():
    results = make_results()
    results["rows"] = []
    frame = to_frame(results)
    assert len(frame) == 0 and "kld_mean (nats)" in frame.columns


# -- HTML ---------------------------------------------------------------------------------------------------


def test_html_opens_with_the_verdict_then_method_table_and_charts():
    results = make_results()
    html = render_html(results)
    page = Page(html)
    text = page.visible
    assert results["verdict"]["variant"] == "int4"  # the smallest within the budget

    # One table row per variant, in measured order, the verdict's highlighted.
    assert page.rows == {"run0-results": VARIANTS}
    chosen = [a["data-variant"] for a in page.tags("tr") if "chosen" in a.get("class", "").split()]
    assert chosen == ["int4"]

    # The verdict first, then model, dataset and method, then the table, then the charts.
    order = [
        text.index(results["verdict"]["text"]),
        text.index("Model, data and method"),
        text.index("Results per variant"),
        text.index("At a glance"),
    ]
    assert order == sorted(order)
    assert text.index(results["verdict"]["text"]) < text.index("python-docs")
    assert "BOS: fixed: the tokenizer does not prepend BOS" in text  # said up front

    # The method and environment, every key of them.
    for value in ("chunks", "512 tokens", "4,096", "5e" * 32, "1,234,567", "bf16", "fp32", "2.13.0",
                  "0.18.0", "0.48.1", "3.11.7", "x86_64", "0123456789abcdef0123456789abcdef01234567",
                  "0.05 nats", "90 %", "llama", "2026-11-22T03:00:00Z"):  # fmt: skip
        assert value in text, value

    # Figures with units and errors; missing ones shown as missing.
    for unit in ("nats", "tok/s", "MB", "%", "nats/token"):
        assert unit in text
    for figure in ("13.011 ± 0.061", "0.0412 ± 0.0011", "41.30 ± 0.90", "98.0", "91.2", "0.0335",
                   "0.412 ± 0.010"):  # fmt: skip
        assert " ".join(figure.split(" ± ")) in text or figure in text, figure
    assert "Not measured in this run: CUDA alloc., CUDA reserved." in text
    headers = [h for h in text.split("Results per variant")[1].split("base")[0].split()]
    assert "arc_easy:" in headers and "acc_stderr" not in headers  # the error sits in acc's cell

    # Charts: inline SVG, one point per variant with a size and a KLD, the budget dashed.
    assert len(page.tags("svg")) == 2
    assert len([a for a in page.tags("circle") if "point" in a["class"]]) == 4  # fp8 has no figures
    assert any("budget" == a["class"] for a in page.tags("line"))
    assert "log scale" in text  # 0.00051 .. 0.05 spans decades
    assert "Not drawn: fp8 (no disk size and mean KLD)" in text
    assert len([a for a in page.tags("rect") if a["class"].startswith("bar")]) == 3  # nf4 and fp8 unmeasured
    assert any(a["class"] == "bar base" for a in page.tags("rect"))
    assert_self_contained(html)


def test_html_escapes_every_text():
    results = make_results()
    results["rows"][1]["method_settings"]["path"] = '"><script>alert(2)</script>'
    results["dataset"]["name"] = "<img src=x onerror=alert(3)>"
    html = render_html(results)
    assert "<script>" not in html.lower() and "<b>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;tiny&#34; &#39;q&#39;" in html  # quotes too, so attributes cannot be broken out of
    page = Page(html)
    assert EVIL in page.visible  # shown as text, exactly
    assert "lm_head kept in <b>bf16</b>" in page.visible
    assert not page.tags("script") and not page.tags("b") and not page.tags("img")
    assert_self_contained(html)


def test_html_of_incomplete_results_says_so():
    results = make_results()
    del results["verdict"]
    results["rows"] = results["rows"][:1]
    del results["environment"]
    page = Page(render_html(results))
    assert "No verdict recorded" in page.visible
    assert page.rows == {"run0-results": ["base"]}
    results["rows"] = []
    page = Page(render_html(results))
    assert page.rows == {"run0-results": []} and not page.tags("svg")


def test_no_variant_within_budget_is_stated():
    results = make_results(max_kld=0.0001)
    assert results["verdict"]["variant"] is None
    html = render_html(results)
    page = Page(html)
    assert "No variant is within the budget" in page.visible
    assert not [a for a in page.tags("tr") if "chosen" in a.get("class", "")]


def test_chart_scales():
    rows = [Row.from_dict(r) for r in make_results()["rows"]]
    chart = quality_vs_size(rows, 0.05, "nf4")
    texts = [s["text"] for s in chart.shapes if s["kind"] == "text"]
    assert "0" in texts and "0.0001" in texts and "0.1" in texts  # log decades, and zero on its own line
    points = {s["tip"].split(":")[0]: s for s in chart.shapes if s["kind"] == "circle"}
    assert set(points) == {"base", "int4", "nf4", "int8"}
    assert points["base"]["y"] > points["int8"]["y"] > points["int4"]["y"]  # lower KLD lower down
    assert points["int4"]["x"] < points["nf4"]["x"] < points["int8"]["x"] < points["base"]["x"]
    assert "chosen" in points["nf4"]["cls"]

    close = [Row("a", disk_bytes=10**8, kld_mean=0.02), Row("b", disk_bytes=2 * 10**8, kld_mean=0.03)]
    linear = quality_vs_size(close, 0.05, None)
    assert not any("log scale" in s.get("text", "") for s in linear.shapes)
    assert [s["text"] for s in linear.shapes if s["kind"] == "text" and s["anchor"] == "end"][:2] == [
        "0",
        "0.02",
    ]

    speed = decode_speed(rows, "nf4")
    values = [s["text"] for s in speed.shapes if s.get("cls") == "bar-value"]
    assert values == ["24.6 ± 0.4 tok/s", "41.3 ± 0.9 tok/s", "33.0 ± 0.5 tok/s"]
    assert speed.left_out == ["nf4 (not measured)", "fp8 (not measured)"]

    assert nice_ticks(282) == [0, 100, 200, 300] and nice_ticks(0.0453)[-1] == 0.05
    assert [tick_text(v) for v in (0, 1e-4, 0.05, 2.5, 1000, 1e-7)] == [
        "0",
        "0.0001",
        "0.05",
        "2.5",
        "1,000",
        "1e-7",
    ]


def test_number_formats():
    assert number(0.0412) == "0.0412" and number(12345.678) == "12,346" and number(0.021) == "0.021"
    assert with_error(13.0112, 0.0612) == ("13.011", "± 0.061")
    assert with_error(0.0, 0.0) == ("0", "± 0") and with_error(2.5, None) == ("2.5", None)


# -- writing and comparing ----------------------------------------------------------------------------------


def test_write_report_is_atomic_and_leaves_old_files_on_bad_input(tmp_path):
    out = tmp_path / "report"
    csv_path, html_path = write_report(make_results(), out)
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.html"]  # no temporary left
    before = html_path.read_text()
    bad = make_results()
    bad["rows"][2]["ppl"] = "12.9"
    with pytest.raises(Exception, match=r"rows\[2\]\.ppl"):
        write_report(bad, out)
    assert html_path.read_text() == before and sorted(p.name for p in out.iterdir()) == [
        "report.csv",
        "report.html",
    ]
    assert write_html(make_results("other/model"), html_path) == html_path
    assert "other/model" in html_path.read_text()


def _save(folder: Path, results: dict[str, Any]) -> Path:
    write_results(folder / "results.json", results)
    return folder / "results.json"


def test_compare_puts_runs_side_by_side(tmp_path):
    second = make_results("HuggingFaceTB/SmolLM2-135M")
    second["rows"] = second["rows"][:2] + second["rows"][3:4]  # base, int4, int8
    a, b = _save(tmp_path / "a", make_results()), _save(tmp_path / "b", second)
    csv_path, html_path = compare([a, b.parent], tmp_path / "cmp")  # a run's folder works too
    frame = pd.read_csv(csv_path)
    assert list(frame.columns[:2]) == ["model", "variant"]
    assert list(frame["model"]) == [EVIL] * 5 + ["HuggingFaceTB/SmolLM2-135M"] * 3
    assert list(frame["variant"]) == [*VARIANTS, "base", "int4", "int8"]
    html = html_path.read_text()
    page = Page(html)
    assert page.rows == {
        "combined-results": [*VARIANTS, "base", "int4", "int8"],
        "run0-results": VARIANTS,
        "run1-results": ["base", "int4", "int8"],
    }
    text = page.visible
    assert text.index("Verdicts") < text.index("All variants") < text.index("Model, data and method")
    assert text.count(make_results()["verdict"]["text"]) >= 2  # in the summary and in its section
    assert len(page.tags("svg")) == 4
    assert "<script>" not in html
    assert_self_contained(html)


def test_cli_report_on_two_results_files(tmp_path, capsys):
    a = _save(tmp_path / "a", make_results())
    b = _save(tmp_path / "b", make_results("org/second"))
    out = tmp_path / "both"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'report.csv'}" in printed and f"wrote {out / 'report.html'}" in printed
    assert len(pd.read_csv(out / "report.csv")) == 10
    # One file, no --out: the report goes beside it.
    assert main(["report", str(a)]) == 0
    assert (a.parent / "report.html").is_file() and (a.parent / "report.csv").is_file()
    assert Page((a.parent / "report.html").read_text()).rows == {"run0-results": VARIANTS}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "not found"),
        ("not-json", "is not valid JSON"),
        ("schema", "not a hubquant results.json of schema version 1"),
        ("rows", "rows[1].kld_mean is 'small', not a finite number or null"),
        ("variant", "rows[0] has no variant name"),
        ("two-without-out", "several results files need --out DIR"),
    ],
)
def test_cli_report_bad_input_is_one_line(tmp_path, capsys, case, expected):
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    results = make_results()
    argv = ["report", str(path), "--out", str(tmp_path / "out")]
    if case == "not-json":
        path.write_text("{ not json")
    elif case == "schema":
        path.write_text(json.dumps({**results, "schema_version": 99}))
    elif case == "rows":
        results["rows"][1]["kld_mean"] = "small"
        path.write_text(json.dumps(results))
    elif case == "variant":
        del results["rows"][0]["variant"]
        path.write_text(json.dumps(results))
    elif case == "two-without-out":
        _save(path.parent, results)
        argv = ["report", str(path), str(path)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("hubquant: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_report_command_does_not_import_torch(tmp_path):
    a = _save(tmp_path / "a", make_results())
    code = """
        import sys
        from hubquant.cli import main
        assert main(["report", "--help"]) == 0
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: hubquant report"), result.stderr
    code = f"""
        import sys
        from hubquant.cli import main
        assert main(["report", {str(a)!r}, "--out", {str(tmp_path / "o")!r}]) == 0
        assert "torch" not in sys.modules, "hubquant report imported torch"
        print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONSAFEPATH": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


# -- in a browser -------------------------------------------------------------------------------------------

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    message = (
        f"no headless Chromium found (looked for {', '.join(BROWSERS)} on PATH); "
        "install it with `apt-get install chromium-headless-shell`"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run the browser test")
    pytest.skip(message)


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        browser, "--no-sandbox", "--headless", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_report_in_headless_chromium(tmp_path):
    """The page as Chromium renders it: one table row per variant, the `<script>` model id shown as
    text, no script element in the DOM; and a screenshot, kept beside the report as an artifact."""
    browser = _browser()
    _, html_path = write_report(make_results(), tmp_path / "report")
    url = html_path.resolve().as_uri()

    dom = _chromium(browser, tmp_path / "profile", "--dump-dom", url).stdout
    page = Page(dom)
    assert page.rows == {"run0-results": VARIANTS}
    assert not page.tags("script")  # the model id's <script> stayed text
    assert EVIL in page.visible
    assert len(page.tags("svg")) == 2

    shot = tmp_path / "report" / "report.png"
    _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 2000) and len(data) > 50_000  # a drawn page, not a blank one
    print(f"screenshot: {shot}")


def test_results_fixture_is_json_clean():
    # The fixture itself must be what write_results accepts (no NaN), or the tests prove nothing.
    json.dumps(copy.deepcopy(make_results()), allow_nan=False)
