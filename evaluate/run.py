"""`hubquant eval`: load a checkpoint (default: the embedded SmolLM2) and measure it.

For now it measures the unquantized model: load time, perplexity on CPython's documentation text,
and greedy decoding speed. Quantized variants, agreement, lm-eval scores and the CSV/HTML report
build on this in the issues that follow.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hubquant.errors import HubquantError
from hubquant.models import load
from hubquant.models.config import torch_dtype
from hubquant.models.hub import resolve

from .perplexity import perplexity, pydoc_text

PROMPT = "The three most useful Python built-in functions are"
CHARS_PER_TOKEN = 8  # text taken per requested token: ample for any tokenizer on English prose


def eval_ids(tokenizer: Any, max_tokens: int) -> torch.Tensor:
    """The token ids perplexity is measured on: the first `max_tokens` tokens of CPython's pydoc
    topics text, encoded with special tokens (bos where the tokenizer adds one).

    Args:
        tokenizer: anything with `encode(text) -> list[int]`.
        max_tokens: how many tokens to keep.
    """
    text = pydoc_text()[: max_tokens * CHARS_PER_TOKEN]
    return torch.tensor(tokenizer.encode(text)[:max_tokens])


def run_eval(
    model_source: str | None,
    *,
    revision: str | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    window: int = 512,
    stride: int = 256,
    max_tokens: int = 4096,
    progress: bool = True,
) -> dict[str, float]:
    """Load `model_source`, print its figures, each with its method, and return them.

    Args:
        model_source: a Hub repo id or a local folder; None: the embedded SmolLM2-135M-Instruct.
        revision: Hub branch, tag or commit.
        dtype: "bf16", "fp16" or "fp32".
        device: where the model runs.
        window: perplexity window, tokens.
        stride: tokens between perplexity windows (1..window).
        max_tokens: text tokens to measure perplexity on.
        progress: show progress bars.

    Returns:
        `load_s`, `perplexity`, `nll` (nats per scored token), `tokens` (scored), `windows`,
        `decode_tok_s`.
    """
    # Cheap checks first, so that a typo fails before minutes of downloading and loading.
    # (perplexity() checks window and stride again; here the message names the flags.)
    if window < 2 or not 1 <= stride <= window:
        raise HubquantError(
            f"--window {window} --stride {stride}: the window must be 2 or more tokens and the "
            "stride between 1 and the window"
        )
    if max_tokens < 2:
        raise HubquantError(f"--max-tokens {max_tokens}: perplexity needs 2 tokens or more")
    torch_dtype(dtype)
    if model_source is None:
        from hubquant.convert import DEFAULT_MODEL_NAME, default_model

        folder, name = default_model(), DEFAULT_MODEL_NAME
    else:
        folder, name = resolve(model_source, revision), model_source
    if not (folder / "tokenizer.json").is_file():
        raise HubquantError(
            f"{name} ships no tokenizer.json; evaluation needs its tokenizer "
            "(convert a checkpoint that has one, or add its tokenizer.json to the folder)"
        )

    start = time.perf_counter()
    model, tokenizer = load(folder, dtype=torch_dtype(dtype), device=device, progress=progress)
    load_s = time.perf_counter() - start
    assert tokenizer is not None  # tokenizer.json is there

    ids = eval_ids(tokenizer, max_tokens)
    ppl = perplexity(model, ids, window=window, stride=stride, progress=progress)

    prompt = torch.tensor([tokenizer.encode(PROMPT)], device=device)
    model.generate(prompt, max_new_tokens=4, eos_ids=[])  # warm-up, left out of the figure
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=32, eos_ids=[])
    decode_s = time.perf_counter() - start
    new = out.shape[1] - prompt.shape[1]

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model      {name}  ({dtype}, {device}, {params:.1f}M params)")
    print(f"load       {load_s:.2f} s  (hubquant.load wall time, files already local, one run)")
    print(
        f"perplexity {ppl.perplexity:.3f}  (CPython pydoc topics text, first {ids.numel()} tokens; "
        f"{ppl.method()})"
    )
    print(
        f"generate   {new / decode_s:.1f} tokens/s  (greedy, batch 1, {new} new tokens after a "
        f"{prompt.shape[1]}-token prompt, one run after warm-up)"
    )
    print(f"sample     {PROMPT}{tokenizer.decode(out[0, prompt.shape[1] :])!r}")
    return {
        "load_s": load_s,
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "windows": ppl.windows,
        "decode_tok_s": new / decode_s,
    }
