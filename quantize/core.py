"""Quantize a loaded model in place, or stream a checkpoint into a quantized Hub folder.

Both walk the model (a decoder, or a BERT encoder) one layer at a time and quantize each layer's
projections (attention q/k/v/o, MLP gate/up/down). Every other `nn.Linear` (the output head unless
`include_head`; an encoder's pooler, masked-LM transform and next-sentence head) stays in the base
dtype and is listed as not converted in the saved `quantization_config`, so that transformers
loads it as a plain Linear.

Streaming (`quantize_checkpoint`) never holds more than one layer in full precision: each layer's
tensors are read from the shards, its projections are quantized, the layer is written as its own
safetensors shard in transformers' names and layout, and everything of it is freed before the next
layer is read. The folder is built under a temporary name and renamed into place when complete, as
`convert` does.
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hubquant.errors import HubquantError
from hubquant.memory import check_memory
from hubquant.models.config import torch_dtype
from hubquant.models.dispatch import placement, plan_device_map
from hubquant.models.encoder import build_model, expected_tensors
from hubquant.models.hub import (
    OPTIONAL_FILES,
    SAFETENSORS_INDEX,
    SENTENCE_FILES,
    SLOW_TOKENIZER_FILES,
    sentence_module_paths,
)
from hubquant.models.layers import fuse_projections, unfuse_views

if TYPE_CHECKING:
    from hubquant.models.checkpoint import Checkpoint

from .base import HEAD, LayerRecord, Method, QuantReport, tensor_bytes
from .calibration import CalibrationSettings, LayerCalibration, calibration_ids, return_freed_memory
from .card import write_card
from .registry import get_method, method_class, parse_variant

# Projections of a layer (decoder or encoder), by canonical module name; all of them are quantized.
PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


@dataclass
class _Target:
    name: str  # canonical module name ("layers.3.attn.q")
    linear: nn.Linear


def _projections(model: nn.Module, layer: int) -> Iterator[_Target]:
    block = model.layers[layer]
    for short in PROJECTIONS:
        module = block.get_submodule(short) if _has(block, short) else None
        if isinstance(module, nn.Linear):
            yield _Target(f"layers.{layer}.{short}", module)


def linear_names(model: nn.Module) -> list[str]:
    """Canonical names of every `nn.Linear` of a model (quantized modules included: bitsandbytes'
    `Linear4bit` is one), in module order; a tied head is listed once, as `lm_head`."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def hub_module(family: Any, name: str) -> str:
    """The Hub (transformers) module name of canonical module `name` ("layers.0.attn.q" ->
    "model.layers.0.self_attn.q_proj")."""
    return family.to_hub(f"{name}.weight")[: -len(".weight")]


def _check_head(model: nn.Module, include_head: bool) -> None:
    if include_head and not isinstance(getattr(model, HEAD, None), nn.Linear):
        raise HubquantError(
            "include_head asked for, but this model has no output head to quantize (a bare encoder, "
            "BertModel); leave out include_head (--include-head)"
        )


