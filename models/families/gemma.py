"""Gemma 1: Llama with RMSNorm scaled by (1 + weight), embeddings scaled by sqrt(hidden), GeGLU.

Hub: `GemmaForCausalLM`. GGUF: llama.cpp's `gemma`, whose converter stores norm weights plus one
and always ties the head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import ModelConfig
from .base import GGUFMetadata, register, str_param
from .llama import Llama


@register("GemmaForCausalLM")
class Gemma(Llama):
    name = "gemma"
    model_type = "gemma"
    # transformers' GemmaConfig: head_dim and num_key_value_heads are fixed numbers, not derived.
    defaults = {
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "attention_bias": False,
    }
    bos_required = True
    gguf_arch = "gemma"
    gguf_permute_qk = False
    gguf_norm_offset = 1.0

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        hf = cls.with_defaults(hf)
        # Gemma's released configs say "gelu" but it was trained with the tanh approximation;
        # transformers reads it so, and ignores the older `hidden_activation` key.
        act = str_param(hf, "hidden_act")
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        base = super().config({**hf, "hidden_act": act, "mlp_bias": False})
        return dataclasses.replace(base, norm_unit_offset=True, embedding_scale=math.sqrt(base.hidden_size))

    @classmethod
    def gguf_config(
        cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int, tied: bool
    ) -> dict[str, Any]:
        config = cls.gguf_common(meta, special_ids, vocab_size)
        config.update(
            head_dim=cls.gguf_head_dim(meta, config, "attention.key_length"),
            rms_norm_eps=meta.arch_float("attention.layer_norm_rms_epsilon", 1e-6, open_low=False),
            hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=False,
            tie_word_embeddings=tied,
        )
        return config
