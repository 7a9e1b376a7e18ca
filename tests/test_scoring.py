"""Perplexity (both methods) against transformers' own loss, agreement against a direct full-logits
computation, and an evaluation run that resumes after an interruption."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import VOCAB

import hubquant
from hubquant.errors import HubquantError
from hubquant.evaluate.scoring import score, windows

pytestmark = pytest.mark.filterwarnings("ignore")


def text_ids(n: int = 700, seed: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    folder, hf = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    return hf, model


def transformers_nll(hf, wins) -> tuple[float, int]:
    """transformers' loss on each window with the unscored positions labelled -100."""
    total, count = 0.0, 0
    for win in wins:
        labels = win.ids[None].clone()
        labels[:, : win.first] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += hf(win.ids[None], labels=labels).loss.item() * n
        count += n
    return total / count, count


@pytest.mark.parametrize("method", ["chunks", "sliding"])
def test_perplexity_equals_transformers(pair, method):
    hf, model = pair
    kwargs = {"stride": 48} if method == "sliding" else {"bos_id": 1}
    wins = windows(text_ids(), method=method, ctx=64, **kwargs)
    got = score(model, wins, progress=False).summary()
    nll, count = transformers_nll(hf, wins)
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-3)
    assert count == sum(w.ids.numel() - w.first for w in wins)


def test_chunks_are_llama_cpp_windows():
    ids = text_ids(700)
    wins = windows(ids, method="chunks", ctx=64, bos_id=1)
    assert len(wins) == 700 // 64  # the leftover is dropped
    assert all(w.ids.numel() == 64 and w.first == 32 and w.ids[0] == 1 for w in wins)
    assert torch.equal(wins[2].ids[1:], ids[129:192])
    assert len(windows(ids, method="chunks", ctx=64, max_chunks=3)) == 3
    sliding = windows(ids, method="sliding", ctx=64, stride=32)
    assert sum(w.ids.numel() - w.first for w in sliding) == 699  # every token after the first, once


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(method="beam"), "--ppl-method"),
        (dict(ctx=2), "--ctx"),
        (dict(method="chunks", stride=8), "--stride"),
        (dict(method="sliding", stride=0), "--stride"),
        (dict(max_chunks=0), "--max-chunks"),
        (dict(ctx=4096), "fewer than one window"),
    ],
)
def test_bad_window_settings(kwargs, named):
    with pytest.raises(HubquantError, match=named):
        windows(text_ids(), **{"ctx": 64, **kwargs})


def test_base_against_itself_is_zero_kld_full_agreement(pair, hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    _, model = pair
    twin, _ = hubquant.load(folder, dtype="fp32", progress=False)  # a separate instance
    wins = windows(text_ids(), ctx=64, max_chunks=4)
    s = score(twin, wins, base=model, progress=False).summary()
    assert s["kld_mean"] == 0 and s["kld_max"] == 0
    assert s["top1_agreement"] == 1 and s["dp_rms"] == 0


def test_kld_equals_direct_full_logits_computation(pair, hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    _, base = pair
    variant, _ = hubquant.load(folder, dtype="fp32", progress=False)
    with torch.no_grad():  # a variant that differs a little, as a quantized one does
        gen = torch.Generator().manual_seed(3)
        for p in variant.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    wins = windows(text_ids(), ctx=64, max_chunks=5, bos_id=1)
    got = score(variant, wins, base=base, progress=False)
    kl, same, dp, nll = [], [], [], []
    with torch.no_grad():
        for w in wins:
            p = torch.log_softmax(base(w.ids[None])[0].double(), -1)[w.first - 1 : -1]
            q = torch.log_softmax(variant(w.ids[None])[0].double(), -1)[w.first - 1 : -1]
            target = w.ids[w.first :]
            kl.append((p.exp() * (p - q)).sum(-1))
            same.append(p.argmax(-1) == q.argmax(-1))
            dp.append(q.exp().gather(-1, target[:, None])[:, 0] - p.exp().gather(-1, target[:, None])[:, 0])
            nll.append(-q.gather(-1, target[:, None])[:, 0])
    kl, same, dp, nll = torch.cat(kl), torch.cat(same), torch.cat(dp), torch.cat(nll)
    s = got.summary()
    assert s["kld_mean"] == pytest.approx(kl.mean().item(), abs=1e-6)
    assert s["kld_max"] == pytest.approx(kl.max().item(), abs=1e-6)
    assert s["kld_p99"] == pytest.approx(torch.quantile(kl, 0.99).item(), abs=1e-6)
    assert s["top1_agreement"] == pytest.approx(same.double().mean().item(), abs=1e-9)
    assert s["dp_rms"] == pytest.approx(dp.pow(2).mean().sqrt().item(), abs=1e-6)
    assert s["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)
    assert 1e-4 < s["kld_mean"] < 1  # the variant really differs
    n = kl.numel()
    assert s["kld_err"] == pytest.approx(kl.std().item() / math.sqrt(n), rel=1e-4)


def test_run_resumes_after_an_interrupted_variant(smollm2_folder: Path, tmp_path: Path, monkeypatch):
    """A run killed during its second variant keeps the first; the rerun skips it."""
    import hubquant.evaluate.run as run

    out = tmp_path / "out"
    args = dict(
        variants=["base", "int8"], ctx=32, max_chunks=2, speed=False, out=out, dtype="fp32", progress=False
    )
    measured: list[str] = []
    real = run.measure_variant

    def measure(task, variant, *a, **k):
        measured.append(variant)
        if variant == "int8" and measured.count("int8") == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-run
        return real(task, variant, *a, **k)

    monkeypatch.setattr(run, "measure_variant", measure)
    with pytest.raises(KeyboardInterrupt):
        run.run_eval(str(smollm2_folder), **args)
    first = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in first["rows"]] == ["base"]
    results = run.run_eval(str(smollm2_folder), **args)
    assert measured == ["base", "int8", "int8"]  # base was not measured again
    assert [r["variant"] for r in results["rows"]] == ["base", "int8"]
    assert results["rows"][0] == first["rows"][0]
    with pytest.raises(HubquantError, match="--force"):  # other settings: no silent mixing
        run.run_eval(str(smollm2_folder), **{**args, "ctx": 64})


def test_datasets(tmp_path: Path):
    from hubquant.evaluate.data import load_text

    docs = load_text("python-docs")
    assert len(docs.text) > 100_000 and len(docs.sha256) == 64
    path = tmp_path / "mine.txt"
    path.write_text("héllo world\n" * 10, encoding="utf-8")
    mine = load_text(str(path))
    assert mine.text.startswith("héllo") and mine.name == "mine.txt"
    for bad, named in [(str(tmp_path / "none.txt"), "not found"), ("wikitext3", "unknown")]:
        with pytest.raises(HubquantError, match=named):
            load_text(bad)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(HubquantError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))


def test_wikitext2_offline_without_cache_is_one_line():
    """HF_HUB_OFFLINE is set for the tests and the dataset was never fetched here."""
    from hubquant.evaluate.data import load_text

    with pytest.raises(HubquantError) as info:
        load_text("wikitext2")
    assert "\n" not in str(info.value) and "python-docs" in str(info.value)
