"""The one small interface every quantization method implements, and the record of what it did.

A method turns one `nn.Linear` of the canonical model (decoder or encoder) into its quantized
runtime module, says which tensors (in transformers' names and layout) and which safetensors
metadata represent that module on disk, writes the `quantization_config` transformers expects in
config.json, and rebuilds the runtime module from saved tensors. Everything else (walking the model layer by layer, streaming
a checkpoint, writing shards atomically, the model card) is shared and lives in `core.py`.

Methods are marked with `@register_method`; `registry.py` finds them in this folder and names them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

# The output head's canonical module name (a decoder's `lm_head`, an encoder's masked-LM decoder).
HEAD = "lm_head"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: mark `cls` as a quantization method. `registry.py` finds the marked classes
    in this folder's source and reads their literal class attributes; nothing is registered at run
    time, so that no list of methods depends on which modules happen to be imported."""
    if not isinstance(cls.__dict__.get("name"), str):
        raise TypeError(f"{cls.__name__}: a method class states its name as a literal class attribute")
    return cls


@dataclass
class LayerRecord:
    """What happened to one projection.

    Attributes:
        name: canonical module name ("layers.3.attn.q").
        shape: (out_features, in_features).
        settings: the settings used for this layer ({"group_size": 64}), empty when skipped.
        skipped: why it was left in the base dtype, or None.
        disk_bytes / runtime_bytes: bytes of its weight representation on disk and in memory.
    """

    name: str
    shape: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    disk_bytes: int = 0
    runtime_bytes: int = 0


