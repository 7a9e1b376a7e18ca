"""Speed and memory of one loaded model, measured the same way for every variant.

The device is synchronised before every clock read; one warm-up run of each measurement is left
out of the figures; each figure is the mean and standard deviation over `runs` runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hubquant.quantize.base import tensor_bytes


def sync(device: torch.device | str) -> None:
    """Wait for queued work on a CUDA device, so that a clock read after it is true."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _times(
    fn: Callable[[], object], device: torch.device | str, runs: int, warmup: list[float] | None = None
) -> list[float]:
    sync(device)
    start = time.perf_counter()
    fn()  # warm-up, left out (its time goes to `warmup` when given: a compile's cost)
    sync(device)
    if warmup is not None:
        warmup.append(time.perf_counter() - start)
    out = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


@torch.inference_mode()
def measure_speed(
    model: torch.nn.Module,
    *,
    vocab_size: int,
    ctx: int = 512,
    decode_tokens: int = 128,
    runs: int = 3,
    device: torch.device | str = "cpu",
    compile: bool = False,
) -> dict[str, float]:
    """Prefill tokens/s (one forward over `ctx` tokens, batch 1), decode tokens/s (`decode_tokens`
    greedy tokens after a 16-token prompt, batch 1, KV cache) and time to first token (16-token
    prompt), each as mean and standard deviation over `runs` runs after a warm-up.

    Args:
        model: the decoder.
        vocab_size: ids are drawn below it.
        ctx: prefill length.
        decode_tokens: new tokens per decode run.
        runs: measured runs (at least 3 for a standard deviation worth stating).
        device: the model's device.
        compile: decode with the compiled step (its compile happens in the warm-up run, whose
            time is returned as `decode_warmup_s`).
    """
    gen = torch.Generator().manual_seed(0)
    long = torch.randint(100 if vocab_size > 200 else 0, vocab_size, (1, ctx), generator=gen).to(device)
    prompt = long[:, :16]
    prefill = [ctx / t for t in _times(lambda: model(long), device, runs)]
    warmup: list[float] = []
    decode = [
        decode_tokens / t
        for t in _times(
            lambda: model.generate(prompt, max_new_tokens=decode_tokens, eos_ids=[], compile=compile),
            device,
            runs,
            warmup,
        )
    ]
    ttft = _times(lambda: model.generate(prompt, max_new_tokens=1, eos_ids=[]), device, runs)
    return {
        "prefill_tok_s": statistics.mean(prefill),
        "prefill_sd": statistics.stdev(prefill) if runs > 1 else 0.0,
        "decode_tok_s": statistics.mean(decode),
        "decode_sd": statistics.stdev(decode) if runs > 1 else 0.0,
        "ttft_s": statistics.mean(ttft),
        **({"decode_warmup_s": warmup[0]} if compile else {}),
    }


@torch.inference_mode()
def measure_encode_speed(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    runs: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Encoder throughput: sequences/s of one forward over the batch `ids` (attention mask all
    ones), the median over `runs` timed runs after one warm-up, with their standard deviation.

    The forward is the model's own call: MLM logits for a masked-LM head, else the last hidden
    state (the pooling of a sentence vector is a mean over it, negligible beside the layers).

    Args:
        model: the encoder.
        ids: token ids `[batch, length]` (encode_batch x encode_length, e.g. 32 x 128).
        runs: timed runs.
        device: the model's device.
    """
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    rates = [ids.shape[0] / t for t in _times(lambda: model(ids, attention_mask=mask), device, runs)]
    return {
        "encode_seq_s": statistics.median(rates),
        "encode_sd": statistics.stdev(rates) if runs > 1 else 0.0,
    }


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size since the last `reset_peak_rss` (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Restart the peak RSS count from the current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def kernel_notes(model: torch.nn.Module) -> list[str]:
    """What runs a variant's products where hubquant runs them otherwise than the saved tensors'
    library would eagerly (a `hubquant_kernel` sentence on the module's class), one line each, so
    that its row says what its figures timed."""
    notes = {getattr(type(module), "hubquant_kernel", None) for module in model.modules()}
    return sorted(note for note in notes if note)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as held at run time: quantized projections as their runtime
    layout holds them (the quantization report's figure), everything else as stored, a tied head
    counted once."""

    report = getattr(model, "quant_report", None)
    quantized = {r.name: r.runtime_bytes for r in report.layers if not r.skipped} if report else {}
    seen: set[int] = set()
    total = sum(quantized.values())
    for name, module in model.named_modules():
        if name in quantized:
            continue
        if any(name.startswith(q + ".") for q in quantized):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor_bytes(tensor)
    return total
