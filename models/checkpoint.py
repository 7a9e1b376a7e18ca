"""Stream a Hub-layout safetensors checkpoint into a meta-initialised model, tensor by tensor.

Peak memory is the model plus one tensor: each tensor is read from its shard with plain reads (no
memory map whose touched pages would stay resident), cast, and assigned in place of the meta
placeholder; nothing is materialised twice. Every tensor is checked: known
(or dropped on purpose), present once, the right shape, and nothing expected left unfilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hubquant.errors import HubquantError
from hubquant.files import read_json

from .config import ModelConfig
from .encoder import expected_tensors
from .families import Family, family_for
from .hub import BIN, BIN_INDEX, CONFIG, SAFETENSORS, SAFETENSORS_INDEX, read_weight_map, resolve
from .safetensors_file import SafetensorsFile


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise HubquantError(
            f"{folder} has no config.json; point at a transformers checkpoint folder (or a Hub repo id)"
        )
    return read_json(path, "config.json")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint worked out once: where it is, what its config says and which family reads it.
    `hubquant.load` and `quantize_checkpoint` take one in place of a path (nothing is resolved or
    read again), and the evaluation driver passes one down from the moment it resolves the model.

    Attributes:
        folder: the local Hub-layout folder (a download lands in the Hub cache, named by its commit).
        config: config.json as read.
        family: the family that builds the model.
        revision: the Hub branch, tag or commit asked for (None: the default branch, or a folder).
        source: the model as the user named it (a Hub id or a path).
    """

    folder: Path
    config: dict[str, Any]
    family: Family
    revision: str | None = None
    source: str = ""

    @classmethod
    def resolve(cls, source: str | Path | Checkpoint, revision: str | None = None) -> Checkpoint:
        """The checkpoint of a Hub id or folder (downloaded once, as `hubquant.load` would).

        Args:
            source: a Hub repo id, a local folder, or a Checkpoint (returned as it is).
            revision: Hub branch, tag or commit.
        """
        if isinstance(source, Checkpoint):
            return source
        folder = resolve(source, revision)
        config = read_config(folder)
        return cls(folder, config, family_for(config), revision, str(source))

    @property
    def spec(self) -> ModelConfig:
        """The family's model config (kind, sizes, heads) read from `config`."""
        return self.family.config(self.config)

    @property
    def commit(self) -> str | None:
        """The Hub commit, when the folder is a Hub snapshot (named by its 40-hex commit)."""
        name = self.folder.name
        return name if len(name) == 40 and all(c in "0123456789abcdef" for c in name) else None


def read_index(index_path: Path) -> dict[str, list[str]]:
    """Shard file name -> tensor names, from a `*.index.json`; every listed shard must exist.

    Args:
        index_path: `model.safetensors.index.json` or `pytorch_model.bin.index.json`.
    """
    shards: dict[str, list[str]] = {}
    for name, shard in read_weight_map(index_path).items():
        shards.setdefault(shard, []).append(name)
    for shard in shards:
        if not (index_path.parent / shard).is_file():
            raise HubquantError(
                f"shard {shard} listed in {index_path} is missing; re-download the checkpoint"
            )
    return dict(sorted(shards.items()))


