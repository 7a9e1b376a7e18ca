"""The Hub token never leaves huggingface_hub, and reports show hostile strings as text.

- Token: with `HF_TOKEN` set to a fake token (and, in a child process, a saved login instead), the
  commands run on tiny checkpoints (convert, quantize, eval, report, push --dry-run, generate, and
  downloads from a local stand-in for the Hub, errors included); stdout, stderr, every log record
  and every file they wrote are scanned for the token.
- Reports: results.json files whose every string (model, dataset, method, environment, variant,
  settings, notes, task names, verdict) is an HTML/JS payload are rendered; the page holds no
  element or attribute the template does not write, shows each payload as text, and the CSV has no
  cell a spreadsheet would run as a formula.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from fakehub import FakeHub

from hubquant.cli import main
from hubquant.evaluate.results import SCHEMA_VERSION, Row, row_dict
from hubquant.reports import compare, render_html, write_report
from hubquant.reports.html import render_comparison_html
from hubquant.reports.tables import FORMULA_STARTS, combined_frame, frame_csv, to_frame

pytestmark = pytest.mark.filterwarnings("ignore")

TOKEN = "hf_FAKEsecret1234567890"
SAVED = "hf_FAKEsaved0987654321"  # the saved login's token (HF_HOME/token)
WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(150)]
EVAL_ARGS = ["--ctx", "32", "--max-tokens", "200", "--no-speed", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def tiny(hf_checkpoint, tmp_path_factory) -> Path:
    """The tiny sharded Llama with a word-level tokenizer.json, and a text of its words beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    source, _ = hf_checkpoint("llama_gqa")
    root = tmp_path_factory.mktemp("secrets")
    folder = Path(shutil.copytree(source, root / "tiny"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(specials))
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(WORDS[3:]) for _ in range(400)))
    return folder


def files_holding(root: Path, secrets: list[str], skip: tuple[Path, ...] = ()) -> list[str]:
    """Files under `root` (not under `skip`) whose bytes hold any of `secrets`, plain or as JSON
    would escape it."""
    found = []
    needles = [s.encode() for s in secrets] + [json.dumps(s).encode()[1:-1] for s in secrets]
    for path in root.rglob("*"):
        if path.is_file() and not any(path == s or s in path.parents for s in skip):
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(str(path))
    return found


def test_the_scan_finds_a_planted_token(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "leak.json").write_text(json.dumps({"t": TOKEN}))
    (tmp_path / "skipped").write_text(TOKEN)
    assert files_holding(tmp_path, [TOKEN], skip=(tmp_path / "skipped",)) == [str(tmp_path / "a/b/leak.json")]


def test_token_never_printed_logged_or_written(
    tiny: Path, tmp_path: Path, monkeypatch, capsys, caplog
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUBQUANT_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.DEBUG)
    text = str(tiny.parent / "text.txt")
    runs = [
        ["convert", str(tiny), "--out", str(tmp_path / "converted")],
        ["quantize", str(tiny), "--method", "int8", "--out", str(tmp_path / "quantized")],
        [
            "eval",
            str(tiny),
            "--variants",
            "base,int8",
            "--dataset",
            text,
            *EVAL_ARGS,
            "--out",
            str(tmp_path / "ev"),
        ],
        ["report", str(tmp_path / "ev" / "results.json"), "--out", str(tmp_path / "report")],
        ["push", str(tmp_path / "quantized"), "--repo-id", "someorg/tiny-int8", "--dry-run"],
        ["generate", str(tiny), "--prompt", "w1 w2", "--max-new-tokens", "2", "--device", "cpu"],
    ]
    for argv in runs:
        assert main(argv) == 0, (argv, capsys.readouterr().err)
    failing = [
        ["convert", "someorg/not-cached", "--out", str(tmp_path / "x")],  # offline: not in the cache
        ["convert", str(tiny), "--out", str(tmp_path / "converted")],  # exists
        ["push", str(tmp_path / "ev"), "--repo-id", "someorg/x", "--dry-run"],  # not a quantized folder
    ]
    for argv in failing:
        assert main(argv) == 1, argv
    out, err = capsys.readouterr()
    assert "dry run: nothing is sent" in out and "hubquant: error:" in err  # the scan saw real output
    assert TOKEN not in out and TOKEN not in err
    assert TOKEN not in caplog.text and all(TOKEN not in str(r.args) for r in caplog.records)
    assert files_holding(tmp_path, [TOKEN]) == []
    assert files_holding(tiny.parent, [TOKEN]) == []
    print(
        f"\ntoken scan: {len(runs) + len(failing)} commands, {sum(1 for _ in tmp_path.rglob('*'))} paths, 0 leaks"
    )


