"""`int4-awq`: int4 with activation-aware scales (AWQ), saved as an `int4` folder whose norms
(or preceding projections) carry the scales.

AWQ (Lin et al., 2023) protects the input channels that carry large activations: it multiplies a
projection's input columns by s (so they take more of the int4 grid) and divides its input by s
where that input is made, in the norm before it or in the projection before it, which leaves the
full-precision model unchanged. Per group of projections fed the same input, s = mean|x|^a
(normalised to a geometric mean of 1 between its largest and smallest value) with a searched on a
grid of 20 values in [0, 1) for the lowest output error on the calibration inputs,
||X (W - Q(W diag(s)) diag(1/s))^T||^2, computed from the inputs X themselves where there are no
more calibration tokens than input channels (the default 2048 tokens against an 8B's 4096 and
14336: each of the 20 products costs out x in x tokens, and X takes less memory than X^T X), else
from the input's Hessian X^T X (out x in x in); a = 0 is round-to-nearest itself, so no layer does worse than `int4` on that text. Where the scales go:

- q/k/v (and, in a parallel block, the MLP's first projections): into the attention norm;
- gate/up: into the MLP norm;
- down: into up's output rows (a gated MLP multiplies act(gate) by up, so dividing up's rows
  divides down's input); a non-gated MLP's activation sits between, so down stays unscaled;
- o: into v's output rows when every query head has its own value head (no GQA); else unscaled.

RMSNorm weights are divided by s (Gemma's (1 + w) form: 1 + w becomes (1 + w) / s), LayerNorm
weights and biases too. The projections are then rounded to nearest on the `int4` method's own
exact grid, so the folder is the `int4` format with other values plus changed norm (and up/v bias)
tensors, which transformers and `hubquant.load` load unchanged.

Then AWQ's clipping search: per output row and group of every projection (q and k excepted), as
scaled, the grid spans only 1, 0.95, ..., 0.55 of the group's largest magnitude, whichever gives
the lowest error of that group's own share of the output on the calibration inputs (X^T X's
diagonal block); the weights beyond take the grid's end codes. A projection keeps the clipping
only where it lowers its whole output error (the groups' own errors leave out the terms between
groups), so the search never does worse than the scaling alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hubquant.models.layers import RMSNorm

from .base import register_method
from .solved import ROWS, InputGroup, SolvedInt4, rounded, rtn_codes

GRID = 20  # exponents tried: 0, 1/20, ..., 19/20
# Clipping: each group's grid spans 1, 0.95, ..., 0.55 of its largest magnitude (AWQ's grid of 20
# and largest shrink of half); not for q and k, whose outputs meet in softmax(q k^T), where their
# own output error says little (AWQ leaves them out for that reason).
CLIP_GRID = 20
CLIP_STEPS = 10
UNCLIPPED = ("attn.q", "attn.k")


def _search(
    linears: list[nn.Linear], group: InputGroup, size: int
) -> tuple[torch.Tensor | None, float, list[float], list[float]]:
    """The scales for the input columns of `linears` (fed one input) with the lowest output error
    on the calibration inputs, and their exponent; None where round-to-nearest (exponent 0) is
    best. Also, for the record, each layer's error with round-to-nearest (exponent 0) and with
    the scales chosen."""
    magnitude = group.abs_mean.float().clamp_min(1e-8)
    best: tuple[float, torch.Tensor | None, float, list[float]] = (float("inf"), None, 0.0, [])
    rtn: list[float] = []
    for step in range(GRID):
        alpha = step / GRID
        scale: torch.Tensor | None = None
        if step:
            scale = magnitude.pow(alpha).clamp_min(1e-4)
            scale = scale / (scale.max() * scale.min()).sqrt()
            if not torch.isfinite(scale).all():
                continue
        errors = [group.error(linear.weight, _scaled_rounding(size, scale)) for linear in linears]
        if not step:
            rtn = errors
        if sum(errors) < best[0]:
            best = (sum(errors), scale, alpha, errors)
    return best[1], best[2], rtn, best[3]


def _scaled_rounding(
    size: int,
    columns: torch.Tensor | None,
    rows: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
) -> Callable[[slice, torch.Tensor], torch.Tensor]:
    """`output_error`'s Q for weights whose input columns are multiplied by `columns` and output
    rows divided by `rows` before rounding to nearest (each group's grid clipped by `clip`), and
    the scales undone after."""

    def dequantize(which: slice, w: torch.Tensor) -> torch.Tensor:
        divisor = rows[which, None] if rows is not None else None
        scaled = w * columns if columns is not None else w
        scaled = scaled / divisor if divisor is not None else scaled
        q = rtn_codes(scaled, size, clip[which] if clip is not None else None).dequantized(size)
        q = q / columns if columns is not None else q
        return q * divisor if divisor is not None else q

    return dequantize


def _search_clip(weight: torch.Tensor, blocks: torch.Tensor, size: int) -> torch.Tensor:
    """AWQ's clipping search: per output row and group of `weight` `[out, in]` (as it will be
    rounded), the share of the group's largest magnitude its grid spans, 1 - i/20 for i < 10,
    with the lowest error of that group's own share of the output on the calibration inputs,
    d H_gg d^T (d: the group's rounding error, H_gg: `blocks[g]`, X^T X's diagonal block of the
    group's input channels, in `weight`'s scaled space); 1 is plain rounding.

    Returns:
        `[out, groups]` fp32 shares.
    """
    rows, cols = weight.shape
    groups = cols // size
    best = torch.ones(rows, groups, device=weight.device)
    for start in range(0, rows, ROWS):
        w = weight[start : start + ROWS].float()
        n = w.shape[0]
        lowest = torch.full((n, groups), float("inf"), device=w.device)
        for step in range(CLIP_STEPS):
            share = 1.0 - step / CLIP_GRID
            clip = torch.full((n, groups), share, device=w.device)
            d = (w - rtn_codes(w, size, clip).dequantized(size)).view(n, groups, size).transpose(0, 1)
            error = (torch.bmm(d, blocks) * d).sum(-1).transpose(0, 1)  # [n, groups]
            better = error < lowest
            lowest = torch.where(better, error, lowest)
            best[start : start + n][better] = share
    return best


def _fold_into_norm(norm: nn.Module, scale: torch.Tensor) -> bool:
    """Divide a norm's output by `scale` (per channel) through its parameters; False if the norm
    has none to carry it."""
    if isinstance(norm, RMSNorm):
        w = norm.weight.data
        s = scale.to(device=w.device, dtype=torch.float32)
        folded = (1.0 + w.float()) / s - 1.0 if norm.unit_offset else w.float() / s
        w.copy_(folded.to(w.dtype))
        return True
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        for p in (norm.weight, norm.bias):
            if p is not None:
                p.data.copy_((p.data.float() / scale.to(p.device)).to(p.dtype))
        return True
    return False


@dataclass
class ClipRecord:
    """What the clipping search did, for the record: weight groups rounded, how many of them were
    clipped, and the sum of those groups' kept shares of their largest magnitude."""

    groups: int = 0
    clipped: int = 0
    share_sum: float = 0.0

    def add(self, groups: int, clip: torch.Tensor | None) -> None:
        """Count `groups` rounded weight groups, with their clipping `clip` (None: unclipped)."""
        self.groups += groups
        if clip is not None:
            self.clipped += int((clip < 1).sum())
            self.share_sum += float(clip[clip < 1].sum())


