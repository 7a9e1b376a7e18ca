"""`embed()`: sentence embeddings from an encoder, pooled and normalised as its checkpoint declares.

A sentence-transformers folder says how its vectors are made: `modules.json` lists the modules
(Transformer, Pooling, Normalize), `1_Pooling/config.json` the pooling modes, and
`sentence_bert_config.json` the truncation length. Those are applied here as sentence-transformers
applies them (pooling modes concatenated in its order: cls, max, mean, mean_sqrt_len, lasttoken;
mean over real tokens only; max with padding set to -1e9; L2 normalisation last). A folder without
`modules.json` gets what sentence-transformers gives a plain Hub model: mean pooling, no
normalisation, truncation at the model's positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from hubquant.errors import HubquantError

from .encoder import Encoder
from .loading import load
from .sentence import KNOWN_MODULES, POOLING_KEYS, SentenceConfig

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Sentence vectors `[batch, hidden x len(modes)]` from token states and the attention mask.

    Args:
        hidden: the encoder's last hidden state `[batch, seq, hidden]`.
        mask: 1 for real tokens, 0 for padding `[batch, seq]` (right padding).
        modes: pooling modes, from `POOLING_KEYS`.
    """
    m = mask.to(hidden.dtype)[..., None]
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, -1e9).max(1).values)
        elif mode in ("mean", "mean_sqrt_len"):
            total = (hidden * m).sum(1)
            count = m.sum(1).clamp_min(1e-9)
            out.append(total / count if mode == "mean" else total / count.sqrt())
        elif mode == "lasttoken":
            last = (mask.long().sum(1) - 1).clamp_min(0)
            out.append(hidden[torch.arange(hidden.shape[0]), last])
        else:
            raise HubquantError(
                f"pooling mode '{mode}' is not supported; use one of {', '.join(POOLING_KEYS)}"
            )
    return torch.cat(out, dim=-1)


def tokenize(
    tokenizer: Tokenizer, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(input_ids, attention_mask)`, each text truncated to `max_length` tokens with
    its special tokens kept (as transformers' tokenizer call with truncation=True does)."""
    backend = tokenizer.backend
    backend.enable_truncation(max_length)
    try:
        rows = [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=True)]
    finally:
        backend.no_truncation()
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def embed(
    source_or_model: str | Path | Encoder,
    texts: str | Sequence[str],
    *,
    batch_size: int = 32,
    tokenizer: Tokenizer | None = None,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Sentence embeddings `[n, dim]` (fp32, on the CPU), one row per text, in the texts' order.

    Args:
        source_or_model: a Hub repo id or folder of an encoder checkpoint, or an `Encoder` from
            `hubquant.load` (quantized or not).
        texts: one text or several.
        batch_size: texts per forward pass (texts are sorted by length first, so batches pad little).
        tokenizer: the tokenizer, when a model is given that `load` did not make.
        dtype, device: only when loading from a source: the model's dtype and device.
        progress: show progress bars.

    Raises:
        HubquantError: a decoder checkpoint, a pipeline module hubquant does not reproduce, a
            missing tokenizer, or batch_size < 1.
    """
    if batch_size < 1:
        raise HubquantError(f"batch_size {batch_size}: embed at least 1 text per batch")
    if isinstance(source_or_model, (str, Path)):
        model, tokenizer = load(source_or_model, dtype=dtype, device=device, progress=progress)
    else:
        model = source_or_model
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if not isinstance(model, Encoder):
        raise HubquantError(
            "embed needs an encoder checkpoint (BertModel, e.g. a sentence-transformers model); "
            "this one is a decoder"
        )
    if tokenizer is None:
        raise HubquantError("the checkpoint ships no tokenizer.json; embed needs its tokenizer")
    sentence: SentenceConfig = getattr(model, "sentence", None) or SentenceConfig(
        max_length=model.config.max_position
    )
    if sentence.unsupported:
        raise HubquantError(
            f"cannot reproduce this sentence-transformers pipeline: {sentence.unsupported} is not "
            f"supported (hubquant applies {', '.join(KNOWN_MODULES)} modules)"
        )
    texts = [texts] if isinstance(texts, str) else list(texts)
    width = model.config.hidden_size * len(sentence.pooling)
    if not texts:
        return torch.zeros(0, width)
    if sentence.lowercase:
        texts = [t.lower() for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), width)
    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="embed", unit="batch", disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            ids, mask = tokenize(tokenizer, [texts[i] for i in rows], sentence.max_length)
            ids, mask = ids.to(model.device), mask.to(model.device)
            hidden = model.hidden_states(ids, mask)
            vectors = pool(hidden, mask, sentence.pooling).float()
            if sentence.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            out[rows] = vectors.cpu()
    return out
