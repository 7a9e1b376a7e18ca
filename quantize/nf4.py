"""nf4 with bitsandbytes: 4-bit NormalFloat codes in blocks of 64 weights, each block scaled by its
absolute maximum; with double quantisation (the default) those scales are themselves stored as 8-bit
codes, in blocks of 256 with one fp32 scale each.

The saved layout is exactly what transformers writes for
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)`: per projection
`weight` (packed codes, uint8 `[n/2, 1]`), `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map` and `weight.quant_state.bitsandbytes__nf4` (the
remaining fields as JSON bytes). The runtime module is bitsandbytes' own `Linear4bit`, computing in
the model's dtype.

bitsandbytes is imported only when a module is made or rebuilt, so that choosing another method
does not pay for it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hubquant.errors import HubquantError

from .base import Method, register_method

BLOCK_SIZE = 64  # transformers' BitsAndBytesConfig has no block size: it always quantizes with 64
NESTED_BLOCK_SIZE = 256  # double quantisation: one fp32 scale per 256 of the 8-bit block scales
# bitsandbytes' AVX512-BF16 CPU kernel (used by Linear4bit.forward wherever the CPU has it,
# transformers included) repacks the weight 32 output rows at a time and asserts the row count.
PACK_ROWS = 32
QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_ABSENT = object()
# Everything bitsandbytes saves for one 4-bit weight (QuantState.as_dict(packed=True) plus the codes).
_WEIGHT_KEYS = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    QUANT_STATE_KEY,
)


class _DropKernelFetchWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def _bnb() -> Any:
    """bitsandbytes, imported without its Hub kernel fetch.

    On CPUs with AVX512-BF16, importing bitsandbytes 0.50 asks the `kernels` package (a
    transformers dependency) for a CPU kernel from the Hub: a download when online, a hang where the
    network is down but offline mode is not set, a warning otherwise. hubquant runs the kernel
    bitsandbytes ships instead (its fallback), so results never depend on the network, and no
    request is made: `kernels` is hidden while bitsandbytes is imported, and the warning that says
    it is missing is dropped.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    hidden = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `import kernels` raises ImportError
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = _DropKernelFetchWarning()
    log.addFilter(drop)
    try:
        import bitsandbytes
    finally:
        log.removeFilter(drop)
        if hidden is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden
    return bitsandbytes