def _has(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of `name`, in the mode (train/eval) of the module it replaces: a new
    module starts in training mode, and bitsandbytes' Linear4bit runs another kernel in training
    mode (on CPUs with AVX512-BF16) than the one a loaded, eval-mode model runs."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf, None)
    module.train(old.training if isinstance(old, nn.Module) else model.training)
    setattr(owner, leaf, module)


def _library_version(library: str) -> str:
    try:
        return version(library)
    except Exception:
        return "unknown"


def new_report(method: Method) -> QuantReport:
    return QuantReport(method.name, method.settings, method.library, _library_version(method.library))


def _quantize_one(method: Method, target: _Target, runtime: bool) -> tuple[nn.Module | None, LayerRecord]:
    """Quantize one projection; (new module or None when skipped, its record)."""
    linear = target.linear
    shape = (linear.out_features, linear.in_features)
    plan = method.plan(target.name, linear)
    if isinstance(plan, str):
        return None, LayerRecord(target.name, shape, skipped=plan, disk_bytes=tensor_bytes(linear.weight))
    saved = method.quantize_named(target.name, linear, plan)
    disk = sum(tensor_bytes(t) for t in method.hf_tensors(saved, "m").values())
    disk -= tensor_bytes(linear.bias) if linear.bias is not None else 0
    # Runtime bytes are those of the runtime layout even when streaming the saved one to disk.
    fast = method.to_runtime(saved)
    module = fast if runtime else saved
    return module, LayerRecord(target.name, shape, plan, None, disk, method.runtime_bytes(fast))


def quantize(
    model: nn.Module,
    method: str | Method = "int4",
    *,
    group_size: int | None = None,
    hqq: bool = False,
    include_head: bool = False,
    head: str | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize a model from `hubquant.load` in place, one layer at a time.

    Each projection's full-precision weight is dropped as soon as its quantized module replaces
    it, so the process holds the quantized model plus at most one layer in full precision.

    Args:
        model: the canonical decoder or encoder (not already quantized).
        method: "int4", "nf4", "int8", "fp8", or a configured `Method`.
        group_size: int4's group size (default 128, falling back to 64 or 32 per layer).
        hqq: int4 only: choose scales with HQQ's parameter search.
        include_head: also quantize the output head (a decoder's `lm_head`, an encoder's masked-LM
            decoder), untied from the embeddings if tied. An encoder's pooler, masked-LM transform
            and next-sentence head always stay in the base dtype.
        head: quantize the output head with this method instead ("int8" beside int4 layers, as
            llama.cpp's 4-bit files keep an 8-bit head); implies include_head. Both methods must
            be torchao's.
        progress: show a progress bar.

    Returns:
        The report: settings per layer, skipped layers and why, bytes.

    Raises:
        HubquantError: the model is already quantized, settings the method refuses, or
            include_head for a model without an output head.
    """
    from tqdm.auto import tqdm

    if getattr(model, "quant_report", None) is not None:
        done = model.quant_report.method
        raise HubquantError(f"the model is already quantized ({done}); quantize its base model instead")
    method = _configured(method, group_size, hqq, head)
    include_head = include_head or method.quantizes_head
    _check_head(model, include_head)

    report = new_report(method)
    unfuse_views(model)  # each layer's full-precision bytes are freed as its projections are replaced
    with torch.no_grad():
        for layer in tqdm(range(len(model.layers)), desc=f"quantize {method.name}", disable=not progress):
            for target in _projections(model, layer):
                module, record = _quantize_one(method, target, runtime=True)
                if module is not None:
                    _set(model, target.name, module)
                report.layers.append(record)
        if include_head:
            if model.config.tie_embeddings:
                model.lm_head.weight = nn.Parameter(
                    model.lm_head.weight.detach().clone(), requires_grad=False
                )
            module, record = _quantize_one(method, _Target(HEAD, model.lm_head), runtime=True)
            if module is not None:
                _set(model, HEAD, module)
            report.layers.append(record)
    model.quant_report = report
    fuse_projections(model, method.fuse)
    return report


def quantize_checkpoint(
    source: str | Path | Checkpoint,
    out: str | Path,
    method: str = "int4",
    *,
    group_size: int | None = None,
    hqq: bool = False,
    include_head: bool = False,
    head: str | None = None,
    dtype: str | torch.dtype = "bf16",
    revision: str | None = None,
    force: bool = False,
    progress: bool = True,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    device: str | torch.device | None = None,
    calibration: CalibrationSettings | None = None,
) -> tuple[Path, QuantReport]:
    """Stream a checkpoint into a quantized Hub-layout folder that transformers loads unchanged.

    Peak memory is about the largest layer in full precision twice, plus the libraries: each layer
    is read, quantized, written as its own shard and freed before the next.

    Args:
        source: a Hub repo id, a local Hub-layout folder or a `Checkpoint`, as for `hubquant.load`.
        out: the output folder (built beside itself, renamed into place when complete).
        method, group_size, hqq, include_head, head: as for `quantize`; `method` may carry
            settings as `--variants` names them ("int4:g64", "int4-gptq:g64:act",
            "int4:head-int8"). The folder holds the same
            tensors as the source (tied ones once), the quantized projections in the method's
            layout, everything else in `dtype`.
        dtype: the base dtype of everything not quantized (and of int4's scales).
        revision: Hub branch, tag or commit.
        force: replace a non-empty `out`.
        progress: show a progress bar.
        device_map, max_memory: quantize each layer on the device a device map gives it (as
            `hubquant.load` plans it: GPUs first); layers mapped to the CPU or disk are quantized
            on the CPU. The folder written is the same as without.
        calibration: what a calibrated method (`int4-gptq`, `int4-awq`) learns from (default: 16 sequences of
            128 tokens from the calibration slice of python-docs, seed 0); ignored by the others.
        device: quantize each layer on this device ("cuda", "cuda:N"; one layer there at a time:
            read on the CPU, moved, quantized, written back): the same saved layout as on the CPU,
            so the folder loads anywhere. None: the CPU (or the device map's devices).

    Returns:
        (the folder, the report).
    """
    from hubquant.convert.writer import check_out, staging
    from hubquant.models.checkpoint import Checkpoint, shard_files

    target_dtype = torch_dtype(dtype)
    on = _quantize_device(device, device_map)
    out = Path(out).expanduser().absolute()
    check_out(out, force)
    quantizer = _configured(method, group_size, hqq, head)
    include_head = include_head or quantizer.quantizes_head
    checkpoint = Checkpoint.resolve(source, revision)
    folder, hf_config, family = checkpoint.folder, checkpoint.config, checkpoint.family
    source = checkpoint.source or folder
    if hf_config.get("quantization_config"):
        kind = hf_config["quantization_config"].get("quant_method", "quantized")
        raise HubquantError(f"{source} is already quantized ({kind}); quantize its base model instead")
    streamer = _LayerStreamer(folder, family, hf_config, shard_files(folder), target_dtype)
    _check_head(streamer.model, include_head)
    if device_map is not None:
        streamer.plan = plan_device_map(streamer.model, device_map, max_memory, target_dtype)
    else:
        _check_streaming_memory(streamer, source, target_dtype)
        if on is not None:
            _check_streaming_memory(streamer, source, target_dtype, on)
            streamer.device = on
    calib = None
    if quantizer.calibrated:
        if streamer.config.kind == "encoder":
            raise HubquantError(f"{quantizer.name} calibrates decoders; use int4 for an encoder")
        ids, record = calibration_ids(folder, family, hf_config, calibration or CalibrationSettings())
        quantizer.calibration = record
        calib = LayerCalibration(ids)
    with staging(out, force) as tmp:
        report = _write_quantized(streamer, quantizer, tmp, include_head, progress, calib)
        _write_metadata(folder, tmp, hf_config, quantizer, report, target_dtype, streamer, source)
    return out, report


def _configured(method: str | Method, group_size: int | None, hqq: bool, head: str | None = None) -> Method:
    """The method with its settings: from a variant name ("int4:g64") and the explicit ones."""
    if not isinstance(method, str):
        if group_size is not None or hqq or head is not None:
            raise HubquantError("give a configured method its settings itself, not group_size, hqq or head")
        return method
    name, settings = parse_variant(method)
    explicit = {k: v for k, v in (("group_size", group_size), ("hqq", hqq)) if v not in (None, False)}
    if explicit and "group_size" not in inspect.signature(method_class(name)).parameters:
        raise HubquantError(f"--group-size and --hqq apply to int4 only, not to {name}")
    if head is not None:
        if "head" in settings and settings["head"] != head:
            raise HubquantError(f"{method} names its head method and --head names {head}; give one")
        parse_variant(f"{name}:head-{head}")  # an unknown method is a one-line error
        settings["head"] = head
    return get_method(name, **{**settings, **explicit})


def _quantize_device(device: str | torch.device | None, device_map: Any) -> torch.device | None:
    """The one device every layer is quantized on (None: the CPU, or a device map's devices)."""
    if device is None:
        return None
    if device_map is not None:
        raise HubquantError("--device and --device-map both say where to quantize; give one of them")
    try:
        on = torch.device(device)
    except (RuntimeError, TypeError):
        raise HubquantError(f"--device {device} is not a device; use cpu, cuda or cuda:N") from None
    if on.type == "cpu":
        return None
    if on.type != "cuda" or not torch.cuda.is_available():
        raise HubquantError(f"--device {device}: no such device here; use cpu, or run where a GPU is")
    if on.index is not None and on.index >= torch.cuda.device_count():
        raise HubquantError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return on


def _check_streaming_memory(
    streamer: _LayerStreamer, source: str | Path, dtype: torch.dtype, device: Any = "cpu"
) -> None:
    """Refuse, before anything is read, a checkpoint whose largest layer (or embeddings and head)
    cannot be held twice in the base dtype on `device`: the peak of streaming, one group at a time."""

    def group_bytes(names: list[str]) -> int:
        total = 0
        for name in names:
            placeholder = streamer.expected[name]
            itemsize = dtype.itemsize if placeholder.is_floating_point() else placeholder.element_size()
            total += placeholder.numel() * itemsize
        return total

    groups: list[int | None] = [None, *range(len(streamer.model.layers))]
    needed = 2 * max(group_bytes(streamer.group(group)) for group in groups)
    name = str(dtype).removeprefix("torch.")
    smaller = "--dtype bf16 or " if dtype.itemsize > 2 else ""
    check_memory(
        needed,
        device,
        what=f"quantizing {source} (its largest layer twice, in {name})",
        fix=f"free memory, or use {smaller}a machine with more memory",
    )


class _LayerStreamer:
    """Reads a checkpoint one group of tensors at a time: everything outside the layers, or one
    layer, as canonical tensors of the meta-built model, cast to the base dtype."""

    def __init__(
        self, folder: Path, family: Any, hf_config: dict[str, Any], shards: dict, dtype: torch.dtype
    ):
        from hubquant.models.checkpoint import hub_tensor_names
        from hubquant.models.safetensors_file import SafetensorsFile

        self.folder, self.family, self.dtype = folder, family, dtype
        self.config = family.config(hf_config)
        if self.config.kind == "encoder":  # as `load` builds it (a BertModel saved without pooler)
            self.config = family.adapt(self.config, hub_tensor_names(folder, shards))
        with torch.device("meta"):
            self.model = build_model(self.config)
        self.expected = expected_tensors(self.model)
        # Stored copies of tied tensors (the head's weight; BERT's MLM decoder bias): not read.
        tied = getattr(self.model, "tied_copies", (f"{HEAD}.weight",)) if self.config.tie_embeddings else ()
        self.where: dict[str, tuple[str, str]] = {}  # canonical -> (shard, hub name)
        for shard in shards:
            with SafetensorsFile(folder / shard) as f:
                for hub_name in f.keys():
                    known, canonical = family.to_canonical(hub_name)
                    if canonical is None or canonical in tied:
                        if not known:
                            raise HubquantError(
                                f"unexpected tensor {hub_name} in {shard}: the {family.name} model built "
                                "from config.json has no place for it; check config.json matches the weights"
                            )
                        continue
                    if canonical not in self.expected:
                        raise HubquantError(f"unexpected tensor {hub_name} in {shard}; check config.json")
                    self.where[canonical] = (shard, hub_name)
        missing = sorted(set(self.expected) - set(self.where))
        if missing:
            raise HubquantError(f"tensor {family.to_hub(missing[0])} is missing from {folder}")

    plan: dict[str, Any] | None = None  # a device map: where each layer is quantized
    device: torch.device | None = None  # or the one device every layer is quantized on

    def place(self, layer: int) -> None:
        """Move a materialized layer to the GPU its device map (or `device`) gives it."""
        if self.device is not None:
            self.model.layers[layer].to(self.device)
            return
        if self.plan is None:
            return

        where = placement(self.plan)(f"layers.{layer}.")
        if isinstance(where, int):
            self.model.layers[layer].to(f"cuda:{where}")

    def group(self, layer: int | None) -> list[str]:
        """Canonical names of one layer's tensors, or (None) of everything outside the layers."""
        prefix = f"layers.{layer}."
        if layer is None:
            return [n for n in self.expected if not n.startswith("layers.")]
        return [n for n in self.expected if n.startswith(prefix)]

    def materialize(self, names: list[str]) -> None:
        """Read `names` from their shards into the model (floating tensors cast to the base dtype)."""
        from hubquant.models.checkpoint import _assign
        from hubquant.models.safetensors_file import SafetensorsFile

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.where[name][0], []).append(name)
        for shard, group in by_shard.items():
            with SafetensorsFile(self.folder / shard) as f:
                for name in group:
                    placeholder = self.expected[name]
                    hub_name = self.where[name][1]
                    if f.shape(hub_name) != tuple(placeholder.shape):
                        raise HubquantError(
                            f"tensor {hub_name} in {shard} has shape {list(f.shape(hub_name))}, expected "
                            f"{list(placeholder.shape)} from config.json; check config.json matches the weights"
                        )
                    tensor = f.read(hub_name)
                    _assign(self.model, name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)
        if self.config.tie_embeddings:
            self.model.tie_weights()

    def release(self, layer: int | None) -> None:
        """Drop a layer's (or the globals') tensors: back to the meta device."""
        from hubquant.models.checkpoint import _assign

        if layer is None:  # embeddings and head: for a 70B model, gigabytes
            for name in self.group(None):
                _assign(self.model, name, self.expected[name])
            if self.config.tie_embeddings:
                self.model.tie_weights()
        else:
            with torch.device("meta"):
                block = type(self.model.layers[layer])(self.config)  # Block or EncoderBlock
            block.attn.layer_idx = layer
            self.model.layers[layer] = block


def _write_quantized(
    streamer: _LayerStreamer,
    method: Method,
    tmp: Path,
    include_head: bool,
    progress: bool,
    calib: LayerCalibration | None = None,
) -> QuantReport:
    from tqdm.auto import tqdm

    model, family = streamer.model, streamer.family
    report = new_report(method)
    layers = len(model.layers)
    # Plan every projection from its shape alone (meta tensors), so that the metadata every
    # shard carries is known before the first weight is read.
    plans: dict[str, dict[str, Any] | str] = {}
    for layer in range(layers):
        for target in _projections(model, layer):
            plans[target.name] = method.plan(target.name, target.linear)
    if include_head:
        plans[HEAD] = method.plan(HEAD, model.lm_head)
    weights = {}
    for name, placeholder in streamer.expected.items():
        module = name.rsplit(".", 1)[0]
        plan = plans.get(module)
        settings = plan if isinstance(plan, dict) and name.endswith(".weight") else None
        weights[family.to_hub(name)] = (tuple(placeholder.shape), settings)
    if include_head and model.config.tie_embeddings and isinstance(plans[HEAD], dict):
        # The quantized head is untied and written as its own tensors, a bias it shared with
        # another tensor (BERT's MLM bias) as a copy. (A skipped head stays tied: not written.)
        weights[family.to_hub(f"{HEAD}.weight")] = (tuple(model.lm_head.weight.shape), plans[HEAD])
        if model.lm_head.bias is not None and f"{HEAD}.bias" not in streamer.expected:
            weights[family.to_hub(f"{HEAD}.bias")] = (tuple(model.lm_head.bias.shape), None)
    metadata = {"format": "pt", **method.hf_metadata(weights, streamer.dtype)}

    groups: list[int | None] = [None, *range(layers)]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    total = 0
    with torch.no_grad():
        bar = tqdm(groups, desc=f"quantize {method.name}", disable=not progress)
        for group, shard in zip(bar, names, strict=True):
            # Every reference to the layer's tensors lives in `_write_group`'s frame, so they are
            # all gone when the layer is released and the next one read.
            written, size = _write_group(
                streamer, method, group, tmp / shard, metadata, report, include_head, calib
            )
            total += size
            weight_map.update(dict.fromkeys(written, shard))
            streamer.release(group)
            return_freed_memory()  # what the layer's temporaries left in the heap, before the next
    streamer.weight_map, streamer.total_size = weight_map, total
    if calib is not None:
        report.settings.setdefault("calibration", {}).update(calib.summary())
    return report


def _write_group(
    streamer: _LayerStreamer,
    method: Method,
    group: int | None,
    path: Path,
    metadata: dict[str, str],
    report: QuantReport,
    include_head: bool,
    calib: LayerCalibration | None,
) -> tuple[list[str], int]:
    """Read one layer (or, for None, everything outside the layers), calibrate and quantize its
    projections, and write it as the shard `path`.

    Returns:
        the hub names written, and their bytes.
    """
    from hubquant.models.safetensors_file import SafetensorsWriter

    model, family = streamer.model, streamer.family
    canon = streamer.group(group)
    streamer.materialize(canon)
    if group is not None:
        streamer.place(group)
    tensors: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    targets = list(_projections(model, group)) if group is not None else []
    if calib is not None:
        if group is None:
            calib.begin(model)  # the embeddings are loaded now
        else:
            calib.layer(model.layers[group], method, [(t.name, t.linear) for t in targets])
    if group is None and include_head:
        if model.config.tie_embeddings:
            model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone(), requires_grad=False)
        if streamer.device is not None:
            model.lm_head.to(streamer.device)
        targets.append(_Target(HEAD, model.lm_head))
    for target in targets:
        module, record = _quantize_one(method, target, runtime=False)
        report.layers.append(record)
        if module is None:
            continue
        tensors.update(method.hf_tensors(module, family.to_hub(f"{target.name}.weight")[: -len(".weight")]))
        done.update(n for n in canon if n.startswith(f"{target.name}."))
    for name in canon:
        if name not in done:
            tensors[family.to_hub(name)] = getattr_tensor(model, name)
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsWriter(path, entries, metadata=metadata)
    try:
        for tensor in tensors.values():
            writer.write(tensor.contiguous().cpu())
    except BaseException:
        writer.close(check=False)
        raise
    writer.close()  # checks the finished shard with the safetensors library
    return list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def getattr_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module), leaf).detach()


def _write_metadata(
    folder: Path,
    tmp: Path,
    hf_config: dict[str, Any],
    method: Method,
    report: QuantReport,
    dtype: torch.dtype,
    streamer: _LayerStreamer,
    source: str | Path,
) -> None:
    family = streamer.family
    # Every Linear left in the base dtype, by Hub name: skipped projections, the head unless it
    # was quantized, an encoder's pooler / MLM transform / NSP head. transformers (torchao's
    # `modules_to_not_convert`, bitsandbytes' `llm_int8_skip_modules`) then loads them as plain
    # Linears instead of expecting quantized tensors for them.
    # In the report's order (a dict, not a set), so that config.json is the same on every run.
    quantized = dict.fromkeys(r.name for r in report.layers if not r.skipped)
    not_converted = [hub_module(family, n) for n in linear_names(streamer.model) if n not in quantized]
    head_quantized = HEAD in quantized
    dtype_name = str(dtype).removeprefix("torch.")
    config = {**hf_config, "dtype": dtype_name, "torch_dtype": dtype_name}
    config["quantization_config"] = method.hf_quantization_config(
        not_converted, head_quantized=head_quantized, quantized={hub_module(family, n): n for n in quantized}
    )
    if head_quantized:
        config["tie_word_embeddings"] = False  # the quantized head is its own tensor now
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {"total_size": streamer.total_size}, "weight_map": streamer.weight_map}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for name in (*OPTIONAL_FILES, *SLOW_TOKENIZER_FILES, *SENTENCE_FILES):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    for module in sentence_module_paths(folder):
        if (folder / module).is_dir():
            shutil.copytree(folder / module, tmp / module)
    write_card(tmp, base_model=str(source), base_config=hf_config, report=report, source_folder=folder)
