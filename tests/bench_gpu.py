"""GPU benchmark of hubquant on one checkpoint: bf16, batch 1, one CUDA device.

usage: python tests/bench_gpu.py FOLDER [--variants base,int4,int8,fp8,nf4] [--out gpu-bench.json]
       [--work DIR] [--keep] [--runs 3] [--budget SECONDS] [--no-compile] [--no-transformers]
       [--device cuda|cuda:N|cpu]   (cpu: a dry run of the logic on a small model, figures meaningless)

Figures, in this order (each printed as one line "section name: value" and written at once to the
JSON at --out, so a run cut short by a timeout still leaves every figure it reached):
  1. device copy bandwidth (read + write) of a 4 GiB tensor, 10 copies after 3 warm-ups;
  2. the base variant: load time, the bytes one decode step reads (every weight but the input
     embedding, a row lookup) and the roofline tokens/s that bandwidth gives, eager speed
     (measure_speed: prefill, decode, time to first token), the first compiled call (compile
     time), compiled speed, and each decode's share of the roofline;
  3. transformers on the same folder: load, prefill, eager greedy decode (128 new tokens after a
     16-token random prompt, 1 warm-up + 3 timed runs);
  4. every other variant as for base, after quantize_checkpoint on the GPU (wall time, writing
     included); each folder is removed after its figures unless --keep;
  5. transformers with cache_implementation="static" (its own compile path), slowest, last.
A step that fails records "ERROR: <type>: <first line>" and the rest go on; with --budget no new
step starts once that many seconds have passed (it records "skipped"). Without CUDA it prints one
line and exits 0. Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DECODE_TOKENS = 128
PROMPT_TOKENS = 16
PREFILL_TOKENS = 512
COPY_BYTES = 4 * 2**30
DEVICE = "cuda"  # --device cpu: a dry run of the script's logic on a small model (figures meaningless)


def on_gpu() -> bool:
    return torch.device(DEVICE).type == "cuda"


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize(DEVICE)


class Recorder:
    """Figures by section; each new one is printed and the whole JSON rewritten (atomically)."""

    def __init__(self, path: Path, budget: float) -> None:
        self.path = path
        self.budget = budget
        self.start = time.perf_counter()
        self.figures: dict[str, dict[str, Any]] = {}
        self.unwritable = False

    def __call__(self, section: str, name: str, value: Any) -> None:
        self.figures.setdefault(section, {})[name] = value
        print(f"{section} {name}: {value}", flush=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.figures, indent=1, default=str) + "\n")
            os.replace(tmp, self.path)
        except OSError as error:  # the figures still go to stdout
            if not self.unwritable:
                print(f"WARNING: cannot write {self.path}: {error}", file=sys.stderr, flush=True)
            self.unwritable = True

    def out_of_time(self) -> bool:
        return bool(self.budget) and time.perf_counter() - self.start > self.budget

    def step(self, section: str, name: str, fn: Callable[[], Any], show: bool = True) -> Any:
        """fn()'s value (recorded when `show`), or None with "ERROR: ..." or "skipped" recorded."""
        if self.out_of_time():
            self(section, name, f"skipped: budget of {self.budget:.0f} s spent")
            return None
        try:
            value = fn()
        except Exception as error:  # every step reports and the run goes on
            lines = str(error).strip().splitlines()
            self(section, name, f"ERROR: {type(error).__name__}: {lines[0][:300] if lines else ''}")
            free()
            return None
        if show:
            self(section, name, value)
        return value


def free() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4 if k == "ttft_s" else 2) for k, v in figures.items()}


def timed(fn: Callable[[], object]) -> float:
    """Seconds fn() takes, the device synchronised on both sides."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def copies(x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    for _ in range(n):
        y.copy_(x)


def copy_bandwidth() -> float:
    """GB/s that device-to-device copies move, read and write counted (the tensors are freed on
    return; the caller empties the cache)."""
    x = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    copies(x, y, 3)
    seconds = timed(lambda: copies(x, y, 10))
    return round(2 * 10 * COPY_BYTES / seconds / 1e9, 1)


def quant_state_bytes(param: torch.Tensor) -> int:
    """bitsandbytes' block scales (absmax, nested ones too), which tensor_bytes does not see."""
    total = 0
    state = getattr(param, "quant_state", None)
    while state is not None:
        absmax = getattr(state, "absmax", None)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
        state = getattr(state, "state2", None)
    return total


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter once (a tied head counted), except the input
    embedding, of which a step reads one row. Quantized tensors by their inner tensors."""
    from hubquant.quantize.base import tensor_bytes

    embed = getattr(getattr(model, "embed", None), "weight", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    total = 0
    for param in model.parameters():
        if param is embed and head is not embed:
            continue
        total += tensor_bytes(param) + quant_state_bytes(param)
    return total


def prompts(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 512-token prefill input, its first 16 tokens as the decode prompt), as measure_speed
    draws them, on the GPU."""
    gen = torch.Generator().manual_seed(0)
    long = torch.randint(100, vocab_size, (1, PREFILL_TOKENS), generator=gen).to(DEVICE)
    return long, long[:, :PROMPT_TOKENS]


