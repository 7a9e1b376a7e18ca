"""Llama 1/2/3 and kin (SmolLM, TinyLlama): the family the others are written as differences from.

Hub: `LlamaForCausalLM`. GGUF: llama.cpp's `llama`, whose converter interleaves the q/k rows of each
head for its rotary kernel and keeps Llama 3's RoPE bands only as a `rope_freqs` tensor.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, GGUFMetadata, activation, bool_param, float_param, register, str_param

LLAMA_MODULES: dict[str, str | None] = {
    "model.embed_tokens": "embed",
    "model.norm": "norm",
    "lm_head": "lm_head",
    "model.layers.{}.input_layernorm": "layers.{}.attn_norm",
    "model.layers.{}.post_attention_layernorm": "layers.{}.mlp_norm",
    "model.layers.{}.self_attn.q_proj": "layers.{}.attn.q",
    "model.layers.{}.self_attn.k_proj": "layers.{}.attn.k",
    "model.layers.{}.self_attn.v_proj": "layers.{}.attn.v",
    "model.layers.{}.self_attn.o_proj": "layers.{}.attn.o",
    "model.layers.{}.mlp.gate_proj": "layers.{}.mlp.gate",
    "model.layers.{}.mlp.up_proj": "layers.{}.mlp.up",
    "model.layers.{}.mlp.down_proj": "layers.{}.mlp.down",
}


@register("LlamaForCausalLM")
class Llama(Family):
    """Llama: RMSNorm, SwiGLU, GQA, RoPE (default, linear, dynamic NTK or llama3 bands)."""

    name = "llama"
    model_type = "llama"
    modules = LLAMA_MODULES
    # Old checkpoints store the RoPE table; it is derived from config.json instead.
    dropped = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)
    # transformers' LlamaConfig (head_dim: hidden / heads, num_key_value_heads: heads).
    defaults = {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
    }
    gguf_arch = "llama"
    gguf_permute_qk = True

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        hf = cls.with_defaults(hf)
        common = cls.common(hf)
        bias = bool_param(hf, "attention_bias")
        return ModelConfig(
            **common,
            norm="rms",
            norm_eps=float_param(hf, "rms_norm_eps", low=0.0),
            mlp="gated",
            act=activation(str_param(hf, "hidden_act")),
            attn_bias=bias,
            attn_out_bias=bias,
            mlp_bias=bool_param(hf, "mlp_bias", default=False),
        )

    @classmethod
    def gguf_config(
        cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int, tied: bool
    ) -> dict[str, Any]:
        config = cls.gguf_common(meta, special_ids, vocab_size)
        config.update(
            head_dim=cls.gguf_head_dim(meta, config, "attention.key_length", "rope.dimension_count"),
            rms_norm_eps=meta.arch_float("attention.layer_norm_rms_epsilon", 1e-6, open_low=False),
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=tied,
        )
        scaling = meta.rope_scaling(config["rope_theta"], config["head_dim"])
        if scaling:
            config["rope_scaling"] = scaling
        return config
