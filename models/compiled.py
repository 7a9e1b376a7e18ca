"""A compiled decode step: fixed shapes, the KV cache written in place, one graph per model.

Eager decoding pays Python and dispatch for every small op of every layer (~40 per layer); a
compiled step fuses the elementwise work and leaves the weights' bytes as the cost. What makes the
step compile once and never again:

- the cache is the preallocated `KVCache`, read whole (`max_len` slots) with a mask of the slots
  written so far, so every step has the same shapes;
- the slot to write and each row's RoPE position are tensors, not Python ints, so no value is
  baked into the graph;
- fused projections are checked before compiling (`drop_stale_fusions`), since `data_ptr()` cannot
  be traced;
- each step writes its one slot with an `index_put_` into the layer's own cache tensor, which
  inductor keeps in place (a write into a view of one all-layers tensor was copied whole, per layer);
- Dynamo's guards on the model are off (they cost more than a sixth of a small model's step);
  instead `compiled_step` compares the model's fingerprint (its modules and weights, by identity
  and metadata) once per generate and compiles again when it changed;
- everything the step writes (the cache's keys, values and valid mask, the positions, the slot) is
  one preallocated state kept on the model (`static_cache`) and marked as a static address, like
  the weights: the graph mutates no input of its own, so CUDA graphs are captured (inductor skips
  them for a graph that mutates other inputs), and the next generate of the same shape reuses the
  very tensors (and the captured graph) instead of recording again.

Inductor compiles it on the CPU; on a GPU the step also runs as a CUDA graph ("reduce-overhead").
Compiled artifacts go to the hubquant cache (`$HUBQUANT_CACHE/compile`, default
~/.cache/hubquant/compile) unless `TORCHINDUCTOR_CACHE_DIR` says otherwise, so a second process
reuses them instead of compiling again.
"""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.compiler import skip_guard_on_all_nn_modules_unsafe
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hubquant.errors import HubquantError

from .layers import KVCache, drop_stale_fusions

if TYPE_CHECKING:
    from .decoder import Decoder


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled artifacts for hubquant (set before the first compile)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    root = Path(os.environ.get("HUBQUANT_CACHE") or Path.home() / ".cache" / "hubquant")
    path = root / "compile"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


class _SlotWrite:
    """The cache as attention sees it in a static step: this step's keys and values go into one
    slot in place; attention reads every slot (the mask hides those not written)."""

    def __init__(self, cache: KVCache, slot: torch.Tensor) -> None:
        self.cache, self.slot = cache, slot

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        # An index_put_ into the layer's own tensor: inductor turns it back into an in-place write
        # of one slot (an index_copy_, or a write into a view of a larger tensor, came out as a
        # copy of the whole cache per layer: measured 0.2-0.7 ms a layer on SmolLM2).
        keys[:, :, self.slot] = k
        values[:, :, self.slot] = v
        return keys, values


