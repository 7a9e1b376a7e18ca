"""Families: one class per architecture, one file per family.

Each family translates `config.json` into `ModelConfig` (missing keys take the reference's
defaults), maps Hub tensor names to canonical ones, and knows its llama.cpp GGUF side. Adding a
family is one class in one file here, plus its tests.

| file         | architecture          | GGUF      |
|--------------|-----------------------|-----------|
| `llama.py`   | `LlamaForCausalLM`    | `llama`   |
| `gemma.py`   | `GemmaForCausalLM`    | `gemma`   |
| `phi.py`     | `PhiForCausalLM`      | `phi2`    |
| `apertus.py` | `ApertusForCausalLM`  | `apertus` |
| `bert.py`    | `BertModel`, `BertForMaskedLM`, `BertForPreTraining` (encoders) | none |
"""

from .apertus import Apertus
from .base import (
    Family,
    GGUFMetadata,
    family_for,
    family_for_gguf,
    hparam,
    register,
    rope_from_hf,
    supported_architectures,
    supported_gguf_architectures,
)
from .bert import BertForMaskedLM, BertForPreTraining, BertModel
from .gemma import Gemma
from .llama import Llama
from .phi import Phi

__all__ = [
    "Apertus",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertModel",
    "Family",
    "GGUFMetadata",
    "Gemma",
    "Llama",
    "Phi",
    "family_for",
    "family_for_gguf",
    "hparam",
    "register",
    "rope_from_hf",
    "supported_architectures",
    "supported_gguf_architectures",
]
