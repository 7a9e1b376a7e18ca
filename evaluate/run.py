"""`hubquant eval`: load a checkpoint (default: the embedded SmolLM2) and measure it.

For now it measures the unquantized model: load time, perplexity on CPython's documentation text,
and greedy decoding speed. Quantized variants, agreement, lm-eval scores and the CSV/HTML report
build on this in the issues that follow.
"""

from __future__ import annotations

import time

import torch

from hubquant.errors import HubquantError
from hubquant.models import load
from hubquant.models.config import torch_dtype

from .perplexity import perplexity, pydoc_text

PROMPT = "The three most useful Python built-in functions are"


def run_eval(
    model_source: str | None,
    *,
    revision: str | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    window: int = 512,
    stride: int = 256,
    max_tokens: int = 4096,
) -> dict[str, float]:
    """Load `model_source` and print (and return) its figures, each with its method."""
    if model_source is None:
        from hubquant.convert import DEFAULT_MODEL_NAME, default_model

        source, name = default_model(), DEFAULT_MODEL_NAME
    else:
        source, name = model_source, model_source
    start = time.perf_counter()
    model, tokenizer = load(source, revision=revision, dtype=torch_dtype(dtype), device=device)
    load_s = time.perf_counter() - start
    if tokenizer is None:
        raise HubquantError(f"{name} ships no tokenizer.json; evaluation needs its tokenizer")

    text = pydoc_text()[: max_tokens * 8]  # ample characters for max_tokens tokens
    ids = torch.tensor(tokenizer.encode(text)[:max_tokens])
    ppl = perplexity(model, ids, window=window, stride=stride)

    prompt = torch.tensor([tokenizer.encode(PROMPT)], device=device)
    model.generate(prompt, max_new_tokens=4, eos_ids=[])  # warm-up, left out of the figure
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=32, eos_ids=[])
    decode_s = time.perf_counter() - start
    new = out.shape[1] - prompt.shape[1]

    print(
        f"model      {name}  ({dtype}, {device}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)"
    )
    print(f"load       {load_s:.2f} s")
    print(f"perplexity {ppl.perplexity:.3f}  (CPython pydoc topics text; {ppl.method()})")
    print(
        f"generate   {new / decode_s:.1f} tokens/s  (greedy, batch 1, {new} new tokens after a {prompt.shape[1]}-token prompt, one run after warm-up)"
    )
    print(f"sample     {PROMPT}{tokenizer.decode(out[0, prompt.shape[1] :])!r}")
    return {"load_s": load_s, "perplexity": ppl.perplexity, "decode_tok_s": new / decode_s}
