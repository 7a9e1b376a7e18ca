"""Families: each maps one `config.json` architecture onto `ModelConfig` and Hub weight names.

A family is a small class registered under its architecture string(s); most are written as a
difference from Llama. Weight names are a plain, invertible map from Hub module paths to
canonical module paths (`{}` stands for the layer index); the parameter's own name
(`weight`, `bias`, `alpha_p`...) carries over unchanged. A Hub name mapped to `None` is dropped on
purpose; any other unknown name is an error at load time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

from hubquant.errors import HubquantError

from .config import ModelConfig, RopeConfig

_REGISTRY: dict[str, type[Family]] = {}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def register(*architectures: str):
    """Class decorator: make a family the handler of these `architectures` strings."""

    def wrap(cls: type[Family]) -> type[Family]:
        for arch in architectures:
            _REGISTRY[arch] = cls
        cls.architectures = architectures
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def family_for(hf_config: dict[str, Any]) -> type[Family]:
    """The family registered for `config.json`'s `architectures[0]`, or a one-line error."""
    archs = hf_config.get("architectures") or []
    if not archs:
        raise HubquantError(
            'config.json names no \'architectures\'; add e.g. "architectures": ["LlamaForCausalLM"]'
        )
    family = _REGISTRY.get(archs[0])
    if family is None:
        raise HubquantError(
            f"architecture '{archs[0]}' is not supported; supported: {', '.join(supported_architectures())}"
        )
    return family


def hparam(hf: dict[str, Any], *names: str, default: Any = ...) -> Any:
    """The first of `names` present (and not None) in `hf`: absorbs key-name differences."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    if default is ...:
        raise HubquantError(f"config.json lacks '{names[0]}'; the checkpoint's config is incomplete")
    return default


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def rope_from_hf(hf: dict[str, Any]) -> tuple[RopeConfig, float]:
    """RoPE settings and the rotary fraction, from old (`rope_scaling`, `rope_theta`) or new
    (`rope_parameters`) config.json layouts."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    supported = ("default", "linear", "dynamic", "llama3")
    if kind not in supported:
        raise HubquantError(f"RoPE type '{kind}' is not supported; supported: {', '.join(supported)}")
    max_position = hparam(hf, "max_position_embeddings", default=2048)
    rope = RopeConfig(
        theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", max_position)),
    )
    fraction = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    return rope, fraction


