"""The lm-eval adapter scores as lm-eval's own `hf` model does, for every request type.

One small offline task per request type (YAML + JSONL in a temporary folder, `dataset_path: json`):
multiple choice (loglikelihood), perplexity on CPython's pydoc text (loglikelihood_rolling, in
several windows) and greedy generation with stop sequences (generate_until). Both models run on the
same checkpoint, the embedded SmolLM2-135M, in fp32; their metrics and their per-request answers are
compared: log-likelihoods within 1e-4 relative, accuracies and generated text exactly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

lm_eval = pytest.importorskip("lm_eval")

import hubquant  # noqa: E402  (registers lm-eval's model "hubquant")
from hubquant.errors import HubquantError  # noqa: E402

MAX_LENGTH = 32  # short, so that each pydoc text is scored in several rolling windows
BATCH_SIZE = 3  # batches hold rows of different lengths: padding is exercised
REL_TOL = 1e-4

MC_DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Madrid"], "answer": 0},
    {"question": "Which animal barks?", "choices": ["a cat", "a dog", "a fish"], "answer": 1},
    {"question": "What colour is the sky on a clear day?", "choices": ["green", "red", "blue"], "answer": 2},
]

GEN_DOCS = [
    {"prompt": "1, 2, 3, 4, 5,", "target": " 6"},
    {"prompt": "Monday, Tuesday, Wednesday,", "target": " Thursday"},
    {"prompt": "a, b, c, d,", "target": " e"},
    {"prompt": "The opposite of hot is", "target": " cold"},
]


def pydoc_docs(count: int = 3, chars: int = 200) -> list[dict[str, str]]:
    """A few passages of CPython's pydoc topics text, long enough for several windows each."""
    from pydoc_data.topics import topics

    return [{"text": topics[key][:chars]} for key in sorted(topics)[:count]]


TASKS = ["hq_mc", "hq_ppl", "hq_gen"]


def write_tasks(folder: Path) -> list[str]:
    """Three tasks, one per request type, as YAML + JSONL under `folder`; returns their names."""
    cache = folder / "datasets-cache"
    tasks = {
        "hq_mc": (
            MC_DOCS,
            """
            output_type: multiple_choice
            doc_to_text: "Question: {{question}}\\nAnswer:"
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{answer}}"
            metric_list:
              - metric: acc
              - metric: acc_norm
            """,
        ),
        "hq_ppl": (
            pydoc_docs(),
            """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
            """,
        ),
        "hq_gen": (
            GEN_DOCS,
            """
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{target}}"
            generation_kwargs:
              until: [",", "\\n"]
              max_gen_toks: 6
              do_sample: false
            metric_list:
              - metric: exact_match
            """,
        ),
    }
    for name, (docs, body) in tasks.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        header = (
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
            "test_split: test\n"
        )
        lines = [line[12:] for line in body.strip("\n").splitlines()]
        (folder / f"{name}.yaml").write_text(header + "\n".join(lines) + "\nmetadata:\n  version: 1.0\n")
    return list(tasks)


def evaluate(model: str, model_args: str, folder: Path, tasks: list[str]) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        batch_size=BATCH_SIZE,
        device="cpu",
        bootstrap_iters=0,
        log_samples=True,
    )


