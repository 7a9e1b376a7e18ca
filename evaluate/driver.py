"""The driver's plumbing, the same for every task: resume an earlier run, make a variant (streamed
into OUT/variants) and load it, begin its row, record the machine and the memory of each device.
`run.py` is the driver that calls these; the tasks (`evaluate/tasks/`) measure.
"""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from hubquant.convert import convert
from hubquant.errors import HubquantError
from hubquant.models.checkpoint import Checkpoint
from hubquant.models.dispatch import describe_device_map
from hubquant.models.loading import load
from hubquant.quantize.calibration import CalibrationSettings
from hubquant.quantize.core import quantize_checkpoint
from hubquant.quantize.registry import variant_folder

from .results import Row, read_results, rows_of
from .speed import reset_peak_rss


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("hubquant", "torch", "torchao", "bitsandbytes", "transformers", "lm_eval"):
        try:
            out[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            out[package] = None
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = dict(_versions())
    env.update(device=device.type, threads=torch.get_num_threads(), python=platform.python_version())
    env["device_name"] = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return env


def placement(model: torch.nn.Module) -> dict[str, Any]:
    """The device map the base model was spread with, for the report (nothing without one)."""
    plan = getattr(model, "hf_device_map", None)
    if not plan:
        return {}

    return {"device_map": describe_device_map(plan)}


def device_peaks(plan: dict[str, Any], rss: int | None) -> dict[str, int]:
    """Peak memory of each device in a device map: RSS for the CPU (and disk offload's reads),
    allocated bytes for each GPU."""
    peaks: dict[str, int] = {}
    for device in dict.fromkeys(str(d) for d in plan.values()):
        if device in ("cpu", "disk"):
            if rss is not None:
                peaks["cpu"] = rss
        else:
            index = int(device.removeprefix("cuda:"))
            peaks[f"cuda:{index}"] = torch.cuda.max_memory_allocated(index)
    return peaks


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def resume(path: Path, header: dict[str, Any], force: bool) -> list[Row]:
    """The rows of an earlier run with the same settings; none with --force.

    A results.json that is not one whole file of this schema (not JSON, cut short, rows without a
    variant...) is never trusted nor a reason to stop: it is kept aside as `results.json.unreadable`
    and the run starts over. (hubquant itself never leaves one: results.json is replaced atomically.)
    """

    if force or not path.is_file():
        return []
    try:
        old = read_results(path)
        rows = rows_of(old)
        if not all(isinstance(r.variant, str) and r.variant for r in rows):
            raise TypeError("a row has no variant name")
    except (HubquantError, TypeError, AttributeError, ValueError) as error:
        aside = path.with_name(f"{path.name}.unreadable")
        os.replace(path, aside)
        why = "not a results.json of this hubquant" if isinstance(error, HubquantError) else str(error)
        print(f"{path} could not be read ({why}); kept as {aside.name}, starting over")
        return []
    same = all(old.get(key) == header[key] for key in ("model", "dataset", "method", "budget"))
    if not same:
        raise HubquantError(
            f"{path} holds results made with other settings; pass --force to start over, or another --out"
        )
    return rows


def start_row(
    variant: str,
    base: torch.nn.Module,
    base_load_s: float,
    checkpoint: Checkpoint,
    out: Path,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
    calibration: CalibrationSettings | None = None,
) -> tuple[Row, torch.nn.Module, Path]:
    """A variant's row begun the same way for every kind of model: memory peaks reset, the variant
    made (streamed into OUT/variants) and loaded, its load time and settings recorded.

    Returns:
        (the row, the loaded model (the base itself for "base"), the variant's folder).
    """

    row = Row(variant)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    if variant == "base":
        row.load_s = base_load_s
        row.method_settings = {"dtype": str(dtype).removeprefix("torch.")}
        return row, base, checkpoint.folder
    vfolder = make_variant(variant, checkpoint, out, progress, device, calibration)
    start = time.perf_counter()
    model, _ = load(vfolder, dtype=dtype, device=device, progress=progress)
    row.load_s = time.perf_counter() - start
    report = getattr(model, "quant_report", None)
    if report is not None:
        row.method_settings = {"method": report.method, "library": report.library, **report.settings}
        row.skipped_layers = len(report.skipped)
    else:
        row.method_settings = {"source": variant}
    return row, model, vfolder


def make_variant(
    variant: str,
    checkpoint: Checkpoint,
    out: Path,
    progress: bool,
    device: torch.device | None = None,
    calibration: CalibrationSettings | None = None,
) -> Path:
    """The variant's folder under OUT/variants, made (streamed) unless already complete there. On
    a GPU run, each layer is quantized on that GPU (one at a time beside the base); the folder is
    the same portable one the CPU writes."""
    if variant.startswith("gguf:"):
        source = Path(variant[5:]).expanduser()
        target = out / "variants" / f"gguf-{source.stem}"
        if not (target / "config.json").is_file():
            convert(source, target, dtype="bf16", force=True, progress=progress)
        return target

    target = out / "variants" / variant_folder(variant)
    if not (target / "config.json").is_file():  # folders appear only when complete
        on = device if device is not None and device.type == "cuda" else None
        quantize_checkpoint(
            checkpoint, target, variant, force=True, progress=progress, device=on, calibration=calibration
        )
    return target
