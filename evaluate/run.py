"""`hubquant eval`: from a Hub id (or folder) to the results a team decides from.

For each variant (the base model in `--dtype`, each quantize method with its defaults, and
`gguf:PATH` for a llama.cpp quant of the same model), one after another:

    make it (quantize_checkpoint / convert, streamed, into OUT/variants/NAME, as it would ship)
      -> load it as any checkpoint is loaded
      -> score it on the same windows as the base: perplexity, and KL divergence, top-1 agreement
         and the change in the correct token's probability against the base's forward
      -> speed (prefill, decode, time to first token) and memory (disk, weights, peak RSS, load)
      -> one row of results.json, written atomically as soon as the variant is done

Only the base and one variant are resident at a time. A rerun with the same settings skips the
variants already in results.json; Ctrl-C keeps every finished row. CSV and HTML reports are views
of results.json (`hubquant.reports`).

Encoders (BERT) take the same command and write the same results.json: when the checkpoint's
family builds an encoder (its config's kind is "encoder"), `run_eval` hands over to
`hubquant.evaluate.encoder.run_encoder_eval`, which scores a masked-LM head by pseudo-perplexity
(15% of each window masked at once, seed 0) and an embedder by the cosine of its sentence vectors
to the base's and the agreement of their nearest neighbours, and times encoding instead of
decoding. The header's `task` ("causal-lm", "masked-lm", "embedding") tells reports which
columns to show. Decoders are measured exactly as before.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from hubquant.convert import DEFAULT_MODEL_NAME, default_model
from hubquant.errors import HubquantError
from hubquant.locks import hold, lock_scope
from hubquant.models import load
from hubquant.models.checkpoint import read_config
from hubquant.models.config import torch_dtype
from hubquant.models.families import family_for
from hubquant.models.hub import resolve
from hubquant.models.loading import torch_device
from hubquant.quantize.registry import default_variants, method_names
from hubquant.reports import write_report

from .data import load_text
from .driver import device_peaks, environment, folder_bytes, placement, resume, start_row
from .encoder import run_encoder_eval
from .results import (
    DEFAULT_MAX_KLD,
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_TOP1,
    RESULTS_ROOT,
    Row,
    clear_temporary_files,
    model_folder_name,
    results_header,
    save_results,
    verdict,
)
from .scoring import score, windows
from .speed import measure_speed, peak_rss_bytes, weight_bytes

# The embedded default model is judged on fewer windows, so that `make eval` ends in minutes.
DEFAULT_MODEL_CHUNKS = 16
DEFAULT_CTX = 512  # decoders; encoders default to 128 (hubquant.evaluate.encoder)


def _check_variants(variants: list[str]) -> None:
    for v in variants:
        if v == "base" or v in method_names():
            continue
        if v.startswith("gguf:"):
            path = Path(v[5:]).expanduser()
            if not path.is_file():
                raise HubquantError(f"variant {v}: GGUF file {path} not found; check the path")
            continue
        known = ", ".join(("base", *method_names(), "gguf:PATH"))
        raise HubquantError(f"variant '{v}' is unknown; use any of {known}")
    if len(set(variants)) != len(variants):
        raise HubquantError("--variants names a variant twice; name each once")


def _check_settings(
    ctx: int | None,
    ppl_method: str,
    stride: int | None,
    max_chunks: int | None,
    max_tokens: int | None,
    max_kld: float,
    min_top1: float,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> None:
    """The flags checked before anything is downloaded or loaded; messages name the flag."""
    if ctx is not None and ctx < 4:
        raise HubquantError(f"--ctx {ctx}: a window needs at least 4 tokens")
    if stride is not None and ppl_method != "sliding":
        raise HubquantError(f"--stride {stride} applies to --ppl-method sliding only")
    window = DEFAULT_CTX if ctx is None else ctx
    if stride is not None and not 1 <= stride <= window:
        raise HubquantError(f"--stride {stride} must be between 1 and --ctx ({window})")
    if max_chunks is not None and max_chunks < 1:
        raise HubquantError(f"--max-chunks {max_chunks}: score at least 1 window")
    if max_tokens is not None and max_tokens < 4:
        raise HubquantError(f"--max-tokens {max_tokens}: perplexity needs at least 4 tokens")
    if max_kld < 0 or not 0 <= min_top1 <= 1:
        raise HubquantError(f"--max-kld {max_kld} --min-top1 {min_top1}: KLD must be >= 0, top-1 in 0..1")
    if not -1 <= min_cosine <= 1:
        raise HubquantError(f"--min-cosine {min_cosine}: a cosine similarity lies in -1..1")


@lock_scope
def run_eval(
    model_source: str | None = None,
    *,
    variants: list[str] | None = None,
    dataset: str = "python-docs",
    ctx: int | None = None,
    max_chunks: int | None = None,
    ppl_method: str = "chunks",
    stride: int | None = None,
    max_tokens: int | None = None,
    dtype: str = "bf16",
    tasks: list[str] | None = None,
    speed: bool = True,
    device: str = "auto",
    out: str | Path | None = None,
    force: bool = False,
    max_kld: float = DEFAULT_MAX_KLD,
    min_top1: float = DEFAULT_MIN_TOP1,
    revision: str | None = None,
    progress: bool = True,
    max_sentences: int | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
    compile: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Measure a model and its quantized variants; write results.json, report.csv, report.html.

    Args:
        model_source: a Hub repo id or local folder; None: the embedded SmolLM2-135M-Instruct.
        variants: "base", quantization methods (`hubquant.quantize.registry`), "gguf:PATH"
            (default: the base and the methods marked `default_eval`).
        dataset: "python-docs", "wikitext2" or a .txt path.
        ctx: tokens per window (default 512; 128 for a masked-LM encoder, at most its positions).
        max_chunks: score at most this many windows (default: all; 16 for the embedded model).
        ppl_method: "chunks" (llama.cpp's) or "sliding" (transformers' guide).
        stride: `sliding` only: tokens between windows (default ctx // 2).
        max_tokens: use only the text's first `max_tokens` tokens.
        dtype: the base model's dtype and the activations' of every variant ("bf16", "fp32").
        tasks: lm-eval task names, scored per variant.
        speed: measure prefill/decode speed.
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:N".
        out: the results folder (default results/<org>__<name>).
        force: start over even if OUT holds results (of these or other settings).
        max_kld, min_top1: the quality budget of the verdict (decoders, masked-LM encoders).
        revision: Hub branch, tag or commit.
        progress: show progress bars.
        max_sentences: embedders only: judge on the text's first N sentences (default 512).
        min_cosine: embedders only: the verdict's budget, the least mean cosine similarity of a
            variant's sentence vectors to the base's (default 0.99).
        compile: decoders: measure decode with the compiled step (`generate(compile=True)`).
        device_map, max_memory: decoders: spread the base model over GPUs, CPU and disk (as
            `hubquant.load`); the report records which layers went where and each device's peak.
            Quantized variants load on `device`.

    An encoder checkpoint (BERT) is measured by `hubquant.evaluate.encoder.run_encoder_eval`,
    which states its own method; the flags that mean nothing for it are refused with the fix.

    Returns:
        The results (as written to OUT/results.json).
    """

    variants = list(variants or default_variants())
    _check_variants(variants)
    _check_settings(ctx, ppl_method, stride, max_chunks, max_tokens, max_kld, min_top1, min_cosine)
    target_dtype = torch_dtype(dtype)
    dev = torch_device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if tasks:
        from .lm_eval import check_tasks

        check_tasks(tasks)  # unknown task names fail before anything is loaded

    text = load_text(dataset)
    if model_source is None:
        folder, model_id = default_model(), DEFAULT_MODEL_NAME
        out_path = Path(out) if out else RESULTS_ROOT / model_folder_name("SmolLM2-135M-Instruct")
        max_chunks = DEFAULT_MODEL_CHUNKS if max_chunks is None else max_chunks
    else:
        folder, model_id = resolve(model_source, revision), str(model_source)
        out_path = Path(out) if out else RESULTS_ROOT / model_folder_name(str(model_source))
    if not (folder / "tokenizer.json").is_file():
        raise HubquantError(
            f"{model_id} ships no tokenizer.json; evaluation needs its tokenizer "
            "(convert a checkpoint that has one, or add its tokenizer.json to the folder)"
        )
    out_path = out_path.expanduser().absolute()
    hold(out_path)  # one run per OUT (hubquant.locks), until run_eval returns
    clear_temporary_files(out_path)  # what a killed run's writes left; never read

    family = family_for(read_config(folder))
    if device_map is not None and family.config(read_config(folder)).kind == "encoder":
        raise HubquantError("--device-map applies to decoders; an encoder fits on one device")
    if family.config(read_config(folder)).kind == "encoder":
        return run_encoder_eval(
            folder=folder,
            model_id=model_id,
            family=family,
            text=text,
            out_path=out_path,
            variants=variants,
            ctx=ctx,
            max_chunks=max_chunks,
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            ppl_method=ppl_method,
            stride=stride,
            tasks=tasks,
            dtype=dtype,
            target_dtype=target_dtype,
            device=dev,
            speed=speed,
            force=force,
            max_kld=max_kld,
            min_top1=min_top1,
            min_cosine=min_cosine,
            progress=progress,
        )
    if max_sentences is not None:
        raise HubquantError("--max-sentences applies to embedders (encoders); drop it for a decoder")
    ctx = DEFAULT_CTX if ctx is None else ctx
    start = time.perf_counter()
    base, tokenizer = load(
        folder,
        dtype=target_dtype,
        device=dev,
        progress=progress,
        device_map=device_map,
        max_memory=max_memory,
    )
    base_load_s = time.perf_counter() - start
    assert tokenizer is not None

    ids = torch.tensor(tokenizer.encode(text.text, add_special_tokens=False))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos_id, bos_note = _bos(tokenizer, family)
    if ppl_method == "sliding" and bos_id is not None:
        ids = torch.cat([torch.tensor([bos_id]), ids])
    wins = windows(ids, method=ppl_method, ctx=ctx, stride=stride, max_chunks=max_chunks,
                   bos_id=bos_id if ppl_method == "chunks" else None)  # fmt: skip
    scored = sum(w.ids.numel() - w.first for w in wins)
    method = {
        "ppl_method": ppl_method, "ctx": ctx, "stride": stride if ppl_method == "sliding" else None,
        "windows": len(wins), "max_chunks": max_chunks, "max_tokens": max_tokens, "tokens_scored": scored,
        "bos": bos_note, "dtype": dtype, "log_softmax": "fp32", "speed_runs": 3 if speed else 0,
        "decode_tokens": 128, "kld": "KL(base || variant), base forward recomputed per variant",
    }  # fmt: skip
    if compile:
        method["decode"] = "compiled step (torch.compile, fixed shapes); prefill eager"
    header = results_header(
        task="causal-lm", model_id=model_id, folder=folder, family=family.name, text=text, method=method,
        environment={**environment(dev), **placement(base)}, budget={"max_kld": max_kld, "min_top1": min_top1},
    )  # fmt: skip
    results_path = out_path / "results.json"
    rows = resume(results_path, header, force)
    done = {r.variant for r in rows}

    def save() -> dict[str, Any]:
        return save_results(results_path, header, rows, verdict(rows, max_kld, min_top1))

    print(f"hubquant eval {model_id}: {len(wins)} windows of {ctx} tokens ({ppl_method}), {scored} tokens scored; "
          f"{text.name} sha256 {text.sha256[:12]}; {dtype} on {dev}; BOS {bos_note}")  # fmt: skip
    results = save()
    for variant in variants:
        if variant in done:
            print(f"{variant:10} already in {results_path}; skipped (use --force to redo)")
            continue
        row = _measure(
            variant,
            base,
            tokenizer,
            base_load_s,
            folder,
            out_path,
            wins,
            target_dtype,
            dev,
            speed,
            tasks,
            progress,
            compile,
        )
        rows.append(row)
        results = save()
        print(_line(row))
    write_report(results, out_path)
    print(results["verdict"]["text"])
    print(f"results: {results_path}")
    return results