class Family:
    """Base of every family: the Hub→canonical module map and config translation."""

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    # Hub module path -> canonical module path ("{}" = layer index); None: drop on purpose.
    modules: ClassVar[dict[str, str | None]] = {}
    dropped: ClassVar[tuple[str, ...]] = ()  # full Hub tensor names ("{}" allowed) never loaded
    tie_default: ClassVar[bool] = False  # the HF config class's default for tie_word_embeddings

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        raise NotImplementedError

    @classmethod
    def common(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """Fields every family reads the same way."""
        hidden = hparam(hf, "hidden_size", "n_embd", "d_model")
        heads = hparam(hf, "num_attention_heads", "n_head")
        rope, fraction = rope_from_hf(hf)
        return dict(
            vocab_size=hparam(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=hparam(hf, "intermediate_size", "n_inner"),
            num_layers=hparam(hf, "num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=hparam(hf, "num_key_value_heads", default=heads),
            head_dim=hparam(hf, "head_dim", default=hidden // heads),
            max_position=hparam(hf, "max_position_embeddings", default=2048),
            rope=rope,
            rotary_fraction=fraction,
            tie_embeddings=bool(hf.get("tie_word_embeddings", cls.tie_default)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )

    # -- names ---------------------------------------------------------------------------

    @classmethod
    def _lookup(cls, table: dict[str, str | None], name: str) -> tuple[bool, str | None]:
        module, _, leaf = name.rpartition(".")
        match = _LAYER_INDEX.search(f".{module}.")
        pattern = _LAYER_INDEX.sub(".{}.", f".{module}.", count=1)[1:-1] if match else module
        if pattern not in table:
            return False, None
        target = table[pattern]
        if target is None:
            return True, None
        target = target.replace("{}", match.group(1)) if match else target
        return True, f"{target}.{leaf}"

    @classmethod
    def to_canonical(cls, hub_name: str) -> tuple[bool, str | None]:
        """(known, canonical name); known with None means the tensor is dropped on purpose."""
        if _LAYER_INDEX.sub(".{}.", hub_name, count=1) in cls.dropped or hub_name in cls.dropped:
            return True, None
        return cls._lookup(cls.modules, hub_name)

    @classmethod
    def to_hub(cls, canonical_name: str) -> str:
        """The Hub name of a canonical tensor (the reverse map, for export and messages)."""
        reverse = {v: k for k, v in cls.modules.items() if v is not None}
        known, name = cls._lookup(reverse, canonical_name)
        if not known or name is None:
            raise KeyError(canonical_name)
        return name


_LLAMA_MODULES: dict[str, str | None] = {
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
    """Llama 1/2/3 and kin (SmolLM, TinyLlama, Mistral-style without sliding window)."""

    name = "llama"
    modules = _LLAMA_MODULES
    # Old checkpoints store the RoPE table; it is derived from config.json instead.
    dropped = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            **cls.common(hf),
            norm="rms",
            norm_eps=hparam(hf, "rms_norm_eps", default=1e-6),
            mlp="gated",
            act=_activation(hparam(hf, "hidden_act", default="silu")),
            attn_bias=bias,
            attn_out_bias=bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )


@register("GemmaForCausalLM")
class Gemma(Llama):
    """Gemma 1: RMSNorm scaled by (1 + weight), embeddings scaled by sqrt(hidden), GeGLU."""

    name = "gemma"
    tie_default = True

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        base = super().config(hf)
        # Gemma's released configs say "gelu" but were trained with the tanh approximation.
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_tanh" if act == "gelu" else _activation(act)
        return _replace(base, norm_unit_offset=True, embedding_scale=math.sqrt(base.hidden_size), act=act)


@register("ApertusForCausalLM")
class Apertus(Llama):
    """Apertus: Llama with an ungated xIELU MLP, q/k RMSNorm and two renamed norms."""

    name = "apertus"
    modules = {
        **{k: v for k, v in _LLAMA_MODULES.items() if "layernorm" not in k and "gate_proj" not in k},
        "model.layers.{}.attention_layernorm": "layers.{}.attn_norm",
        "model.layers.{}.feedforward_layernorm": "layers.{}.mlp_norm",
        "model.layers.{}.self_attn.q_norm": "layers.{}.attn.q_norm",
        "model.layers.{}.self_attn.k_norm": "layers.{}.attn.k_norm",
        "model.layers.{}.mlp.act_fn": "layers.{}.mlp.act",
    }

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        return _replace(super().config(hf), mlp="plain", qk_norm="rms")


@register("PhiForCausalLM")
class Phi(Family):
    """Phi-1/1.5/2: LayerNorm, parallel attention+MLP, partial rotary, biases everywhere."""

    name = "phi"
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

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        return ModelConfig(
            **cls.common(hf),
            norm="layer",
            norm_eps=hparam(hf, "layer_norm_eps", default=1e-5),
            mlp="plain",
            act=_activation(hparam(hf, "hidden_act", default="gelu_new")),
            parallel_residual=True,
            qk_norm="layer" if hf.get("qk_layernorm") else None,
            attn_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            head_bias=True,
        )


_ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_tanh",
    "xielu": "xielu",
}


def _activation(name: str) -> str:
    if name not in _ACT_NAMES:
        raise HubquantError(f"activation '{name}' is not supported; supported: {', '.join(_ACT_NAMES)}")
    return _ACT_NAMES[name]


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)
