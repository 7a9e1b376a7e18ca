"""`hubquant eval`: from a Hub id (or folder) to the results a team decides from. The one driver.

    settings   One `EvalSettings` (the CLI, `run_eval(...)` and the sweep build it), checked before
               anything is downloaded.
    checkpoint Resolved once (`Checkpoint`: folder, config, family, revision) and passed down to
               loading and quantizing; the task that measures it is picked from the registry
               (`evaluate/tasks/`: causal LM, masked LM, sentence embedding, or one registered).
    prepare    The base loads once; the task builds its inputs from the text once and states its
               method (written to results.json with the dataset's hash and the machine).
    variants   For each variant (the base in `--dtype`, each quantize method, `gguf:PATH`), one
               after another: made (streamed into OUT/variants/NAME, as it would ship), loaded as
               any checkpoint is, measured by the task against the base, its size and memory
               recorded, and saved as one row of results.json (atomically) before the next.

Only the base and one variant are resident at a time. A rerun with the same settings skips the
variants already in results.json; Ctrl-C keeps every finished row. CSV and HTML reports are views
of results.json (`hubquant.reports`).
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
from hubquant.models.checkpoint import Checkpoint
from hubquant.models.config import torch_dtype
from hubquant.models.loading import torch_device
from hubquant.quantize.calibration import CalibrationSettings
from hubquant.reports import write_report

from .data import load_text
from .driver import device_peaks, environment, folder_bytes, placement, resume, start_row
from .results import (
    RESULTS_ROOT,
    Row,
    clear_temporary_files,
    model_folder_name,
    results_header,
    save_results,
    verdict,
)
from .settings import EvalSettings
from .speed import kernel_notes, peak_rss_bytes, weight_bytes
from .tasks import Task, task_for

# The embedded default model is judged on fewer windows, so that `make eval` ends in minutes.
DEFAULT_MODEL_CHUNKS = 16


def eval_settings(model: str | EvalSettings | None = None, **settings: Any) -> EvalSettings:
    """The settings of a run from `run_eval`'s arguments: an `EvalSettings` as it is, or a model
    and settings by name (one-line error for an unknown name)."""
    if isinstance(model, EvalSettings):
        return model.with_(**settings) if settings else model
    return EvalSettings.from_mapping({"model": model, **settings}, "run_eval")


@lock_scope
def run_eval(model: str | EvalSettings | None = None, /, **settings: Any) -> dict[str, Any]:
    """Measure a model and its quantized variants; write results.json, report.csv, report.html.

    Args:
        model: a Hub repo id or local folder (None: the embedded SmolLM2-135M-Instruct), or a
            whole `EvalSettings`.
        **settings: any `EvalSettings` field by name (variants, dataset, ctx, device, out...).

    Returns:
        The results (as written to OUT/results.json).

    Raises:
        HubquantError: a setting, the model or the text is wrong (one line, with the fix).
    """
    s = eval_settings(model, **settings)
    s.check()
    target_dtype = torch_dtype(s.dtype)
    device = torch_device(
        ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    )
    if s.tasks:
        from .lm_eval import check_tasks

        check_tasks(list(s.tasks))  # unknown task names fail before anything is loaded
    text = load_text(s.dataset)
    checkpoint, model_id, out = _checkpoint(s)
    task = task_for(checkpoint, s.task)(s, checkpoint, device)
    if s.model is None and s.max_chunks is None and task.name == "causal-lm":
        task.settings = s = s.with_(max_chunks=DEFAULT_MODEL_CHUNKS)
    if not (checkpoint.folder / "tokenizer.json").is_file():
        raise HubquantError(
            f"{model_id} ships no tokenizer.json; evaluation needs its tokenizer "
            "(convert a checkpoint that has one, or add its tokenizer.json to the folder)"
        )
    task.check()
    hold(out)  # one run per OUT (hubquant.locks), until run_eval returns
    clear_temporary_files(out)  # what a killed run's writes left; never read

    start = time.perf_counter()
    base, tokenizer = load(
        checkpoint, dtype=target_dtype, device=device, progress=s.progress,
        device_map=s.device_map, max_memory=s.max_memory,
    )  # fmt: skip
    base_load_s = time.perf_counter() - start
    method = task.prepare(base, tokenizer, text)
    header = results_header(
        task=task.name, model_id=model_id, folder=checkpoint.folder, family=checkpoint.family.name, text=text,
        method=method, environment={**environment(device), **placement(base)}, budget=task.budget(),
    )  # fmt: skip
    results_path = out / "results.json"
    rows = resume(results_path, header, s.force)
    done = {r.variant for r in rows}

    def save() -> dict[str, Any]:
        return save_results(results_path, header, rows, verdict(rows, header["budget"], task.name))

    kind = "" if task.name == "causal-lm" else f" ({task.name})"
    print(f"hubquant eval {model_id}{kind}: {task.headline()}; {text.name} sha256 {text.sha256[:12]}; "
          f"{s.dtype} on {device}")  # fmt: skip
    results = save()
    for variant in s.variant_list:
        if variant in done:
            print(f"{variant:10} already in {results_path}; skipped (use --force to redo)")
            continue
        row = measure_variant(task, variant, base, base_load_s, out)
        rows.append(row)
        results = save()
        print(task.line(row))
    write_report(results, out)
    print(results["verdict"]["text"])
    print(f"results: {results_path}")
    return results


def _checkpoint(s: EvalSettings) -> tuple[Checkpoint, str, Path]:
    """The checkpoint (resolved once), the model's name for the results, and OUT."""
    if s.model is None:
        checkpoint = Checkpoint.resolve(default_model())
        model_id, name = DEFAULT_MODEL_NAME, "SmolLM2-135M-Instruct"
    else:
        checkpoint = Checkpoint.resolve(s.model, s.revision)
        model_id = name = str(s.model)
    out = Path(s.out) if s.out else RESULTS_ROOT / model_folder_name(name)
    return checkpoint, model_id, out.expanduser().absolute()


def measure_variant(task: Task, variant: str, base: torch.nn.Module, base_load_s: float, out: Path) -> Row:
    """One variant, start to end: made and loaded (`start_row`), measured by the task against the
    base, its size and memory recorded; only the base stays resident afterwards.

    Args:
        task: the run's task, prepared.
        variant: the variant's name.
        base: the base model.
        base_load_s: the base's load time (the base row's).
        out: the run's OUT.
    """
    s, device = task.settings, task.device
    calibration = CalibrationSettings(dataset=s.dataset, samples=s.calib_samples, length=s.calib_len)
    row, model, vfolder = start_row(
        variant,
        base,
        base_load_s,
        task.checkpoint,
        out,
        torch_dtype(s.dtype),
        device,
        s.progress,
        calibration,
    )
    if model is not base:
        row.notes += task.adopt(model, base, variant)
        row.notes += kernel_notes(model)
    figures = task.measure(model, base, variant)
    row.notes += figures.pop("notes", [])
    row.update(figures)
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
