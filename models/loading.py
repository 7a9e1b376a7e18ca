"""`load()`: any supported Hub checkpoint into its canonical model (decoder or encoder) and tokenizer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from hubquant.errors import HubquantError
from hubquant.files import read_json
from hubquant.memory import check_memory
from hubquant.quantize.loading import load_quantized

from .checkpoint import Checkpoint, hub_tensor_names, load_weights, shard_files
from .config import torch_dtype
from .decoder import Decoder
from .dispatch import Offload, dispatch, placement, plan_device_map
from .encoder import Encoder, build_model
from .layers import fuse_projections
from .safetensors_file import SafetensorsFile
from .sentence import read_sentence_config
from .tokenizer import Tokenizer, eos_token_ids


def load(
    source: str | Path | Checkpoint,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    progress: bool = True,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[Decoder | Encoder, Tokenizer | None]:
    """Load a checkpoint into hubquant's canonical model: a `Decoder`, or an `Encoder` for BERT.

    Args:
        source: a Hub repo id ("HuggingFaceTB/SmolLM2-135M"), a local Hub-layout folder, or a
            `Checkpoint` already resolved (its folder and config are used as they are).
        revision: Hub branch, tag or commit.
        dtype: parameter dtype, "bf16" / "fp16" / "fp32" (or "bfloat16"...) or a torch dtype,
            as `hubquant.convert.convert` takes it; tensors are cast one by one as they stream in.
        device: where the model lives: "cpu", "cuda", "cuda:N" or a torch.device.
        progress: show a progress bar while loading.
        device_map: "auto" or {module: device} to spread a model bigger than one device over the
            GPUs, then the CPU, then disk (accelerate's planning and hooks, `models.dispatch`);
            each tensor streams straight to its device. None: everything on `device`.
        max_memory: with device_map: the most each device may hold ({0: "20GiB", "cpu": "60GiB",
            "disk": "200GiB"}); a plan that needs disk when "disk" is not listed is refused.
        offload_folder: where disk-offloaded tensors go (default: a temporary folder removed
            with the model).

    Returns:
        `(model, tokenizer)`, the model in eval mode; tokenizer is None when the checkpoint ships
        no tokenizer.json. An encoder also carries `model.tokenizer` and `model.sentence` (the
        pooling and normalisation a sentence-transformers folder declares), which `embed` uses.

    Raises:
        HubquantError: for a bad dtype or device (before anything is downloaded), and for any
            checkpoint that cannot be loaded, with the fix.
    """
    dtype = torch_dtype(dtype)
    device = torch_device(device)
    checkpoint = Checkpoint.resolve(source, revision)
    folder, hf_config, family = checkpoint.folder, checkpoint.config, checkpoint.family
    source = checkpoint.source or folder
    shards = shard_files(folder)  # refuse pickle-only or weightless folders before anything else
    gen_path = folder / "generation_config.json"
    gen_config = read_json(gen_path, "generation_config.json") if gen_path.is_file() else {}
    cfg = family.config(hf_config)
    # The stop set has one rule (tokenizer.eos_token_ids), so generate's default is the tokenizer's.
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_folder(folder, family.with_defaults(hf_config), gen_config)
    eos = (
        tokenizer.eos_ids
        if tokenizer is not None
        else eos_token_ids(family.with_defaults(hf_config), gen_config, {}, None)
    )
    cfg = dataclasses.replace(cfg, eos_token_ids=eos)
    if cfg.kind == "encoder":
        cfg = family.adapt(cfg, hub_tensor_names(folder, shards))

    if device_map is None:  # a device map plans each device's share itself
        check_load_memory(
            folder, shards, source, dtype, device, quantized=bool(hf_config.get("quantization_config"))
        )
    with torch.device("meta"):
        model = build_model(cfg)
    plan = offload = None
    if device_map is not None:
        if hf_config.get("quantization_config"):
            raise HubquantError("device_map applies to unquantized checkpoints; load the base model with it")
        plan = plan_device_map(model, device_map, max_memory, dtype)
        offload = Offload(offload_folder) if "disk" in plan.values() else None
    if hf_config.get("quantization_config"):
        # A variant made by `hubquant quantize` (or by transformers): rebuilt as saved, never
        # re-quantized, then repacked into the fastest layout for `device`.

        load_quantized(
            model, family, folder, hf_config, dtype=dtype, device=device, shards=shards, progress=progress
        )
    else:
        load_weights(
            model,
            family,
            folder,
            dtype=dtype,
            device=device,
            tie_embeddings=cfg.tie_embeddings,
            progress=progress,
            shards=shards,
            placement=placement(plan) if plan is not None else None,
            offload=offload,
        )
        if plan is not None:
            if offload is not None:
                offload.finish(model)
            dispatch(model, plan, offload)
        # q/k/v and gate/up as one product each: views of one tensor, names and state_dict unchanged
        fuse_projections(model)
    model.eval()
    if isinstance(model, Encoder):
        model.sentence = read_sentence_config(folder, cfg)
        model.tokenizer = tokenizer
    return model, tokenizer


def weights_bytes(folder: Path, shards: dict[str, list[str] | None], dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of every tensor once loaded, floating ones in `dtype`; bytes of the largest tensor as
    stored), from the shards' headers alone.

    Args:
        folder: the checkpoint folder.
        shards: `shard_files(folder)`.
        dtype: the dtype floating tensors are cast to.
    """

    total = largest = 0
    for shard in shards:
        try:
            with SafetensorsFile(folder / shard) as f:
                for name in f.keys():
                    numel, stored = math.prod(f.shape(name)), f.dtype(name)
                    total += numel * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
                    largest = max(largest, numel * stored.itemsize)
        except OSError as error:
            raise HubquantError(f"cannot read {folder / shard}: {error}") from None
    return total, largest


def check_load_memory(
    folder: Path,
    shards: dict[str, list[str] | None],
    source: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    quantized: bool = False,
) -> None:
    """Refuse a load whose weights (in `dtype`, plus one tensor being read) exceed the memory
    available on `device` (`hubquant.memory`), with the figures and the fix.

    Args:
        folder: the checkpoint folder.
        shards: `shard_files(folder)`.
        source: the name the user gave, for the message.
        dtype: the dtype floating tensors are loaded in.
        device: where the weights go.
        quantized: the checkpoint is a quantized variant already.
    """

    total, largest = weights_bytes(folder, shards, dtype)
    # Read into CPU memory tensor by tensor: on a GPU, the CPU holds one tensor at a time.
    needed = total + (largest if device.type == "cpu" else 0)
    fixes = []
    if dtype.itemsize > 2:
        fixes.append("--dtype bf16")
    if not quantized:
        fixes.append("a quantized variant (hubquant quantize --out)")
    fixes.append("a GPU with more memory" if device.type == "cuda" else "a machine with more memory")
    fix = "use " + (", ".join(fixes[:-1]) + ", or " if len(fixes) > 1 else "") + fixes[-1]
    name = str(dtype).removeprefix("torch.")
    check_memory(needed, device, what=f"loading {source} in {name} on {device}", fix=fix)


def torch_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, checked before any work: a CUDA device must exist here.

    Args:
        device: "cpu", "cuda", "cuda:N" or a torch.device.

    Raises:
        HubquantError: the device string is malformed, or names a GPU this machine lacks.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise HubquantError(f"device {device!r} is not valid; use cpu, cuda, cuda:N") from None
    if resolved.type == "cuda":
        # torch accepts "cuda:7" on any machine; the failure would only come at the first tensor.
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise HubquantError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here; use cpu")
        if resolved.index is not None and resolved.index >= count:
            raise HubquantError(
                f"device {str(device)!r} asked for, but torch sees {count} CUDA GPU(s) "
                f"(cuda:0..cuda:{count - 1}); pick one of those"
            )
    return resolved
