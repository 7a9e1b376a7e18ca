"""`int4-gptq`: int4 with GPTQ's calibrated rounding, saved in exactly the `int4` format.

GPTQ (Frantar et al., 2022) rounds a linear layer's weights one input column at a time and spreads
each column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
H = X^T X of the layer's inputs X on calibration text, so that the layer's outputs on that text
move as little as they can. Here:

- the grid is the `int4` method's own: per group of `group_size` input columns, the exact
  asymmetric scale and zero point (`_exact_asymmetric_qparams`), computed from the weights as they
  stand when the group's first column is reached (the errors of earlier groups already spread into
  them), or, with activation order, from the original weights before any column moves (static
  groups: the format has no `g_idx`, so a group's columns must share its parameters whatever order
  they are rounded in);
- blocked lazy updates (128 columns a block), dampening (1% of the mean diagonal added), columns
  that never see a non-zero input set to zero, optional activation order (columns by decreasing
  diagonal of H);
- layers one at a time (`Calibration`): the calibration activations enter a layer as the layers
  before it left them, already quantized; one layer's weights in fp32 at a time beside them.

Why not torchao's GPTQ: torchao 0.18's GPTQ (prototype) quantizes into its own `Int4Tensor`
through a CUDA-only kernel package, has no activation order and runs the whole model at once; our
format is `IntxUnpackedToInt8Tensor` with our exact qparams, made on the CPU too, one layer at a
time. The solver is a few dozen lines of torch, tested against a plain column-by-column reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hubquant.errors import HubquantError

from .base import register_method
from .torchao_methods import Int4, _detached_linear, _exact_asymmetric_qparams

DAMP = 0.01  # share of the mean diagonal of H added to it
BLOCK = 128  # columns per lazy-update block
QMIN, QMAX = -8, 7


@dataclass
class Solution:
    """A layer's rounded weights: int4 codes `[out, in]` (int8, -8..7), and per group its scale and
    zero point `[out, groups]` (scale in the weight's dtype, exact; zero point int8)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def dequantized(self, group: int) -> torch.Tensor:
        """The weights the codes stand for, fp32: (q - zp) * s."""
        scale = self.scale.float().repeat_interleave(group, dim=1)
        zero = self.zero_point.float().repeat_interleave(group, dim=1)
        return (self.codes.float() - zero) * scale


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, QMIN, QMAX)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group: int,
    *,
    act_order: bool = False,
    damp: float = DAMP,
    block: int = BLOCK,
) -> Solution:
    """Round `weight` to int4 on the `int4` method's grid with GPTQ (module docstring).

    Args:
        weight: `[out, in]` the layer's full-precision weights.
        hessian: `[in, in]` X^T X of its calibration inputs (any positive scale).
        group: input columns per scale and zero point; divides `in`.
        act_order: round columns by decreasing Hessian diagonal (groups stay static).
        damp: share of the mean diagonal added to it before inverting.
        block: columns per lazy-update block (a multiple of `group`).
    """
    rows, cols = weight.shape
    if cols % group or block % group:
        raise HubquantError(f"GPTQ: group size {group} must divide the layer's {cols} inputs and the block")
    dtype = weight.dtype
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static: tuple[torch.Tensor, torch.Tensor] | None = None
    order = torch.arange(cols)
    if act_order:
        static = _exact_asymmetric_qparams(w.to(torch.float32), group)
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise HubquantError(
            "GPTQ: the calibration Hessian is not positive definite even damped; use more --calib-samples"
        ) from None

    groups = cols // group
    scale = torch.empty(rows, groups, dtype=torch.float64)
    zero = torch.empty(rows, groups, dtype=torch.float64)
    if static is not None:
        scale[:], zero[:] = static[0].double(), static[1].double()
    codes = torch.empty(rows, cols, dtype=torch.float64)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        errors = torch.zeros_like(w1)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            original = int(order[column])
            g = original // group
            if static is None and column % group == 0:
                s, z = _exact_asymmetric_qparams(w1[:, i : i + group].to(torch.float32), group)
                scale[:, g], zero[:, g] = s[:, 0].double(), z[:, 0].double()
            q = _quantize_column(w1[:, i], scale[:, g], zero[:, g])
            codes[:, column] = q
            err = (w1[:, i] - (q - zero[:, g]) * scale[:, g]) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return Solution(codes.to(torch.int8), scale.to(dtype), zero.to(torch.int8))


class HessianHook:
    """Accumulates X^T X of a linear layer's inputs over forward calls (fp64), and their count."""

    def __init__(self, linear: nn.Linear) -> None:
        self.h = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)
        self.count = 0
        self.handle = linear.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        self.h += (x.T @ x).cpu()
        self.count += x.shape[0]


