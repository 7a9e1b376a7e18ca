"""Models bigger than one device: accelerate plans where each layer lives and runs it there.

hubquant keeps no scheduler of its own. accelerate's `infer_auto_device_map` places the model,
built on the meta device, across the visible GPUs, then the CPU, then disk, never splitting a
decoder or encoder block and keeping tied weights together; its `dispatch_model` hooks move
activations between devices and bring disk-offloaded layers in for their forward. What hubquant
adds is the streaming: each tensor goes from its shard straight to the device that owns it (or to
the offload folder), so the whole model is never held in RAM.

    model, tok = hubquant.load("swiss-ai/Apertus-70B", device_map="auto", max_memory={0: "75GiB", 1: "75GiB", "cpu": "100GiB"})
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hubquant.errors import HubquantError

from .encoder import expected_tensors

# Module classes a device boundary never cuts through.
NO_SPLIT = ["Block", "EncoderBlock"]
DeviceMap = dict[str, "str | int | torch.device"]


def _human(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _parse_memory(max_memory: dict[Any, Any] | None) -> dict[Any, int] | None:
    """max_memory with every value in bytes ("10GiB", "500MB" or an int), keys as accelerate wants
    them (GPU indices as ints, "cpu", "disk")."""
    if max_memory is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict[Any, int] = {}
    for key, value in max_memory.items():
        device = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(device, str) and device.startswith("cuda:"):
            device = int(device.split(":", 1)[1])
        try:
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            out[device] = value if isinstance(value, int) else convert_file_size_to_int(value)
        except (ValueError, TypeError):
            raise HubquantError(
                f"max_memory[{key!r}] = {value!r} is not a size; use bytes or a string like '10GiB'"
            ) from None
    return out


def model_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of every parameter and buffer in `dtype` (floating ones) or as they are (others)."""

    size = torch.tensor([], dtype=dtype).element_size()
    return sum(
        t.numel() * (size if t.is_floating_point() else t.element_size())
        for t in expected_tensors(model).values()
    )


def plan_device_map(
    model: nn.Module,
    device_map: str | DeviceMap,
    max_memory: dict[Any, Any] | None,
    dtype: torch.dtype,
) -> DeviceMap:
    """Where each module lives: accelerate's plan for "auto", or the given map, checked.

    Args:
        model: the canonical model on the meta device.
        device_map: "auto", or {module name: device} ("" for the whole model; devices: GPU index,
            "cuda:N", "cpu", "disk").
        max_memory: the most each device may hold ({0: "20GiB", "cpu": "60GiB", "disk": ...});
            None: what the devices have free.
        dtype: the dtype the weights are loaded in.

    Raises:
        HubquantError: an unknown plan name; a map that leaves modules out; a `max_memory` too
            small for the model (without "disk" in it), with the figures.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import check_device_map

    limits = _parse_memory(max_memory)
    if isinstance(device_map, str):
        if device_map != "auto":
            raise HubquantError(f"device_map {device_map!r} is not supported; use 'auto' or a dict")
        plan = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=NO_SPLIT, dtype=dtype)
    else:
        plan = {name: _device_key(device) for name, device in device_map.items()}
        try:
            check_device_map(model, plan)
        except ValueError as error:
            raise HubquantError(
                f"device_map leaves modules out ({error}); map every module, or use 'auto'"
            ) from None
    if limits is not None and "disk" not in limits and "disk" in plan.values():
        need = model_bytes(model, dtype)
        allowed = sum(v for k, v in limits.items() if k != "disk")
        raise HubquantError(
            f"the model needs {_human(need)} in {str(dtype).removeprefix('torch.')} but max_memory allows "
            f"{_human(allowed)}; raise max_memory, add 'disk' to it to offload the rest, or load a quantized variant"
        )
    return plan


def _device_key(device: str | int | torch.device) -> str | int:
    if isinstance(device, torch.device):
        return device.index if device.type == "cuda" and device.index is not None else device.type
    if isinstance(device, str) and device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return device


def placement(plan: DeviceMap) -> Callable[[str], str | int]:
    """Canonical tensor name -> the device its module was given (the longest matching prefix)."""
    keys = sorted(plan, key=len, reverse=True)

    def where(name: str) -> str | int:
        for key in keys:
            if key == "" or name == key or name.startswith(key + "."):
                return plan[key]
        raise HubquantError(f"device_map places no module holding {name}; map every module")

    return where


def describe_device_map(plan: DeviceMap) -> str:
    """Which modules live where, in one line: "0: embed, layers 0-15; cpu: layers 16-31, norm,
    lm_head; disk: ..." (runs of consecutive layers collapsed)."""

    by_device: dict[str, list[str]] = {}
    for name, device in plan.items():
        by_device.setdefault(str(device), []).append(name)
    parts = []
    for device, names in by_device.items():
        layers = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"layers\.(\d+)", n)))
        others = [n for n in names if not re.fullmatch(r"layers\.\d+", n)]
        runs: list[str] = []
        for i in layers:
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        text = [f"layers {a}-{b}" if a != b else f"layer {a}" for a, b in runs]
        parts.append(f"{device}: {', '.join(others[:1] + text + others[1:]) or '-'}")
    return "; ".join(parts)


class Offload:
    """The folder disk-offloaded tensors are written to while loading (accelerate's format), removed
    when the model is garbage-collected unless the caller gave it."""

    def __init__(self, folder: str | Path | None) -> None:
        self.given = folder is not None
        self.folder = (
            Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="hubquant-offload-"))
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, dict[str, Any]] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        from accelerate.utils import offload_weight

        self.index = offload_weight(tensor, name, str(self.folder), self.index)

    def finish(self, model: nn.Module) -> None:
        from accelerate.utils import save_offload_index

        save_offload_index(self.index, str(self.folder))
        if not self.given:
            weakref.finalize(model, shutil.rmtree, str(self.folder), True)


def dispatch(model: nn.Module, plan: DeviceMap, offload: Offload | None) -> None:
    """Attach accelerate's hooks: inputs follow the layers across devices, disk-offloaded layers
    are read in for their forward and dropped after it."""
    from accelerate import dispatch_model

    devices = set(plan.values())
    if devices <= {"cpu"} or len(devices) == 1 and "disk" not in devices:
        return  # one device: nothing to dispatch
    dispatch_model(
        model,
        device_map=plan,
        offload_dir=str(offload.folder) if offload is not None else None,
        offload_index=offload.index if offload is not None else None,
    )
    model.hf_device_map = dict(plan)
