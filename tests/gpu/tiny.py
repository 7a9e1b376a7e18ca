"""Tiny perturbed checkpoints of every decoder family, hubquant against transformers on CUDA.

usage: python tiny.py WORKDIR [--device cuda] [--budget SECONDS]

For Llama, Gemma, Phi and Apertus (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256, MLP 128,
every parameter moved off its init by seeded noise), saved by transformers' save_pretrained:
  - hubquant's logits against transformers' on the same random ids, fp32 (max abs diff) and bf16;
  - for int4, int8, fp8, nf4: the folder quantize_checkpoint writes (on the device where it takes
    one), loaded on the device by hubquant and by transformers (max abs diff between the two, and
    hubquant's variant against the bf16 base), and loaded by hubquant on the CPU (the saved layout
    is portable);
  - compiled greedy decode against eager, same tokens or not (last: compiles are the slow part;
    with --budget they stop being started once the budget is spent).
One line per check, "family method check: value"; a failing check prints its one-line error and
the rest go on. All values also go to WORKDIR/tiny.json, rewritten after every line.
Without CUDA (and --device cuda) it prints one line and exits 0. Not a test (pytest does not
collect it).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5, qk_layernorm=True)),
    "apertus": ("ApertusConfig", {}),
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
ROPE = {"llama": (500000.0, LLAMA3), "apertus": (12000000.0, LLAMA3)}  # name -> (theta, scaling)
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
METHODS = ("int4", "int8", "fp8", "nf4", "int4:head-int8")  # the last: int4 layers, an int8 head
NOISE = 0.05
SEQ = 48  # crosses the llama3 bands: their original context is set to 16 below
NEW_TOKENS = 16


class Recorder:
    """Prints each figure as one line and rewrites the JSON of all of them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {}

    def __call__(self, key: str, value: Any) -> None:
        self.values[key] = value
        print(f"{key}: {value}", flush=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.values, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"ERROR: {type(error).__name__}: {lines[0][:300] if lines else ''}"


def attempt(rec: Recorder, key: str, fn: Callable[[], Any]) -> Any:
    """fn()'s value, or None with its one-line error recorded under key."""
    try:
        return fn()
    except Exception as error:  # every check reports and the run goes on
        rec(key, one_line(error))
        return None


def check(rec: Recorder, key: str, fn: Callable[[], Any]) -> Any:
    """Record fn()'s value under key, or its one-line error; returns the value or None."""
    value = attempt(rec, key, fn)
    if value is not None:
        rec(key, value)
    return value


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def family_config(name: str) -> Any:
    import transformers

    cls_name, overrides = FAMILIES[name]
    cls = getattr(transformers, cls_name)
    kwargs: dict[str, Any] = {**COMMON, **overrides}
    if name in ROPE:
        theta, scaling = ROPE[name]
        scaling = {**scaling, "original_max_position_embeddings": 16}
        if "rope_parameters" in inspect.signature(cls.__init__).parameters:  # transformers 5
            kwargs["rope_parameters"] = {**scaling, "rope_theta": theta}
        else:
            kwargs.update(rope_theta=theta, rope_scaling=scaling)
    return cls(**kwargs)


def make_checkpoint(name: str, folder: Path, seed: int) -> None:
    """A transformers model of the family, every parameter and saved buffer perturbed, saved sharded."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(family_config(name), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    saved = model.state_dict()
    buffers = [b for n, b in model.named_buffers() if n in saved]
    with torch.no_grad():
        for tensor in [*model.parameters(), *buffers]:
            if tensor.is_floating_point() and tensor.numel():
                tensor.add_(torch.randn(tensor.shape, generator=gen).to(tensor.dtype) * NOISE)
    model.save_pretrained(folder, max_shard_size="100KB")


def tf_logits(folder: Path, dtype: torch.dtype, device: str, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    with torch.inference_mode():
        out = model(ids.to(device)).logits.float().cpu()
    del model
    free()
    return out


def hq_logits(folder: Path, dtype: str, device: str, ids: torch.Tensor) -> torch.Tensor:
    import hubquant

    model, _ = hubquant.load(folder, dtype=dtype, device=device, progress=False)
    with torch.inference_mode():
        out = model(ids.to(device)).float().cpu()
    del model
    free()
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def equal_or_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return "equal" if torch.equal(a, b) else f"max abs diff {max_diff(a, b):.4g}"


def quantize(folder: Path, out: Path, method: str, device: str) -> str:
    """quantize_checkpoint on `device` where it takes the keyword, else without; says which and how long."""
    from hubquant.quantize.core import quantize_checkpoint

    start = time.perf_counter()
    try:
        quantize_checkpoint(folder, out, method, force=True, progress=False, device=device)
        where = device
    except TypeError as error:
        if "unexpected keyword argument 'device'" not in str(error):
            raise
        start = time.perf_counter()
        quantize_checkpoint(folder, out, method, force=True, progress=False)
        where = "default device (quantize_checkpoint takes no device keyword)"
    return f"{time.perf_counter() - start:.2f} s on {where}"


def cpu_load(folder: Path, ids: torch.Tensor, on_device: torch.Tensor | None) -> str:
    got = hq_logits(folder, "bf16", "cpu", ids)
    if on_device is None:
        return "ok"
    return f"ok, max|cpu-device| {max_diff(got, on_device):.4g}"


def parity(name: str, work: Path, device: str, ids: torch.Tensor, rec: Recorder) -> None:
    """Base fp32/bf16 parity, then every method's folder on the device, in transformers, on the CPU."""
    folder = work / name
    if check(rec, f"{name} base checkpoint", lambda: make_checkpoint(name, folder, 0) or "saved") is None:
        return
    check(
        rec,
        f"{name} fp32 hq-vs-tf",
        lambda: (
            f"max abs diff {max_diff(hq_logits(folder, 'fp32', device, ids), tf_logits(folder, torch.float32, device, ids)):.3g}"
        ),
    )
    base = attempt(rec, f"{name} bf16 tf logits", lambda: tf_logits(folder, torch.bfloat16, device, ids))
    if base is not None:
        check(
            rec, f"{name} bf16 hq-vs-tf", lambda: equal_or_diff(hq_logits(folder, "bf16", device, ids), base)
        )
    for method in METHODS:
        out = work / f"{name}-{method}"
        if (
            check(rec, f"{name} {method} quantize", lambda m=method, o=out: quantize(folder, o, m, device))
            is None
        ):
            continue
        hq = attempt(rec, f"{name} {method} hq load", lambda o=out: hq_logits(o, "bf16", device, ids))
        if hq is not None:
            rec(f"{name} {method} hq load", f"ok on {device}")
            if base is not None:
                rec(f"{name} {method} hq-vs-base(tf bf16)", f"max abs diff {max_diff(hq, base):.4g}")
            check(
                rec,
                f"{name} {method} hq-vs-tf",
                lambda o=out, h=hq: (
                    f"max abs diff {max_diff(h, tf_logits(o, torch.bfloat16, device, ids)):.4g}"
                ),
            )
        if device != "cpu":
            check(rec, f"{name} {method} hq load on cpu", lambda o=out, h=hq: cpu_load(o, ids, h))


def compiled_vs_eager(folder: Path, device: str, ids: torch.Tensor) -> str:
    """Greedy tokens of the compiled decode against eager, and the first compiled call's time."""
    import hubquant

    torch._dynamo.reset()  # one process, many models: drop the previous models' graphs
    model, _ = hubquant.load(folder, dtype="bf16", device=device, progress=False)
    prompt = ids[:1, :8].to(device)
    with torch.inference_mode():
        eager = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_ids=[], compile=False)
        start = time.perf_counter()
        compiled = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_ids=[], compile=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    del model
    free()
    if torch.equal(eager, compiled):
        return f"equal ({NEW_TOKENS} tokens; first compiled call {seconds:.1f} s)"
    same = int((eager == compiled).all(0).cumprod(0).sum()) - prompt.shape[1]
    return f"DIFFER after {same} of {NEW_TOKENS} tokens (first compiled call {seconds:.1f} s)"


