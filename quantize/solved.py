"""What the calibrated int4 methods (`int4-gptq`, `int4-awq`) share: codes worked out on
calibration data and saved in exactly the `int4` format.

Both round onto the `int4` method's own grid (per group of input columns, the exact asymmetric
scale and zero point of `_exact_asymmetric_qparams`), so the folder they write is an `int4` folder
with other values: transformers and `hubquant.load` load it unchanged. A method here works a
decoder layer out at once (`calibrate`), from the layer's inputs on calibration text (one
`InputGroup` per distinct input: its Hessian X^T X, or the inputs X themselves, and mean |x|), and keeps each projection's
`Solution` until the writer asks for it (`quantize_named`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hubquant.errors import HubquantError

from .torchao_methods import Int4, _detached_linear, _exact_asymmetric_qparams

QMIN, QMAX = -8, 7
ROWS = 256  # output rows at a time when dequantizing or measuring errors: temporaries stay small


@dataclass
class Solution:
    """A layer's rounded weights: int4 codes `[out, in]` (int8, -8..7), and per group its scale and
    zero point `[out, groups]` (scale exact in bf16; zero point int8)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    loss: torch.Tensor | None = None  # per row, the output error the solver incurred (GPTQ)
    damping: float = 0.0  # what the solver added to the Hessian's diagonal
    dead: torch.Tensor | None = None  # input columns that never saw a non-zero input

    def dequantized(self, group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights the codes stand for, (q - zp) * s worked out in fp32 and stored in `dtype`;
        a block of rows at a time, so that no `[out, in]` fp32 temporary exists beside the result."""
        rows, cols = self.codes.shape
        out = torch.empty(rows, cols, dtype=dtype, device=self.codes.device)
        for start in range(0, rows, ROWS):
            r = slice(start, min(start + ROWS, rows))
            q = self.codes[r].view(-1, cols // group, group).float()
            q.sub_(self.zero_point[r, :, None].float()).mul_(self.scale[r, :, None].float())
            out[r] = q.view(-1, cols)
        return out

    def rows(self, start: int, stop: int) -> Solution:
        loss = self.loss[start:stop] if self.loss is not None else None
        return Solution(
            self.codes[start:stop],
            self.scale[start:stop],
            self.zero_point[start:stop],
            loss,
            self.damping,
            self.dead,
        )


@dataclass
class InputGroup:
    """Projections of one decoder layer fed the very same input, and that input's statistics on
    the calibration text.

    Attributes:
        names: canonical names ("layers.3.attn.q"), in the order they ran.
        hessian: `[in, in]` X^T X summed over every calibration token (fp32); None while `inputs`
            stands for it.
        abs_mean: `[in]` mean |x| per input channel.
        inputs: the calibration inputs X themselves (fp32 `[tokens, in]` chunks, in the order
            they ran), kept instead of the Hessian where a method asked for them and there are no
            more tokens than input channels (`InputStats(keep_inputs=True)`): X is then the
            smaller of the two, and ||X D^T||^2 the cheaper product (out x in x tokens against
            out x in x in).
    """

    names: list[str]
    hessian: torch.Tensor | None
    abs_mean: torch.Tensor
    inputs: list[torch.Tensor] | None = None

    def take_hessian(self) -> torch.Tensor:
        """Hand the Hessian over (to be worked on in place): the group keeps no reference."""
        hessian = self.hessian if self.hessian is not None else gram(self.inputs or [])
        self.hessian = self.inputs = None
        return hessian

    def blocks(self, size: int) -> torch.Tensor:
        """`[groups, size, size]` the diagonal blocks of X^T X, one per group of `size` input
        channels: each group's own share of the output error, without the terms between groups."""
        if self.inputs is not None:
            out = torch.zeros(self.abs_mean.shape[0] // size, size, size, device=self.abs_mean.device)
            for chunk in self.inputs:
                grouped = chunk.view(chunk.shape[0], -1, size).transpose(0, 1)  # [groups, tokens, size]
                out.baddbmm_(grouped.transpose(1, 2), grouped)
            return out
        assert self.hessian is not None, "the group's statistics were handed over"
        n = self.hessian.shape[0] // size
        return self.hessian.view(n, size, n, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()

    def error(self, weight: torch.Tensor, dequantize: Callable[[slice, torch.Tensor], torch.Tensor]) -> float:
        """`output_error` of `weight` rounded by `dequantize`, on these inputs."""
        if self.inputs is not None:
            return output_error(weight, None, dequantize, inputs=self.inputs)
        assert self.hessian is not None, "the group's statistics were handed over"
        return output_error(weight, self.hessian, dequantize)


def gram(inputs: list[torch.Tensor]) -> torch.Tensor:
    """X^T X (fp32) of input chunks `[tokens, in]`."""
    h = torch.zeros(inputs[0].shape[1], inputs[0].shape[1], device=inputs[0].device)
    for chunk in inputs:
        h.addmm_(chunk.T, chunk)
    return h


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest codes of `w` on the grid (scale, zero point), clamped to int4."""
    return torch.clamp(torch.round(w / scale) + zero, QMIN, QMAX)


def rtn_codes(weight: torch.Tensor, group: int, clip: torch.Tensor | None = None) -> Solution:
    """Round-to-nearest on the `int4` grid (what `int4` does), a block of rows at a time (the grid
    is per row and group, so blocks change nothing but the size of the temporaries).

    Args:
        weight: `[out, in]`.
        group: the group size.
        clip: `[out, groups]` or None: each group's grid spans only the weights within this share
            of its largest magnitude (AWQ's clipping); the weights beyond take the grid's end codes.
    """
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, rows, ROWS):
        w = weight[start : start + ROWS].float()
        grouped = w.reshape(-1, cols // group, group)
        if clip is None:
            scale, zero = _exact_asymmetric_qparams(w, group)
        else:
            bound = grouped.abs().amax(dim=-1, keepdim=True) * clip[start : start + ROWS, :, None].float()
            scale, zero = _exact_asymmetric_qparams(torch.clamp(grouped, -bound, bound).view(-1, cols), group)
        q = quantize_column(grouped, scale[:, :, None], zero.float()[:, :, None])
        codes[start : start + ROWS] = q.view(-1, cols)
        scales.append(scale)
        zeros.append(zero)
    return Solution(codes, torch.cat(scales), torch.cat(zeros))


def output_error(
    weight: torch.Tensor,
    h: torch.Tensor | None,
    dequantize: Callable[[slice, torch.Tensor], torch.Tensor],
    *,
    inputs: list[torch.Tensor] | None = None,
) -> float:
    """||X (W - Q)^T||^2 over the calibration inputs, a block of output rows at a time: from
    H = X^T X as trace((W - Q) H (W - Q)^T), or from the inputs X themselves (`[tokens, in]`
    chunks) as the sum of squares of (W - Q) X^T; the same value either way, up to fp32 rounding.

    Args:
        weight: `[out, in]` the full-precision weights W.
        h: `[in, in]` X^T X (None when `inputs` are given).
        dequantize: Q's rows, given which rows and W's rows in fp32.
        inputs: X, instead of `h`.
    """
    total = 0.0
    for start in range(0, weight.shape[0], ROWS):
        rows = slice(start, min(start + ROWS, weight.shape[0]))
        w = weight[rows].float()
        d = w - dequantize(rows, w)
        if inputs is not None:
            total += sum(float((d @ chunk.T).square_().sum(dtype=torch.float64)) for chunk in inputs)
        else:
            assert h is not None
            total += float(((d @ h) * d).sum(dtype=torch.float64))
    return total


def rounded(size: int) -> Callable[[slice, torch.Tensor], torch.Tensor]:
    """`output_error`'s Q for round-to-nearest on the `int4` grid with groups of `size`."""
    return lambda rows, w: rtn_codes(w, size).dequantized(size)


class SolvedInt4(Int4):
    """An int4 method whose codes are worked out layer by layer on calibration text (not
    registered itself). Subclasses define `calibrate`.

    Args:
        group_size: as for `int4` (default 128).
    """

    calibrated: ClassVar[bool] = True
    sizes: ClassVar[str] = (
        "Saved as `int4` is: torchao's portable layout, one byte per 4-bit value "
        "(`IntxUnpackedToInt8Tensor`); hubquant packs it at load time into the fast layout of the "
        "device, two values per byte, which is the run-time figure. transformers loads the folder as "
        "any int4 folder and keeps the saved layout in memory."
    )

    def __init__(
        self, group_size: int | None = None, hqq: bool = False, act_order: bool = False, **settings: Any
    ) -> None:
        for value, flag in ((hqq, "--hqq (:hqq)"), (act_order, "--act-order (:act)")):
            if value:
                raise HubquantError(f"{self.name} chooses its own rounding; {flag} does not apply to it")
        super().__init__(group_size=group_size, **settings)
        self.solutions: dict[str, Solution] = {}
        self.calibration: dict[str, Any] = {}  # how it was calibrated (text, tokens, samples...)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "group_size": self.group_size,
            **({"calibration": self.calibration} if self.calibration else {}),
        }

    @classmethod
    def from_hf_config(cls, quantization_config: dict[str, Any]) -> SolvedInt4 | None:
        return None  # its folders are int4 folders: `int4` loads them

    def calibrate(
        self, block: nn.Module, prefix: str, groups: list[InputGroup]
    ) -> dict[str, tuple[float, float]]:
        """Work out the quantized weights of one decoder layer's projections (and change `block`
        where the method folds scales into it), from its inputs on calibration text.

        Args:
            block: the layer as the writer will save it (its tensors may be changed in place).
            prefix: the layer's canonical prefix ("layers.3.").
            groups: one per distinct input; consumed (emptied) to free each Hessian once used.

        Returns:
            per projection, (the output error on the calibration inputs with this method's
            weights, the same with round-to-nearest): ||X (W - Q)^T||^2.
        """
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """What the method chose over the whole model, for the calibration record (default: nothing)."""
        return {}

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The solved weights of `name` in `dtype`, or None where the plan skipped it."""
        solution = self.solutions.get(name)
        if solution is None:
            return None
        return solution.dequantized(solution.codes.shape[1] // solution.scale.shape[1], dtype)

    def quantize_named(self, name: str, linear: nn.Linear, layer_settings: dict[str, Any]) -> nn.Module:
        """The saved-layout module of a solved layer: its codes and qparams, nothing recomputed."""
        from torchao.quantization import IntxUnpackedToInt8Tensor

        solution = self.solutions.pop(name, None)
        if solution is None:
            raise RuntimeError(f"{self.name}: {name} was not calibrated before being quantized")
        weight = linear.weight
        quantized = IntxUnpackedToInt8Tensor(
            qdata=solution.codes.to(weight.device),
            scale=solution.scale.to(device=weight.device, dtype=weight.dtype),
            zero_point=solution.zero_point.to(weight.device),
            target_dtype=torch.int4,
            block_size=(1, layer_settings["group_size"]),
            dtype=weight.dtype,
            activation_quantization=None,
        )
        module = _detached_linear(linear)
        module.weight = nn.Parameter(quantized, requires_grad=False)
        return module

    def _planned(
        self, block: nn.Module, prefix: str, names: list[str]
    ) -> dict[int, list[tuple[str, nn.Linear]]]:
        """The projections among `names` the plan quantizes, by group size."""
        by_group: dict[int, list[tuple[str, nn.Linear]]] = {}
        for name in names:
            linear = block.get_submodule(name[len(prefix) :])
            plan = self.plan(name, linear)
            if not isinstance(plan, str):
                by_group.setdefault(plan["group_size"], []).append((name, linear))
        return by_group
