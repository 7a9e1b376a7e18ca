"""Token generation with the preallocated KV cache: greedy or sampled, stopping at eos."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decoder import Decoder, KVCache


def _pick(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


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
) -> torch.Tensor:
    """Continue `input_ids` `[batch, seq]` by up to `max_new_tokens` tokens.

    Args:
        model: the decoder.
        input_ids: prompts, left-padded when of different lengths.
        attention_mask: 1 for real tokens, 0 for padding.
        max_new_tokens: the most tokens added per row.
        do_sample: sample (with `temperature`, `top_k`, `top_p`) instead of greedy argmax.
        eos_ids: stop ids (default: the model config's); a row that produced one is finished
            and padded with `pad_id` (default: its first eos id) until all rows finish.
        generator: random generator for reproducible sampling.

    Returns:
        `[batch, seq + n]` token ids, prompts included.
    """
    eos = list(model.config.eos_token_ids if eos_ids is None else eos_ids)
    pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
    batch, seq = input_ids.shape
    cache = KVCache(model.config, batch, seq + max_new_tokens, model.dtype, input_ids.device)
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
            logits = model(token[:, None], None, cache, last_only=True)[:, -1]
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
