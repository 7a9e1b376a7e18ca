"""What every family shares: the registry, config translation with the reference's defaults, the
Hub<->canonical name maps, and the GGUF side (llama.cpp's names, hyperparameters and transforms).

A family is one class in one file (`llama.py`, `gemma.py`...), registered under its `config.json`
architecture string(s) and, where llama.cpp knows it, its GGUF architecture name. The decoder never
sees a family: `config()` turns `config.json` into a `ModelConfig` whose typed fields name each quirk.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np

from hubquant.errors import HubquantError

from ..config import ModelConfig, RopeConfig

_REGISTRY: dict[str, type[Family]] = {}
_GGUF_REGISTRY: dict[str, type[Family]] = {}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Keys each RoPE type needs in its parameters, as transformers' validation requires them.
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}  # fmt: skip


def register(*architectures: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: make a family the handler of these `config.json` `architectures` strings
    (and of its `gguf_arch`, if it sets one)."""

    def wrap(cls: type[Family]) -> type[Family]:
        for arch in architectures:
            _REGISTRY[arch] = cls
        cls.architectures = architectures
        if cls.gguf_arch:
            _GGUF_REGISTRY[cls.gguf_arch] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def supported_gguf_architectures() -> list[str]:
    return sorted(_GGUF_REGISTRY)


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


def family_for_gguf(arch: str, where: str = "") -> type[Family]:
    """The family registered for a GGUF file's `general.architecture`, or a one-line error."""
    family = _GGUF_REGISTRY.get(arch)
    if family is None:
        supported = ", ".join(supported_gguf_architectures())
        suffix = f" ({where})" if where else ""
        raise HubquantError(f"GGUF architecture '{arch}' is not supported; supported: {supported}{suffix}")
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


def rope_from_hf(
    hf: dict[str, Any], default_params: dict[str, Any] | None = None, default_fraction: float = 1.0
) -> tuple[RopeConfig, float]:
    """RoPE settings and the rotary fraction, from old (`rope_scaling`, `rope_theta`) or new
    (`rope_parameters`) config.json layouts, with transformers' precedence: the RoPE dict's own
    keys, then top-level `rope_theta` / `partial_rotary_factor`, then the family's defaults.

    Args:
        hf: config.json content.
        default_params: the family's RoPE dict when config.json has none (Apertus: llama3).
        default_fraction: the family's `partial_rotary_factor` when none is given (Phi: 0.5).
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or default_params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise HubquantError(f"RoPE type '{kind}' is not supported; supported: {', '.join(ROPE_TYPES)}")
    lacking = [key for key in _ROPE_REQUIRED.get(kind, ()) if params.get(key) is None]
    if lacking:
        raise HubquantError(
            f"config.json's RoPE parameters of type '{kind}' lack {', '.join(lacking)}; add them to rope_scaling"
        )
    max_position = hparam(hf, "max_position_embeddings", default=2048)
    theta = params.get("rope_theta", hf.get("rope_theta"))
    rope = RopeConfig(
        theta=float(theta if theta is not None else 10000.0),
        type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", max_position)),
    )
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    return rope, float(fraction if fraction is not None else default_fraction)


class GGUFMetadata(Protocol):
    """What a family reads of a GGUF file's metadata (implemented in `hubquant.convert.gguf`)."""

    arch: str
    path: Any

    def get(self, key: str, default: Any = None) -> Any: ...

    def arch_value(self, key: str, default: Any = None) -> Any: ...

    def require(self, key: str) -> Any: ...

    def rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None: ...


Transform = Callable[[np.ndarray], np.ndarray]