def static_step(model: Decoder, token: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
    """One decode step with fixed shapes: the logits `[batch, vocab]` after `token`.

    Args:
        model: the decoder.
        token: `[batch, 1]` the tokens just chosen.
        cache: the KV cache the prompt was run through.
        slot: `[1]` long, the cache slot this step writes; each row's RoPE position is the
            cache's `next_pos`.
    """
    cache.valid.index_fill_(1, slot, True)
    mask = cache.valid[:, None, None, :]
    x = model.embed(token)
    if model.config.embedding_scale is not None:
        x = x * torch.tensor(model.config.embedding_scale, dtype=x.dtype)
    rope = model._rope(cache.next_pos[:, None], x.dtype)
    writer = _SlotWrite(cache, slot)
    for layer in model.layers:
        x = layer(x, rope, mask, writer)
    return model.lm_head(model.norm(x))[:, -1]


def static_cache(
    model: Decoder, batch: int, length: int, dtype: torch.dtype, device: torch.device | str
) -> KVCache:
    """The model's decode state for compiled steps: one `KVCache` (and its `slot`) per model,
    kept and reused while the shape is the same, emptied for each new generate.

    Its tensors are marked as static addresses (`torch._dynamo.mark_static_address`): the compiled
    step's writes into them are writes into state that stays put, as a module's buffers are, which
    CUDA graphs replay; a fresh cache per call would be a mutated graph input instead.

    Args:
        model: the decoder.
        batch: rows.
        length: slots (bucketed: `bucketed`).
        dtype, device: those of the model.
    """
    key = (batch, length, dtype, str(torch.device(device)))
    held = model.__dict__.get("_static_cache")
    if held is not None and held[0] == key:
        cache = held[1]
        cache.valid.zero_()
        cache.next_pos.zero_()
        cache.length, cache.padded = 0, False
        return cache
    cache = KVCache(model.config, batch, length, dtype, device)
    cache.slot = torch.zeros(1, dtype=torch.long, device=device)
    for tensor in (*cache.k, *cache.v, cache.valid, cache.next_pos, cache.slot):
        torch._dynamo.mark_static_address(tensor)
    model.__dict__["_static_cache"] = (key, cache)
    return cache


@functools.cache
def row_products() -> Any:
    """The inductor pass `RowProducts` (a class made on first use: its base, inductor's
    `CustomGraphPass`, takes a second to import, which a load that never compiles should not pay)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class RowProducts(CustomGraphPass):
        """Inductor pass for the CPU: a one-row product with a floating weight (`mm`/`addmm` of a
        `[1, in]` input in bf16, fp16 or fp32) becomes a multiply and a sum over the input width, in
        fp32, cast back once, as the library product also accumulates; inductor then generates one
        vectorised reduction kernel that streams the weight once.

        Why: for one row, torch's CPU product (oneDNN) streams a bf16 weight at about half the memory
        bandwidth (SmolLM2's 49152 x 576 head: 4.7 ms, 12 GB/s, 2 cores; the generated kernel: 2.4 ms,
        24 GB/s). Decode runs one row per step, so every floating product of a batch-1 step is such a
        product: SmolLM2 bf16 compiled decode 34 -> 59 tok/s, fp32 23 -> 26, int4 (its bf16 head)
        74 -> 78 (one A/B run each). Values: the same sums in another order, rounded once (tested
        against the library product). Products of more rows (prefill, batch decode) stay as they are.
        """

        DTYPES = (torch.bfloat16, torch.float16, torch.float32)

        def __call__(self, graph: torch.fx.Graph) -> None:
            aten, prims = torch.ops.aten, torch.ops.prims
            for node in list(graph.nodes):
                if node.op != "call_function" or node.kwargs:
                    continue
                if node.target is aten.mm.default:
                    bias, x, w_t = None, *node.args
                elif node.target is aten.addmm.default and len(node.args) == 3:
                    bias, x, w_t = node.args
                else:
                    continue
                xv, wv = x.meta.get("val"), w_t.meta.get("val")
                if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)):
                    continue
                if (
                    xv.device.type != "cpu"
                    or xv.shape[0] != 1
                    or xv.dtype not in self.DTYPES
                    or wv.dtype != xv.dtype
                ):
                    continue
                with graph.inserting_before(node):
                    # `[out, in]`: the weight as stored when the product took its transpose.
                    if (
                        w_t.op == "call_function"
                        and w_t.target is aten.permute.default
                        and list(w_t.args[1]) == [1, 0]
                    ):
                        weight = w_t.args[0]
                    else:
                        weight = graph.call_function(aten.permute.default, (w_t, [1, 0]))
                    as_f32 = prims.convert_element_type.default
                    terms = graph.call_function(
                        aten.mul.Tensor,
                        (
                            graph.call_function(as_f32, (weight, torch.float32)),
                            graph.call_function(as_f32, (x, torch.float32)),
                        ),
                    )
                    out = graph.call_function(aten.sum.dim_IntList, (terms, [1]))
                    if bias is not None:
                        out = graph.call_function(
                            aten.add.Tensor, (out, graph.call_function(as_f32, (bias, torch.float32)))
                        )
                    out = graph.call_function(as_f32, (out, xv.dtype))
                    out = graph.call_function(aten.view.default, (out, [1, wv.shape[1]]))
                node.replace_all_uses_with(out)
                graph.erase_node(node)
            graph.eliminate_dead_code()

        def uuid(self) -> Any:
            return get_hash_for_files((__file__,))

    return RowProducts


def compile_options(model: Decoder) -> dict[str, Any]:
    """The backend the step compiles with: inductor, with CUDA graphs on a GPU (what
    mode="reduce-overhead" sets), one-row products as generated reductions on the CPU
    (`RowProducts`). Tests swap the backend; `compiled_step` adds the guard filter."""
    if model.device.type == "cuda":
        options: dict[str, Any] = {"triton.cudagraphs": True}
    else:
        options = {"post_grad_custom_post_pass": row_products()()}
    return {"backend": "inductor", "options": options}


def _fingerprint(model: Decoder) -> tuple:
    """What the compiled step assumed of the model and no guard re-checks: which modules and
    tensors it holds (by identity), their dtypes, devices and shapes, the fused products, and the
    training flags. Any change (a quantizer swapping a Linear, `.to()`, a new fused product) gives
    another fingerprint, and the step is compiled again."""
    parts: list[Any] = []
    for name, module in model.named_modules():
        fused = module.__dict__.get("_fused")
        parts.append((name, id(module), type(module), module.training, id(fused)))
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                parts.append(_tensor_print(tensor))
    return tuple(parts)


def _tensor_print(tensor: torch.Tensor) -> tuple:
    """A tensor's identity and metadata; for a tensor subclass (torchao's), its parts' too."""
    inner: tuple = ()
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = tuple(_tensor_print(getattr(tensor, n)) for n in names)
    shape = (tensor.dtype, tensor.device, tuple(tensor.shape), tuple(tensor.stride()))
    return (id(tensor), type(tensor), *shape, inner)