def quantize_variant(folder: Path, out: Path, method: str) -> dict[str, Any]:
    """quantize_checkpoint on the GPU where it takes `device`, else without; wall seconds, writing
    included."""
    from hubquant.quantize.core import quantize_checkpoint

    start = time.perf_counter()
    try:
        quantize_checkpoint(folder, out, method, force=True, progress=False, device=DEVICE)
        where = DEVICE
    except TypeError as error:
        if "unexpected keyword argument 'device'" not in str(error):
            raise
        start = time.perf_counter()
        quantize_checkpoint(folder, out, method, force=True, progress=False)
        where = "default (quantize_checkpoint takes no device keyword)"
    sync()
    return {"seconds": round(time.perf_counter() - start, 1), "device": where}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def load_hubquant(path: Path) -> tuple[torch.nn.Module, float]:
    import hubquant

    start = time.perf_counter()
    model, _ = hubquant.load(path, dtype="bf16", device=DEVICE, progress=False)
    sync()
    return model, round(time.perf_counter() - start, 1)


def roofline(model: torch.nn.Module, bandwidth: float | None) -> dict[str, Any]:
    """Bytes read per decode step and the tokens/s the copy bandwidth allows at most."""
    read = decode_read_bytes(model)
    out: dict[str, Any] = {"decode_read_bytes": read, "decode_read_gb": round(read / 1e9, 3)}
    if bandwidth:
        out["roofline_tok_s"] = round(bandwidth * 1e9 / read, 1)
    return out


def first_compiled_call(model: torch.nn.Module) -> float:
    """Seconds of the first compiled generate (the compile and CUDA graph capture), the same shape
    measure_speed times next, so that its warm-up finds the graph ready."""
    _, prompt = prompts(model.config.vocab_size)
    torch._dynamo.reset()  # a fresh model per variant: drop the previous variant's graphs
    with torch.inference_mode():
        seconds = timed(
            lambda: model.generate(prompt, max_new_tokens=DECODE_TOKENS, eos_ids=[], compile=True)
        )
    return round(seconds, 1)


def speed(model: torch.nn.Module, compile: bool, runs: int, roof: float | None) -> dict[str, float]:
    from hubquant.evaluate.speed import measure_speed

    figures = rounded(
        measure_speed(model, vocab_size=model.config.vocab_size, device=DEVICE, runs=runs, compile=compile)
    )
    if roof:
        figures["share_of_roofline"] = round(figures["decode_tok_s"] / roof, 3)
    return figures


def bench_variant(
    rec: Recorder, folder: Path, variant: str, work: Path, bandwidth: float | None, args: argparse.Namespace
) -> float | None:
    """One variant: quantize (not for base), load, roofline, eager speed, compile time, compiled
    speed. Returns its roofline tokens/s (None when not known)."""
    path = folder
    if variant != "base":
        path = work / variant
        if rec.step(variant, "quantize", lambda: quantize_variant(folder, path, variant)) is None:
            return None
        rec.step(variant, "disk_gb", lambda: round(folder_bytes(path) / 1e9, 3))
    if on_gpu():
        torch.cuda.reset_peak_memory_stats(DEVICE)
    loaded = rec.step(variant, "load_s", lambda: load_hubquant(path), show=False)
    if loaded is None:
        return None
    rec(variant, "load_s", loaded[1])
    top = measure_loaded(rec, variant, loaded[0], bandwidth, args)
    del loaded
    torch._dynamo.reset()
    free()
    if variant != "base" and not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return top


def measure_loaded(
    rec: Recorder, variant: str, model: torch.nn.Module, bandwidth: float | None, args: argparse.Namespace
) -> float | None:
    """Roofline, eager speed, compile time, compiled speed, peak memory of a loaded variant."""
    roof = rec.step(variant, "roofline", lambda: roofline(model, bandwidth)) or {}
    top = roof.get("roofline_tok_s")
    rec.step(variant, "eager", lambda: speed(model, False, args.runs, top))
    compiled = (
        None
        if args.no_compile
        else rec.step(variant, "compile_first_call_s", lambda: first_compiled_call(model))
    )
    if compiled is not None:
        rec.step(variant, "compiled", lambda: speed(model, True, args.runs, top))
    if on_gpu():
        rec.step(variant, "peak_gpu_gb", lambda: round(torch.cuda.max_memory_allocated(DEVICE) / 1e9, 2))
    return top


