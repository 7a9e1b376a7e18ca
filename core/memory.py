"""Refuse a step that cannot fit in memory, with the figures and the fix, before it starts.

Loading or quantizing a model that does not fit ends with the OS killing the process (or CUDA's
out-of-memory error) minutes in, with no word on why. So each such step first compares the bytes it
will need (from the safetensors headers, read before any weight is) with the memory available to it:

- CPU: Linux's `MemAvailable` (/proc/meminfo), lowered to the container's cgroup limit when there is
  one (the limit minus what the cgroup uses, page cache not counted, as `docker stats` counts it);
- CUDA: the device's free memory, `torch.cuda.mem_get_info`.

Where neither can be read (another OS, another device type) the check passes.

`HUBQUANT_AVAILABLE_MEMORY` replaces the measured figure for every device: bytes, or a size such
as "8GB" or "512MiB". It exists for tests (to see the refusal without a big model) and as the way
past the check when the figure is known to be wrong (swap the OS does not count): set it large.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError

ENV = "HUBQUANT_AVAILABLE_MEMORY"
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


def human(nbytes: int | float) -> str:
    """Bytes as "16.1 GB", "512.0 MB" or "80.5 kB" (decimal units).

    Args:
        nbytes: a byte count.
    """
    if nbytes >= 10**9:
        return f"{nbytes / 1e9:.1f} GB"
    if nbytes >= 10**6:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1e3:.1f} kB"


def _override() -> int | None:
    value = os.environ.get(ENV)
    if value is None or not value.strip():
        return None
    match = _SIZE.match(value)
    if match is None:
        raise HubquantError(f"{ENV}={value!r} is not a size; write it as bytes or like 8GB, 512MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    """`MemAvailable` from a /proc/meminfo-style file, in bytes (None when absent).

    Args:
        meminfo: the file to read.
    """
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                parts = line.split()
                return int(parts[1]) * (1024 if parts[-1].lower() == "kb" else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_v2_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup v2 folder and its ancestors up to `root` (limits are inherited)."""
    relative = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip().strip("/")
    except OSError:
        pass
    folder = root.joinpath(*relative.split("/")) if relative else root
    dirs = [folder]
    while folder != root and root in folder.parents:
        folder = folder.parent
        dirs.append(folder)
    return dirs


def cgroup_available(root: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """What the cgroup's memory limit leaves (limit - usage + page cache), in bytes; None when the
    cgroup has no limit or none can be read. cgroup v2 first (the process's cgroup and its
    ancestors: the tightest), then v1.

    Args:
        root: the cgroup filesystem's mount point.
        proc_cgroup: the process's /proc/self/cgroup.
    """
    left = []
    for folder in _cgroup_v2_dirs(root, proc_cgroup):
        limit = _read_int(folder / "memory.max")  # "max" (no limit) reads as None
        if limit is None:
            continue
        usage = _read_int(folder / "memory.current") or 0
        cache = _stat_value(folder / "memory.stat", "file")
        left.append(max(0, limit - max(0, usage - cache)))
    if left:
        return min(left)
    v1 = root / "memory"
    limit_v1 = _read_int(v1 / "memory.limit_in_bytes")
    if limit_v1 is None or limit_v1 >= 2**60:  # v1 says "no limit" with a huge number
        return None
    usage = _read_int(v1 / "memory.usage_in_bytes") or 0
    cache = _stat_value(v1 / "memory.stat", "total_cache")
    return max(0, limit_v1 - max(0, usage - cache))


def available_memory(device: Any = "cpu") -> tuple[int | None, str]:
    """Bytes available to a new allocation on `device`, and where that figure comes from.

    Args:
        device: "cpu", "cuda", "cuda:N" or a torch.device.

    Returns:
        (bytes or None when unknown, a few words naming the memory: "available RAM", "free on cuda:0").
    """
    kind = str(getattr(device, "type", device)).partition(":")[0]
    name = str(device)
    override = _override()
    where = "free on " + name if kind == "cuda" else "available RAM"
    if override is not None:
        return override, f"{where} ({ENV})"
    if kind == "cuda":
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):
            return None, where
        return int(free), where
    if kind != "cpu":
        return None, where
    figures = [v for v in (meminfo_available(), cgroup_available()) if v is not None]
    return (min(figures) if figures else None), where


def check_memory(needed: int, device: Any = "cpu", *, what: str, fix: str) -> None:
    """Refuse `what` when it needs more bytes than `device` has available.

    Args:
        needed: the bytes the step will allocate.
        device: where it allocates them ("cpu", "cuda:0"...).
        what: the step, as the message's subject ("loading org/model in float32").
        fix: what to do instead, e.g. "use --dtype bf16, a quantized variant, or a machine with
            more memory".

    Raises:
        HubquantError: "WHAT needs 16.1 GB, 7.9 GB available RAM: FIX".
    """
    available, where = available_memory(device)
    if available is None or needed <= available:
        return
    raise HubquantError(f"{what} needs {human(needed)}, {human(available)} {where}: {fix}")
