"""Canonical models: one decoder parametrised by `ModelConfig`, families registered by architecture."""

from .config import ModelConfig, RopeConfig
from .decoder import Decoder, KVCache
from .families import Family, family_for, register, supported_architectures
from .generate import generate
from .loading import load
from .tokenizer import Tokenizer

__all__ = [
    "Decoder",
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
