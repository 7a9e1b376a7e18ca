"""Phi-1, phi-1.5, phi-2: LayerNorm, attention and MLP in parallel on one norm, partial rotary,
biases everywhere (the head too), optional q/k LayerNorm.

Hub: `PhiForCausalLM`. GGUF: llama.cpp's `phi2`, which may keep the attention as one fused qkv tensor.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, GGUFMetadata, activation, bool_param, float_param, register, str_param


@register("PhiForCausalLM")
class Phi(Family):
    name = "phi"
    model_type = "phi"
    modules = {
        "model.embed_tokens": "embed",
        "model.final_layernorm": "norm",
        "lm_head": "lm_head",
        "model.layers.{}.input_layernorm": "layers.{}.attn_norm",
        "model.layers.{}.self_attn.q_proj": "layers.{}.attn.q",
        "model.layers.{}.self_attn.k_proj": "layers.{}.attn.k",
        "model.layers.{}.self_attn.v_proj": "layers.{}.attn.v",
        "model.layers.{}.self_attn.dense": "layers.{}.attn.o",
        "model.layers.{}.self_attn.q_layernorm": "layers.{}.attn.q_norm",
        "model.layers.{}.self_attn.k_layernorm": "layers.{}.attn.k_norm",
        "model.layers.{}.mlp.fc1": "layers.{}.mlp.up",
        "model.layers.{}.mlp.fc2": "layers.{}.mlp.down",
    }
    # transformers' PhiConfig; partial_rotary_factor 0.5 unless given.
    defaults = {
        "vocab_size": 51200,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "qk_layernorm": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    default_rotary_fraction = 0.5
    gguf_arch = "phi2"
    gguf_fused = {"attn_qkv": ("attn_q", "attn_k", "attn_v")}

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        hf = cls.with_defaults(hf)
        common = cls.common(hf)
        return ModelConfig(
            **common,
            norm="layer",
            norm_eps=float_param(hf, "layer_norm_eps", low=0.0),
            mlp="plain",
            act=activation(str_param(hf, "hidden_act")),
            parallel_residual=True,
            qk_norm="layer" if bool_param(hf, "qk_layernorm") else None,
            attn_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            head_bias=True,
        )

    @classmethod
    def gguf_config(
        cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int, tied: bool
    ) -> dict[str, Any]:
        config = cls.gguf_common(meta, special_ids, vocab_size)
        head_dim = cls.gguf_head_dim(meta, config)
        rotary = meta.arch_int("rope.dimension_count", head_dim, limit="head_dim")
        if rotary > head_dim:
            raise meta.refuse(
                f"GGUF metadata '{meta.arch}.rope.dimension_count' ({rotary}) is larger than the head size "
                f"({head_dim})"
            )
        config.update(
            partial_rotary_factor=rotary / head_dim,
            layer_norm_eps=meta.arch_float("attention.layer_norm_epsilon", 1e-5, open_low=False),
            hidden_act="gelu_new",
            qk_layernorm=False,
            tie_word_embeddings=tied,
        )
        return config