def compiled_step(model: Decoder, shape: tuple[int, ...] = ()) -> Any:
    """The model's compiled `static_step` for one cache shape (compiled on its first call, kept on
    the model while the model's modules and weights stay the same objects: see `_fingerprint`).

    Each shape (batch, cache slots) has a step, and a code object, of its own, so Dynamo compiles
    each exactly once: within one code object its recompiles count against `recompile_limit` (8),
    and the shape after that would decode eagerly without a word.

    Args:
        model: the decoder.
        shape: the cache's (batch, slots) that the step will run with.

    Raises:
        HubquantError: for RoPE that depends on the length (dynamic NTK), which has no fixed shape.
    """
    if model.config.rope.type == "dynamic":
        raise HubquantError(
            "--compile does not apply to dynamic-NTK RoPE (its frequencies change with the length); "
            "run without --compile"
        )
    drop_stale_fusions(model)
    fingerprint = _fingerprint(model)
    held = model.__dict__.get("_compiled_step")
    if held is None or held[0] != fingerprint:
        held = model.__dict__["_compiled_step"] = (fingerprint, {})
    steps: dict[tuple[int, ...], Any] = held[1]
    if shape in steps:
        return steps[shape]
    compile_cache_dir()
    chosen = compile_options(model)
    # Dynamo checks its guards before every call of a compiled function; for a step that takes the
    # model, that is every module's attributes and every weight's metadata (for torchao's tensor
    # subclasses, their parts too): 2.3 ms a step on SmolLM2 int4 (2 cores), a sixth of the step.
    # The fingerprint above checks the same things once per generate instead.
    options = {**chosen.get("options", {}), "guard_filter_fn": skip_guard_on_all_nn_modules_unsafe}
    step = torch.compile(_own_copy(static_step), dynamic=False, backend=chosen["backend"], options=options)
    steps[shape] = step
    return step


def _own_copy(function: Any) -> Any:
    """`function` with a code object of its own. Dynamo keeps compiled graphs, and counts
    recompiles against `recompile_limit` (8), per code object: every model (and every cache shape)
    compiling the one `static_step` would share that count, and the ninth of a process (an eval of
    many variants, a sweep, generations of many lengths) would silently decode eagerly."""
    return types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__
    )


def advance(cache: KVCache, slot: torch.Tensor) -> None:
    """After a static step: one more slot used, every row one position further."""
    cache.length += 1
    cache.padded = True  # eager steps after this one must read the valid mask too
    cache.next_pos += 1
    slot += 1


# Cache slots come in multiples of this, so that prompts and budgets of nearby lengths share a
# compiled step (fixed shapes) instead of compiling again. Every step reads all slots (the mask hides those not written): SmolLM2 decoding 80 tokens
# ran 4-9% faster with 128 slots than with 256 (int4, bf16; compiled, 2 cores).
CACHE_BUCKET = 128


def bucketed(length: int) -> int:
    """The cache slots a compiled generate of `length` tokens (prompt included) allocates."""
    return -(-length // CACHE_BUCKET) * CACHE_BUCKET
