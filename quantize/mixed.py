"""One method for the projections and another for the output head, in one torchao folder.

llama.cpp's 4-bit files keep the output head at 8 bits (Q8_0, or Q6_K in its k-quants): on a small
model the head is a large share of the bytes a token reads (SmolLM2-135M: 57 of 115 MB at int4 with
a bf16 head), and 8 bits keep its logits close to the base. `WithHead` pairs two torchao methods
(`int4:head-int8`: int4 layers, an int8 head), writes config.json's `quantization_config` as
transformers writes `TorchAoConfig(quant_type=FqnToConfig({...}))` (the head by its name, the
projections by one regex), and reads such a folder back. Each tensor's safetensors metadata names
its own subclass, which is what transformers and `load_module` rebuild it from.

It is not a registered method: `--method int4 --head int8` and the variant `int4:head-int8` name it,
and the report and card record the projections' method with `head` among its settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hubquant.errors import HubquantError

from .base import HEAD, Method
from .torchao_methods import _torchao_config_to_dict, _TorchaoMethod, checkpoint_metadata

# The key a head's layer settings carry, naming the method that quantizes it.
METHOD_KEY = "method"


class WithHead(Method):
    """`body` quantizes the projections, `head` the output head (`include_head` implied).

    Args:
        body: a torchao method (int4, int4-gptq, int4-awq, int8, fp8).
        head: another torchao method, with another tensor subclass.

    Raises:
        HubquantError: for a method that is not torchao's, or the same method twice.
    """

    quantizes_head = True

    def __init__(self, body: Method, head: Method) -> None:
        for role, method in (("projections", body), ("head", head)):
            if not isinstance(method, _TorchaoMethod):
                raise HubquantError(
                    f"a separate head method needs torchao methods on both sides; {method.name} for the "
                    f"{role} is {method.library}'s: use --include-head to quantize the head with it instead"
                )
        if set(body.tensor_types) & set(head.tensor_types):
            raise HubquantError(
                f"--head {head.name} is the projections' own method; use --include-head instead"
            )
        self.body, self.head = body, head

    # The projections' facts stand for the variant (its name, library, calibration).
    name = property(lambda self: self.body.name)  # type: ignore[assignment]
    library = property(lambda self: self.body.library)  # type: ignore[assignment]
    bits = property(lambda self: self.body.bits)  # type: ignore[assignment]
    calibrated = property(lambda self: self.body.calibrated)  # type: ignore[assignment]
    sequential = property(lambda self: self.body.sequential)  # type: ignore[assignment]
    keeps_inputs = property(lambda self: self.body.keeps_inputs)  # type: ignore[assignment]

    @property
    def calibration(self) -> Any:
        return getattr(self.body, "calibration", None)

    @calibration.setter
    def calibration(self, record: Any) -> None:
        self.body.calibration = record  # type: ignore[attr-defined]

    @property
    def settings(self) -> dict[str, Any]:
        return {**self.body.settings, "head": self.head.name}

    def _by_settings(self, layer_settings: Mapping[str, Any]) -> tuple[_TorchaoMethod, dict[str, Any]]:
        rest = {k: v for k, v in layer_settings.items() if k != METHOD_KEY}
        return (self.head if layer_settings.get(METHOD_KEY) == self.head.name else self.body), rest  # type: ignore[return-value]

    def _by_weight(self, module: nn.Module) -> _TorchaoMethod:
        kind = type(module.weight).__name__
        return self.head if kind in self.head.tensor_types else self.body  # type: ignore[return-value]

    def plan(self, name: str, linear: nn.Linear) -> dict[str, Any] | str:
        if name != HEAD:
            return self.body.plan(name, linear)
        plan = self.head.plan(name, linear)
        return plan if isinstance(plan, str) else {**plan, METHOD_KEY: self.head.name}

    def quantize(self, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        method, rest = self._by_settings(layer_settings)
        return method.quantize(linear, rest)

    def quantize_named(self, name: str, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        method, rest = self._by_settings(layer_settings)
        return method.quantize_named(name, linear, rest)

    def calibrate(self, block: nn.Module, prefix: str, groups: list[Any]) -> dict[str, tuple[float, float]]:
        return self.body.calibrate(block, prefix, groups)

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        return self.body.dequantized(name, dtype)

    def to_runtime(self, module: nn.Module) -> nn.Module:
        return self._by_weight(module).to_runtime(module)

    def fuse(self, modules: list[nn.Module]) -> nn.Module | None:
        return self.body.fuse(modules)  # only projections are fused

    def hf_tensors(self, module: nn.Module, hub_prefix: str) -> dict[str, torch.Tensor]:
        return self._by_weight(module).hf_tensors(module, hub_prefix)

    def hf_metadata(
        self, tensors: dict[str, tuple[tuple[int, ...], dict[str, Any] | None]], dtype: torch.dtype
    ) -> dict[str, str]:
        def weight_entry(
            name: str, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype
        ) -> str:
            method, rest = self._by_settings(settings)
            return method._weight_metadata(name, shape, rest, dtype)

        return checkpoint_metadata(tensors, dtype, weight_entry)

    def owns(self, hub_prefix: str, keys: set[str]) -> set[str]:
        return self.body.owns(hub_prefix, keys)  # the same names for every torchao subclass

    def hf_quantization_config(
        self,
        not_converted: list[str],
        *,
        head_quantized: bool | None = None,
        quantized: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The body's `TorchAoConfig` with `quant_type` an `FqnToConfig`: the head by its Hub
        name, every other quantized module by one regex over the Hub names (layer numbers as
        `\\d+`).

        Args:
            not_converted, head_quantized: as for any method.
            quantized: Hub name -> canonical name of every quantized module (required).
        """
        from torchao.quantization import FqnToConfig

        if not quantized:
            raise ValueError("WithHead.hf_quantization_config needs the quantized modules' names")
        heads = [hub for hub, canonical in quantized.items() if canonical == HEAD]
        patterns = dict.fromkeys(
            re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(hub)) for hub in quantized if hub not in heads
        )
        entries: dict[str, Any] = {hub: self.head.saved_config() for hub in heads}
        if patterns:
            entries["re:" + "|".join(patterns)] = self.body.saved_config()
        config = self.body.hf_quantization_config(not_converted, head_quantized=head_quantized)
        config["quant_type"] = {"default": _torchao_config_to_dict(FqnToConfig(entries))}
        return config

    @classmethod
    def from_hf_config(cls, quantization_config: dict[str, Any]) -> Method | None:
        """Not used: `registry.method_from_hf_config` reads these folders (each part is a method
        of the registry)."""
        return None

    def load_module(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        hub_prefix: str,
        like: nn.Linear,
        dtype: torch.dtype,
    ) -> nn.Module:
        entry = metadata.get(f"{hub_prefix}.weight", "{}")
        try:
            kind = json.loads(entry).get("_type")
        except (ValueError, AttributeError):
            kind = None
        method = self.head if kind in self.head.tensor_types else self.body
        return method.load_module(tensors, metadata, hub_prefix, like, dtype)

    def theoretical_bytes(self, shape: tuple[int, int], layer_settings: dict[str, Any]) -> int:
        method, rest = self._by_settings(layer_settings)
        return method.theoretical_bytes(shape, rest)

    def runtime_bytes(self, module: nn.Module) -> int:
        return self.body.runtime_bytes(module)  # both torchao: the weight's bytes