@dataclass
class QuantReport:
    """What a quantization did, layer by layer: written to the model card and results.

    Attributes:
        method: the method's name; `settings` its settings as given.
        library: "torchao" or "bitsandbytes", with `library_version`.
        layers: one record per projection (quantized or skipped).
    """

    method: str
    settings: dict[str, Any]
    library: str
    library_version: str
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def skipped(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.skipped]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Method(ABC):
    """One quantization method. Subclasses set `name`, `library`, and implement the methods below.

    Args (of the constructor): the method's settings, e.g. `group_size`, `hqq`; unknown or invalid
    ones raise `HubquantError`.
    """

    # Literal class attributes, read without importing the class by `registry.py` (see there).
    name: ClassVar[str]
    library: ClassVar[str]
    bits: ClassVar[int]  # bits per weight value
    title: ClassVar[str]  # the card's title for the method
    about: ClassVar[str]  # the card's sentences on what the format stores (Markdown)
    sizes: ClassVar[str]  # the card's sentences on disk against run-time bytes (Markdown)
    repacks: ClassVar[bool] = False  # hubquant.load packs the saved layout into another for the device
    default_eval: ClassVar[bool] = True  # `hubquant eval` makes it without --variants
    # Calibrated: needs calibration text, `calibrate` each layer before `quantize_named`;
    # sequential: one input at a time, the projections run before it already quantized;
    # keeps_inputs: its statistics are the inputs X where they are smaller than X^T X (it only
    # measures output errors, and never solves with the Hessian).
    calibrated: ClassVar[bool] = False
    sequential: ClassVar[bool] = False
    keeps_inputs: ClassVar[bool] = False
    # Quantizes the output head whether or not `include_head` is asked (a separate head method).
    quantizes_head: ClassVar[bool] = False

    @property
    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The settings as given (recorded in reports and the model card)."""

    @abstractmethod
    def plan(self, name: str, linear: nn.Linear) -> dict[str, Any] | str:
        """The settings this layer will be quantized with, or a string: why it is skipped."""

    @abstractmethod
    def quantize(self, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        """The module replacing `linear`, in the layout that is saved (full-precision weights in,
        on any device). `to_runtime` then turns it into the fastest layout for its device."""

    def quantize_named(self, name: str, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        """`quantize` for the layer named `name` (canonical, "layers.3.attn.q"): a calibrated method
        uses what it solved for that layer. Default: `quantize`."""
        return self.quantize(linear, layer_settings)

    def calibrate(self, block: nn.Module, prefix: str, groups: list[Any]) -> dict[str, tuple[float, float]]:
        """Calibrated methods: work out one decoder layer's quantized weights from the statistics
        of its projections' inputs on calibration text, before `quantize_named` is called for
        each (see `quantize/solved.py`)."""
        raise NotImplementedError(f"{self.name} is not calibrated")

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Calibrated methods: the weights `calibrate` worked out for `name`, in `dtype`, to carry
        the calibration activations on to the next layer."""
        raise NotImplementedError(f"{self.name} is not calibrated")

    def to_runtime(self, module: nn.Module) -> nn.Module:
        """The fastest runtime layout of a quantized module for the device it is on (int4 on the
        CPU: torchao's packed opaque layout). Default: as saved."""
        return module

    def fuse(self, modules: list[nn.Module]) -> nn.Module | None:
        """One runtime module computing the outputs of `modules` (runtime layout, one shared input)
        side by side, for one product instead of several (q/k/v; gate/up), with the same values;
        None where this method cannot (the modules are then run one by one). Default: None."""
        return None

    @abstractmethod
    def hf_tensors(self, module: nn.Module, hub_prefix: str) -> dict[str, torch.Tensor]:
        """The tensors that represent the saved-layout `module` in a transformers checkpoint, by
        full name under `hub_prefix` ("model.layers.0.self_attn.q_proj"), bias included."""

    def hf_metadata(
        self, tensors: dict[str, tuple[tuple[int, ...], dict[str, Any] | None]], dtype: torch.dtype
    ) -> dict[str, str]:
        """The safetensors `__metadata__` every shard of the checkpoint carries (transformers merges
        them), computed before any weight is quantized, from every Hub weight name of the checkpoint
        with its shape and its layer settings (None: kept in the base dtype), and `dtype`, the base
        dtype the weights are quantized from (torchao's metadata records it). Default: none."""
        return {}

    def owns(self, hub_prefix: str, keys: set[str]) -> set[str]:
        """The saved tensor names (out of `keys`) that make up the quantized module at `hub_prefix`
        (bias included); empty when that module was saved unquantized."""
        return set()

    @abstractmethod
    def hf_quantization_config(
        self,
        not_converted: list[str],
        *,
        head_quantized: bool | None = None,
        quantized: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """config.json's `quantization_config`, as transformers writes it for this method;
        `not_converted` lists the Hub module names of every Linear left in the base dtype (the
        head among them unless it was quantized; an encoder's pooler and heads),
        `head_quantized` says whether the output head was quantized (None: whether `lm_head`,
        a decoder's head, is absent from `not_converted`), and `quantized` maps the Hub name of
        every quantized module to its canonical name (what a per-module config names)."""

    @classmethod
    @abstractmethod
    def from_hf_config(cls, quantization_config: dict[str, Any]) -> Method | None:
        """This method configured from a saved `quantization_config`, or None if it is not ours."""

    @abstractmethod
    def load_module(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        hub_prefix: str,
        like: nn.Linear,
        dtype: torch.dtype,
    ) -> nn.Module:
        """Rebuild the saved-layout module from its tensors (full names under `hub_prefix`, as
        `owns` chose them, already on the target device), with `like` (meta device) giving the
        shape and bias, and `dtype` the activations' dtype."""

    @abstractmethod
    def theoretical_bytes(self, shape: tuple[int, int], layer_settings: dict[str, Any]) -> int:
        """Bytes the method's format needs for a weight of `shape`: bits per value plus scales
        (what the storage test holds the files to, within 5%)."""

    def runtime_bytes(self, module: nn.Module) -> int:
        """Bytes the module holds at run time."""
        return linear_bytes(module)


def linear_bytes(module: nn.Module) -> int:
    """Bytes of a (possibly quantized) module's parameters and buffers, as held at run time."""
    total = 0
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        total += tensor_bytes(tensor)
    return total


def fused_linear(
    modules: list[nn.Module], weight: torch.Tensor, cls: type[nn.Linear] = nn.Linear
) -> nn.Linear:
    """A `cls` (an `nn.Linear`) holding `weight` (a quantized tensor of the stacked outputs) and
    the modules' biases stacked (None when they have none)."""
    biases = [m.bias for m in modules]
    with torch.device("meta"):
        fused = cls(weight.shape[1], weight.shape[0], bias=False)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if all(b is not None for b in biases):
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside torchao tensor subclasses (their inner tensors)."""
    names: list[str] = list(getattr(tensor, "tensor_data_names", []) or [])
    names += list(getattr(tensor, "optional_tensor_data_names", []) or [])
    if names:
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n, None) is not None)
    return tensor.numel() * tensor.element_size()


Filter = Callable[[str, nn.Linear], bool]