@register_method
class Int4AWQ(SolvedInt4):
    """int4 with AWQ's activation-aware scales folded into the layer (module docstring).

    Args:
        group_size: as for `int4` (default 128).
    """

    name: ClassVar[str] = "int4-awq"
    bits: ClassVar[int] = 4
    title: ClassVar[str] = "int4 weight-only, AWQ-scaled"
    about: ClassVar[str] = (
        "The `int4` format exactly (4-bit integers, one scale and zero point per group of input "
        "values, on the same exact asymmetric grid), rounded to nearest after AWQ's "
        "activation-aware scaling: each projection's input channels are multiplied by a scale "
        "that grows with their mean activation on calibration text (its exponent searched for the "
        "lowest output error), and the norm or projection that makes that input is divided by it, "
        "so the norm weights (and up/v biases) in this folder differ from the base model's. Groups "
        "whose grid spans less than their full range where that lowers the output error (AWQ's "
        "clipping) round their largest weights to the grid's ends."
    )
    library: ClassVar[str] = "torchao"
    repacks: ClassVar[bool] = True
    default_eval: ClassVar[bool] = False
    keeps_inputs: ClassVar[bool] = True

    def __init__(self, group_size: int | None = None, **settings: Any) -> None:
        super().__init__(group_size=group_size, **settings)
        self.exponents: list[float] = []  # the exponent chosen per scaled group, for the record
        self.clipping = ClipRecord()
        # the last layer's folds: name -> (its input columns' scale, its output rows' divisor)
        self.scales: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def summary(self) -> dict[str, Any]:
        """How many input groups were scaled, and the exponents chosen; what share of the weight
        groups were clipped, and how far on average."""
        record = self.clipping
        clipping = {
            "clipped_weight_groups": round(record.clipped / record.groups, 4) if record.groups else 0.0,
            **({"clip_share_mean": round(record.share_sum / record.clipped, 4)} if record.clipped else {}),
        }
        if not self.exponents:
            return {"scaled_groups": 0, **clipping}
        ordered = sorted(self.exponents)
        return {
            "scaled_groups": len(ordered),
            "exponent_median": ordered[len(ordered) // 2],
            "exponent_range": [ordered[0], ordered[-1]],
            **clipping,
        }

    def calibrate(
        self, block: nn.Module, prefix: str, groups: list[InputGroup]
    ) -> dict[str, tuple[float, float]]:
        """Search each group's scales on the original weights, fold them all into `block` (norms,
        up/v rows and biases; skipped projections' columns), then round every planned projection
        to nearest in its scaled form (`SolvedInt4.calibrate`)."""
        columns: dict[str, torch.Tensor] = {}  # name -> its input columns' scale
        rows: dict[str, torch.Tensor] = {}  # name -> its output rows' divisor
        # name -> its output error rounded to nearest, and with its input columns scaled as
        # chosen: what the search measured, not measured again
        rtn: dict[str, float] = {}
        scaled: dict[str, float] = {}
        for group in groups:
            producer = self._producer(block, prefix, group.names)
            planned = self._planned(block, prefix, group.names)
            if producer is None or len(planned) != 1:
                continue  # nothing to fold into (or mixed group sizes): round to nearest
            ((size, members),) = planned.items()
            scale, alpha, errors_rtn, errors_scaled = _search([linear for _, linear in members], group, size)
            rtn.update(zip([name for name, _ in members], errors_rtn, strict=True))
            if scale is None:
                continue
            if isinstance(producer, nn.Linear):  # divide its output rows (and bias) by the scale
                name = prefix + _relative(block, producer)
                rows[name] = scale
                if producer.bias is not None:
                    producer.bias.data.copy_((producer.bias.data.float() / scale).to(producer.bias.dtype))
            elif not _fold_into_norm(producer, scale):
                continue
            self.exponents.append(alpha)
            for name in group.names:
                columns[name] = scale
            scaled.update(zip([name for name, _ in members], errors_scaled, strict=True))
        self.scales = {name: (columns.get(name), rows.get(name)) for name in set(columns) | set(rows)}
        errors: dict[str, tuple[float, float]] = {}
        planned_names = set()
        while groups:
            group = groups.pop(0)
            for size, members in self._planned(block, prefix, group.names).items():
                blocks = group.blocks(size)
                for name, linear in members:
                    planned_names.add(name)
                    col, row = columns.get(name), rows.get(name)
                    w = linear.weight.detach().to(torch.float32, copy=True)  # scaled in place
                    if col is not None:
                        w.mul_(col)
                    if row is not None:
                        w.div_(row[:, None])
                    if name not in rtn:  # not searched: nothing to fold into
                        rtn[name] = group.error(linear.weight, rounded(size))
                    if row is None:  # as the search measured it (unscaled: round-to-nearest)
                        mine = scaled.get(name, rtn[name])
                    else:  # its output rows carry the next group's scale too
                        mine = group.error(linear.weight, _scaled_rounding(size, col, row))
                    clip = None
                    if name[len(prefix) :] not in UNCLIPPED:
                        channels = col.view(-1, size) if col is not None else None
                        own = (
                            blocks / (channels[:, :, None] * channels[:, None, :])
                            if channels is not None
                            else blocks
                        )
                        clip = _search_clip(w, own, size)
                        clipped = group.error(linear.weight, _scaled_rounding(size, col, row, clip))
                        if clipped < mine:  # the groups' own errors leave out the terms between them
                            mine = clipped
                        else:
                            clip = None
                    self.solutions[name] = rtn_codes(w, size, clip)
                    self.clipping.add(w.numel() // size, clip)
                    del w, clip
                    errors[name] = (mine, rtn[name])
                del blocks
            del group
        for name in set(columns) | set(rows):  # a skipped projection keeps full precision, scaled
            if name not in planned_names:
                linear = block.get_submodule(name[len(prefix) :])
                w = linear.weight.data.float()
                if name in columns:
                    w = w * columns[name]
                if name in rows:
                    w = w / rows[name][:, None]
                linear.weight.data.copy_(w.to(linear.weight.dtype))
        return errors

    @staticmethod
    def _producer(block: nn.Module, prefix: str, names: list[str]) -> nn.Module | None:
        """What makes the input of the projections `names`, if it can carry a scale: a norm, or
        the projection whose output rows are that input."""
        local = {name[len(prefix) :] for name in names}
        if "attn.q" in local:
            return getattr(block, "attn_norm", None)
        mlp = getattr(block, "mlp", None)
        if "mlp.up" in local:
            return getattr(block, "mlp_norm", None)
        if local == {"mlp.down"} and mlp is not None and getattr(mlp, "gate", None) is not None:
            return mlp.up
        attn = getattr(block, "attn", None)
        if local == {"attn.o"} and attn is not None and attn.num_heads == attn.num_kv_heads:
            if attn.v.out_features == attn.o.in_features:
                return attn.v
        return None


def _relative(block: nn.Module, module: nn.Module) -> str:
    for name, candidate in block.named_modules():
        if candidate is module:
            return name
    raise RuntimeError("the producer is not in the block")
