"""torchao's weight-only methods: `int4` (per group), `int8` (per row) and `fp8` (per row).

Every weight is quantized by torchao itself: int8 and fp8 with `quantize_` and the very config
config.json records, int4 with the tensor subclass of that config (`IntxUnpackedToInt8Tensor.
from_hp`) and qparams chosen as below. Weights are saved with torchao's own
`flatten_tensor_state_dict` and rebuilt with `unflatten_tensor_state_dict`, so the files are
exactly what transformers writes and reads for `TorchAoConfig(quant_type=config)`.

int4 has two layouts:

- saved (what the files hold, and what transformers loads), the same whichever device quantized
  it: torchao's `IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g),
  mapping_type=ASYMMETRIC)` layout, an `IntxUnpackedToInt8Tensor`: one int8 byte per 4-bit value q
  in [-8, 7], and per group one scale s (base dtype) and one int8 zero point zp; the weight is
  (q - zp) * s. (Folders that an older hubquant packed on CUDA, `tile_packed_to_4d`, still load
  there.)
- runtime, repacked from the saved values by `to_runtime`: on the CPU torchao's `Int4OpaqueTensor`
  (the `_weight_int4pack_mm_for_cpu` kernel that `PrototypeInt4WeightOnlyConfig` uses); on CUDA its
  `Int4TilePackedTo4dTensor` (tinygemm's `_weight_int4pack_mm`), padded to that kernel's multiples
  with zero weights. Both kernels compute (n - 8) * s + z from unsigned nibbles n and a float zero z, both s and z in the
  activations' dtype. With n = q + 8 and z = -zp * s it computes exactly the saved weight, provided
  -zp * s is exact in bf16. So the scales are chosen to make it so: torchao's asymmetric min/max
  scale, rounded up to 5 significant bits (never clipping more), times |zp| <= 8 (at most 3
  significant bits) fits bf16's 8. The integers are then rounded by torchao (`from_hp` with these
  qparams). Rounding the scale up costs under 3% of step size on average; being asymmetric gains
  far more: on SmolLM2-135M (4096 tokens of Python docs) perplexity 19.4 against 22.1 for
  torchao's default symmetric mapping, at group size 128 (base model: 14.7).
  The runtime weights are therefore the saved weights bit for bit, and a reloaded variant gives
  the in-memory model's logits. Layers the kernel cannot take (another tool's checkpoint whose
  -zp * s is not exact; an output width not a multiple of 16; activations not bf16) keep the saved
  layout, which computes the same values with a dequantize and a dense matmul.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from hubquant.errors import HubquantError
from hubquant.models.compiled import compile_cache_dir

from .base import HEAD, Method, fused_linear, register_method, tensor_bytes

# Group sizes int4 accepts; a layer whose input width the requested size does not divide falls
# back to the largest smaller one that does.
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
# The CPU int4 kernel packs output channels 16 at a time (`_convert_weight_to_int4pack_for_cpu`
# refuses other widths), so such layers are not quantized at all: a saved layer that cannot run
# fast anywhere would defeat the point of int4.
OUT_MULTIPLE = 16
# Rows of the dummy weight quantized to learn a layer's safetensors metadata before any real
# weight is read (the metadata does not depend on the row count).
_DUMMY_ROWS = OUT_MULTIPLE


def _torchao_config_to_dict(config: Any) -> dict[str, Any]:
    from torchao.core.config import config_to_dict

    return config_to_dict(config)


def _plain_metadata() -> str:
    # What flatten_tensor_state_dict writes for a plain tensor.
    return json.dumps({"_type": torch.Tensor.__name__})


def checkpoint_metadata(
    tensors: dict[str, tuple[tuple[int, ...], dict[str, Any] | None]],
    dtype: torch.dtype,
    weight_entry: Callable[[str, tuple[int, ...], dict[str, Any], torch.dtype], str],
) -> dict[str, str]:
    """The safetensors metadata of a torchao checkpoint, from every Hub weight name -> (shape,
    layer settings or None when kept plain): `weight_entry(name, shape, settings, dtype)` for each
    quantized weight, the plain entry for the rest, and the list of all names."""
    metadata: dict[str, str] = {}
    for name, (shape, layer_settings) in tensors.items():
        if layer_settings is None:
            metadata[name] = _plain_metadata()
        else:
            metadata[name] = weight_entry(name, shape, layer_settings, dtype)
    metadata["tensor_names"] = json.dumps(list(tensors))
    return metadata


def _detached_linear(linear: nn.Linear) -> nn.Linear:
    """A new Linear holding `linear`'s weight and bias (no copy), for `quantize_` to swap the
    weight of without touching the model's module."""
    with torch.device("meta"):
        new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    new.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return new


def _unbind_extra_repr(module: nn.Module) -> None:
    """Break the reference cycle `quantize_` leaves: it binds an `extra_repr` to the module itself
    (module -> its __dict__ -> bound method -> module), so a quantized layer outlives its last
    reference until Python's cyclic collector happens to run, which a stream of a few large
    tensors rarely triggers: the streaming writer then held several layers' weights at once. The
    module's repr goes back to plain `Linear`'s (sizes, no weight description)."""
    module.__dict__.pop("extra_repr", None)


