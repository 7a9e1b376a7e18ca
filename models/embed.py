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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hubquant.errors import HubquantError
from hubquant.files import read_json

if TYPE_CHECKING:
    from .config import ModelConfig
    from .encoder import Encoder
    from .tokenizer import Tokenizer

# sentence-transformers' pooling modes, in the order it concatenates them, with their config keys.
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
_UNSUPPORTED_POOLING = ("pooling_mode_weightedmean_tokens",)
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
_FIX = "re-download the checkpoint"


@dataclass(frozen=True)
class SentenceConfig:
    """How token states become one sentence vector.

    Attributes:
        pooling: pooling modes, concatenated in this order.
        normalize: L2-normalise the pooled vector.
        max_length: tokens kept per text (special tokens included).
        lowercase: lower-case texts before tokenizing (sentence_bert_config's do_lower_case).
        declared: read from a sentence-transformers layout (False: the plain-model default).
        unsupported: why this folder's pipeline cannot be reproduced (a module hubquant lacks).
    """

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_length: int = 512
    lowercase: bool = False
    declared: bool = False
    unsupported: str | None = None

    def describe(self) -> str:
        norm = ", L2-normalised" if self.normalize else ""
        where = "declared by the checkpoint" if self.declared else "default for a plain model"
        return f"{'+'.join(self.pooling)} pooling{norm}, max {self.max_length} tokens ({where})"


def read_sentence_config(folder: Path, cfg: ModelConfig) -> SentenceConfig:
    """The sentence pipeline a checkpoint folder declares (see the module docstring).

    Args:
        folder: the checkpoint folder.
        cfg: the model's config (its positions bound the truncation length).
    """
    max_length = cfg.max_position
    st_path = folder / "sentence_bert_config.json"
    st = read_json(st_path, st_path.name, _FIX) if st_path.is_file() else {}
    if st.get("max_seq_length"):
        max_length = min(int(st["max_seq_length"]), cfg.max_position)
    lowercase = bool(st.get("do_lower_case", False))
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return SentenceConfig(max_length=max_length, lowercase=lowercase)
    modules = read_json(modules_path, modules_path.name, _FIX, kind=list)
    pooling: tuple[str, ...] = ()
    normalize = False
    unsupported = None
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _KNOWN_MODULES:
            unsupported = unsupported or f"module {module.get('type')} in {modules_path}"
        elif kind == "Pooling":
            pooling, why = _pooling(folder / module.get("path", "1_Pooling") / "config.json")
            unsupported = unsupported or why
        elif kind == "Normalize":
            normalize = True
    return SentenceConfig(
        pooling=pooling or ("mean",),
        normalize=normalize,
        max_length=max_length,
        lowercase=lowercase,
        declared=True,
        unsupported=unsupported,
    )


def _pooling(path: Path) -> tuple[tuple[str, ...], str | None]:
    if not path.is_file():
        return ("mean",), None  # sentence-transformers' Pooling default
    config = read_json(path, path.name, _FIX)
    if isinstance(config.get("pooling_mode"), str):  # newer configs may name one mode
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(
            config["pooling_mode"], config["pooling_mode"]
        )
        if mode not in POOLING_KEYS:
            return (), f"pooling mode '{config['pooling_mode']}' in {path}"
        return (mode,), None
    for key in _UNSUPPORTED_POOLING:
        if config.get(key):
            return (), f"{key} in {path}"
    return tuple(mode for mode, key in POOLING_KEYS.items() if config.get(key)), None


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
    from .encoder import Encoder

    if batch_size < 1:
        raise HubquantError(f"batch_size {batch_size}: embed at least 1 text per batch")
    if isinstance(source_or_model, (str, Path)):
        from .loading import load

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
            f"supported (hubquant applies {', '.join(_KNOWN_MODULES)} modules)"
        )
    texts = [texts] if isinstance(texts, str) else list(texts)
    width = model.config.hidden_size * len(sentence.pooling)
    if not texts:
        return torch.zeros(0, width)
    if sentence.lowercase:
        texts = [t.lower() for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), width)
    from tqdm.auto import tqdm

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
