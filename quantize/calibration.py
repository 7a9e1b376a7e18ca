"""Calibration of calibrated methods (`int4-gptq`, `int4-awq`): which tokens they learn from, and the
activations that carry those tokens through a decoder one layer at a time while it is quantized.

Tokens: `samples` sequences of `length` tokens, at seeded random offsets inside the calibration
slice of the text (its last quarter, `hubquant.texts.TokenSplit`), which no eval of that
text scores. A checkpoint without a tokenizer (a synthetic benchmark model) calibrates on seeded
random ids instead, and says so.

Activations (`LayerCalibration`): the embeddings of those sequences enter layer 0; each layer runs
once in fp32 with hooks collecting X^T X of every projection's inputs (the Hessians the method
solves with), then once more with its projections replaced by their quantized values, and what
comes out enters the next layer. So every layer is calibrated on what the quantized layers before
it produce. Memory: the inputs and outputs of one layer, samples x length x hidden x 4 bytes each,
plus one layer in fp32 and its Hessians.
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hubquant.errors import HubquantError
from hubquant.files import read_json
from hubquant.models.tokenizer import Tokenizer
from hubquant.texts import TokenSplit, load_text

from .solved import InputGroup, gram

if TYPE_CHECKING:
    from .base import Method

DEFAULT_SAMPLES = 16
DEFAULT_LENGTH = 128
BATCH = 8  # sequences per forward while calibrating


@dataclass(frozen=True)
class CalibrationSettings:
    """What a calibrated method learns from.

    Attributes:
        dataset: "python-docs", "wikitext2" or a .txt path: its calibration slice is used.
        samples: sequences drawn.
        length: tokens per sequence.
        seed: the draw's seed.
    """

    dataset: str = "python-docs"
    samples: int = DEFAULT_SAMPLES
    length: int = DEFAULT_LENGTH
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value in (("--calib-samples", self.samples), ("--calib-len", self.length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HubquantError(f"{flag} {value!r}: give a whole number of at least 1")
        if self.length < 2:
            raise HubquantError(f"--calib-len {self.length}: a sequence needs at least 2 tokens")


def calibration_ids(
    folder: Path, family: Any, hf_config: dict[str, Any], settings: CalibrationSettings
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration sequences `[samples, length]` and the record of how they were drawn.

    Args:
        folder: the checkpoint folder (its tokenizer.json tokenizes the text).
        family, hf_config: the checkpoint's family and config.json.
        settings: what to draw.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    shape = (settings.samples, settings.length)
    record: dict[str, Any] = {"samples": settings.samples, "length": settings.length, "seed": settings.seed}
    if not (folder / "tokenizer.json").is_file():
        vocab = int(hf_config.get("vocab_size") or 0)
        if vocab < 2:
            raise HubquantError(f"{folder} has no tokenizer.json and no vocab_size to calibrate on")
        record["text"] = "seeded random token ids (the checkpoint ships no tokenizer)"
        return torch.randint(0, vocab, shape, generator=gen), record

    path = folder / "generation_config.json"
    gen_config = read_json(path, "generation_config.json") if path.is_file() else {}
    tokenizer = Tokenizer.from_folder(folder, family.with_defaults(hf_config), gen_config)
    text = load_text(settings.dataset)
    ids = torch.tensor(tokenizer.encode(text.text, add_special_tokens=False), dtype=torch.long)
    split = TokenSplit(text, ids.numel())
    tail = ids[split.split :]
    if tail.numel() < settings.length:
        raise HubquantError(
            f"the calibration slice of {text.name} has {tail.numel()} tokens, fewer than --calib-len "
            f"{settings.length}; use a shorter --calib-len or a longer --calib-dataset"
        )
    starts = torch.randint(0, tail.numel() - settings.length + 1, (settings.samples,), generator=gen)
    record.update(split.record())
    return torch.stack([tail[s : s + settings.length] for s in starts.tolist()]), record


class Reached(Exception):
    """Raised inside a forward once what was to be collected is collected: the rest is skipped."""


class InputStats:
    """The statistics of the inputs of a layer's projections over forward calls: X^T X (fp32, on
    the inputs' device) and mean |x| per channel, one per distinct input. Projections fed the very
    same tensor (q/k/v; gate/up; in a parallel block also the MLP's first projections) share one.

    Args:
        linears: (name, layer) to watch.
        first_only: stop the forward once the first distinct input's projections have all run
            (`Reached`).
        keep_inputs: keep the inputs X themselves instead of X^T X while there are no more tokens
            than input channels (then X is the smaller and ||X D^T||^2 the cheaper to work out);
            an input that outgrows that is turned into X^T X and goes on as one.
    """

    KEEP = 8  # inputs remembered within a forward, to recognise one fed to several projections

    def __init__(
        self, linears: list[tuple[str, nn.Linear]], first_only: bool = False, keep_inputs: bool = False
    ) -> None:
        self.first_only = first_only
        self.keep_inputs = keep_inputs
        self.shared: dict[str, int] = {}  # name -> index into h / inputs / abs_sum
        self.h: list[torch.Tensor | None] = []
        self.inputs: list[list[torch.Tensor] | None] = []
        self.abs_sum: list[torch.Tensor] = []
        self.count: list[int] = []
        self._recent: list[tuple[torch.Tensor, int]] = []  # the inputs seen last, by identity
        self.handles = [linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            for seen, index in self._recent:
                if seen is x:
                    self.shared.setdefault(name, index)  # the same input as another projection
                    return
            index = self.shared.get(name)
            if index is None:
                if self.first_only and self.count:
                    raise Reached  # the first input's projections have all run
                index = self.shared[name] = len(self.count)
                self.h.append(
                    None if self.keep_inputs else torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
                )
                self.inputs.append([] if self.keep_inputs else None)
                self.abs_sum.append(torch.zeros(x.shape[-1], device=x.device))
                self.count.append(0)
            self._add(index, x.detach().reshape(-1, x.shape[-1]))
            self._recent = [(x, index), *self._recent[: self.KEEP - 1]]

        return hook

    def _add(self, index: int, x: torch.Tensor) -> None:
        flat = x.float()  # one conversion for every statistic
        self.abs_sum[index] += flat.abs().sum(0)
        self.count[index] += flat.shape[0]
        kept = self.inputs[index]
        if kept is not None and self.count[index] <= flat.shape[1]:
            # kept beyond this forward: a copy where `float()` handed back the forward's own tensor
            kept.append(flat.clone() if flat is x else flat)
            return
        if kept is not None:  # more tokens than channels: X^T X is the smaller from here on
            self.h[index] = (
                gram(kept) if kept else torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
            )
            self.inputs[index] = None
        h = self.h[index]
        assert h is not None
        h.addmm_(flat.T, flat)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._recent = []

    def groups(self) -> list[InputGroup]:
        """One per distinct input: the projections fed it, in the order they ran, and its statistics."""
        names: list[list[str]] = [[] for _ in self.count]
        for name, index in self.shared.items():
            names[index].append(name)
        return [
            InputGroup(n, h, a / max(c, 1), inputs)
            for n, h, a, c, inputs in zip(names, self.h, self.abs_sum, self.count, self.inputs, strict=True)
        ]

    def clear(self) -> None:
        self.h, self.inputs, self.abs_sum, self.count = [], [], [], []


class LayerCalibration:
    """Calibration activations moving through a decoder as its layers are quantized in order.

    Args:
        ids: `[samples, length]` calibration sequences.
    """

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.x: torch.Tensor | None = None
        self.errors: dict[str, tuple[float, float]] = {}  # name -> (method's, round-to-nearest's)
        self.method: Method | None = None

    @torch.no_grad()
    def begin(self, model: nn.Module) -> None:
        """Embed the sequences (the model's embeddings must be loaded): layer 0's input, in the
        model's dtype."""
        device = model.embed.weight.device
        x = model.embed(self.ids.to(device))
        if model.config.embedding_scale is not None:
            x = x * torch.tensor(model.config.embedding_scale, dtype=x.dtype)
        self.x = x
        self.model = model

    @torch.no_grad()
    def layer(self, block: nn.Module, method: Method, targets: list[tuple[str, nn.Linear]]) -> None:
        """Calibrate one layer in place: collect the statistics of the inputs of its projections,
        let the method work them out (it may change `block`: AWQ folds scales into it), put the
        worked-out weights in `block` (new tensors: the loaded ones are never written to), then
        move the activations through the layer as it will be saved.

        A sequential method (GPTQ) takes the projections one input at a time, in the order the
        layer runs them: q/k/v, then o on the outputs of the quantized q/k/v, then gate/up, then
        down; each pass stops once its input is collected, and only one Hessian exists at a time.

        Args:
            block: the layer, its weights loaded (runs in its own dtype).
            method: the calibrated method.
            targets: (canonical name, the layer's Linear) to quantize, in order.
        """
        if self.x is None:
            raise RuntimeError("LayerCalibration.begin must run before the layers")
        for module in block.modules():  # a fused q/k/v product would hide the projections' inputs
            module.__dict__.pop("_fused", None)
        device = next(block.parameters()).device
        prefix = _common_prefix([name for name, _ in targets])
        remaining = dict(targets)
        self.method = method
        while remaining:
            stats = InputStats(
                list(remaining.items()), first_only=method.sequential, keep_inputs=method.keeps_inputs
            )
            self._run(block, device)
            stats.remove()
            return_freed_memory()  # the forward's temporaries, before the solver's matrices
            groups = stats.groups()
            stats.clear()  # the method frees each Hessian once used
            if not groups:
                break  # the targets left never ran (not reached by this block's forward)
            done = [name for group in groups for name in group.names]
            self.errors.update(method.calibrate(block, prefix, groups))
            for name in done:
                linear = remaining.pop(name)
                quantized = method.dequantized(name, linear.weight.dtype)
                if quantized is not None:  # else skipped by the method's plan: full precision
                    weight = quantized.to(linear.weight.device)
                    linear.weight = nn.Parameter(weight, requires_grad=False)
        self.x = self._run(block, device, keep=True)

    def _run(self, block: nn.Module, device: torch.device, keep: bool = False) -> torch.Tensor | None:
        assert self.x is not None
        out = []
        for chunk in self.x.split(BATCH):
            chunk = chunk.to(device)
            positions, mask = self.model._positions_and_mask(
                chunk.shape[0], chunk.shape[1], 0, None, None, device
            )
            rope = self.model._rope(positions, chunk.dtype)
            try:
                y = block(chunk, rope, mask, None)
            except Reached:
                continue
            if keep:
                out.append(y.to(self.x.device))
        return torch.cat(out) if keep else None

    def summary(self) -> dict[str, Any]:
        """How much the method lowered each layer's output error on the calibration text, against
        round-to-nearest on the same grid: the worst and the median ratio, and whether every layer
        improved."""
        ratios = sorted(mine / rtn for mine, rtn in self.errors.values() if rtn > 0)
        if not ratios:
            return {}
        chose = getattr(self.method, "summary", None)  # what the method chose (AWQ: exponents)
        return {
            **(chose() if chose is not None else {}),
            "output_error_vs_rtn_median": round(ratios[len(ratios) // 2], 4),
            "output_error_vs_rtn_worst": round(ratios[-1], 4),
            "layers_better_than_rtn": f"{sum(r < 1 for r in ratios)}/{len(ratios)}",
        }


def return_freed_memory() -> None:
    """Hand memory freed by large temporaries back to the system (glibc keeps it otherwise, and
    the next large matrix then comes on top of it in the peak RSS; a no-op elsewhere). Objects in
    reference cycles are collected first, the young generations only (milliseconds): a
    bitsandbytes layer and its weight point at each other, and Python's automatic collector,
    counting objects rather than bytes, lets several layers' worth of them pile up."""
    gc.collect(1)
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def _common_prefix(names: list[str]) -> str:
    """ "layers.3." for names under layer 3."""
    first = names[0]
    return first[: first.index(".", len("layers.")) + 1]