class _TorchaoMethod(Method):
    """What the three torchao methods share: quantize with `quantize_`, save and load with
    torchao's safetensors support, config.json as `TorchAoConfig(quant_type=...).to_dict()`."""

    library: ClassVar[str] = "torchao"
    # torchao tensor subclass names this method saves and loads.
    tensor_types: ClassVar[tuple[str, ...]]
    # torchao config class names (in a saved quantization_config) that mean this method.
    config_types: ClassVar[tuple[str, ...]]

    def __init__(self, **settings: Any) -> None:
        if settings:
            raise HubquantError(
                f"{self.name} takes no settings (got {', '.join(sorted(settings))}); "
                "--group-size and --hqq apply to int4 only"
            )
        self._metadata_cache: dict[tuple[Any, ...], str] = {}

    @property
    def settings(self) -> dict[str, Any]:
        return {}

    # --- what each method defines ---

    def torchao_config(self, layer_settings: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
        """The torchao config that quantizes a layer with `layer_settings` on `device`.

        Args:
            layer_settings: what `plan` returned for the layer.
            device: where the weight is.
            dtype: the weight's dtype.
        """
        raise NotImplementedError

    def saved_config(self) -> Any:
        """The torchao config recorded in config.json: the layout `quantize_checkpoint` writes."""
        raise NotImplementedError

    # --- the Method interface ---

    def plan(self, name: str, linear: nn.Linear) -> dict[str, Any] | str:
        """Every projection is quantized per row: nothing to choose, nothing skipped.

        Args:
            name: canonical module name.
            linear: the layer (possibly on the meta device: only its shape is used).
        """
        return {}

    def quantize(self, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        """Quantize with torchao's `quantize_`; the result is in the saved layout.

        Args:
            linear: the full-precision layer (left unchanged).
            layer_settings: what `plan` returned for it.
        """
        from torchao.quantization import quantize_

        module = _detached_linear(linear)
        config = self.torchao_config(layer_settings, linear.weight.device, linear.weight.dtype)
        quantize_(module, config)
        _unbind_extra_repr(module)
        kind = type(module.weight).__name__
        if kind not in self.tensor_types:
            # quantize_ returns the weight unchanged where it declines a shape; plan should have
            # skipped such a layer, so this is a bug, not a user error.
            raise RuntimeError(
                f"torchao left a {tuple(linear.weight.shape)} weight as {kind} for {self.name}"
            )
        return module

    def hf_tensors(self, module: nn.Module, hub_prefix: str) -> dict[str, torch.Tensor]:
        """torchao's flattened tensors: `{prefix}._weight_qdata`, `_weight_scale`, ... and bias.

        Args:
            module: a saved-layout module from `quantize` or `load_module`.
            hub_prefix: the module's transformers name.
        """
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, _ = flatten_tensor_state_dict(self._state(module, hub_prefix))
        return tensors

    def _state(self, module: nn.Module, hub_prefix: str) -> dict[str, torch.Tensor]:
        # flatten_tensor_state_dict accepts tensor subclasses and plain tensors, not Parameters.
        state = {f"{hub_prefix}.weight": module.weight.detach()}
        if getattr(module, "bias", None) is not None:
            state[f"{hub_prefix}.bias"] = module.bias.detach()
        return state

    def hf_metadata(
        self, tensors: dict[str, tuple[tuple[int, ...], dict[str, Any] | None]], dtype: torch.dtype
    ) -> dict[str, str]:
        """The metadata `flatten_tensor_state_dict` writes for the whole checkpoint: one JSON entry
        per tensor and the list of all names. A quantized weight's entry is learnt by quantizing
        a small dummy weight with the same settings and input width (the entry holds the block
        size and dtype, never the values).

        Args:
            tensors: every Hub weight name -> (shape, layer settings or None when not quantized).
            dtype: the base dtype the real weights are quantized from.
        """
        return checkpoint_metadata(tensors, dtype, self._weight_metadata)

    def _weight_metadata(
        self, name: str, shape: tuple[int, ...], layer_settings: dict[str, Any], dtype: torch.dtype
    ) -> str:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        key = (shape[1], dtype, tuple(sorted(layer_settings.items())))
        if key not in self._metadata_cache:
            gen = torch.Generator().manual_seed(0)
            with torch.device("meta"):
                dummy = nn.Linear(shape[1], _DUMMY_ROWS, bias=False)
            weight = torch.randn(_DUMMY_ROWS, shape[1], generator=gen, device="cpu").to(dtype)
            dummy.weight = nn.Parameter(weight, requires_grad=False)
            quantized = self.quantize(dummy, layer_settings)
            _, metadata = flatten_tensor_state_dict({"w.weight": quantized.weight.detach()})
            self._metadata_cache[key] = metadata["w.weight"]
        return self._metadata_cache[key]

    def runtime_bytes(self, module: nn.Module) -> int:
        """Bytes of the weight representation held at run time (the bias not counted, as for
        disk bytes: `LayerRecord` records the weight's representation).

        Args:
            module: a quantized module, in either layout.
        """
        return tensor_bytes(module.weight)

    def owns(self, hub_prefix: str, keys: set[str]) -> set[str]:
        """`{prefix}._weight_*` (and `{prefix}.bias`) when the module was saved quantized.

        Args:
            hub_prefix: the module's transformers name.
            keys: every tensor name of the checkpoint.
        """
        mine = {k for k in keys if k.startswith(f"{hub_prefix}._weight_")}
        if mine and f"{hub_prefix}.bias" in keys:
            mine.add(f"{hub_prefix}.bias")
        return mine

    def hf_quantization_config(
        self,
        not_converted: list[str],
        *,
        head_quantized: bool | None = None,
        quantized: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """`TorchAoConfig(quant_type=config, modules_to_not_convert=..., include_input_output_
        embeddings=...).to_dict()`, built from torchao's serializer without transformers.

        Args:
            not_converted: Hub names of the Linears left in the base dtype; the head is among
                them unless it was quantized.
            head_quantized: whether the output head was quantized, which is what
                `include_input_output_embeddings` records (None: whether a decoder's `lm_head` is
                absent from `not_converted`). A model without a head (BertModel) records False.
        """
        if head_quantized is None:
            head_quantized = HEAD not in not_converted
        return {
            "quant_method": "torchao",
            "quant_type": {"default": _torchao_config_to_dict(self.saved_config())},
            # None is transformers' own default: its default skips (the head) apply.
            "modules_to_not_convert": list(not_converted) or None,
            "include_input_output_embeddings": head_quantized,
            "untie_embedding_weights": False,
        }

    @classmethod
    def from_hf_config(cls, quantization_config: dict[str, Any]) -> Method | None:
        """This method, if `quantization_config` is torchao's with one of `config_types`.

        Args:
            quantization_config: config.json's `quantization_config`.
        """
        if quantization_config.get("quant_method") != "torchao":
            return None
        quant_type = quantization_config.get("quant_type")
        default = quant_type.get("default") if isinstance(quant_type, dict) else None
        if not isinstance(default, dict) or default.get("_type") not in cls.config_types:
            return None
        from torchao.core.config import config_from_dict

        try:
            config = config_from_dict(default)
        except (ValueError, TypeError, KeyError, AssertionError) as error:
            raise HubquantError(
                f"config.json's torchao quantization_config ({default.get('_type')}) does not parse "
                f"with this torchao: {str(error).splitlines()[0]}; re-create the variant"
            ) from None
        return cls._from_torchao_config(config)

    @classmethod
    def _from_torchao_config(cls, config: Any) -> Method | None:
        return cls()

    def load_module(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        hub_prefix: str,
        like: nn.Linear,
        dtype: torch.dtype,
    ) -> nn.Module:
        """Rebuild the saved-layout Linear with torchao's `unflatten_tensor_state_dict`.

        Args:
            tensors: the module's saved tensors, by full name, on the target device.
            metadata: the checkpoint's merged safetensors metadata.
            hub_prefix: the module's transformers name.
            like: the meta-device Linear it replaces (shape, bias).
            dtype: the activations' dtype: the weight is rebuilt to compute in it.
        """
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        name = f"{hub_prefix}.weight"
        if name not in metadata:
            raise HubquantError(
                f"the safetensors metadata has no entry for {name}; the shards were not written by "
                "torchao's safetensors support: re-create the variant"
            )
        entry = json.loads(metadata[name])
        if entry.get("_type") not in self.tensor_types:
            raise HubquantError(
                f"{name} is saved as {entry.get('_type')}, which {self.name} does not load; re-create the variant"
            )
        # The entry names the dtype the weight dequantizes to; asking for the activations' dtype
        # makes a variant saved in bf16 run in (say) fp32 without touching the saved values.
        if isinstance(entry.get("_data"), dict) and "dtype" in entry["_data"]:
            entry["_data"]["dtype"] = {"_type": "torch.dtype", "_data": str(dtype).removeprefix("torch.")}
        parts = {k: v for k, v in tensors.items() if k.startswith(f"{hub_prefix}._weight_")}
        try:
            rebuilt, _ = unflatten_tensor_state_dict(
                parts, {"tensor_names": json.dumps([name]), name: json.dumps(entry)}
            )
        except (ValueError, AssertionError, TypeError) as error:
            raise HubquantError(
                f"{name} does not rebuild as {entry.get('_type')}: {str(error).splitlines()[0]}; re-create the variant"
            ) from None
        weight = rebuilt.get(name)
        if weight is None:
            raise HubquantError(
                f"{name} is incomplete: it needs {', '.join(entry.get('_tensor_data_names', []))} "
                f"and the shards hold {', '.join(sorted(k.rsplit('.', 1)[1] for k in parts))}; re-create the variant"
            )
        expected = (like.out_features, like.in_features)
        if tuple(weight.shape) != expected:
            raise HubquantError(
                f"{name} has shape {list(weight.shape)}, expected {list(expected)} from config.json; "
                "check config.json matches the weights"
            )
        with torch.device("meta"):
            module = nn.Linear(like.in_features, like.out_features, bias=like.bias is not None)
        module.weight = nn.Parameter(weight, requires_grad=False)
        if like.bias is not None:
            bias = tensors.get(f"{hub_prefix}.bias")
            if bias is None:
                raise HubquantError(
                    f"{hub_prefix}.bias is missing from the checkpoint; re-create the variant"
                )
            module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return module


@register_method
class Int4(_TorchaoMethod):
    """int4 weight-only, per group, symmetric; optionally with HQQ's scale search.

    Args:
        group_size: 32, 64, 128 or 256 (default 128). A layer whose input width it does not
            divide uses the largest smaller size of 128/64/32 that does; a layer none divides,
            or whose output width is not a multiple of 16, stays in the base dtype.
        hqq: choose the scales with torchao's HQQ search (`IntxChooseQParamsAlgorithm.
            HQQ_SCALE_ONLY`: least-squares scales, symmetric, zero points 0) instead of the
            asymmetric min/max default. It lowers the weight error; on SmolLM2-135M perplexity it
            did not help (22.7 against 22.1 symmetric and 19.4 for the default).

    Raises:
        HubquantError: for a group size or hqq value outside those.
    """

    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4
    title: ClassVar[str] = "int4 weight-only"
    about: ClassVar[str] = (
        "Each weight is a 4-bit integer with one scale and zero point per group of consecutive "
        "input values (the group size above); activations stay in the base dtype."
    )
    sizes: ClassVar[str] = (
        "int4 is saved in torchao's portable layout, one byte per 4-bit value "
        "(`IntxUnpackedToInt8Tensor`), wherever it was made, so a folder made on a GPU loads on a "
        "CPU and the other way round. hubquant packs the weights at load time into the fast layout "
        "of the device it runs on, two values per byte, which is the run-time figure. "
        "transformers keeps the saved layout in memory."
    )
    repacks: ClassVar[bool] = True
    tensor_types: ClassVar[tuple[str, ...]] = ("IntxUnpackedToInt8Tensor", "Int4TilePackedTo4dTensor")
    config_types: ClassVar[tuple[str, ...]] = ("IntxWeightOnlyConfig", "Int4WeightOnlyConfig")

    def __init__(self, group_size: int | None = None, hqq: bool = False, **settings: Any) -> None:
        super().__init__(**settings)
        if group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
            raise HubquantError(
                f"int4 group size {group_size!r} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"
            )
        if not isinstance(hqq, bool):
            raise HubquantError(f"int4's hqq setting must be true or false, not {hqq!r}")
        self.group_size = group_size
        self.hqq = hqq

    @property
    def settings(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "hqq": self.hqq}

    def plan(self, name: str, linear: nn.Linear) -> dict[str, Any] | str:
        """The group size for this layer ({"group_size": g, "hqq": ...}) or why it is skipped.

        Args:
            name: canonical module name.
            linear: the layer (possibly on the meta device: only its shape is used).
        """
        out_features, in_features = linear.out_features, linear.in_features
        if out_features % OUT_MULTIPLE:
            return f"output width {out_features} is not a multiple of {OUT_MULTIPLE}, which the CPU int4 kernel needs"
        candidates = [self.group_size, *(g for g in (128, 64, 32) if g < self.group_size)]
        for group in candidates:
            if in_features % group == 0:
                return {"group_size": group, "hqq": self.hqq}
        return (
            f"input width {in_features} is not a multiple of any group size {'/'.join(map(str, candidates))}"
        )

    def torchao_config(self, layer_settings: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup
        from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

        group = layer_settings["group_size"]
        hqq = layer_settings.get("hqq", False)
        if hqq:
            return IntxWeightOnlyConfig(
                weight_dtype=torch.int4,
                granularity=PerGroup(group),
                intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY,
            )
        return IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(group), mapping_type=MappingType.ASYMMETRIC
        )

    def quantize(self, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        """Quantize into the saved layout, the same on every device: an `IntxUnpackedToInt8Tensor`
        whose qparams the CPU and CUDA kernels can hold exactly (module docstring). A folder made
        on a GPU loads on a CPU and the other way round; `to_runtime` packs for the device.

        Args:
            linear: the full-precision layer (left unchanged).
            layer_settings: what `plan` returned for it.
        """
        from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType
        from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

        weight = linear.weight.detach()
        group = layer_settings["group_size"]
        block = (1, group)  # what IntxWeightOnlyConfig passes; the metadata records it
        if layer_settings.get("hqq", False):
            quantized = IntxUnpackedToInt8Tensor.from_hp(
                weight,
                block,
                torch.int4,
                intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY,
            )
        else:
            scale, zero_point = _exact_asymmetric_qparams(weight, group)
            quantized = IntxUnpackedToInt8Tensor.from_hp(
                weight,
                block,
                torch.int4,
                mapping_type=MappingType.ASYMMETRIC,
                intx_choose_qparams_algorithm=None,
                custom_scale=scale,
                custom_zero_point=zero_point,
            )
        module = _detached_linear(linear)
        module.weight = nn.Parameter(quantized, requires_grad=False)
        return module

    def saved_config(self) -> Any:
        # One saved layout on every device. The group size recorded is the one asked for; each
        # weight's own block size is in its metadata.
        return self.torchao_config(
            {"group_size": self.group_size, "hqq": self.hqq}, torch.device("cpu"), torch.bfloat16
        )

    @classmethod
    def _from_torchao_config(cls, config: Any) -> Method | None:
        from torchao.quantization import Int4WeightOnlyConfig, PerGroup

        if isinstance(config, Int4WeightOnlyConfig):
            hqq = str(getattr(config.int4_choose_qparams_algorithm, "value", "")) == "hqq"
            return cls(group_size=config.group_size, hqq=hqq)
        if config.weight_dtype != torch.int4 or not isinstance(config.granularity, PerGroup):
            return None  # another intx width: not a variant hubquant makes
        hqq = str(getattr(config.intx_choose_qparams_algorithm, "value", "")) == "hqq_scale_only"
        return cls(group_size=config.granularity.group_size, hqq=hqq)

    def to_runtime(self, module: nn.Module) -> nn.Module:
        """Repack the saved int4 values for the device's kernel, exactly (same integers, same
        scales, the kernel's float zero -zp * s where that is exact): on the CPU torchao's
        `Int4OpaqueTensor` (`_weight_int4pack_mm_for_cpu`), on CUDA its `Int4TilePackedTo4dTensor`
        (tinygemm's `_weight_int4pack_mm`, bf16 activations).

        Args:
            module: a saved-layout module from `quantize` or `load_module`.
        """
        weight = module.weight
        kind = type(weight).__name__
        if kind == "Int4TilePackedTo4dTensor" and weight.device.type != "cuda":
            raise HubquantError(
                "this int4 variant was packed for CUDA (tile_packed_to_4d); load it with device='cuda'"
            )
        opaque = _to_int4_tile_packed(weight) if weight.device.type == "cuda" else _to_int4_opaque(weight)
        if opaque is None:
            return module
        # A new module: the saved-layout one may still be written out (core streams it). A model
        # in another dtype runs this product in bf16 and gets its output back in its own dtype.
        cls = nn.Linear if weight.dtype == torch.bfloat16 else Bf16Linear
        with torch.device("meta"):
            runtime = cls(module.in_features, module.out_features, bias=module.bias is not None)
        runtime.weight = nn.Parameter(opaque, requires_grad=False)
        bias = module.bias
        if bias is not None and cls is Bf16Linear:
            bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        runtime.bias = bias
        return runtime

    def fuse(self, modules: list[nn.Module]) -> nn.Module | None:
        """Stack `Int4OpaqueTensor` weights: the packed rows one after another, the scale/zero
        table's output columns side by side (it is [groups, out, 2]); the CPU kernel computes each
        output row alone, so every output is unchanged. The packing interleaves blocks of 64
        output rows, so every part but the last must be a whole number of blocks."""
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        weights = [m.weight for m in modules]
        first = weights[0]
        if not all(
            type(w) is Int4OpaqueTensor
            and list(w.block_size) == list(first.block_size)
            and w.shape[1] == first.shape[1]
            and w.act_pre_scale is None and w.qzeros is None and w.compensation is None
            and w.act_mapping_type is None
            for w in weights
        ) or any(w.shape[0] % INT4_PACK_ROWS for w in weights[:-1]) or len({type(m) for m in modules}) > 1:  # fmt: skip
            return None
        out = sum(w.shape[0] for w in weights)
        qdata = torch.cat([w.qdata for w in weights])
        weight = Int4OpaqueTensor(
            qdata,
            torch.cat([w.scale_and_zero for w in weights], dim=1),
            list(first.block_size),
            torch.Size([out, first.shape[1]]),
        )
        # The parts keep their (small) scale tables and view the fused codes: stored once.
        for w, rows in zip(weights, qdata.split([w.qdata.shape[0] for w in weights]), strict=True):
            w.qdata = rows
        return fused_linear(modules, weight, type(modules[0]))

    def theoretical_bytes(self, shape: tuple[int, int], layer_settings: dict[str, Any]) -> int:
        """Disk bytes of the saved (unpacked) layout: one int8 byte per 4-bit value, plus per group
        a bf16 scale (2 bytes) and an int8 zero point (1 byte). Scales are counted in bf16, the
        base dtype variants are made in.

        Args:
            shape: (out_features, in_features).
            layer_settings: what `plan` returned ({"group_size": g, ...}).
        """
        out_features, in_features = shape
        groups = out_features * in_features // layer_settings["group_size"]
        return out_features * in_features + groups * (2 + 1)

    def theoretical_runtime_bytes(self, shape: tuple[int, int], layer_settings: dict[str, Any]) -> int:
        """Bytes of the CPU runtime (packed) layout: 4 bits per value, plus per group a bf16 scale
        and a bf16 zero (the kernel's `scales_and_zeros`).

        Args:
            shape: (out_features, in_features).
            layer_settings: what `plan` returned ({"group_size": g, ...}).
        """
        out_features, in_features = shape
        groups = out_features * in_features // layer_settings["group_size"]
        return out_features * in_features // 2 + groups * (2 + 2)


def _exact_asymmetric_qparams(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric int4 scales (in `weight`'s dtype) and int8 zero points such that
    -zero_point * scale is exact in bf16 (see the module docstring).

    Like torchao's asymmetric `choose_qparams_affine`, each group's range is widened to hold 0, so
    a zero weight stays exactly zero, and split into 15 steps; the step is then rounded up to 5
    significant bits.
    """
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group, group)
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    # An all-zero group gets the smallest normal float32 step (a power of two: exact anywhere).
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    mantissa, exponent = torch.frexp(scale)  # mantissa in [0.5, 1)
    scale = torch.ldexp(torch.ceil(mantissa * 32) / 32, exponent)
    zero_point = (-8 - torch.round(low / scale)).clamp(-8, 7)
    return scale.to(weight.dtype), zero_point.to(torch.int8)


class Bf16Linear(nn.Linear):
    """An int4 CPU product in a model of another dtype (fp32): its input is cast to bf16, the
    kernel's only fast activation dtype, and its output back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.bfloat16)).to(x.dtype)


# The CPU int4 packing (`_convert_weight_to_int4pack_for_cpu`) interleaves blocks of this many
# output rows: stacking packed weights is exact only on block boundaries (measured: a 32-row part
# followed by another changes the outputs).
INT4_PACK_ROWS = 64


def _tinygemm_qparams(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The saved int4 values as the int4pack kernels (CPU and CUDA) take them: unsigned nibbles
    [out, in] (int32, q + 8), bf16 scales and float zeros [out, groups]; None when the weight is
    not plain grouped int4, or when bf16 cannot hold its qparams exactly."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if not isinstance(weight, IntxUnpackedToInt8Tensor):
        return None
    out_features, in_features = weight.shape
    group = weight.block_size[-1]
    if (
        weight.target_dtype != torch.int4
        or weight.block_size[0] != 1
        or in_features % group
        or out_features % OUT_MULTIPLE
    ):
        return None
    # The kernels are fast with bf16 activations only (8x slower with fp32 on the CPU, measured), and
    # their scales and zeros must be in the activations' dtype: bf16, exactly, or not at all.
    scale = weight.scale.to(torch.bfloat16)
    zero = -weight.zero_point.to(torch.bfloat16) * scale
    exact = -weight.zero_point.double() * weight.scale.double()
    if not (torch.equal(scale.double(), weight.scale.double()) and torch.equal(zero.double(), exact)):
        # Another tool's qparams whose float zero bf16 cannot hold: keep the saved layout rather
        # than change the weights.
        return None
    # Signed int4 [-8, 7] -> the kernels' unsigned nibbles [0, 15]; they subtract 8 back.
    return weight.qdata.to(torch.int32) + 8, scale, zero


# tinygemm (CUDA) takes the inner dimension in multiples of this and output rows in multiples of 8;
# torchao pads both the same way, and its linear pads the activations to match.
CUDA_INNER_MULTIPLE, CUDA_ROW_MULTIPLE, CUDA_INNER_K_TILES = 1024, 8, 8


def _to_int4_tile_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (saved int4 on a CUDA device) as torchao's `Int4TilePackedTo4dTensor`, the
    tinygemm layout: the same values, padded with zero weights (nibble 8, scale 1, zero 0) to the
    kernel's multiples, two nibbles a byte, packed by `_convert_weight_to_int4pack`."""
    from torchao.quantization import Int4TilePackedTo4dTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    qparams = _tinygemm_qparams(weight)
    if qparams is None:
        return None
    nibbles, scale, zero = qparams
    out_features, in_features = weight.shape
    group = weight.block_size[-1]
    rows = -(-out_features // CUDA_ROW_MULTIPLE) * CUDA_ROW_MULTIPLE
    inner = -(-in_features // CUDA_INNER_MULTIPLE) * CUDA_INNER_MULTIPLE
    nibbles = torch.nn.functional.pad(nibbles, (0, inner - in_features, 0, rows - out_features), value=8)
    pad_groups = (0, inner // group - scale.shape[1], 0, rows - out_features)
    scale = torch.nn.functional.pad(scale, pad_groups, value=1.0)
    zero = torch.nn.functional.pad(zero, pad_groups, value=0.0)
    pairs = (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), CUDA_INNER_K_TILES)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale, zero, torch.bfloat16)
    return Int4TilePackedTo4dTensor(packed, scale_and_zero, [1, group], weight.shape)


def _to_int4_opaque(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (an `IntxUnpackedToInt8Tensor` holding int4) as an `Int4OpaqueTensor` with the
    same values and bf16 scales (the kernel's activations are bf16 whatever the model's dtype), or
    None where the CPU kernel cannot take it exactly."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    qparams = _tinygemm_qparams(weight) if weight.device.type == "cpu" else None
    if qparams is None:
        return None
    nibbles, scale, zero = qparams
    group = weight.block_size[-1]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)  # inner k tiles: unused on CPU
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale, zero, torch.bfloat16)
    return Int4OpaqueTensor(packed, scale_and_zero, [1, group], weight.shape)


@register_method
class Int8(_TorchaoMethod):
    """int8 weight-only, one fp32 scale per output row (torchao's `Int8WeightOnlyConfig`)."""

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8
    title: ClassVar[str] = "int8 weight-only"
    about: ClassVar[str] = (
        "Each weight is an 8-bit integer with one scale per output row; activations stay in the base dtype."
    )
    sizes: ClassVar[str] = (
        "The layout is the same on disk and in memory: one byte per weight plus the row scales."
    )
    tensor_types: ClassVar[tuple[str, ...]] = ("Int8Tensor",)
    config_types: ClassVar[tuple[str, ...]] = ("Int8WeightOnlyConfig",)

    def torchao_config(self, layer_settings: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()

    def saved_config(self) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()

    def theoretical_bytes(self, shape: tuple[int, int], layer_settings: dict[str, Any]) -> int:
        """One byte per value, plus per row an fp32 scale and the int8 zero point torchao saves
        (always 0: the mapping is symmetric).

        Args:
            shape: (out_features, in_features).
            layer_settings: unused (per row, no choices).
        """
        out_features, in_features = shape
        return out_features * in_features + out_features * (4 + 1)

    def to_runtime(self, module: nn.Module) -> nn.Module:
        """On the CPU, an `Int8Linear` holding the very same weight, run by torch's int8
        weight-only kernel (`_weight_int8pack_mm`); elsewhere, and for input widths that kernel
        cannot take, as saved.

        Args:
            module: a saved-layout module from `quantize` or `load_module`.
        """
        return _holding(module, Int8Linear) if _int8_pack_mm_takes(module.weight) else module

    def fuse(self, modules: list[nn.Module]) -> nn.Module | None:
        return _fuse_rowwise(modules, "Int8Tensor")


def _holding(module: nn.Module, cls: type[nn.Linear]) -> nn.Linear:
    """A `cls` holding `module`'s very weight and bias (no copy): the same saved tensors, another
    forward."""
    with torch.device("meta"):
        runtime = cls(module.in_features, module.out_features, bias=module.bias is not None)
    runtime.weight, runtime.bias = module.weight, module.bias
    return runtime


# `_weight_int8pack_mm` reads the input width in steps of 16 values (AVX512; 8 with AVX2) and has
# no tail: other widths give wrong values or crash (measured), so they keep torchao's product.
INT8_PACK_K = 16
# Its bf16 kernel is a vector-matrix one: faster than torchao's convert-then-matmul up to about
# 16-32 input rows on SmolLM2's shapes, slower beyond (measured here: 5.4x at 1 row, 1.25x at 16,
# 0.7x at 32; 0.55x at 64). Decode steps take it; prefill blocks of more rows run torchao's product.
INT8_PACK_MAX_ROWS = 16


def _int8_pack_mm_takes(weight: torch.Tensor) -> bool:
    """Whether `weight` is a bf16 CPU Int8Tensor that torchao runs as weight-only with one scale and
    no zero point per output row (`Int8WeightOnlyConfig`'s layout) and a width the kernel takes."""
    if type(weight).__name__ != "Int8Tensor" or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if weight.dtype != torch.bfloat16:
        return False  # its fp32 and fp16 kernels are scalar code: slower than torchao's product
    zero = weight.zero_point
    return (
        list(weight.block_size) == [1, weight.shape[1]]
        and weight.shape[1] % INT8_PACK_K == 0
        and weight.scale.numel() == weight.shape[0]
        and (zero is None or not bool(zero.any()))
        and all(getattr(weight, name, None) is None for name in ("act_quant_kwargs", "act_pre_scale"))
        and int8_pack_mm_works()
    )


@functools.cache
def int8_pack_mm_works() -> bool:
    """Whether this CPU's `_weight_int8pack_mm` (torch picks its code by CPU) gives the product of a
    small probe, for 1, 3 and 16 rows in turn, within bf16's rounding; checked once per process.
    Where it does not, int8 keeps torchao's product, with a warning."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (6, 48), dtype=torch.int8, generator=gen)
    scale = (torch.rand(6, generator=gen) + 0.5).to(torch.bfloat16)
    dense = q.double() * scale.double()[:, None]
    for rows in (1, 3, INT8_PACK_MAX_ROWS):
        x = torch.randn(rows, 48, generator=gen).to(torch.bfloat16)
        exact = x.double() @ dense.T
        try:
            out = torch._weight_int8pack_mm(x, q, scale).double()
        except RuntimeError:
            out = None
        if out is None or not bool(((out - exact).abs() <= 2**-7 * exact.abs().max()).all()):
            warnings.warn(
                "int8: torch's _weight_int8pack_mm gives wrong products on this CPU; "
                "running torchao's slower product instead",
                stacklevel=2,
            )
            return False
    return True


class Int8Linear(nn.Linear):
    """int8 weight-only in bf16 on the CPU, for decode: up to `INT8_PACK_MAX_ROWS` input rows run
    torch's `_weight_int8pack_mm` on the saved int8 rows and the row scales in bf16, which is what
    torchao's int8 weight-only product becomes when compiled on the CPU (inductor's weight-only
    int8 pattern), and equal to it bit for bit. Eager torchao instead converts the whole weight to
    bf16 on every product and runs a dense matmul (5x slower for one row on SmolLM2's shapes,
    30x on a 4096 x 4096 weight); more rows (prefill) run that product. The values differ from
    eager torchao's by the rounding: this kernel accumulates x . (q s) in fp32 and rounds once;
    torchao rounds x . q to bf16, then the product with s."""

    hubquant_kernel: ClassVar[str] = (
        "int8 products: torch's _weight_int8pack_mm up to 16 rows (decode; torchao's int8 compiled "
        "on the CPU), torchao's convert-then-matmul beyond (prefill)"
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.reshape(-1, x.shape[-1])
        if x.device.type != "cpu" or x.dtype != torch.bfloat16 or rows.shape[0] > INT8_PACK_MAX_ROWS:
            return super().forward(x)
        if x.requires_grad and torch.is_grad_enabled():
            return super().forward(x)  # the kernel has no derivative; torchao's product has one
        out = torch._weight_int8pack_mm(rows.contiguous(), weight.qdata, weight.scale.to(x.dtype).reshape(-1))
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        return out if self.bias is None else out + self.bias


def _fuse_rowwise(modules: list[nn.Module], kind: str) -> nn.Module | None:
    """Stack per-output-row quantized weights (torchao's `Int8Tensor`, `Float8Tensor`): values,
    scales (and zero points) row after row; each output row is computed as before."""
    weights = [m.weight for m in modules]
    first = weights[0]
    if not all(
        type(w).__name__ == kind and w.shape[1] == first.shape[1] and w.dtype == first.dtype for w in weights
    ):
        return None
    if any(list(w.block_size) != [1, w.shape[1]] for w in weights):
        return None
    optional = ("act_quant_scale", "act_quant_zero_point", "act_pre_scale", "act_quant_kwargs", "mm_config")
    if any(getattr(w, name, None) is not None for w in weights for name in optional):
        return None
    qdata = torch.cat([w.qdata for w in weights])
    scale = torch.cat([w.scale for w in weights])
    block = [1, first.shape[1]]
    rows = [w.shape[0] for w in weights]
    zero = None
    if kind == "Int8Tensor":
        zeros = [w.zero_point for w in weights]
        zero = torch.cat(zeros) if all(z is not None for z in zeros) else None
        if zero is None and any(z is not None for z in zeros):
            return None
        weight = type(first)(
            qdata, scale, block, first.dtype, zero_point=zero, reduce_range=first.reduce_range
        )
    else:
        weight = type(first)(
            qdata, scale, block, mm_config=None, act_quant_kwargs=None,
            kernel_preference=first.kernel_preference, dtype=first.dtype,
        )  # fmt: skip
    # The parts view the fused values and scales: stored once.
    for w, q, sc, z in zip(
        weights,
        qdata.split(rows),
        scale.split(rows),
        (zero.split(rows) if zero is not None else [None] * len(rows)),
        strict=True,
    ):
        w.qdata, w.scale = q, sc
        if z is not None:
            w.zero_point = z
    cls = type(modules[0]) if all(type(m) is type(modules[0]) for m in modules) else nn.Linear
    return fused_linear(modules, weight, cls)


@register_method
class Fp8(_TorchaoMethod):
    """float8 (e4m3) weight-only, one fp32 scale per output row (`Float8WeightOnlyConfig`)."""

    name: ClassVar[str] = "fp8"
    bits: ClassVar[int] = 8
    title: ClassVar[str] = "float8 weight-only"
    about: ClassVar[str] = (
        "Each weight is an 8-bit float (e4m3) with its scales; activations stay in the base dtype."
    )
    sizes: ClassVar[str] = (
        "The layout is the same on disk and in memory: one byte per weight plus the scales."
    )
    # Not in eval's default set: it is int8's size on a coarser grid (`--variants fp8` adds it).
    default_eval: ClassVar[bool] = False
    tensor_types: ClassVar[tuple[str, ...]] = ("Float8Tensor",)
    config_types: ClassVar[tuple[str, ...]] = ("Float8WeightOnlyConfig",)

    def torchao_config(self, layer_settings: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()

    def saved_config(self) -> Any:
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()

    def theoretical_bytes(self, shape: tuple[int, int], layer_settings: dict[str, Any]) -> int:
        """One byte per value plus an fp32 scale per row.

        Args:
            shape: (out_features, in_features).
            layer_settings: unused (per row, no choices).
        """
        out_features, in_features = shape
        return out_features * in_features + out_features * 4

    def to_runtime(self, module: nn.Module) -> nn.Module:
        """On the CPU, an `Fp8Linear` holding the very same weight (torchao's product there
        dequantizes with scalar conversions, ~15x slower than inductor's); elsewhere as saved.

        Args:
            module: a saved-layout module from `quantize` or `load_module`.
        """
        if not _fp8_rowwise_weight_only(module.weight) or module.weight.device.type != "cpu":
            return module
        return _holding(module, Fp8Linear)

    def fuse(self, modules: list[nn.Module]) -> nn.Module | None:
        return _fuse_rowwise(modules, "Float8Tensor")


def _fp8_rowwise_weight_only(weight: torch.Tensor) -> bool:
    """Whether `weight` is a Float8Tensor that torchao runs as weight-only with one scale per
    output row (`Float8WeightOnlyConfig`'s layout), the one `Fp8Linear` computes."""
    return (
        type(weight).__name__ == "Float8Tensor"
        and weight.dim() == 2
        and list(weight.block_size) == [1, weight.shape[1]]
        and tuple(weight.scale.shape) == (weight.shape[0], 1)
        and getattr(weight, "act_quant_kwargs", None) is None
    )


def _fp8_dequantize(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's float8 dequantization (`_dequantize_affine_float8`), the same operations in
    the same order: fp8 to fp32, times the row scales, to `dtype`."""
    return (qdata.to(torch.float32) * scale).to(dtype)


# Compiled once per process, for every shape (dynamic): inductor converts fp8 with vector
# instructions where eager torch converts one value at a time. None until first used; False when
# compiling failed there (then torchao's own product runs, with a warning).
_FP8_KERNEL: Any = None


def _fp8_kernel() -> Any:
    global _FP8_KERNEL
    if _FP8_KERNEL is None:
        compile_cache_dir()
        _FP8_KERNEL = torch.compile(_fp8_dequantize, dynamic=True)
    return _FP8_KERNEL


class Fp8Linear(nn.Linear):
    """fp8 weight-only on the CPU, with the same values as torchao's product: the weight (a
    torchao `Float8Tensor`, one scale per row, as saved) dequantized by `_fp8_dequantize` compiled,
    then `matmul(x, w.t())` and the bias added, as torchao does. torchao's CPU path converts fp8
    with scalar code (measured here: 1.6 ms for a 576 x 1536 weight, 0.2 ms compiled). The first
    product compiles it (seconds; kept in the hubquant compile cache)."""

    hubquant_kernel: ClassVar[str] = (
        "fp8 products: torchao's dequantization compiled by inductor, then torchao's matmul"
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global _FP8_KERNEL
        weight = self.weight
        kernel = _fp8_kernel() if _FP8_KERNEL is not False else None
        if kernel is None or x.device.type != "cpu":  # the layout was checked by `to_runtime`
            return super().forward(x)
        try:
            dense = kernel(weight.qdata, weight.scale, weight.dtype)
        except Exception as error:  # no C++ compiler, or inductor cannot build here
            _FP8_KERNEL = False
            warnings.warn(
                f"fp8: compiling the CPU dequantization failed ({type(error).__name__}); "
                "running torchao's slower product instead",
                stacklevel=2,
            )
            return super().forward(x)
        out = torch.matmul(x, dense.t())
        return out if self.bias is None else out + self.bias