def answers(results: dict[str, Any], task: str) -> list[list[Any]]:
    """Each document's raw model answers, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[resp[0] for resp in sample["resps"]] for sample in samples]


def close(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(a, str):
        return a == b
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-6)


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    write_tasks(folder)
    return folder


@pytest.fixture(scope="module")
def both_results(smollm2_folder: Path, task_folder: Path) -> tuple[dict, dict]:
    folder, tasks = task_folder, TASKS
    hf = evaluate("hf", f"pretrained={smollm2_folder},dtype=float32,max_length={MAX_LENGTH}", folder, tasks)
    ours = evaluate(
        "hubquant", f"pretrained={smollm2_folder},dtype=fp32,max_length={MAX_LENGTH}", folder, tasks
    )
    return hf, ours


def test_loglikelihood_multiple_choice_matches_hf(both_results: tuple[dict, dict]) -> None:
    hf, ours = both_results
    assert close(answers(ours, "hq_mc"), answers(hf, "hq_mc")), (answers(ours, "hq_mc"), answers(hf, "hq_mc"))
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["hq_mc"][metric] == hf["results"]["hq_mc"][metric], metric
    assert len(answers(ours, "hq_mc")) == len(MC_DOCS)


def test_loglikelihood_rolling_matches_hf(both_results: tuple[dict, dict]) -> None:
    hf, ours = both_results
    assert close(answers(ours, "hq_ppl"), answers(hf, "hq_ppl")), (
        answers(ours, "hq_ppl"),
        answers(hf, "hq_ppl"),
    )
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, want = ours["results"]["hq_ppl"][metric], hf["results"]["hq_ppl"][metric]
        assert math.isclose(got, want, rel_tol=REL_TOL), (metric, got, want)


def test_generate_until_matches_hf(both_results: tuple[dict, dict]) -> None:
    hf, ours = both_results
    generated = answers(ours, "hq_gen")
    assert generated == answers(hf, "hq_gen")
    assert ours["results"]["hq_gen"]["exact_match,none"] == hf["results"]["hq_gen"]["exact_match,none"]
    assert any(text for (text,) in generated), generated  # the model did write something


def test_results_name_the_variant(both_results: tuple[dict, dict]) -> None:
    _, ours = both_results
    assert ours["config"]["model"] == "hubquant"
    assert ours["config"]["model_variant"] == "base"
    assert ours["config"]["model_dtype"] == "torch.float32"


@pytest.fixture(scope="module")
def loaded(smollm2_folder: Path) -> tuple[Any, Any]:
    """The checkpoint loaded once, in fp32, for the tests that wrap a loaded model."""
    return hubquant.load(smollm2_folder, dtype="fp32", progress=False)


def test_bos_handling_and_rolling_windows(smollm2_folder: Path, loaded: tuple[Any, Any]) -> None:
    """add_bos_token=True prepends bos once, as lm-eval's hf model asks transformers to; the
    default follows the tokenizer (SmolLM2's adds none); each pydoc text needs several windows."""
    from transformers import AutoTokenizer

    from hubquant.evaluate.lm_eval import HubquantLM

    lm = HubquantLM(loaded[0], tokenizer=loaded[1], add_bos_token=True, max_length=MAX_LENGTH)
    hf = AutoTokenizer.from_pretrained(smollm2_folder, add_bos_token=True)
    bos = lm.tokenizer.bos_id
    assert bos is not None and lm.prefix_token_id == bos == hf.bos_token_id
    for text in ("Hello world", "x = 1\n"):
        assert lm.tok_encode(text) == hf.encode(text) == [bos, *hf.encode(text, add_special_tokens=False)]
        assert lm.tok_encode(hf.bos_token + text) == hf.encode(text)  # never a second bos
        assert lm.tok_encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    lm.add_bos_token = None  # the tokenizer's own behaviour: no bos for SmolLM2
    assert lm.tok_encode("Hello world") == AutoTokenizer.from_pretrained(smollm2_folder).encode("Hello world")
    assert lm.tok_encode("Hello world")[0] != bos
    assert all(len(lm.tok_encode(doc["text"])) > MAX_LENGTH for doc in pydoc_docs())


def test_run_tasks_scores_a_loaded_model_as_simple_evaluate_does(
    loaded: tuple[Any, Any], task_folder: Path, both_results: tuple[dict, dict]
) -> None:
    from lm_eval.tasks import TaskManager

    from hubquant.evaluate.lm_eval import check_tasks, run_tasks

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    check_tasks(["hq_mc", "hq_g*"], manager)
    with pytest.raises(HubquantError, match="no_such_task"):
        check_tasks(["hq_mc", "no_such_task"], manager)
    model, tokenizer = loaded
    scores = run_tasks(
        model,
        ["hq_mc"],
        tokenizer,
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        task_manager=manager,
        bootstrap_iters=0,
    )
    _, ours = both_results
    assert scores == {"hq_mc": {k: ours["results"]["hq_mc"][k] for k in ("acc,none", "acc_norm,none")}}


def test_unknown_variant_is_one_line_error(tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with pytest.raises(HubquantError) as caught:
        simple_evaluate(
            model="hubquant",
            model_args=f"pretrained={tmp_path},variant=int3",
            tasks=write_tasks(tmp_path)[:1],
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        )
    message = str(caught.value)
    assert "\n" not in message and "int3" in message and "int4" in message, message


def test_unknown_model_arg_is_one_line_error(tmp_path: Path) -> None:
    from lm_eval.api.registry import get_model

    with pytest.raises(HubquantError) as caught:
        get_model("hubquant").create_from_arg_string(f"pretrained={tmp_path},dtyp=fp32")
    assert "\n" not in str(caught.value) and "dtyp" in str(caught.value)


def test_import_hubquant_registers_without_importing_lm_eval_or_torch() -> None:
    code = """
        import sys
        import hubquant
        assert "torch" not in sys.modules and "lm_eval" not in sys.modules, "imported eagerly"
        from lm_eval.api.registry import get_model, model_registry
        assert "hubquant" in model_registry and "torch" not in sys.modules
        assert "hf" in model_registry  # lm-eval's own models are still there
        assert get_model("hubquant").__module__ == "hubquant.evaluate.lm_eval"
        print("ok")
    """
    result = run_python(["-c", "\n".join(line[8:] for line in code.splitlines())])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_module_entry_point_help() -> None:
    result = run_python(["-m", "hubquant.evaluate.lm_eval", "--help"])
    assert result.returncode == 0, result.stderr
    assert "lm-eval" in result.stdout and "run" in result.stdout


def test_module_entry_point_reports_hubquant_errors_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    from hubquant.evaluate.lm_eval import main

    def cli_evaluate() -> None:  # lm-eval's CLI, cut to where it builds the model from --model_args
        get_model(sys.argv[2]).create_from_arg_string(sys.argv[4])

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", cli_evaluate)
    monkeypatch.setattr(sys, "argv", ["lm_eval"])
    status = main(["--model", "hubquant", "--model_args", f"pretrained={tmp_path},variant=int3"])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith("hubquant: error: ") and "int3" in err and "\n" not in err, err


def run_python(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