def _bos(tokenizer: Any, family: Any) -> tuple[int | None, str]:
    """The BOS to put first in each window, and what was done about it (said in the report)."""
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        return tokenizer.bos_id, f"prepended (id {tokenizer.bos_id}), as the tokenizer does"
    if getattr(family, "bos_required", False) and tokenizer.bos_id is not None:
        return tokenizer.bos_id, (
            f"fixed: the tokenizer does not prepend BOS, which {family.name} models need; "
            f"prepended (id {tokenizer.bos_id})"
        )
    return None, "none (the tokenizer adds none)"


def _measure(
    variant: str,
    base: torch.nn.Module,
    tokenizer: Any,
    base_load_s: float,
    folder: Path,
    out: Path,
    wins: list,
    dtype: torch.dtype,
    device: torch.device,
    speed: bool,
    tasks: list[str] | None,
    progress: bool,
    compile: bool = False,
) -> Row:
    row, model, vfolder = start_row(variant, base, base_load_s, folder, out, dtype, device, progress)
    s = score(model, wins, base=base, device=device, progress=progress, desc=f"score {variant}").summary()
    for key, value in s.items():
        setattr(row, key, value)
    if speed:
        for key, value in measure_speed(
            model, vocab_size=model.config.vocab_size, device=device, compile=compile
        ).items():
            setattr(row, key, value)
    if tasks:
        from .lm_eval import run_tasks

        row.tasks = run_tasks(model, tasks, tokenizer)  # every variant shares the base's tokenizer
    row.disk_bytes = folder_bytes(vfolder)
    row.weight_bytes = weight_bytes(model)
    row.peak_rss_bytes = peak_rss_bytes()
    if device.type == "cuda":
        row.cuda_peak_allocated_bytes = torch.cuda.max_memory_allocated(device)
        row.cuda_peak_reserved_bytes = torch.cuda.max_memory_reserved(device)
    plan = getattr(model, "hf_device_map", None)
    if plan:
        row.device_peak_bytes = device_peaks(plan, row.peak_rss_bytes)
        row.notes.append(
            "peak memory per device: "
            + ", ".join(f"{d} {b / 1e9:.2f} GB" for d, b in row.device_peak_bytes.items())
        )
    if model is not base:
        del model
        gc.collect()
    return row


def _line(row: Row) -> str:
    def f(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    return (
        f"{row.variant:10} ppl {f(row.ppl, '.3f')} ± {f(row.ppl_err, '.3f')}  KLD {f(row.kld_mean, '.5f')} nats  "
        f"top-1 {f(row.top1_agreement and row.top1_agreement * 100, '.1f')}%  "
        f"decode {f(row.decode_tok_s, '.1f')} tok/s  disk {f(row.disk_bytes and row.disk_bytes / 1e6, '.1f')} MB"
    )