HUB_CHILD = """
import sys
import huggingface_hub
from hubquant.cli import main
assert huggingface_hub.get_token() == sys.argv[1], "the saved login is not in play"
for argv in (
    ["convert", "org/tiny", "--out", sys.argv[2] + "/from-hub"],
    ["eval", "org/tiny", "--variants", "base", "--out", sys.argv[2] + "/ev", *sys.argv[4:]],
    ["generate", "org/gated"],
    ["generate", "org/nothing"],
    ["push", sys.argv[3], "--repo-id", "org/new-int8"],
):
    print("exit", main(argv), flush=True)
"""


def test_token_of_the_saved_login_stays_out_of_hub_downloads_and_errors(tiny: Path, tmp_path: Path) -> None:
    """Against a local stand-in for the Hub, with the token saved by `hf auth login` (HF_HOME/token)
    and no HF_TOKEN: downloads, a gated and a missing repo, and a push the stand-in refuses."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text(SAVED)
    quantized = tmp_path / "quantized"
    assert main(["quantize", str(tiny), "--method", "int8", "--out", str(quantized)]) == 0
    server = FakeHub()
    server.repos = {"org/tiny": tiny}
    server.gated = {"org/gated"}
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "PYTHONSAFEPATH": "1", "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_HUB_DOWNLOAD_TIMEOUT": "5"}  # fmt: skip
    env.pop("HF_TOKEN", None)
    eval_args = ["--dataset", str(tiny.parent / "text.txt"), *EVAL_ARGS]
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(HUB_CHILD), SAVED, str(tmp_path / "out"), str(quantized),
             *eval_args],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    finally:
        server.close()
    assert result.stdout.count("exit 0") == 2 and result.stdout.count("exit 1") == 3, result.stderr
    assert (tmp_path / "out" / "from-hub" / "config.json").is_file()
    assert server.fetched("org/tiny"), "nothing was downloaded"
    errors = [line for line in result.stderr.splitlines() if line.startswith("hubquant: error:")]
    assert len(errors) == 3 and "gated" in errors[0], result.stderr
    assert SAVED not in result.stdout and SAVED not in result.stderr
    assert files_holding(tmp_path, [SAVED], skip=(home / "token",)) == []
    print(
        f"\nsaved-login scan: 5 commands against the stand-in Hub, {len(server.requests)} requests, 0 leaks"
    )


def test_dry_run_refuses_a_folder_holding_the_token(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    quantized = tmp_path / "quantized"
    assert main(["quantize", str(tiny), "--method", "int8", "--out", str(quantized)]) == 0
    card = quantized / "README.md"
    card.write_text(card.read_text() + f"\nuse it with token {TOKEN}\n")
    capsys.readouterr()
    assert main(["push", str(quantized), "--repo-id", "someorg/tiny-int8", "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert (
        out == ""
        and err
        == "hubquant: error: README.md contains your Hub token; remove it from the file before pushing\n"
    )


# --- hostile strings in reports -----------------------------------------------------------------

PAYLOADS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(1)>",
    "javascript:alert(document.cookie)",
    "</style><script>alert(1)</script>",
    "</title><script>alert(1)</script>",
    "</textarea></noscript><iframe src=javascript:alert(1)>",
    '<a href="javascript:alert(1)">click</a>',
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "&#60;script&#62;",
    "<scr<script>ipt>alert(1)</script>",
    "\uff1cscript\uff1ealert(1)\uff1c/script\uff1e",
    "\u202egnp.exe",
    "\u200b<b\u200d>zero width</b>",
    "<!-- comment -->",
    "]]><![CDATA[<script>alert(1)</script>]]>",
    "{{ 7*7 }}{% if true %}x{% endif %}",
    "<style>body{display:none}</style>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<base href=//evil.example/>",
    '<meta http-equiv="refresh" content="0;url=//evil.example">',
    "<form action=//evil.example><button>go</button></form>",
    "data:text/html,<script>alert(1)</script>",
    "<svg><animate onbegin=alert(1) attributeName=x dur=1s>",
    'x" onmouseover="alert(1)',
    "x' onfocus='alert(1)' autofocus='",
    "`-alert(1)-`",
    '=HYPERLINK("http://evil.example","click")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    "\uff1d1+1",
]


def _template_vocabulary() -> tuple[set[str], set[str]]:
    """The element and attribute names the report template itself writes."""
    source = resources.files("hubquant.reports").joinpath("templates", "report.html.j2").read_text()
    source = re.sub(r"\{#.*?#\}", "", source, flags=re.DOTALL)
    tags = {t.lower() for t in re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", source)}
    tags |= {f"h{level}" for level in range(1, 7)}  # <h{{ level }}>
    attrs = set()
    for tag in re.findall(r"<[a-zA-Z][^>]*>", source):
        attrs |= {a.lower() for a in re.findall(r"\s([a-zA-Z][a-zA-Z0-9:-]*)=", tag)}
    return tags, attrs


class Page(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self.comments: list[str] = []
        self._in_style = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, attrs))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        (self.styles if self._in_style else self.text).append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)


def _fuzzed(rng: random.Random, i: int) -> tuple[dict[str, Any], list[str]]:
    """A results.json whose strings are payloads (field k of run i gets payload i + k, so that over
    len(PAYLOADS) runs every field carries every payload), sometimes wrapped in plain text."""
    counter = iter(range(10_000))
    used: list[str] = []

    def s(shown: bool = True) -> str:
        """The next payload; `shown`: the page shows it as it is (not inside JSON)."""
        payload = PAYLOADS[(i + next(counter)) % len(PAYLOADS)]
        choice = rng.random()
        text = payload if choice < 0.5 else f"model {payload} v2" if choice < 0.8 else payload + payload[::-1]
        if shown:
            used.append(text)
        return text

    base, variant = s(), s()
    rows = [
        Row(base, {s(): s(), "dtype": s()}, ppl=12.3, ppl_err=0.05, kld_mean=0.0, top1_agreement=1.0,
            decode_tok_s=20.0, disk_bytes=2_000_000, notes=[s()], tasks={s(): {s(): 0.41, "acc_stderr": 0.01}}),
        Row(variant, {"method": s(), s(): [s(shown=False), 1]}, ppl=12.9, ppl_err=0.06, kld_mean=0.03, kld_err=0.001,
            top1_agreement=0.93, decode_tok_s=31.0, disk_bytes=900_000, notes=[s(), s()],
            tasks={"arc_easy": {"acc": s(), "acc_stderr": 0.02}}),
    ]  # fmt: skip
    results = {
        "schema_version": SCHEMA_VERSION,
        "task": "causal-lm",
        "model": {"id": s(), "commit": s(), "family": s()},
        "dataset": {"name": s(), "sha256": s(), "chars": 1234},
        "method": {"ppl_method": s(), "ctx": 512, "bos": "fixed: " + s(), "dtype": s(), s(): s()},
        "environment": {"hubquant": s(), "torch": s(), "device": s(), "device_name": s(), "python": s()},
        "budget": {"max_kld": 0.05, "min_top1": 0.9},
        "rows": [row_dict(r) for r in rows],
        "verdict": {"variant": variant, "text": s()},
        "created": s(),
    }
    return results, used


def _check_html(html: str, used: list[str], allowed: tuple[set[str], set[str]], style: str) -> int:
    tags, attrs = allowed
    page = Page(html)
    for tag, attributes in page.elements:
        assert tag in tags, f"element <{tag}> written from data"
        for name, value in attributes:
            assert name in attrs, f"attribute {name}={value!r} on <{tag}> written from data"
            assert not name.startswith("on") and name not in ("href", "src", "action", "style", "srcdoc")
    assert [tag for tag, _ in page.elements].count("style") == 1 and page.styles == [style]
    assert page.comments == []
    assert sum(1 for tag, _ in page.elements if tag == "meta") == 5  # the template's own
    text = "".join(page.text).replace("\r\n", "\n").replace("\r", "\n")
    missing = [u for u in used if u.replace("\r", "\n").strip() not in text]
    assert not missing, f"shown nowhere as text: {missing[:3]}"
    return len(page.elements)


def _check_csv(csv_text: str) -> int:
    cells = 0
    rows = list(csv.reader(io.StringIO(csv_text, newline="")))
    assert {len(row) for row in rows} == {len(rows[0])}, "a text cell broke its row"
    for row in rows:
        for cell in row:
            cells += 1
            if cell.startswith(FORMULA_STARTS):
                float(cell)  # only a number may start like a formula (a negative figure)
    return cells


def test_hostile_strings_stay_text_in_html_and_csv(tmp_path: Path) -> None:
    rng = random.Random(1234)
    allowed = _template_vocabulary()
    style = Page(render_html(_fuzzed(random.Random(0), 0)[0])).styles[0]  # the template's, constant
    assert "script" not in allowed[0] and "img" not in allowed[0] and "href" not in allowed[1]

    reports = elements = cells = 0
    runs = []
    for i in range(len(PAYLOADS)):
        results, used = _fuzzed(rng, i)
        elements += _check_html(render_html(results), used, allowed, style)
        cells += _check_csv(frame_csv(to_frame(results)))
        reports += 1
        runs.append((results, used))
    for i in range(0, len(runs) - 1, 6):  # comparisons of two runs: the combined table and sections
        pair = runs[i : i + 2]
        used = [u for _, strings in pair for u in strings]
        elements += _check_html(render_comparison_html([r for r, _ in pair]), used, allowed, style)
        cells += _check_csv(frame_csv(combined_frame([r for r, _ in pair])))
        reports += 1

    # Through the files, as `hubquant eval` and `hubquant report` write them.
    results, used = runs[0]
    csv_path, html_path = write_report(results, tmp_path / "one")
    _check_html(html_path.read_text(encoding="utf-8"), used, allowed, style)
    _check_csv(csv_path.read_text(encoding="utf-8"))
    for k, (results, _) in enumerate(runs[1:3]):
        (tmp_path / f"r{k}").mkdir()
        (tmp_path / f"r{k}" / "results.json").write_text(json.dumps(results))
    csv_path, html_path = compare([tmp_path / "r0", tmp_path / "r1"], tmp_path / "both")
    _check_html(html_path.read_text(encoding="utf-8"), runs[1][1] + runs[2][1], allowed, style)
    models = [row[0] for row in csv.reader(io.StringIO(csv_path.read_text(encoding="utf-8")))][1:]
    want = [r["model"]["id"] for r, _ in runs[1:3] for _ in r["rows"]]
    assert models == [("'" + m if m.startswith(FORMULA_STARTS) else m) for m in want]
    print(f"\nhostile strings: {reports + 2} reports ({len(PAYLOADS)} payloads), {elements} elements and "
          f"{cells} CSV cells checked, 0 injections")  # fmt: skip


def test_csv_formula_cells_get_a_quote_and_numbers_stay_numbers() -> None:
    results, _ = _fuzzed(random.Random(0), 0)
    results["model"]["id"] = '=HYPERLINK("http://evil.example","click")'
    results["rows"][1]["variant"] = "-2+3+cmd|' /C calc'!A0"
    results["rows"][1]["kld_mean"] = -0.5  # a negative figure: still a number
    results["rows"][0]["notes"] = ["ok\r=1+1,\rthen"]  # a bare CR would end the row for readers
    text = frame_csv(to_frame(results))
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 2 and rows[0]["notes"] == "ok\n=1+1,\nthen"
    assert rows[1]["variant"] == "'-2+3+cmd|' /C calc'!A0"
    assert rows[1]["kld_mean (nats)"] == "-0.5"
    text = frame_csv(combined_frame([results]))
    assert next(csv.DictReader(io.StringIO(text)))["model"] == '\'=HYPERLINK("http://evil.example","click")'


def test_hostile_strings_stay_text_in_the_model_card(monkeypatch) -> None:
    """The card (README.md pushed with a variant) shows names, settings, skip reasons and evaluation
    rows as Markdown text: no raw `<` in its body, and its YAML front matter keeps its own keys."""
    import yaml

    from hubquant.quantize import card as card_module
    from hubquant.quantize.base import LayerRecord, QuantReport
    from hubquant.quantize.card import render_card

    monkeypatch.setattr(card_module, "_hub_license", lambda repo_id: {})  # contact nothing
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
    for i, payload in enumerate(PAYLOADS):
        layers = [
            LayerRecord("layers.0.attn.q", (64, 64), {"group_size": payload}, None, 4096, 2048),
            LayerRecord("layers.0.attn.k", (64, 64), {}, payload, 8192, 0),
        ]
        report = QuantReport("int4", {"group_size": 64, payload: payload}, "torchao", payload, layers)
        results = {"method": payload, "rows": [{"variant": payload, "ppl": 1.5, "notes": [payload]}]}
        base = f"/models/{payload}" if i % 2 else payload
        text = render_card(base_model=base, base_config=config, report=report, results=results)
        front, body = text.split("\n---\n", 1)
        meta = yaml.safe_load(front.removeprefix("---\n"))
        assert set(meta) <= {"base_model", "base_model_relation", "library_name", "tags", "pipeline_tag"}, (
            meta
        )
        assert "<" not in body, (payload, [line for line in body.splitlines() if "<" in line][:2])
    print(f"\nmodel card: {len(PAYLOADS)} cards with hostile names, 0 injections")