def fqn_parts(quantization_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the projections' torchao config dict, the head's) of a `WithHead` folder's
    `quantization_config`, or None when it is not one.

    Raises:
        HubquantError: an FqnToConfig of another shape than `WithHead` writes.
    """
    if quantization_config.get("quant_method") != "torchao":
        return None
    quant_type = quantization_config.get("quant_type")
    default = quant_type.get("default") if isinstance(quant_type, dict) else None
    if not isinstance(default, dict) or default.get("_type") not in ("FqnToConfig", "ModuleFqnToConfig"):
        return None
    data = default.get("_data") if isinstance(default.get("_data"), dict) else {}
    entries = data.get("fqn_to_config") or data.get("module_fqn_to_config") or {}
    # The projections: one regex (what hubquant writes) or torchao's `_default` (what a
    # `FqnToConfig({"_default": ..., "lm_head": ...})` made with torchao directly holds).
    body = [v for k, v in entries.items() if isinstance(k, str) and (k.startswith("re:") or k == "_default")]
    named = [
        v for k, v in entries.items() if isinstance(k, str) and not k.startswith("re:") and k != "_default"
    ]
    if len(body) != 1 or len(named) != 1 or not all(isinstance(v, dict) for v in (*body, *named)):
        raise HubquantError(
            "config.json's torchao FqnToConfig is not one hubquant reads (one config for the head by "
            "its name, one for the projections by a regex or _default); re-create the variant with hubquant"
        )
    return body[0], named[0]
