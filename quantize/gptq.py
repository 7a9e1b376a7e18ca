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

from typing import Any, ClassVar

import torch
from torch import nn

from hubquant.errors import HubquantError

from .base import register_method
from .solved import InputGroup, Solution, SolvedInt4, output_error, quantize_column, rtn_codes
from .torchao_methods import _exact_asymmetric_qparams

DAMP = 0.01  # share of the mean diagonal of H added to it
BLOCK = 128  # columns per lazy-update block


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
            q = quantize_column(w1[:, i], scale[:, g], zero[:, g])
            codes[:, column] = q.to(torch.int8)
            err = (w1[:, i] - (q - zero[:, g]) * scale[:, g]) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return Solution(codes, scale.to(dtype), zero.to(torch.int8))


@register_method
class Int4GPTQ(SolvedInt4):
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
    sequential: ClassVar[bool] = True

    def __init__(
        self, group_size: int | None = None, act_order: bool = False, damp: float = DAMP, **settings: Any
    ) -> None:
        super().__init__(group_size=group_size, **settings)
        if not isinstance(act_order, bool):
            raise HubquantError(f"int4-gptq's act_order must be true or false, not {act_order!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise HubquantError(f"int4-gptq's damp {damp!r} must be a number between 0 and 1")
        self.act_order, self.damp = act_order, float(damp)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "group_size": self.group_size,
            "act_order": self.act_order,
            "damp": self.damp,
            **({"calibration": self.calibration} if self.calibration else {}),
        }

    def calibrate(
        self, block: nn.Module, prefix: str, groups: list[InputGroup]
    ) -> dict[str, tuple[float, float]]:
        """GPTQ each group of projections on its input's Hessian (`SolvedInt4.calibrate`); `block`
        is left as it is."""
        errors: dict[str, tuple[float, float]] = {}
        while groups:
            group = groups.pop(0)  # freed once solved: one [in, in] Hessian at a time
            for size, members in self._planned(block, prefix, group.names).items():
                self.solve(members, group.hessian, size)
                for name, linear in members:
                    w = linear.weight.detach().float()
                    mine = self.solutions[name].dequantized(size)
                    rtn = rtn_codes(w, size).dequantized(size)
                    errors[name] = (output_error(w, mine, group.hessian), output_error(w, rtn, group.hessian))
            del group
        return errors

    def solve(self, linears: list[tuple[str, nn.Linear]], hessian: torch.Tensor, group: int) -> None:
        """Round layers that share one input (named, in `linears`) with GPTQ on that input's
        `hessian`, in one solve: GPTQ treats output rows independently, so stacking the layers'
        rows gives each layer exactly what solving it alone would."""
        weight = torch.cat([linear.weight.detach().float() for _, linear in linears])
        solution = gptq(weight, hessian, group, act_order=self.act_order, damp=self.damp)
        start = 0
        for name, linear in linears:
            self.solutions[name] = solution.rows(start, start + linear.out_features)
            start += linear.out_features
