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
    precision: torch.dtype = torch.float32,
) -> Solution:
    """Round `weight` to int4 on the `int4` method's grid with GPTQ (module docstring).

    Args:
        weight: `[out, in]` the layer's full-precision weights.
        hessian: `[in, in]` X^T X of its calibration inputs (any positive scale); left unchanged.
        group: input columns per scale and zero point; divides `in`.
        act_order: round columns by decreasing Hessian diagonal (groups stay static).
        damp: share of the mean diagonal added to it before inverting.
        block: columns per lazy-update block (a multiple of `group`).
        precision: the dtype of the inversion and the column loop (fp32, as GPTQ is run in the
            field; the damping keeps the inversion well conditioned). Memory: besides `hessian`,
            two `[in, in]` matrices at a time while inverting, then one.
    """
    rows, cols = weight.shape
    if cols % group or block % group:
        raise HubquantError(f"GPTQ: group size {group} must divide the layer's {cols} inputs and the block")
    dtype = weight.dtype
    device = weight.device  # solved where the weights are: the GPU when quantizing on one
    w = weight.detach().to(precision).clone()
    h = hessian.detach().to(device=device, dtype=precision, copy=True)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static: tuple[torch.Tensor, torch.Tensor] | None = None
    order = torch.arange(cols)
    if act_order:
        static = _exact_asymmetric_qparams(w.to(torch.float32), group)
        order = torch.argsort(torch.diagonal(h).cpu(), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    try:
        h = torch.linalg.cholesky(h)  # one [in, in] matrix alive beside the next, never three
        h = torch.cholesky_inverse(h)
        hinv = torch.linalg.cholesky(h, upper=True)
        del h
    except torch.linalg.LinAlgError:
        raise HubquantError(
            "GPTQ: the calibration Hessian is not positive definite even damped; use more --calib-samples"
        ) from None

    groups = cols // group
    scale = torch.empty(rows, groups, dtype=precision, device=device)
    zero = torch.empty(rows, groups, dtype=precision, device=device)
    if static is not None:
        scale[:], zero[:] = static[0].to(precision), static[1].to(precision)
    codes = torch.empty(rows, cols, dtype=torch.int8, device=device)
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
                scale[:, g], zero[:, g] = s[:, 0].to(precision), z[:, 0].to(precision)
            q = _quantize_column(w1[:, i], scale[:, g], zero[:, g])
            codes[:, column] = q.to(torch.int8)
            err = (w1[:, i] - (q - zero[:, g]) * scale[:, g]) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return Solution(codes, scale.to(dtype), zero.to(torch.int8))


class Hessians:
    """X^T X of the inputs of several linear layers over forward calls (fp32, on the inputs'
    device), one per distinct
    input: layers fed the very same tensor (q/k/v; gate/up) share one Hessian, which is then
    accumulated and solved once for all of them.

    Args:
        linears: (name, layer) to watch.
    """

    def __init__(self, linears: list[tuple[str, nn.Linear]]) -> None:
        self.shared: dict[str, int] = {}  # name -> index into `h`
        self.h: list[torch.Tensor] = []
        self._last: tuple[torch.Tensor, int] | None = None  # the input seen last and its Hessian
        self.handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.shared.setdefault(name, self._last[1])  # same input as the layer before
                return
            index = self.shared.get(name)
            if index is None:
                index = self.shared[name] = len(self.h)
                self.h.append(torch.zeros(x.shape[-1], x.shape[-1], device=x.device))
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            self.h[index].addmm_(flat.T, flat)
            self._last = (x, index)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._last = None

    def groups(self) -> list[tuple[list[str], torch.Tensor]]:
        """(names sharing an input, in the order they ran; their Hessian)."""
        names: list[list[str]] = [[] for _ in self.h]
        for name, index in self.shared.items():
            names[index].append(name)
        return list(zip(names, self.h, strict=True))


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

    def solve(self, linears: list[tuple[str, nn.Linear]], hessian: torch.Tensor) -> None:
        """Round layers that share one input (named, in `linears`) with GPTQ on that input's
        `hessian`, in one solve: GPTQ treats output rows independently, so stacking the layers'
        rows gives each layer exactly what solving it alone would. `quantize_named` then uses it.
        """
        by_group: dict[int, list[tuple[str, nn.Linear]]] = {}
        for name, linear in linears:
            plan = self.plan(name, linear)
            if not isinstance(plan, str):
                by_group.setdefault(plan["group_size"], []).append((name, linear))
        for group, members in by_group.items():
            weight = torch.cat([linear.weight.detach().float() for _, linear in members])
            solution = gptq(weight, hessian, group, act_order=self.act_order, damp=self.damp)
            start = 0
            for name, linear in members:
                rows = slice(start, start + linear.out_features)
                start = rows.stop
                self.solutions[name] = Solution(
                    solution.codes[rows], solution.scale[rows], solution.zero_point[rows]
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
