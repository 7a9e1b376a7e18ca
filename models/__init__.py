"""Canonical models: one decoder parametrised by `ModelConfig`, families registered by architecture.

The public names are resolved on first use (PEP 562): importing `hubquant.models` (which the CLI
does to read the dtype names in `config.py`) must not import torch.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from hubquant import _LazyPackage

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from .config import ModelConfig, RopeConfig
    from .decoder import Decoder
    from .embed import embed
    from .encoder import Encoder, build_model
    from .families import Family, family_for, register, supported_architectures
    from .generate import generate
    from .layers import KVCache
    from .loading import load
    from .tokenizer import Tokenizer

# Public name -> the submodule (relative to this package) that defines it.
_LAZY: dict[str, str] = {
    "Decoder": "decoder",
    "Encoder": "encoder",
    "build_model": "encoder",
    "embed": "embed",
    "Family": "families",
    "KVCache": "layers",
    "ModelConfig": "config",
    "RopeConfig": "config",
    "Tokenizer": "tokenizer",
    "family_for": "families",
    "generate": "generate",
    "load": "loading",
    "register": "families",
    "supported_architectures": "families",
}

__all__ = [
    "Decoder",
    "Encoder",
    "build_model",
    "embed",
    "Family",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "Tokenizer",
    "family_for",
    "generate",
    "load",
    "register",
    "supported_architectures",
]


# A submodule import must not replace `generate` (the function) with models/generate.py.
sys.modules[__name__].__class__ = _LazyPackage
