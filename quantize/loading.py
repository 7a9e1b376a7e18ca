"""Load a quantized variant into the canonical model (decoder or encoder): quantized modules rebuilt
as saved (never re-quantized), the rest streamed like any checkpoint, then each module repacked for
its device."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hubquant.errors import HubquantError
from hubquant.files import read_json
from hubquant.models.layers import fuse_projections

from .base import LayerRecord, QuantReport
from .core import HEAD, _set, _Target, hub_module, linear_names
from .registry import method_from_hf_config


def _targets(model: nn.Module, family: Any) -> dict[str, _Target]:
    """Hub module name -> every `nn.Linear` of the model that a checkpoint may hold quantized:
    the projections, the head, and (for another tool's variant) any other Linear."""
    targets = {}
    for name in linear_names(model):
        try:
            prefix = hub_module(family, name)
        except KeyError:  # a module this family never writes
            continue
        targets[prefix] = _Target(name, model.get_submodule(name))
    return targets


def load_quantized(
    model: nn.Module,
    family: Any,
    folder: Path,
    hf_config: dict[str, Any],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    shards: dict[str, list[str] | None],
    progress: bool = True,
) -> QuantReport:
    """Fill a meta-built `model` from a quantized checkpoint folder.

    Args:
        model: the canonical decoder or encoder on the meta device.
        family: the checkpoint's family.
        folder: the checkpoint folder.
        hf_config: its config.json, with `quantization_config`.
        dtype: base dtype of the unquantized tensors and of the activations.
        device: where the model lives.
        shards: `shard_files(folder)`.
        progress: show a progress bar.

    Returns:
        The quantization report (also set as `model.quant_report`).
    """
    from hubquant.models.checkpoint import load_weights
    from hubquant.models.safetensors_file import SafetensorsFile

    method = method_from_hf_config(hf_config["quantization_config"])
    keys: dict[str, str] = {}  # tensor name -> shard
    metadata: dict[str, str] = {}
    for shard in shards:
        with SafetensorsFile(folder / shard) as f:
            keys.update(dict.fromkeys(f.keys(), shard))
            metadata.update(f.metadata or {})  # transformers merges the shards' metadata too
    names = set(keys)
    targets = _targets(model, family)
    owned: dict[str, set[str]] = {}
    for prefix in targets:
        mine = method.owns(prefix, names)
        if mine:
            owned[prefix] = mine
    if not owned:
        raise HubquantError(
            f"{folder} says it is quantized ({method.name}) but holds no quantized tensors; re-create it"
        )
    provided = frozenset(
        f"{targets[p].name}.{leaf}"
        for p in owned
        for leaf in ("weight", "bias")
        if hasattr(targets[p].linear, leaf)
    )
    load_weights(
        model,
        family,
        folder,
        dtype=dtype,
        device=device,
        tie_embeddings=model.config.tie_embeddings and HEAD not in {targets[p].name for p in owned},
        progress=progress,
        shards=shards,
        skip=frozenset().union(*owned.values()),
        provided=provided,
    )
    by_shard: dict[str, list[tuple[str, str]]] = {}
    for prefix, tensor_names in owned.items():
        for name in tensor_names:
            by_shard.setdefault(keys[name], []).append((prefix, name))
    read: dict[str, dict[str, torch.Tensor]] = {p: {} for p in owned}
    for shard, items in by_shard.items():
        with SafetensorsFile(folder / shard) as f:
            for prefix, name in items:
                read[prefix][name] = f.read(name).to(device)
    records = []
    with torch.no_grad():
        for prefix, tensors in read.items():
            target = targets[prefix]
            module = method.load_module(tensors, metadata, prefix, target.linear, dtype)
            module = method.to_runtime(module)
            _set(model, target.name, module)
            shape = (target.linear.out_features, target.linear.in_features)
            disk = sum(t.numel() * t.element_size() for n, t in tensors.items() if not n.endswith(".bias"))
            records.append(LayerRecord(target.name, shape, {}, None, disk, method.runtime_bytes(module)))
    report = _saved_report(folder)
    if report is None:
        report = QuantReport(method.name, method.settings, method.library, "", records)
    else:  # the saved report knows the settings; the runtime bytes are this device's
        measured = {r.name: r.runtime_bytes for r in records}
        for layer in report.layers:
            layer.runtime_bytes = measured.get(layer.name, layer.runtime_bytes)
    model.quant_report = report

    fuse_projections(model, method.fuse)  # q/k/v and gate/up as one product each, where it can
    return report


def _saved_report(folder: Path) -> QuantReport | None:
    """The report `hubquant quantize` wrote beside the weights, if any."""
    path = folder / "quantization_report.json"
    if not path.is_file():
        return None
    data = read_json(path, path.name, "re-create the variant")
    try:
        layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in data.pop("layers", [])]
        known = {f.name for f in fields(QuantReport)} - {"layers"}  # the card adds base_model
        return QuantReport(**{k: v for k, v in data.items() if k in known}, layers=layers)
    except (ValueError, TypeError, KeyError):
        raise HubquantError(f"{path} is not a hubquant quantization report; re-create the variant") from None
