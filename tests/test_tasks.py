"""A task is one small object: registered at run time, it goes through the driver, results.json
(its figures flat in the rows, its method and budget in the header), the verdict, resume, the
printed line and both reports, with nothing else changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hubquant.errors import HubquantError
from hubquant.evaluate import EvalSettings, run_eval
from hubquant.evaluate.results import Row, read_results
from hubquant.evaluate.tasks import Figure, Label, Task, get_task, register_task, task_for, unregister_task
from hubquant.models.checkpoint import Checkpoint
from hubquant.reports import write_report

pytestmark = pytest.mark.filterwarnings("ignore")


class Entropy(Task):
    """Mean entropy of the next-token distribution over the first windows of the text, and how far
    a variant's moves from the base's."""

    name = "entropy"
    figures = (
        Figure("entropy", "entropy (nats)", "entropy", "nats", meaning="mean next-token entropy"),
        Figure(
            "entropy_shift",
            "entropy_shift (nats)",
            "entropy shift",
            "nats",
            meaning="|variant's mean entropy - base's|",
        ),
        Figure("disk_bytes", "disk (MB)", "disk", "MB", scale=1e-6),
    )
    method_labels = {"windows": Label("windows of 16 tokens"), "tokens": Label("tokens", "tokens")}
    budget_labels = {"max_shift": Label("max entropy shift", "nats")}
    method_columns = (("method", "windows", "windows"),)

    @classmethod
    def applies(cls, checkpoint: Checkpoint) -> bool:
        return checkpoint.spec.kind == "decoder"

    def check(self) -> None:
        if self.settings.max_chunks is None:
            raise HubquantError("--max-chunks is needed for the entropy task")

    def budget(self) -> dict[str, float]:
        return {"max_shift": 0.5}

    def prepare(self, base: Any, tokenizer: Any, text: Any) -> dict[str, Any]:
        ids = torch.tensor(tokenizer.encode(text.text[:20_000], add_special_tokens=False))
        self.batch = ids[: 16 * self.settings.max_chunks].view(-1, 16)
        self.base_entropy = self._entropy(base)
        return {"windows": self.batch.shape[0], "tokens": self.batch.numel()}

    def _entropy(self, model: Any) -> float:
        with torch.inference_mode():
            logp = torch.log_softmax(model(self.batch).float(), dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    def measure(self, model: Any, base: Any, variant: str = "variant") -> dict[str, Any]:
        entropy = self.base_entropy if model is base else self._entropy(model)
        return {"entropy": entropy, "entropy_shift": abs(entropy - self.base_entropy)}

    @classmethod
    def passes(cls, row: Row, budget: dict[str, Any]) -> bool:
        return row.get("entropy_shift") is not None and row.get("entropy_shift") <= budget["max_shift"]

    @classmethod
    def budget_text(cls, budget: dict[str, Any]) -> str:
        return f"entropy shift <= {budget['max_shift']:g} nats"

    @classmethod
    def verdict_figures(cls, row: Row) -> str:
        return f"entropy shift {row.get('entropy_shift'):.4f} nats"

    @classmethod
    def line(cls, row: Row) -> str:
        return f"{row.variant:10} entropy {row.get('entropy'):.4f} nats"


@pytest.fixture
def entropy_task():
    register_task(Entropy)
    yield Entropy
    unregister_task(Entropy.name)


def test_a_task_registered_at_run_time_goes_through_driver_results_and_reports(
    entropy_task, smollm2_folder: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    settings = EvalSettings(
        model=str(smollm2_folder), task="entropy", variants=("base", "int8"), max_chunks=2, dtype="fp32",
        speed=False, out=out, progress=False,
    )  # fmt: skip
    results = run_eval(settings)
    printed = capsys.readouterr().out
    assert "base       entropy " in printed and "int8       entropy " in printed  # the task's line

    saved = read_results(out / "results.json")
    assert saved == json.loads((out / "results.json").read_text()) and saved["task"] == "entropy"
    assert saved["method"] == {"windows": 2, "tokens": 32} and saved["budget"] == {"max_shift": 0.5}
    base, int8 = saved["rows"]
    assert base["entropy_shift"] == 0 and 0 < int8["entropy_shift"] < 0.5  # int8 moves it, a little
    assert int8["entropy"] > 0 and int8["disk_bytes"] < base["disk_bytes"]
    assert "ppl" not in base and "kld_mean" not in int8  # only the task's figures
    assert saved["verdict"]["variant"] == "int8"
    assert (
        saved["verdict"]["text"].startswith("Ship int8")
        and "entropy shift <= 0.5 nats" in saved["verdict"]["text"]
    )
    assert results["rows"] == saved["rows"]

    csv = (out / "report.csv").read_text().splitlines()
    assert csv[0].split(",")[:4] == ["variant", "entropy (nats)", "entropy_shift (nats)", "disk (MB)"]
    assert "windows" in csv[0].split(",")  # the task's method column
    html = (out / "report.html").read_text()
    for words in ("entropy shift", "mean next-token entropy", "max entropy shift", "windows of 16 tokens"):
        assert words in html, words

    # A rerun resumes: nothing is measured again, the file is the same but for its time stamp.
    again = run_eval(settings)
    assert again["rows"] == saved["rows"] and "already in" in capsys.readouterr().out


def test_task_choice(entropy_task, smollm2_folder: Path):
    checkpoint = Checkpoint.resolve(smollm2_folder)
    assert task_for(checkpoint) is Entropy  # the latest registered that applies is asked first
    unregister_task("entropy")
    assert task_for(checkpoint).name == "causal-lm"
    with pytest.raises(HubquantError, match="--task masked-lm does not apply"):
        task_for(checkpoint, "masked-lm")
    with pytest.raises(HubquantError, match="--task nope is unknown"):
        task_for(checkpoint, "nope")
    assert get_task(None).name == get_task("written-by-a-plugin-not-loaded").name == "causal-lm"


def test_a_report_of_a_registered_task_renders_from_results_alone(entropy_task, tmp_path: Path):
    results = {
        "schema_version": 1,
        "task": "entropy",
        "model": {"id": "m"},
        "method": {"windows": 3},
        "budget": {"max_shift": 0.5},
        "rows": [
            Row("base", entropy=2.0, entropy_shift=0.0).to_dict(),
            Row("x", entropy=2.1, entropy_shift=0.1).to_dict(),
        ],
        "verdict": {"variant": "x", "text": "Ship x."},
    }
    csv_path, html_path = write_report(results, tmp_path)
    assert csv_path.read_text().splitlines()[2].startswith("x,2.1,0.1,")
    assert "entropy shift" in html_path.read_text()


def test_settings_are_one_value():
    with pytest.raises(HubquantError, match="setting 'ctxx' is unknown"):
        EvalSettings.from_mapping({"ctxx": 3})
    settings = EvalSettings(variants=["base", "int8"])  # a list becomes a tuple
    assert settings.variants == ("base", "int8") and settings.variant_list == ("base", "int8")
    with pytest.raises(HubquantError, match="--ctx 2"):
        settings.with_(ctx=2).check()


def test_cli_task_flag_names_a_task(bert_checkpoint, tmp_path: Path, capsys):
    from hubquant.cli import main

    folder, _ = bert_checkpoint("bert_mlm")
    capsys.readouterr()  # the fixture's own output
    assert main(["eval", str(folder), "--task", "causal-lm", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--task causal-lm does not apply" in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_decode_is_timed_compiled_on_a_gpu_unless_eager():
    from hubquant.cli import build_parser, eval_settings
    from hubquant.evaluate.tasks.causal_lm import CausalLM

    parser = build_parser()
    for argv, want in ((["eval"], None), (["eval", "--compile"], True), (["eval", "--eager"], False)):
        assert eval_settings(parser.parse_args(argv)).compile is want, argv
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--compile", "--eager"])
    for compile, device, timed_compiled in (
        (None, "cpu", False),
        (None, "cuda", True),  # what a deployment runs on a GPU
        (False, "cuda", False),
        (True, "cpu", True),
    ):
        task = CausalLM(EvalSettings(compile=compile), None, torch.device(device))
        assert task.compiled is timed_compiled, (compile, device)
