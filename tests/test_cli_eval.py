"""`hubquant eval` end to end: its printed perplexity against transformers' loss on the same windows."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hubquant.cli import main
from hubquant.evaluate import pydoc_text

pytestmark = pytest.mark.filterwarnings("ignore")

MAX_TOKENS, WINDOW, STRIDE = 300, 64, 32


def transformers_sliding_perplexity(
    folder: Path, max_tokens: int, window: int, stride: int
) -> tuple[float, int]:
    """transformers' tokenizer, model and loss; windows of `window` tokens every `stride` tokens,
    each scoring only the tokens no earlier window scored (labels -100 elsewhere)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    text = pydoc_text()[: max_tokens * 8]  # `hubquant eval` reads 8 characters per wanted token
    ids = torch.tensor(tokenizer.encode(text)[:max_tokens])
    assert ids.numel() == max_tokens
    total_nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        inputs = ids[begin:end][None]
        labels = inputs.clone()
        labels[:, : -(end - prev_end)] = -100  # already scored by an earlier window
        count = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        with torch.no_grad():
            total_nll += model(inputs, labels=labels).loss.item() * count
        scored += count
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(total_nll / scored), scored


def test_eval_perplexity_equals_transformers(smollm2_folder: Path, tmp_path: Path, capsys) -> None:
    """`hubquant eval --ppl-method sliding` writes the perplexity transformers computes on the same
    windows, with its method beside it in results.json."""
    import json

    out = tmp_path / "out"
    args = ["eval", str(smollm2_folder), "--variants", "base", "--ppl-method", "sliding"]
    args += ["--max-tokens", str(MAX_TOKENS), "--ctx", str(WINDOW), "--stride", str(STRIDE)]
    args += ["--no-speed", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    (row,) = results["rows"]
    want, scored = transformers_sliding_perplexity(smollm2_folder, MAX_TOKENS, WINDOW, STRIDE)
    assert scored == MAX_TOKENS - 1  # every token after the first, once
    method = results["method"]
    assert (method["ppl_method"], method["ctx"], method["stride"]) == ("sliding", WINDOW, STRIDE)
    assert method["tokens_scored"] == scored
    assert method["windows"] == math.ceil((MAX_TOKENS - WINDOW) / STRIDE) + 1
    assert row["ppl"] == pytest.approx(want, rel=1e-3)
    assert row["kld_mean"] == 0 and row["top1_agreement"] == 1  # the base against itself
    assert 1.0 < want < 100.0  # a real model on real text
    assert results["dataset"]["name"] == "python-docs" and len(results["dataset"]["sha256"]) == 64
    assert (out / "report.html").is_file() or "hubquant.reports" not in sys.modules
    printed = capsys.readouterr().out
    assert "ppl" in printed and "results:" in printed


@pytest.fixture
def no_tokenizer_folder(hf_checkpoint, tmp_path: Path) -> Path:
    source, _ = hf_checkpoint("llama_gqa")  # transformers saves no tokenizer with a bare model
    folder = Path(shutil.copytree(source, tmp_path / "ckpt"))
    assert not (folder / "tokenizer.json").exists()
    return folder


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hubquant: error: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_eval_without_tokenizer_is_one_error_line(no_tokenizer_folder: Path, capsys) -> None:
    assert main(["eval", str(no_tokenizer_folder), "--device", "cpu", "--max-tokens", "50"]) == 1
    line = one_error_line(capsys)
    assert "tokenizer.json" in line and str(no_tokenizer_folder) in line


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--ppl-method", "sliding", "--stride", "0"], "--stride 0"),
        (["--ppl-method", "sliding", "--ctx", "16", "--stride", "32"], "--stride 32"),
        (["--stride", "8"], "--stride 8"),  # chunks take no stride
        (["--ctx", "1"], "--ctx 1"),
        (["--max-tokens", "1"], "--max-tokens 1"),
        (["--max-chunks", "0"], "--max-chunks 0"),
        (["--variants", "base,int3"], "int3"),
        (["--variants", "gguf:/nonexistent.gguf"], "/nonexistent.gguf"),
    ],
)
def test_eval_bad_settings_are_one_error_line_before_loading(
    no_tokenizer_folder: Path, capsys, flags: list[str], named: str
) -> None:
    """Checked first: the message is about the flag, not the missing tokenizer, and nothing loads."""
    assert main(["eval", str(no_tokenizer_folder), "--device", "cpu", *flags]) == 1
    assert named in one_error_line(capsys)
