"""Apertus: Llama with an ungated xIELU MLP, q/k RMSNorm, two renamed norms, and llama3 RoPE
(theta 12e6) as its default.

Hub: `ApertusForCausalLM`. GGUF: llama.cpp's `apertus`, whose converter leaves q/k unpermuted and
keeps each layer's xIELU parameters as metadata arrays (`xielu.alpha_p`, ...) rather than tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hubquant.errors import HubquantError

from ..config import ModelConfig
from .base import GGUFMetadata, register
from .llama import LLAMA_MODULES, Llama

_XIELU = ("alpha_p", "alpha_n", "beta", "eps")


@register("ApertusForCausalLM")
class Apertus(Llama):
    name = "apertus"
    model_type = "apertus"
    modules = {
        **{k: v for k, v in LLAMA_MODULES.items() if "layernorm" not in k and "gate_proj" not in k},
        "model.layers.{}.attention_layernorm": "layers.{}.attn_norm",
        "model.layers.{}.feedforward_layernorm": "layers.{}.mlp_norm",
        "model.layers.{}.self_attn.q_norm": "layers.{}.attn.q_norm",
        "model.layers.{}.self_attn.k_norm": "layers.{}.attn.k_norm",
        "model.layers.{}.mlp.act_fn": "layers.{}.mlp.act",
    }
    # transformers' ApertusConfig.
    defaults = {
        "vocab_size": 131072,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "xielu",
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 3,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "rope_theta": 12000000.0,
        "attention_bias": False,
    }
    # With no RoPE dict at all, transformers uses these (a top-level rope_theta does not override).
    default_rope = {
        "rope_type": "llama3",
        "rope_theta": 12000000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    gguf_arch = "apertus"
    gguf_permute_qk = False

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        hf = cls.with_defaults(hf)
        base = super().config({**hf, "mlp_bias": False})
        return dataclasses.replace(base, mlp="plain", qk_norm="rms")

    @classmethod
    def gguf_config(
        cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int, tied: bool
    ) -> dict[str, Any]:
        config = super().gguf_config(meta, special_ids, vocab_size, tied)
        config["hidden_act"] = "xielu"
        # Written out even when plain: Apertus' own default is llama3, which would change the model.
        config.setdefault("rope_scaling", {"rope_type": "default", "rope_theta": config["rope_theta"]})
        return config

    @classmethod
    def gguf_metadata_tensors(cls, meta: GGUFMetadata, hf: dict[str, Any]) -> dict[str, np.ndarray]:
        layers = int(hf["num_hidden_layers"])
        shapes = cls.hub_shapes(hf)
        out = {}
        for param in _XIELU:
            values = meta.get(f"xielu.{param}")
            if values is None or len(values) != layers:
                found = "missing" if values is None else f"{len(values)} values"
                raise HubquantError(
                    f"GGUF metadata 'xielu.{param}' must hold one value per layer ({layers}), "
                    f"found {found}: {meta.path}"
                )
            for layer, value in enumerate(values):
                name = f"model.layers.{layer}.mlp.act_fn.{param}"
                out[name] = np.full(shapes[name], value, dtype=np.float32)
        return out
