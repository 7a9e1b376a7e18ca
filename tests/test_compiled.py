"""The compiled decode step (`generate(..., compile=True)`): the same tokens as eager decoding,
its static-shape step the same logits, and a second call reusing the compiled graph."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import sample_ids

import hubquant
from hubquant.errors import HubquantError
from hubquant.models.compiled import advance, static_step

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def gemma(hf_checkpoint):
    """Gemma: embedding scale, unit-offset norms, MQA: the step's every special path."""
    folder, _ = hf_checkpoint("gemma_mqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    return model


def test_static_step_equals_the_eager_step(gemma):
    """The fixed-shape step (every slot read, a mask of the written ones) gives the eager step's
    logits, for a left-padded batch."""
    ids = sample_ids(batch=2, seq=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = hubquant.KVCache(gemma.config, 2, 32, gemma.dtype, "cpu")
    with torch.no_grad():
        gemma(ids, mask, cache)
        static_cache = copy.deepcopy(cache)
        token = torch.tensor([[5], [9]])
        eager = gemma(token, None, cache, last_only=True)[:, -1]
        slot = torch.tensor([static_cache.length])
        static = static_step(gemma, token, static_cache, slot)
        advance(static_cache, slot)
        assert (static - eager).abs().max().item() <= 1e-5
        again_eager = gemma(token, None, cache, last_only=True)[:, -1]
        again_static = static_step(gemma, token, static_cache, slot)
        advance(static_cache, slot)
    assert (again_static - again_eager).abs().max().item() <= 1e-5
    assert static_cache.length == cache.length and torch.equal(static_cache.next_pos, cache.next_pos)


def test_compiled_generation_equals_eager(gemma):
    ids = sample_ids(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    eager = gemma.generate(ids, mask, max_new_tokens=12, eos_ids=[])
    compiled = gemma.generate(ids, mask, max_new_tokens=12, eos_ids=[], compile=True)
    assert torch.equal(eager, compiled)
    start = time.perf_counter()  # another length in the same cache bucket: no new compile
    longer = gemma.generate(ids, mask, max_new_tokens=20, eos_ids=[], compile=True)
    assert time.perf_counter() - start < 5, "the second call compiled again"
    assert torch.equal(longer[:, : eager.shape[1]], eager)


def _library_calls(code: str) -> list[str]:
    return [
        line.strip()
        for line in code.splitlines()
        if "extern_kernels.mm(" in line or "extern_kernels.addmm(" in line
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_row_products_compile_to_a_generated_reduction(dtype):
    """`RowProducts`, the CPU step's inductor pass: a one-row product (with and without bias, the
    weight stored either way round) compiles to a generated kernel with no library product, and
    its values are the library's up to the order of the sums (rounded once); two rows keep the
    library product."""
    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from hubquant.models.compiled import row_products

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 96, generator=gen).to(dtype)
    bias = torch.randn(300, generator=gen).to(dtype)
    eps = torch.finfo(dtype).eps
    for stored in (weight, weight.t().contiguous().t()):  # row-major; input-major (fp32 fused)
        for b in (None, bias):
            for rows in (1, 2):
                x = torch.randn(rows, 96, generator=gen).to(dtype)
                torch._dynamo.reset()
                step = torch.compile(
                    lambda x, w=stored, b=b: F.linear(x, w, b),
                    options={"post_grad_custom_post_pass": row_products()()},
                )
                out, code = run_and_get_code(step, x)
                exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
                # One rounding to the dtype, plus fp32 summation's worst case over 96 terms.
                terms = F.linear(x.double().abs(), weight.double().abs())
                bound = eps * exact.abs().max() + 96 * torch.finfo(torch.float32).eps * terms.max()
                assert (out.double() - exact).abs().max() <= bound
                library = F.linear(x, stored, b).double()  # torch's own product, same input
                assert (out.double() - library).abs().max() <= 2 * bound
                assert bool(_library_calls(code[0])) == (rows == 2), code[0]


def test_a_batch_of_one_compiles_with_no_library_product_and_decodes_the_eager_tokens(gemma):
    """The real compiled step (inductor, the CPU's options) of a one-row decode: every projection
    and the head run as generated kernels, and greedy decoding gives the eager tokens."""
    from torch._inductor.utils import run_and_get_code

    ids = sample_ids(batch=1, seq=6)
    eager = gemma.generate(ids, max_new_tokens=10, eos_ids=[])
    gemma.__dict__.pop("_compiled_step", None)
    torch._dynamo.reset()
    compiled, code = run_and_get_code(gemma.generate, ids, max_new_tokens=10, eos_ids=[], compile=True)
    assert torch.equal(eager, compiled)
    assert code and not any(_library_calls(c) for c in code), [_library_calls(c) for c in code]


def test_compile_refuses_dynamic_rope(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_dynamic")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    with pytest.raises(HubquantError, match="dynamic-NTK"):
        model.generate(sample_ids(batch=1, seq=4), max_new_tokens=2, compile=True)


def test_the_compiled_step_mutates_only_static_state(hf_checkpoint, monkeypatch):
    """What CUDA graphs need, checked on the CPU: every graph input the compiled step writes (the
    KV cache, the valid mask, the positions, the slot) is static state, as the weights are, read
    from AOTAutograd's own records of the graph (its input-mutation metadata). A cache made fresh
    per call would be a mutated graph input, and inductor would skip CUDA graphs for it."""
    records = _record_forward_graphs(monkeypatch)
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    ids = sample_ids(batch=1, seq=5)
    eager = model.generate(ids, max_new_tokens=6, eos_ids=[])
    first = model.generate(ids, max_new_tokens=6, eos_ids=[], compile=True)
    cache = model.__dict__["_static_cache"][1]
    second = model.generate(ids, max_new_tokens=9, eos_ids=[], compile=True)
    assert torch.equal(first, eager) and torch.equal(second[:, : first.shape[1]], first)
    assert len(records) == 1, "the step compiled more than once"
    _, mutated, static = records[0]
    assert mutated, "the step writes its cache: some input must be mutated"
    assert mutated <= static, f"inputs {sorted(mutated - static)} are mutated but not static state"
    assert model.__dict__["_static_cache"][1] is cache  # the same tensors, call after call


def test_each_cache_write_is_a_one_slot_put_into_its_own_tensor(hf_checkpoint, monkeypatch):
    """The step writes each layer's keys and values as an `index_put` into that layer's own cache
    tensor (in the functional graph, the mutated input's new value is `index_put(input, ...)`),
    which inductor turns back into an in-place write of one slot. Written through a view of one
    all-layers tensor, or with `index_copy_`, the whole cache was copied for every layer (0.2 to
    0.7 ms a layer on SmolLM2: decode at half speed)."""
    graphs = _record_forward_graphs(monkeypatch)
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    ids = sample_ids(batch=1, seq=5)
    assert torch.equal(
        model.generate(ids, max_new_tokens=4, eos_ids=[], compile=True),
        model.generate(ids, max_new_tokens=4, eos_ids=[]),
    )
    graph, mutated, _ = graphs[0]
    nodes = list(graph.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = next(n for n in nodes if n.op == "output").args[0]  # mutated inputs' values first
    cache = model.__dict__["_static_cache"][1]
    shape = tuple(cache.k[0].shape)
    puts = 0
    for index, value in zip(sorted(mutated), outputs, strict=False):
        if tuple(inputs[index].meta["val"].shape) == shape:
            assert value.target is torch.ops.aten.index_put.default, value.target
            assert value.args[0] is inputs[index], "the put is not into the cache tensor itself"
            puts += 1
    assert puts == 2 * model.config.num_layers


def test_a_model_changed_after_compiling_compiles_the_step_again(hf_checkpoint, monkeypatch):
    """Dynamo's guards on the model are off (they cost a sixth of a small model's step); the
    model's fingerprint, checked once per generate, stands in for them: a module swapped after a
    compiled generate compiles the step again, and the tokens are the changed model's."""
    compiles = _count_compiles(monkeypatch)
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    ids = sample_ids(batch=1, seq=5)
    before = model.generate(ids, max_new_tokens=6, eos_ids=[], compile=True)
    model.generate(ids, max_new_tokens=6, eos_ids=[], compile=True)
    assert len(compiles) == 1, "the same model compiled twice"

    class Negated(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -super().forward(x)

    head = model.lm_head
    negated = Negated(head.in_features, head.out_features, bias=False)
    negated.weight = head.weight
    model.lm_head = negated  # greedy decoding now picks the least likely token
    eager = model.generate(ids, max_new_tokens=6, eos_ids=[])
    after = model.generate(ids, max_new_tokens=6, eos_ids=[], compile=True)
    assert not torch.equal(eager, before)
    assert torch.equal(after, eager)
    assert len(compiles) == 2


def test_each_model_compiles_its_own_step_past_dynamos_recompile_limit(hf_checkpoint, monkeypatch):
    """An eval of many variants (or a sweep) compiles one step per model in one process. Dynamo
    counts recompiles per code object: were the models to share `static_step`'s, the one after
    `recompile_limit` would not compile at all and would decode eagerly without a word."""
    compiles = _count_compiles(monkeypatch)
    folder, _ = hf_checkpoint("llama_gqa")
    ids = sample_ids(batch=1, seq=4)
    models = torch._dynamo.config.recompile_limit + 2
    for _ in range(models):
        model, _ = hubquant.load(folder, dtype="fp32", progress=False)
        model.generate(ids, max_new_tokens=2, eos_ids=[], compile=True)
    assert len(compiles) == models


def test_each_cache_shape_compiles_its_own_step_past_dynamos_recompile_limit(hf_checkpoint, monkeypatch):
    """Generations of many lengths (each cache bucket a shape) and batch sizes from one model:
    each shape compiles once, and the ones after `recompile_limit` are still compiled, not decoded
    eagerly without a word; a length seen before compiles nothing."""
    import hubquant.models.compiled as compiled

    compiles = _count_compiles(monkeypatch)
    monkeypatch.setattr(compiled, "CACHE_BUCKET", 8)
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    ids = sample_ids(batch=1, seq=4)
    shapes = torch._dynamo.config.recompile_limit + 2
    for k in range(shapes):  # caches of 8, 16, ... slots
        eager = model.generate(ids, max_new_tokens=8 * k + 3, eos_ids=[])
        assert torch.equal(model.generate(ids, max_new_tokens=8 * k + 3, eos_ids=[], compile=True), eager)
        assert len(compiles) == k + 1, f"the cache of {8 * (k + 1)} slots did not compile"
    model.generate(sample_ids(batch=2, seq=4), max_new_tokens=3, eos_ids=[], compile=True)
    model.generate(ids, max_new_tokens=3, eos_ids=[], compile=True)  # seen: nothing new
    assert len(compiles) == shapes + 1


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_cpu_runtime_quantized_products_compile_into_the_one_step(hf_checkpoint, monkeypatch, method):
    """int8's `Int8Linear` and fp8's `Fp8Linear` (whose dequantization is itself compiled) trace
    into the step as one graph, with no break, and decode the eager tokens."""
    from hubquant.quantize.torchao_methods import Fp8Linear, Int8Linear

    graphs = _count_compiles(monkeypatch)
    folder, _ = hf_checkpoint("llama_gqa")
    model, _ = hubquant.load(folder, dtype="bf16", progress=False)
    hubquant.quantize(model, method, progress=False)
    kind = {"int8": Int8Linear, "fp8": Fp8Linear}[method]
    assert any(type(module) is kind for module in model.modules())
    ids = sample_ids(batch=1, seq=5)
    with torch.inference_mode():
        eager = model.generate(ids, max_new_tokens=6, eos_ids=[])
        first = model.generate(ids, max_new_tokens=6, eos_ids=[], compile=True)
    assert torch.equal(first, eager)
    assert len(graphs) == 1, f"the step compiled as {len(graphs)} graphs"


def _record_forward_graphs(monkeypatch) -> list[tuple[torch.fx.GraphModule, set[int], set[int]]]:
    """Swap the step's backend for AOTAutograd with a recording forward compiler: per graph
    compiled, the functional forward graph (run as traced), the indices of the inputs it mutates,
    and those of its static inputs, from AOTAutograd's own metadata."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import TracingContext

    import hubquant.models.compiled as compiled

    records: list[tuple[torch.fx.GraphModule, set[int], set[int]]] = []

    def recording(gm, example_inputs):
        def forward(graph, inputs):
            meta = TracingContext.get().fw_metadata
            mutated = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
            records.append((graph, mutated, set(meta.static_input_indices)))
            return graph

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward)

    monkeypatch.setattr(compiled, "compile_options", lambda model: {"backend": recording})
    return records


def _count_compiles(monkeypatch) -> list[int]:
    """Swap the step's backend for one that runs the graph as traced and appends to the returned
    list once per graph compiled."""
    import hubquant.models.compiled as compiled

    graphs: list[int] = []

    def counting(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    monkeypatch.setattr(compiled, "compile_options", lambda model: {"backend": counting})
    return graphs
