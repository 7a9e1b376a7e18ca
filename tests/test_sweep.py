"""`hubquant sweep` on a local Ray (2 CPUs): two tiny models x two variants, a rerun that skips
everything, and a failing task that does not stop the others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")
ray = pytest.importorskip("ray")


def with_tokenizer(folder: Path, target: Path) -> Path:
    """A copy of a tiny checkpoint with a word-level tokenizer over its 160 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(folder, target)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 100)]
    words += "the of and to in is for that with on as are by it this be or from an at not if".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(target / "tokenizer.json"))
    (target / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return target


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_sweep_two_models_two_variants_rerun_and_failure(hf_checkpoint, tmp_path, local_ray, capsys):
    from hubquant.evaluate.sweep import run_sweep

    a = with_tokenizer(hf_checkpoint("llama_gqa")[0], tmp_path / "models" / "tiny-llama")
    b = with_tokenizer(hf_checkpoint("gemma_mqa")[0], tmp_path / "models" / "tiny-gemma")
    broken = with_tokenizer(hf_checkpoint("llama_gqa")[0], tmp_path / "models" / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    spec = tmp_path / "sweep.yaml"
    settings = "{ctx: 16, max_chunks: 2, max_tokens: 200, speed: false, dtype: fp32, device: cpu}"
    spec.write_text(f"models: [{a}, {b}]\nvariants: [base, int8]\neval: {settings}\n")
    out = tmp_path / "out"
    summary = run_sweep(spec, out=out)
    assert not summary["failed"] and len(summary["ran"]) == 4
    for name in ("tiny-llama", "tiny-gemma"):
        results = json.loads((out / name / "results.json").read_text())
        assert [r["variant"] for r in results["rows"]] == ["base", "int8"]
        assert results["rows"][1]["kld_mean"] is not None and (out / name / "report.html").is_file()
    assert (out / "report.html").is_file() and (out / "report.csv").is_file()

    again = run_sweep(spec, out=out)  # everything is there: nothing runs
    assert again["ran"] == [] and len(again["skipped"]) == 4

    spec.write_text(f"models: [{a}, {broken}]\nvariants: [base, int8, nf4]\neval: {settings}\n")
    mixed = run_sweep(spec, out=out)
    failed = {(f["model"], f["variant"]) for f in mixed["failed"]}
    assert failed == {(str(broken), v) for v in ("base", "int8", "nf4")}
    assert all("architecture 'NoSuchForCausalLM' is not supported" in f["error"] for f in mixed["failed"])
    assert all("\n" not in f["error"] for f in mixed["failed"])
    assert [list(t) for t in [(str(a), "nf4")]] == [t for t in mixed["ran"] if t[0] == str(a)]
    rows = json.loads((out / "tiny-llama" / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["base", "int8", "nf4"]  # merged beside the earlier rows


def test_bad_sweep_files_are_one_line(tmp_path):
    from hubquant.errors import HubquantError
    from hubquant.evaluate.sweep import read_spec

    cases = {
        "models: []\n": "'models' must be a non-empty list",
        "models: [a]\nvariants: [int3]\n": "variant 'int3' is unknown",
        "models: [a]\neval: {ctxx: 3}\n": "eval setting 'ctxx' is unknown",
        "models: [a]\nfoo: 1\n": "unknown key 'foo'",
        "models: [a\n": "is not valid YAML",
    }
    for text, expected in cases.items():
        path = tmp_path / "s.yaml"
        path.write_text(text)
        with pytest.raises(HubquantError, match=expected):
            read_spec(path)
