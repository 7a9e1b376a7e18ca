"""Token generation with the preallocated KV cache: greedy or sampled, stopping at eos.

Sampling filters the logits exactly as transformers' `generate` does with `do_sample=True`:
temperature, then top-k, then top-p, on fp32 logits (`filter_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from hubquant.errors import HubquantError

from .compiled import advance, bucketed, compiled_step, static_cache
from .layers import KVCache

if TYPE_CHECKING:
    from .decoder import Decoder


def filter_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The logits that sampling draws from: scaled, with `-inf` wherever top-k or top-p filters.

    The same operations, in the same order and precision, as transformers' `TemperatureLogitsWarper`,
    `TopKLogitsWarper` and `TopPLogitsWarper` (with `min_tokens_to_keep=1`), so the kept set and
    the kept values are identical to theirs, ties and the threshold included:

    - top-k keeps every token whose logit is at least the k-th largest (ties at the k-th all stay);
    - top-p sorts ascending, and drops a token when the probability mass up to and including it is
      at most `1 - top_p`; the most probable token always stays.

    Args:
        logits: `[..., vocab]` logits of any floating dtype; computed in fp32.
        temperature: divides the logits (> 0; 1.0 leaves them as they are).
        top_k: keep the k most likely tokens; None or 0 disables it; k >= vocab keeps all.
        top_p: keep the smallest set of most likely tokens whose probability reaches `top_p`
            (0..1); None or 1.0 disables it.

    Returns:
        fp32 logits, `-inf` where filtered.
    """
    _check_sampling(temperature, top_k, top_p)
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = scores.sort(dim=-1, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise HubquantError(f"temperature ({temperature}) must be > 0; for greedy decoding, do not sample")
    if top_k is not None and top_k < 0:
        raise HubquantError(f"top_k ({top_k}) must be >= 0 (0 or None: no top-k filtering)")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise HubquantError(f"top_p ({top_p}) must be in 0..1 (1.0 or None: no top-p filtering)")


def _pick(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not do_sample:
        # In fp32: the same index (the cast is exact; ties go to the first either way), and torch's
        # CPU argmax over bf16 is scalar code (180 us for a 49152-token vocabulary against 65 us).
        return logits.float().argmax(-1)
    scores = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Continue `input_ids` `[batch, seq]` by up to `max_new_tokens` tokens.

    Args:
        model: the decoder.
        input_ids: prompts, left-padded when of different lengths.
        attention_mask: 1 for real tokens, 0 for padding.
        max_new_tokens: the most tokens added per row.
        do_sample: sample instead of greedy argmax, from the logits `filter_logits` leaves.
        temperature: sampling temperature (> 0).
        top_k: sample from the k most likely tokens only (None or 0: all).
        top_p: sample from the smallest set of likely tokens whose probability reaches it (None: all).
        eos_ids: stop ids (default: the model config's); a row that produced one is finished
            and padded with `pad_id` until all rows finish.
        pad_id: the id finished rows are padded with (default: the first eos id, else 0).
        generator: random generator for reproducible sampling.
        compile: run each step after the prompt as one compiled graph (`hubquant.models.compiled`:
            inductor on the CPU, CUDA graphs on a GPU; the first call compiles, later calls and
            later processes reuse it). The prompt runs eagerly.

    Returns:
        `[batch, seq + n]` token ids, prompts included.
    """
    if do_sample:
        _check_sampling(temperature, top_k, top_p)  # before any forward pass
    eos = list(model.config.eos_token_ids if eos_ids is None else eos_ids)
    pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
    batch, seq = input_ids.shape
    step_fn = None
    if compile:
        slots = bucketed(seq + max_new_tokens)
        step_fn = compiled_step(model, (batch, slots))
        cache = static_cache(model, batch, slots, model.dtype, input_ids.device)
    else:
        cache = KVCache(model.config, batch, seq + max_new_tokens, model.dtype, input_ids.device)
    slot = cache.slot
    stop = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new: list[torch.Tensor] = []
    logits = model(input_ids, attention_mask, cache, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        if eos:
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            if step_fn is not None and slot is not None:
                if step == 0:
                    slot.fill_(cache.length)  # the first slot after the prompt
                logits = step_fn(model, token[:, None], cache, slot)
                advance(cache, slot)
            else:
                logits = model(token[:, None], None, cache, last_only=True)[:, -1]
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