@register_method
class NF4(Method):
    """nf4 weight-only quantization with bitsandbytes, saved as transformers saves it.

    Args:
        double_quant: store the per-block scales as 8-bit codes (bitsandbytes'
            `compress_statistics`, transformers' `bnb_4bit_use_double_quant`). Default True.

    Raises:
        HubquantError: for any other setting (nf4 has no group size and no HQQ search) or a
            non-boolean `double_quant`.
    """

    name = "nf4"
    library = "bitsandbytes"
    bits = 4
    title = "NF4 (4-bit NormalFloat, bitsandbytes)"
    about = (
        "Each weight is one of 16 NormalFloat levels, two per byte, with one absmax per block of 64 "
        "values; with double quantisation the absmax values are themselves quantized to 8 bits. "
        "Matrix products run in the compute dtype."
    )
    sizes = "bitsandbytes keeps the same packed layout on disk and in memory."

    def __init__(self, double_quant: bool = True, **unknown: Any) -> None:
        given = sorted(k for k, v in unknown.items() if v is not None and v is not False)
        if given:
            raise HubquantError(
                f"nf4 does not take {', '.join(given)}: its blocks are {BLOCK_SIZE} weights, the only "
                "size transformers' BitsAndBytesConfig loads; its one setting is double_quant"
            )
        if not isinstance(double_quant, bool):
            raise HubquantError(f"nf4's double_quant must be true or false, not {double_quant!r}")
        self.double_quant = double_quant

    @property
    def settings(self) -> dict[str, Any]:
        """The settings in force (block size and compute dtype are fixed by the saved format)."""
        return {"quant_type": "nf4", "block_size": BLOCK_SIZE, "double_quant": self.double_quant}

    def plan(self, name: str, linear: nn.Linear) -> dict[str, Any] | str:
        """Quantize when bitsandbytes' CPU kernels compute the layer correctly, else say why not.

        Args:
            name: canonical module name (unused: every projection follows the same rule).
            linear: the projection; only its shape is read, so it may be on the meta device.

        Returns:
            `{"block_size": 64, "double_quant": ...}`, or the reason the layer is kept as is.
        """
        rows, cols = linear.out_features, linear.in_features
        if cols % BLOCK_SIZE:
            # The format itself takes any size, but on the CPU bitsandbytes 0.50 (and so
            # transformers) cannot run it: its AVX-512 dequantizer, used for widths that are a
            # multiple of 16, indexes the block scales as if every row started a new block (wrong
            # outputs), and its AVX512-BF16 kernel reshapes the scales to [rows, width / 64].
            return (
                f"input width {cols} is not a multiple of nf4's block size {BLOCK_SIZE} "
                "(bitsandbytes' CPU kernels need whole blocks per row)"
            )
        if rows % PACK_ROWS:
            return (
                f"output width {rows} is not a multiple of {PACK_ROWS} (bitsandbytes' AVX512-BF16 CPU "
                f"kernel packs {PACK_ROWS} rows at a time and refuses the layer)"
            )
        return {"block_size": BLOCK_SIZE, "double_quant": self.double_quant}

    def quantize(self, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        """The `Linear4bit` replacing `linear`, quantized on the weight's device.

        Args:
            linear: the full-precision projection (bf16, fp16 or fp32 weight).
            layer_settings: as `plan` returned them.

        Returns:
            A `bitsandbytes.nn.Linear4bit` whose compute dtype is the weight's dtype.
        """
        bnb = _bnb()
        weight = linear.weight.detach()
        module = self._empty_module(linear, weight.dtype)
        param = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=layer_settings.get("block_size", BLOCK_SIZE),
            compress_statistics=layer_settings.get("double_quant", self.double_quant),
            quant_type="nf4",
            quant_storage=torch.uint8,
            module=module,
        )
        # transformers quantizes through this same call (Params4bit(...).to(device)), which is
        # what makes the saved tensors byte-identical to its own.
        module.weight = param._quantize(weight.device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def to_runtime(self, module: nn.Module) -> nn.Module:
        """On a CPU without AVX512-BF16: the same module with its 8-bit block scales expanded to
        fp32 once, instead of on every call. Elsewhere: as saved.

        bitsandbytes' CPU matmul dequantizes the scales, then the codes, then runs a plain linear,
        every call. Expanding the scales up front computes the same fp32 values (so the outputs are
        bit-identical) and made SmolLM2-135M decode about 15% faster here, for 3 more bytes per 64
        weights. CPUs with AVX512-BF16 repack the weight for their fused kernel on the first call
        (bitsandbytes does that itself, expanding the scales too); CUDA reads nested scales natively.

        Args:
            module: a saved-layout `Linear4bit`.
        """
        weight = module.weight
        state = weight.quant_state
        if weight.device.type != "cpu" or not state.nested or module.support_avx512bf16_for_cpu:
            return module
        bnb = _bnb()
        nested = state.state2
        # Exactly what matmul_4bit computes before each call on the CPU.
        absmax = (
            torch.ops.bitsandbytes.dequantize_blockwise.default(
                state.absmax, nested.absmax, nested.code, nested.blocksize, torch.float32
            )
            + state.offset
        )
        flat = bnb.functional.QuantState(
            absmax=absmax,
            shape=state.shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        runtime = self._empty_module(module, module.compute_dtype)
        runtime.weight = bnb.nn.Params4bit(
            weight.data,
            requires_grad=False,
            quant_state=flat,
            blocksize=state.blocksize,
            compress_statistics=False,
            quant_type=state.quant_type,
            quant_storage=weight.quant_storage,
            module=runtime,
            bnb_quantized=True,
        )
        runtime.quant_state = flat
        runtime.bias = module.bias
        runtime.hubquant_runtime = True  # not the saved layout any more: hf_tensors refuses it
        return runtime

    def fuse(self, modules: list[nn.Module]) -> nn.Module | None:
        """Stack CPU runtime `Linear4bit`s whose block scales are plain fp32 (`to_runtime`'s): the
        packed codes and the scales one weight after another. Each weight holds whole blocks (its
        input width is a multiple of 64, or it was skipped), so every block and every output is
        unchanged. Nested scales (the saved layout, CUDA) are left separate."""
        bnb = _bnb()
        weights = [m.weight for m in modules]
        states = [w.quant_state for w in weights]
        first = states[0]
        if not all(
            isinstance(m, bnb.nn.Linear4bit)
            and getattr(m, "hubquant_runtime", False)
            and not s.nested
            and s.blocksize == first.blocksize
            and s.quant_type == first.quant_type
            and s.dtype == first.dtype
            and torch.equal(s.code, first.code)
            and s.shape[1] == first.shape[1]
            and (s.shape[0] * s.shape[1]) % s.blocksize == 0
            and m.compute_dtype == modules[0].compute_dtype
            for m, s in zip(modules, states, strict=True)
        ):
            return None
        out = sum(s.shape[0] for s in states)
        state = bnb.functional.QuantState(
            absmax=torch.cat([s.absmax for s in states]),
            shape=torch.Size([out, first.shape[1]]),
            code=first.code,
            blocksize=first.blocksize,
            quant_type=first.quant_type,
            dtype=first.dtype,
        )
        with torch.device("meta"):
            fused = bnb.nn.Linear4bit(
                first.shape[1], out, bias=all(m.bias is not None for m in modules),
                compute_dtype=modules[0].compute_dtype, compress_statistics=False, quant_type=first.quant_type,
                quant_storage=weights[0].quant_storage,
            )  # fmt: skip
        data = torch.cat([w.data.reshape(-1, 1) for w in weights])
        fused.weight = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_state=state,
            blocksize=first.blocksize,
            compress_statistics=False,
            quant_type=first.quant_type,
            quant_storage=weights[0].quant_storage,
            module=fused,
            bnb_quantized=True,
        )
        fused.quant_state = state
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in modules]), requires_grad=False)
        fused.hubquant_runtime = True
        # The parts view the fused codes and scales: stored once.
        codes = data.split([w.data.numel() for w in weights])
        scales = state.absmax.split([s.absmax.numel() for s in states])
        for w, s, c, a in zip(weights, states, codes, scales, strict=True):
            w.data = c.view(w.data.shape)
            s.absmax = a
        return fused

    def hf_tensors(self, module: nn.Module, hub_prefix: str) -> dict[str, torch.Tensor]:
        """The tensors transformers saves for `module` (Linear4bit._save_to_state_dict's).

        Args:
            module: a saved-layout `Linear4bit` from `quantize` or `load_module`.
            hub_prefix: its Hub module name ("model.layers.0.self_attn.q_proj").

        Raises:
            HubquantError: the module is in a runtime layout: from `to_runtime`, or repacked for
                bitsandbytes' AVX512-BF16 CPU kernel by its first forward (an inverse that does
                not restore the saved bytes).
        """
        state = module.weight.quant_state
        if getattr(module, "hubquant_runtime", False) or getattr(state, "packing_format_for_cpu", False):
            raise HubquantError(
                f"{hub_prefix} is in bitsandbytes' runtime layout, not the saved one; "
                "save with quantize_checkpoint (hubquant quantize --out) instead"
            )
        tensors = {f"{hub_prefix}.weight": module.weight.data}
        for key, value in state.as_dict(packed=True).items():
            tensors[f"{hub_prefix}.weight.{key}"] = value
        if module.bias is not None:
            tensors[f"{hub_prefix}.bias"] = module.bias.detach()
        return tensors

    def owns(self, hub_prefix: str, keys: set[str]) -> set[str]:
        """The saved tensors of a 4-bit module at `hub_prefix`: empty unless its nf4 state is there.

        Args:
            hub_prefix: a Hub module name.
            keys: every tensor name of the checkpoint.
        """
        if f"{hub_prefix}.{QUANT_STATE_KEY}" not in keys:
            return set()
        wanted = [f"{hub_prefix}.{k}" for k in (*_WEIGHT_KEYS, "bias")]
        return {k for k in wanted if k in keys}

    def hf_quantization_config(
        self,
        not_converted: list[str],
        *,
        head_quantized: bool | None = None,
        quantized: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...).to_dict()`,
        built without importing transformers (transformers 5's field order).

        Args:
            not_converted: Hub names of every Linear left in the base dtype, the head included
                when it is not quantized, an encoder's pooler and heads too. Written as
                `llm_int8_skip_modules`: transformers skips exactly these (an explicit list
                replaces its default of skipping the head), so the list must be complete.
            head_quantized: unused (bitsandbytes records the head in the list alone).
        """
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": False,
            "_load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(not_converted),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": True,
            "load_in_8bit": False,
        }

    @classmethod
    def from_hf_config(cls, quantization_config: dict[str, Any]) -> NF4 | None:
        """nf4 as saved by hubquant or by transformers (uint8 storage), or None.

        Args:
            quantization_config: config.json's `quantization_config`.
        """
        qc = quantization_config
        if qc.get("quant_method") != "bitsandbytes":
            return None
        if not qc.get("load_in_4bit", qc.get("_load_in_4bit", False)):
            return None
        if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
            return None
        if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
            return None
        return cls(double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)))

    def load_module(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        hub_prefix: str,
        like: nn.Linear,
        dtype: torch.dtype,
    ) -> nn.Module:
        """Rebuild the `Linear4bit` from its saved tensors, as transformers does (`from_prequantized`).

        Args:
            tensors: the tensors `owns` chose, by full name, on the target device.
            metadata: the shards' `__metadata__` (unused: the state travels in its own tensor).
            hub_prefix: the Hub module name.
            like: the projection on the meta device (shape, bias).
            dtype: the activations' dtype, used as compute dtype and for the bias.

        Raises:
            HubquantError: a tensor is missing, or the saved state is not nf4 of this shape.
        """
        bnb = _bnb()
        weight_name = f"{hub_prefix}.weight"
        if weight_name not in tensors:
            raise HubquantError(f"{weight_name} is missing; re-create the variant")
        weight = tensors[weight_name]
        stats = {k[len(weight_name) + 1 :]: v for k, v in tensors.items() if k.startswith(weight_name + ".")}
        module = self._empty_module(like, dtype)
        try:
            param = bnb.nn.Params4bit.from_prequantized(
                weight, dict(stats), requires_grad=False, device=weight.device, module=module
            )
        except (AssertionError, KeyError, ValueError) as error:
            raise HubquantError(f"the nf4 state of {hub_prefix} is incomplete or damaged ({error})") from None
        state = param.quant_state
        expected = (like.out_features, like.in_features)
        if state.quant_type != "nf4" or tuple(state.shape) != expected:
            raise HubquantError(
                f"{hub_prefix} holds a {state.quant_type} weight of shape {list(state.shape)}, expected "
                f"nf4 {list(expected)} from config.json; check config.json matches the weights"
            )
        if weight.numel() != math.ceil(math.prod(expected) / 2):
            raise HubquantError(
                f"{weight_name} has {weight.numel()} bytes of codes, not {math.prod(expected) // 2}"
            )
        module.weight = param
        if like.bias is not None:
            bias = tensors.get(f"{hub_prefix}.bias")
            if bias is None:
                raise HubquantError(f"{hub_prefix}.bias is missing; re-create the variant")
            module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return module

    def theoretical_bytes(self, shape: tuple[int, int], layer_settings: dict[str, Any]) -> int:
        """4 bits per value, plus per block of 64 one scale (8-bit with double quantisation, then
        one fp32 scale per 256 blocks, the 256-entry scale code and the scales' fp32 offset; fp32
        without), plus the 16-entry nf4 code and the JSON record of the remaining fields.

        Args:
            shape: (out_features, in_features).
            layer_settings: as `plan` returned them.
        """
        values = shape[0] * shape[1]
        blocks = math.ceil(values / layer_settings.get("block_size", BLOCK_SIZE))
        nested = layer_settings.get("double_quant", self.double_quant)
        total = math.ceil(values / 2) + 16 * 4  # codes, nf4 code book
        if nested:
            total += blocks + math.ceil(blocks / NESTED_BLOCK_SIZE) * 4 + 256 * 4
        else:
            total += blocks * 4
        return total + _record_bytes(shape, nested)

    def runtime_bytes(self, module: nn.Module) -> int:
        """Packed codes, the whole quant state (scales, nested scales, code books) and the bias.

        Args:
            module: a `Linear4bit`.
        """
        weight = module.weight
        total = weight.numel() * weight.element_size()
        state = weight.quant_state
        parts = [state.absmax, state.code, state.offset]
        if getattr(state, "state2", None) is not None:
            parts += [state.state2.absmax, state.state2.code]
        if module.bias is not None:
            parts.append(module.bias)
        return total + sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))

    def _empty_module(self, like: nn.Linear, dtype: torch.dtype) -> nn.Module:
        # Built on the meta device: its placeholder weight is replaced at once, never allocated.
        return _bnb().nn.Linear4bit(
            like.in_features,
            like.out_features,
            bias=like.bias is not None,
            compute_dtype=dtype,
            compress_statistics=self.double_quant,
            quant_type="nf4",
            quant_storage=torch.uint8,
            device="meta",
        )


def _record_bytes(shape: tuple[int, int], nested: bool) -> int:
    """Size of `weight.quant_state.bitsandbytes__nf4`: the JSON of the non-tensor fields, with a
    typical 18-character offset (its exact digits vary by a few bytes)."""
    record: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": BLOCK_SIZE,
        "dtype": "bfloat16",
        "shape": list(shape),
    }
    if nested:
        record.update(
            nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset=0.123456789012345
        )
    return len(json.dumps(record))