def load_transformers(folder: Path) -> tuple[torch.nn.Module, float]:
    import transformers

    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map=DEVICE
    ).eval()
    sync()
    return model, round(time.perf_counter() - start, 1)


def hf_generate(model: torch.nn.Module, prompt: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=DECODE_TOKENS,
        min_new_tokens=DECODE_TOKENS,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


def hf_decode(model: torch.nn.Module, runs: int, **kwargs: Any) -> dict[str, float]:
    """Greedy decode tokens/s over `runs` runs after one warm-up (timed apart: for the static cache
    it holds the compile)."""
    _, prompt = prompts(model.config.vocab_size)
    with torch.inference_mode():
        warm = timed(lambda: hf_generate(model, prompt, **kwargs))
        rates = [DECODE_TOKENS / timed(lambda: hf_generate(model, prompt, **kwargs)) for _ in range(runs)]
    return {
        "decode_tok_s": round(statistics.mean(rates), 2),
        "decode_sd": round(statistics.stdev(rates), 2) if runs > 1 else 0.0,
        "warmup_call_s": round(warm, 1),
    }


def hf_prefill(model: torch.nn.Module, runs: int) -> dict[str, float]:
    long, _ = prompts(model.config.vocab_size)
    with torch.inference_mode():
        timed(lambda: model(long))
        rates = [PREFILL_TOKENS / timed(lambda: model(long)) for _ in range(runs)]
    return {"prefill_tok_s": round(statistics.mean(rates), 1)}


def bench_transformers(rec: Recorder, folder: Path, runs: int, static: bool, roof: float | None) -> None:
    """transformers on the same folder: eager decode, or (static) its static cache + compile."""
    section = "transformers static" if static else "transformers"
    loaded = rec.step(section, "load_s", lambda: load_transformers(folder), show=False)
    if loaded is None:
        return
    rec(section, "load_s", loaded[1])
    measure_transformers(rec, section, loaded[0], runs, static, roof)
    del loaded
    torch._dynamo.reset()
    free()


def measure_transformers(
    rec: Recorder, section: str, model: torch.nn.Module, runs: int, static: bool, roof: float | None
) -> None:
    if not static:
        rec.step(section, "prefill", lambda: hf_prefill(model, runs))
    kwargs = {"cache_implementation": "static"} if static else {}
    figures = rec.step(section, "decode", lambda: hf_decode(model, runs, **kwargs), show=False)
    if figures is not None:
        if roof:
            figures["share_of_base_roofline"] = round(figures["decode_tok_s"] / roof, 3)
        rec(section, "decode", figures)


def environment(rec: Recorder) -> None:
    import transformers

    import hubquant

    rec("env", "device", torch.cuda.get_device_name(DEVICE) if on_gpu() else DEVICE)
    rec("env", "versions", {"torch": torch.__version__, "transformers": transformers.__version__})
    rec("env", "hubquant", str(Path(hubquant.__file__).parent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="a Hub-layout checkpoint folder")
    parser.add_argument("--variants", default="base,int4,int8,fp8,nf4", help="comma-separated")
    parser.add_argument(
        "--out", default="gpu-bench.json", help="JSON file, or folder (ends in /) for gpu-bench.json"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu-work"), help="quantized folders")
    parser.add_argument("--keep", action="store_true", help="keep the quantized folders")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--budget", type=float, default=0.0, help="start no step after this many s (0: none)")
    parser.add_argument("--no-compile", action="store_true", help="skip compiled decode (hubquant's, static)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu for a dry run")
    return parser.parse_args()


def main() -> int:
    global DEVICE
    args = parse_args()
    DEVICE = args.device
    if on_gpu() and not torch.cuda.is_available():
        print("no CUDA device: GPU bench skipped")
        return 0
    if not (args.folder / "config.json").is_file():
        print(f"{args.folder} has no config.json: not a checkpoint folder")
        return 2
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    if args.out.endswith("/") or out.is_dir():
        out = out / "gpu-bench.json"
    rec = Recorder(out, args.budget)
    rec.step("env", "setup", lambda: environment(rec), show=False)
    bandwidth = rec.step("device", "copy_gb_s", copy_bandwidth)
    free()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    base_roof: float | None = None
    for variant in variants:
        top = bench_variant(rec, args.folder, variant, args.work, bandwidth, args)
        if variant == "base":
            base_roof = top
            if not args.no_transformers:
                bench_transformers(rec, args.folder, args.runs, False, base_roof)
    if not args.no_transformers and "base" not in variants:
        bench_transformers(rec, args.folder, args.runs, False, base_roof)
    if not args.no_transformers and not args.no_compile:
        bench_transformers(rec, args.folder, args.runs, True, base_roof)
    rec("run", "total_s", round(time.perf_counter() - rec.start, 1))
    print(f"figures written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
