"""What a sentence-transformers folder declares about its vectors: `modules.json` lists the modules
(Transformer, Pooling, Normalize), `1_Pooling/config.json` the pooling modes, and
`sentence_bert_config.json` the truncation length. A folder without `modules.json` gets what
sentence-transformers gives a plain Hub model: mean pooling, no normalisation, truncation at the
model's positions. Read when a checkpoint loads; applied by `embed.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.files import read_json

if TYPE_CHECKING:
    from .config import ModelConfig

# sentence-transformers' pooling modes, in the order it concatenates them, with their config keys.
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
_UNSUPPORTED_POOLING = ("pooling_mode_weightedmean_tokens",)
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
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
        if kind not in KNOWN_MODULES:
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