def compile_order(work: Path) -> list[tuple[str, str, Path]]:
    """(family, method, folder) for the compile checks, most wanted first: every family's base, then
    llama's methods, then the other families' methods."""
    order = [(name, "bf16", work / name) for name in FAMILIES]
    for name in FAMILIES:
        order += [(name, m, work / f"{name}-{m}") for m in METHODS]
    return [item for item in order if (item[2] / "config.json").is_file()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--budget", type=float, default=0.0, help="start no compile check after this many s")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: tiny GPU check skipped")
        return 0
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.workdir / "tiny.json")
    if args.device.startswith("cuda"):
        rec("device", torch.cuda.get_device_name(torch.device(args.device)))
    ids = torch.randint(3, COMMON["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    families = [f for f in args.families.split(",") if f in FAMILIES]
    for name in families:
        parity(name, args.workdir, args.device, ids, rec)
    rec("parity done s", round(time.perf_counter() - start, 1))
    for name, method, folder in compile_order(args.workdir):
        if name not in families:
            continue
        key = f"{name} {method} compiled-vs-eager"
        if args.budget and time.perf_counter() - start > args.budget:
            rec(key, f"skipped: budget of {args.budget:.0f} s spent")
            continue
        check(rec, key, lambda f=folder: compiled_vs_eager(f, args.device, ids))
    rec("total s", round(time.perf_counter() - start, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