class Family:
    """Base of every family. Subclasses set the class attributes and write `config()`."""

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    model_type: ClassVar[str] = ""
    # Hub module path -> canonical module path ("{}" = layer index); None: drop on purpose.
    modules: ClassVar[dict[str, str | None]] = {}
    dropped: ClassVar[tuple[str, ...]] = ()  # full Hub tensor names ("{}" allowed) never loaded
    # The transformers config class's defaults for every key `config()` reads: a key missing from
    # config.json (or null there) takes this value, so a trimmed config gives the reference's model.
    defaults: ClassVar[dict[str, Any]] = {}
    default_rope: ClassVar[dict[str, Any] | None] = None  # RoPE dict when config.json has none
    default_rotary_fraction: ClassVar[float] = 1.0
    # Trained with BOS first in every sequence, whether or not the tokenizer adds it (Gemma: its
    # scores collapse without it); evaluation puts it there and says so.
    bos_required: ClassVar[bool] = False

    # -- GGUF (llama.cpp) side ------------------------------------------------------------
    gguf_arch: ClassVar[str | None] = None  # llama.cpp's `general.architecture`, if it has one
    gguf_permute_qk: ClassVar[bool] = False  # llama.cpp interleaves q/k rows for its rotary kernel
    gguf_norm_offset: ClassVar[float] = 0.0  # llama.cpp adds this to RMSNorm weights (Gemma: 1)
    # A fused GGUF tensor (short name) -> the GGUF tensors it stacks, in row order (Phi-2's qkv).
    gguf_fused: ClassVar[dict[str, tuple[str, ...]]] = {}

    # -- config ---------------------------------------------------------------------------

    @classmethod
    def with_defaults(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """config.json with every missing (or null) key the family reads set to the reference's default."""
        given = {key: value for key, value in hf.items() if value is not None}
        return {**cls.defaults, **given}

    @classmethod
    def tied(cls, hf: dict[str, Any]) -> bool:
        """Whether the head shares the embeddings: config.json's word, else the family's default.

        The one tie rule: loading, conversion and export all call this.
        """
        return bool(cls.with_defaults(hf).get("tie_word_embeddings", False))

    @classmethod
    def config(cls, hf: dict[str, Any]) -> ModelConfig:
        raise NotImplementedError

    @classmethod
    def adapt(cls, cfg: ModelConfig, hub_names: set[str]) -> ModelConfig:
        """The config adjusted to the tensors the checkpoint holds (BERT: a bare encoder saved
        without its pooler). Most families' configs say everything: unchanged."""
        return cfg

    @classmethod
    def common(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """Fields every family reads the same way; `hf` already has the defaults filled in."""
        hidden = hparam(hf, "hidden_size", "n_embd", "d_model")
        heads = hparam(hf, "num_attention_heads", "n_head")
        rope, fraction = rope_from_hf(hf, cls.default_rope, cls.default_rotary_fraction)
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
            tie_embeddings=cls.tied(hf),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )

    # -- names ----------------------------------------------------------------------------

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

    @classmethod
    def hub_shapes(cls, hf: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every tensor a Hub checkpoint of this config holds, by Hub name, with its shape.

        Read off the canonical model built on the meta device, so no shape table can drift from
        the model; a tied head is absent (it is the embedding).
        """
        import torch

        from ..checkpoint import expected_tensors
        from ..encoder import build_model

        with torch.device("meta"):
            model = build_model(cls.config(hf))
        return {cls.to_hub(name): tuple(t.shape) for name, t in expected_tensors(model).items()}

    # -- GGUF -----------------------------------------------------------------------------

    @classmethod
    def gguf_config(cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int, tied: bool) -> dict[str, Any]:  # fmt: skip
        """config.json for a GGUF file of this family. Every key is written out, so that no
        reader's class defaults can change the model."""
        raise HubquantError(f"{cls.name} checkpoints cannot be read from GGUF files")

    @classmethod
    def gguf_common(cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The hyperparameters every llama.cpp architecture stores under the same keys."""
        heads = int(meta.require("attention.head_count"))
        config: dict[str, Any] = {
            "architectures": [cls.architectures[0]],
            "model_type": cls.model_type,
            "vocab_size": int(meta.arch_value("vocab_size", vocab_size)),
            "hidden_size": int(meta.require("embedding_length")),
            "intermediate_size": int(meta.require("feed_forward_length")),
            "num_hidden_layers": int(meta.require("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(meta.arch_value("attention.head_count_kv", heads)),
            "max_position_embeddings": int(meta.arch_value("context_length", 2048)),
            "rope_theta": float(meta.arch_value("rope.freq_base", 10000.0)),
        }
        for role in ("bos", "eos", "pad"):
            if role in special_ids:
                config[f"{role}_token_id"] = special_ids[role]
        return config

    @classmethod
    def gguf_names(cls, hf: dict[str, Any]) -> dict[str, list[str]]:
        """GGUF tensor name -> the Hub tensor(s) it holds (several for a fused one), from gguf-py's
        own `TensorNameMap`, for every tensor `hub_shapes` expects that llama.cpp stores as a tensor."""
        import gguf

        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == cls.gguf_arch)
        names = gguf.TensorNameMap(arch, int(hf["num_hidden_layers"]))
        out: dict[str, list[str]] = {}
        for hub_name in cls.hub_shapes(hf):
            gguf_name = names.get_name(hub_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is not None:
                out.setdefault(gguf_name, []).append(hub_name)
        for fused, parts in cls.gguf_fused.items():
            for suffix in ("weight", "bias"):
                members = [f"blk.{{}}.{part}.{suffix}" for part in parts]
                for layer in range(int(hf["num_hidden_layers"])):
                    hub = [out.get(m.format(layer), [None])[0] for m in members]
                    if all(hub):
                        out[f"blk.{layer}.{fused}.{suffix}"] = hub
        return out

    @classmethod
    def gguf_metadata_tensors(cls, meta: GGUFMetadata, hf: dict[str, Any]) -> dict[str, np.ndarray]:
        """Hub tensors that llama.cpp keeps as metadata rather than tensors (Apertus' xIELU)."""
        return {}

    @classmethod
    def gguf_transform(cls, hub_name: str, hf: dict[str, Any]) -> tuple[Transform | None, int]:
        """What undoes llama.cpp's change to one tensor, and the row block it works on: a slice
        of rows on multiples of the block can be transformed alone (q/k: whole heads)."""
        module = hub_name.rsplit(".", 1)[0]
        head_dim = hparam(hf, "head_dim", default=hf["hidden_size"] // hf["num_attention_heads"])
        if cls.gguf_permute_qk and module.endswith((".self_attn.q_proj", ".self_attn.k_proj")):
            return _unpermute(head_dim), head_dim
        if cls.gguf_norm_offset and hub_name.endswith("norm.weight"):
            offset = np.float32(cls.gguf_norm_offset)
            return (lambda w: w - offset), 1
        return None, 1


def _unpermute(head_dim: int) -> Transform:
    """Inverse of llama.cpp's q/k row permutation, on any whole number of heads: within each
    head, rows (i, half) go back to (half, i)."""

    def undo(w: np.ndarray) -> np.ndarray:
        heads = w.shape[0] // head_dim
        return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return undo


def activation(name: str) -> str:
    """hubquant's name for a transformers activation name, or a one-line error."""
    if name not in _ACT_NAMES:
        raise HubquantError(f"activation '{name}' is not supported; supported: {', '.join(_ACT_NAMES)}")
    return _ACT_NAMES[name]


_ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_tanh",
    "xielu": "xielu",
}