def shard_files(folder: Path) -> dict[str, list[str] | None]:
    """Shard file name -> tensor names the index assigns to it (None: single file, no index)."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return dict(read_index(folder / SAFETENSORS_INDEX))
    if (folder / SAFETENSORS).is_file():
        return {SAFETENSORS: None}
    if (folder / BIN).is_file() or (folder / BIN_INDEX).is_file():
        raise HubquantError(
            f"{folder} holds pickle weights (pytorch_model*.bin), which are not loaded directly; "
            f"run `hubquant convert {folder} --out DIR` and load DIR"
        )
    raise HubquantError(f"{folder} has no model.safetensors or {SAFETENSORS_INDEX}")


def hub_tensor_names(folder: Path, shards: dict[str, list[str] | None]) -> set[str]:
    """Every tensor name the checkpoint holds: from the index, or from the shards' headers."""
    names: set[str] = set()
    for shard, listed in shards.items():
        if listed is not None:
            names.update(listed)
            continue
        try:
            with SafetensorsFile(folder / shard) as f:
                names.update(f.keys())
        except OSError as error:
            raise HubquantError(f"cannot read {folder / shard}: {error}") from None
    return names


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_weights(
    model: nn.Module,
    family: type[Family],
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    tie_embeddings: bool = False,
    progress: bool = True,
    shards: dict[str, list[str] | None] | None = None,
    skip: frozenset[str] = frozenset(),
    provided: frozenset[str] = frozenset(),
    placement: Any = None,
    offload: Any = None,
) -> None:
    """Fill `model` (built on the meta device) from `folder`'s safetensors shards.

    Args:
        model: the canonical model, on the meta device.
        family: maps Hub tensor names to canonical ones.
        folder: the checkpoint folder.
        dtype: floating tensors are cast to this on the way in.
        device: where the tensors end up.
        tie_embeddings: the head shares the embeddings; a stored `lm_head.weight` is ignored.
        progress: show a progress bar.
        shards: `shard_files(folder)`, when the caller already has it.
        skip: Hub tensor names left to the caller (a quantized module's tensors).
        provided: canonical names the caller fills itself (not reported missing).
        placement: canonical name -> device (or "disk") from a device map (`models.dispatch`);
            None: everything to `device`.
        offload: where "disk" tensors are written (`models.dispatch.Offload`); they stay on the
            meta device in the model.
    """
    from tqdm.auto import tqdm

    expected = expected_tensors(model)
    source: dict[str, str] = {}  # canonical name -> shard it came from
    shards = shards if shards is not None else shard_files(folder)
    total = sum(len(names) if names else 0 for names in shards.values()) - len(skip) or None
    bar = tqdm(total=total, desc="loading", unit="tensor", disable=not progress, leave=False)
    for shard, listed in shards.items():
        try:
            with SafetensorsFile(folder / shard) as f:
                keys = list(f.keys())
                absent = sorted(set(listed or ()) - set(keys))
                if absent:
                    raise HubquantError(
                        f"tensor {absent[0]} is listed for {shard} in the index but absent from it"
                    )
                for hub_name in keys:
                    if hub_name in skip:
                        continue
                    known, canonical = family.to_canonical(hub_name)
                    if not known or (canonical is not None and canonical not in expected):
                        if tie_embeddings and canonical in getattr(model, "tied_copies", ("lm_head.weight",)):
                            continue  # tied heads are served by the embeddings, as transformers does
                        raise HubquantError(
                            f"unexpected tensor {hub_name} in {shard}: the {family.name} model built "
                            "from config.json has no place for it; check config.json matches the weights"
                        )
                    if canonical is None:
                        continue
                    if canonical in source:
                        raise HubquantError(
                            f"tensor {hub_name} appears twice: in {source[canonical]} and in {shard}"
                        )
                    target = device
                    if placement is not None:
                        where = placement(canonical)
                        if where == "disk":
                            _check_shape(f, hub_name, expected[canonical], shard)
                            tensor = f.read(hub_name)
                            offload.write(
                                canonical, tensor.to(dtype) if tensor.is_floating_point() else tensor
                            )
                            source[canonical] = shard
                            bar.update()
                            continue
                        target = as_torch_device(where)
                    _load_one(model, f, hub_name, canonical, expected[canonical], shard, dtype, target)
                    source[canonical] = shard
                    bar.update()
        except OSError as error:
            raise HubquantError(f"cannot read {folder / shard}: {error}") from None
    bar.close()
    missing = sorted(set(expected) - set(source) - provided)
    if missing:
        name = family.to_hub(missing[0])
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise HubquantError(f"tensor {name} is missing from {folder}{more}; the checkpoint is incomplete")
    if tie_embeddings:
        model.tie_weights()


def _check_shape(f: SafetensorsFile, hub_name: str, placeholder: torch.Tensor, shard: str) -> None:
    shape = f.shape(hub_name)
    if shape != tuple(placeholder.shape):
        raise HubquantError(
            f"tensor {hub_name} in {shard} has shape {list(shape)}, expected {list(placeholder.shape)} "
            "from config.json; check config.json matches the weights"
        )


def _load_one(
    model: nn.Module,
    f: SafetensorsFile,
    hub_name: str,
    canonical: str,
    placeholder: torch.Tensor,
    shard: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    _check_shape(f, hub_name, placeholder, shard)
    stored = f.dtype(hub_name)
    if stored == getattr(torch, "float4_e2m1fn_x2", None):
        raise HubquantError(
            f"tensor {hub_name} in {shard} is F4 (packed float4), which hubquant cannot load; "
            "use a BF16, F16 or F32 checkpoint"
        )
    cast = stored.is_floating_point and stored != dtype
    if not cast and torch.device(device).type == "cpu":
        tensor = f.map(hub_name)  # kept as stored: share the page cache instead of copying
    else:
        tensor = f.read(hub_name)
        tensor = tensor.to(dtype) if cast else tensor
    _assign(model, canonical, tensor.to(device))


def as_torch_device(device: str | int) -> torch.device:
    """A device_map value as a torch device (an integer is a CUDA index, as accelerate writes it)."""
    return torch.device(f"cuda:{device}") if isinstance(device, int) else torch.device(device)