@register_method
class Int4GPTQ(Int4):
    """int4 with GPTQ rounding on calibration text: the `int4` format and grid, other values.

    Args:
        group_size: as for `int4` (default 128).
        act_order: round columns in decreasing order of their Hessian diagonal (groups static).
        damp: share of the mean Hessian diagonal added before inverting (default 0.01).
    """

    name: ClassVar[str] = "int4-gptq"
    bits: ClassVar[int] = 4
    title: ClassVar[str] = "int4 weight-only, GPTQ-calibrated"
    about: ClassVar[str] = (
        "The `int4` format exactly (4-bit integers, one scale and zero point per group of input "
        "values, on the same exact asymmetric grid); only the rounding differs: GPTQ rounds each "
        "layer's weights one input column at a time and spreads each rounding error over the "
        "columns not yet rounded, weighted by the inverse Hessian of the layer's inputs on "
        "calibration text, so that its outputs on that text change least. Layers are calibrated "
        "in order, each on the activations the already-quantized layers before it produce."
    )
    library: ClassVar[str] = "torchao"
    sizes: ClassVar[str] = (
        "Saved as `int4` is: torchao's portable layout, one byte per 4-bit value "
        "(`IntxUnpackedToInt8Tensor`); hubquant packs it at load time into the fast layout of the "
        "device, two values per byte, which is the run-time figure. transformers loads the folder as "
        "any int4 folder and keeps the saved layout in memory."
    )
    repacks: ClassVar[bool] = True
    default_eval: ClassVar[bool] = False
    calibrated: ClassVar[bool] = True

    def __init__(
        self, group_size: int | None = None, act_order: bool = False, damp: float = DAMP, **settings: Any
    ) -> None:
        if settings.get("hqq"):
            raise HubquantError("int4-gptq chooses its own rounding; --hqq applies to int4 only")
        settings.pop("hqq", None)
        super().__init__(group_size=group_size, **settings)
        if not isinstance(act_order, bool):
            raise HubquantError(f"int4-gptq's act_order must be true or false, not {act_order!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise HubquantError(f"int4-gptq's damp {damp!r} must be a number between 0 and 1")
        self.act_order, self.damp = act_order, float(damp)
        self.solutions: dict[str, Solution] = {}
        self.calibration: dict[str, Any] = {}  # how it was calibrated (text, tokens, samples...)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "group_size": self.group_size,
            "act_order": self.act_order,
            "damp": self.damp,
            **({"calibration": self.calibration} if self.calibration else {}),
        }

    @classmethod
    def from_hf_config(cls, quantization_config: dict[str, Any]) -> Int4GPTQ | None:
        return None  # its folders are int4 folders: `int4` loads them

    def solve(self, name: str, linear: nn.Linear, hessian: torch.Tensor) -> None:
        """Round `linear` (named `name`) with GPTQ on `hessian`; `quantize_named` then uses it."""
        plan = self.plan(name, linear)
        if isinstance(plan, str):
            return
        self.solutions[name] = gptq(
            linear.weight.detach().float(),
            hessian,
            plan["group_size"],
            act_order=self.act_order,
            damp=self.damp,
        )

    def quantize_named(self, name: str, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        """The saved-layout module of a solved layer (its GPTQ codes and qparams)."""
        from torchao.quantization import IntxUnpackedToInt8Tensor

        solution = self.solutions.pop(name, None)
        if solution is None:
            raise RuntimeError(f"int4-gptq: {name} was not calibrated before being quantized")
        weight = linear.weight
        group = layer_settings["group_size"]
        quantized = IntxUnpackedToInt8Tensor(
            qdata=solution.codes.to(weight.device),
            scale=solution.scale.to(device=weight.device, dtype=weight.dtype),
            zero_point=solution.zero_point.to(weight.device),
            target_dtype=torch.int4,
            block_size=(1, group),
            dtype=weight.dtype,
            activation_quantization=None,
        )
        module = _detached_linear(linear)
        module.weight = nn.Parameter(quantized, requires_grad=False)
        return module


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float(
        torch.linalg.vector_norm((a - b).double()) / max(torch.linalg.vector_norm(b.double()), 1e-30)
    )


def rtn_codes(weight: torch.Tensor, group: int) -> Solution:
    """Round-to-nearest on the same grid (what `int4` does), for comparisons."""
    scale, zero = _exact_asymmetric_qparams(weight.float(), group)
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.float().repeat_interleave(group, dim=1)
    codes = _quantize_column(weight.float(), s, z)
    return Solution(codes.to(torch.int8), scale, zero)
