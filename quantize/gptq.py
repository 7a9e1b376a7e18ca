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

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from hubquant.errors import HubquantError

from .base import register_method
from .calibration import return_freed_memory
from .solved import ROWS, InputGroup, Solution, SolvedInt4, output_error, quantize_column, rounded
from .torchao_methods import _exact_asymmetric_qparams

DAMP = 0.01  # share of the mean diagonal of H added to it
BLOCK = 128  # columns per lazy-update block


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor | Callable[[], torch.Tensor],
    group: int,
    *,
    act_order: bool = False,
    damp: float = DAMP,
    block: int = BLOCK,
    precision: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Solution:
    """Round `weight` to int4 on the `int4` method's grid with GPTQ (module docstring).

    Args:
        weight: `[out, in]` the layer's full-precision weights.
        hessian: `[in, in]` X^T X of its calibration inputs (any positive scale), left unchanged;
            or a function handing it over (`InputGroup.take_hessian`): then it is worked on in
            place and freed, one `[in, in]` matrix less.
        group: input columns per scale and zero point; divides `in`.
        act_order: round columns by decreasing Hessian diagonal (groups stay static).
        damp: share of the mean diagonal added to it before inverting.
        block: columns per lazy-update block (a multiple of `group`).
        precision: the dtype of the inversion and the column loop (fp32, as GPTQ is run in the
            field; the damping keeps the inversion well conditioned). Memory: besides `hessian`,
            two `[in, in]` matrices at a time while inverting (one with a handed-over Hessian),
            then one.
        overwrite: `weight` may be used as working memory (it must be `precision` already).
    """
    rows, cols = weight.shape
    if cols % group or block % group:
        raise HubquantError(f"GPTQ: group size {group} must divide the layer's {cols} inputs and the block")
    dtype = weight.dtype
    device = weight.device  # solved where the weights are: the GPU when quantizing on one
    w = weight.detach() if overwrite and weight.dtype == precision else weight.detach().to(precision).clone()
    if callable(hessian):
        h = hessian().detach().to(device=device, dtype=precision)  # ours now: no copy
    else:
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
    damping = float(damp * torch.diagonal(h).mean())
    h.diagonal().add_(damping)
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
    loss = torch.zeros(rows, dtype=torch.float64, device=device)  # per row: its output error, damped
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
            loss += err * err
        w[:, end:] -= errors @ hinv[start:end, end:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    # Each column's err^2 is what rounding it adds to the layer's output error under the damped
    # Hessian, once the later columns have absorbed what they can; their sum is that error.
    return Solution(codes, scale.to(dtype), zero.to(torch.int8), loss=loss, damping=damping, dead=dead.cpu())


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
            group = groups.pop(0)  # one [in, in] Hessian at a time, handed to the last solve
            planned = list(self._planned(block, prefix, group.names).items())
            for i, (size, members) in enumerate(planned):
                rtn = {name: output_error(lin.weight, group.hessian, rounded(size)) for name, lin in members}
                last = i == len(planned) - 1
                return_freed_memory()  # before the solver's [in, in] matrices
                self.solve(members, group.take_hessian if last else group.hessian, size)
                for name, linear in members:
                    errors[name] = (solved_error(linear.weight, self.solutions[name]), rtn[name])
            del group
        return errors

    def solve(
        self,
        linears: list[tuple[str, nn.Linear]],
        hessian: torch.Tensor | Callable[[], torch.Tensor],
        group: int,
    ) -> None:
        """Round layers that share one input (named, in `linears`) with GPTQ on that input's
        `hessian`, in one solve: GPTQ treats output rows independently, so stacking the layers'
        rows gives each layer exactly what solving it alone would."""
        weight = torch.cat([linear.weight.detach().float() for _, linear in linears])
        solution = gptq(weight, hessian, group, act_order=self.act_order, damp=self.damp, overwrite=True)
        del weight
        start = 0
        for name, linear in linears:
            self.solutions[name] = solution.rows(start, start + linear.out_features)
            start += linear.out_features


def solved_error(weight: torch.Tensor, solution: Solution) -> float:
    """||X (W - Q)^T||^2 of a GPTQ solution on its calibration inputs, from what the solver
    recorded (no Hessian needed): its per-row loss is that error under the damped Hessian
    H + damping * I, so the damping's share, damping * ||W - Q||^2, is taken off (W with the
    columns that never saw an input zeroed, as the solver had them)."""
    if solution.loss is None:
        raise ValueError("the solution carries no loss record")
    size = solution.codes.shape[1] // solution.scale.shape[1]
    squares = 0.0
    for start in range(0, weight.shape[0], ROWS):
        w = weight[start : start + ROWS].to(torch.float32, copy=True)
        if solution.dead is not None:
            w[:, solution.dead.to(w.device)] = 0.0
        d = w - solution.rows(start, start + ROWS).dequantized(size)
        squares += float((d * d).sum(dtype=torch.float64))
    return float(solution.loss.sum()) - solution.damping * squares
