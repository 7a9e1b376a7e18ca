"""What every family shares: the registry, config translation with the reference's defaults, the
Hub<->canonical name maps, and the GGUF side (llama.cpp's names, hyperparameters and transforms).

A family is one class in one file (`llama.py`, `gemma.py`...), registered under its `config.json`
architecture string(s) and, where llama.cpp knows it, its GGUF architecture name. The decoder never
sees a family: `config()` turns `config.json` into a `ModelConfig` whose typed fields name each quirk.
"""

from __future__ import annotations

import functools
import json
import math
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
    if not isinstance(hf_config, dict):
        raise HubquantError(
            f"config.json holds a JSON {_kind(hf_config)}, not an object of settings; re-download or fix it"
        )
    archs = hf_config.get("architectures") or []
    if not archs:
        raise HubquantError(
            'config.json names no \'architectures\'; add e.g. "architectures": ["LlamaForCausalLM"]'
        )
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise bad_value("architectures", archs, 'a list of class names, e.g. ["LlamaForCausalLM"]')
    family = _REGISTRY.get(archs[0])
    if family is None:
        raise HubquantError(
            f"architecture {_show(archs[0], 100)} is not supported; supported: {', '.join(supported_architectures())}"
        )
    return family


def family_for_gguf(arch: str, where: str = "") -> type[Family]:
    """The family registered for a GGUF file's `general.architecture`, or a one-line error."""
    family = _GGUF_REGISTRY.get(arch)
    if family is None:
        supported = ", ".join(supported_gguf_architectures())
        suffix = f" ({where})" if where else ""
        raise HubquantError(
            f"GGUF architecture {_show(arch, 100)} is not supported; supported: {supported}{suffix}"
        )
    return family


# Bounds on the sizes config.json (or a GGUF's metadata) may give: far beyond any released model,
# small enough that nothing built from them (a model on the meta device, a RoPE table, a shape
# product) overflows or runs for minutes. name -> (lowest, highest).
LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 20),
    "intermediate_size": (1, 1 << 22),
    "num_hidden_layers": (1, 1 << 12),
    "num_attention_heads": (1, 1 << 14),
    "num_key_value_heads": (1, 1 << 14),
    "head_dim": (1, 1 << 16),
    "max_position_embeddings": (1, (1 << 31) - 1),
    "original_max_position_embeddings": (1, (1 << 31) - 1),
    "type_vocab_size": (0, 1 << 16),
}
# Aliases some configs use for the same sizes (GPT-2 style names).
_ALIASES = {"n_embd": "hidden_size", "d_model": "hidden_size", "n_head": "num_attention_heads",
            "n_inner": "intermediate_size", "n_layer": "num_hidden_layers"}  # fmt: skip
_MISSING: Any = ...


def _show(value: Any, limit: int = 40) -> str:
    """A config value as a message shows it: its repr, on one line, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def bad_value(
    key: str, value: Any, expected: str, where: str = "config.json", fix: str = ""
) -> HubquantError:
    """The one-line error for a config value of the wrong type or out of range, naming the key."""
    return HubquantError(
        f"{where}'s {key} is {_show(value)} ({_kind(value)}), but it must be {expected}; "
        + (fix or f"fix {key} in {where}")
    )


def _pick(hf: dict[str, Any], names: tuple[str, ...], default: Any) -> tuple[str, Any]:
    """(the key used, its value): the first of `names` present and not null, else the default."""
    for name in names:
        if hf.get(name) is not None:
            return name, hf[name]
    if default is _MISSING:
        raise HubquantError(f"config.json lacks '{names[0]}'; the checkpoint's config is incomplete")
    return names[0], default


def hparam(hf: dict[str, Any], *names: str, default: Any = ...) -> Any:
    """The first of `names` present (and not None) in `hf`: absorbs key-name differences.
    Untyped: for sizes, flags and factors use `int_param`, `bool_param`, `float_param`."""
    return _pick(hf, names, default)[1]


def as_int(key: str, value: Any, low: int | None = None, high: int | None = None, where: str = "config.json", fix: str = "") -> int:  # fmt: skip
    """`value` as an int, or a one-line error naming `key`: an integer (a whole float such as 32.0
    too, as JSON writers sometimes give), not a bool, within [low, high] (default: `LIMITS[key]`)."""
    bounds = LIMITS.get(_ALIASES.get(key, key), (None, None))
    low = bounds[0] if low is None else low
    high = bounds[1] if high is None else high
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_value(key, value, "an integer", where, fix)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high:,}"
        raise bad_value(key, value, f"an integer {span}", where, fix)
    return value


def int_param(hf: dict[str, Any], *names: str, default: Any = ..., low: int | None = None, high: int | None = None) -> int:  # fmt: skip
    """The first of `names` given in `hf` (else `default`), checked by `as_int`."""
    key, value = _pick(hf, names, default)
    return as_int(key, value, low, high)


def as_float(key: str, value: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False, where: str = "config.json", fix: str = "") -> float:  # fmt: skip
    """`value` as a finite float within [low, high] (above `low` when `open_low`), or a one-line
    error naming `key`. Integers are numbers too; bools and strings are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_value(key, value, "a number", where, fix)
    number = float(value) if abs(value) < 1e308 else math.inf
    below = low is not None and (number <= low if open_low else number < low)
    if not math.isfinite(number) or below or (high is not None and number > high):
        if low is None:
            span = "a finite number"
        else:
            span = f"a number {'above' if open_low else 'at least'} {low}" + (
                f" and at most {high}" if high is not None else ""
            )
        raise bad_value(key, value, span, where, fix)
    return number


def float_param(hf: dict[str, Any], *names: str, default: Any = ..., low: float | None = None, high: float | None = None, open_low: bool = False) -> float:  # fmt: skip
    """The first of `names` given in `hf` (else `default`), checked by `as_float`."""
    key, value = _pick(hf, names, default)
    return as_float(key, value, low, high, open_low=open_low)


def bool_param(hf: dict[str, Any], name: str, default: Any = ...) -> bool:
    """A true/false flag: JSON true or false (0 and 1 pass too), never a string like "false"."""
    key, value = _pick(hf, (name,), default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise bad_value(key, value, "true or false")


def str_param(hf: dict[str, Any], name: str, default: Any = ...) -> str:
    key, value = _pick(hf, (name,), default)
    if not isinstance(value, str):
        raise bad_value(key, value, "a string")
    return value


def token_id_param(hf: dict[str, Any], name: str) -> int | None:
    """A special token id: an integer or null (out-of-vocabulary ids are kept, as transformers keeps
    them: several Hub configs say pad_token_id -1)."""
    value = hf.get(name)
    if value is None:
        return None
    return as_int(name, value, low=-(1 << 62), high=1 << 62)


def token_ids_param(hf: dict[str, Any], name: str) -> tuple[int, ...]:
    """`eos_token_id`-style: an integer, a list of integers, or null, as a tuple."""
    value = hf.get(name)
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(as_int(name, item, low=-(1 << 62), high=1 << 62) for item in items if item is not None)


def head_dim(hf: dict[str, Any], hidden: int, heads: int) -> int:
    """config.json's head_dim, else hidden_size / num_attention_heads, which must then divide."""
    if hf.get("head_dim") is not None:
        return int_param(hf, "head_dim")
    if hidden % heads:
        raise HubquantError(
            f"config.json's hidden_size ({hidden}) is not a multiple of its num_attention_heads ({heads}), "
            "and it gives no head_dim; fix one of them in config.json"
        )
    return hidden // heads


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
    where, params = "rope_parameters", dict(default_params or {})
    for key in ("rope_parameters", "rope_scaling"):
        given = hf.get(key)
        if given is not None and not isinstance(given, dict):
            raise bad_value(key, given, "an object of RoPE settings (or null)")
        if given:
            where, params = key, dict(given)
            break
    kind = params.get("rope_type", params.get("type", "default"))
    if not isinstance(kind, str):
        raise bad_value(f"{where}.rope_type", kind, f"one of {', '.join(ROPE_TYPES)}")
    if kind not in ROPE_TYPES:
        raise HubquantError(
            f"config.json's {where}.rope_type {_show(kind)} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    lacking = [key for key in _ROPE_REQUIRED.get(kind, ()) if params.get(key) is None]
    if lacking:
        raise HubquantError(
            f"config.json's {where} (rope_type '{kind}') lacks {', '.join(lacking)}; add them to {where}"
        )
    max_position = int_param(hf, "max_position_embeddings", default=2048)

    def number(key: str, default: float) -> float:
        value = params.get(key)
        return as_float(f"{where}.{key}", default if value is None else value, 0.0, open_low=True)

    theta = params.get("rope_theta")
    theta_key = f"{where}.rope_theta" if theta is not None else "rope_theta"
    theta = hf.get("rope_theta") if theta is None else theta
    original = params.get("original_max_position_embeddings")
    rope = RopeConfig(
        theta=as_float(theta_key, 10000.0 if theta is None else theta, 0.0, open_low=True),
        type=kind,
        factor=number("factor", 1.0),
        low_freq_factor=number("low_freq_factor", 1.0),
        high_freq_factor=number("high_freq_factor", 4.0),
        original_max_position=max_position
        if original is None
        else as_int(
            f"{where}.original_max_position_embeddings", original, *LIMITS["max_position_embeddings"]
        ),
    )
    if kind == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
        raise HubquantError(
            f"config.json's {where} gives high_freq_factor {rope.high_freq_factor} <= low_freq_factor "
            f"{rope.low_freq_factor}; llama3 RoPE needs high above low: fix {where} in config.json"
        )
    fraction = params.get("partial_rotary_factor")
    fraction_key = f"{where}.partial_rotary_factor" if fraction is not None else "partial_rotary_factor"
    fraction = hf.get("partial_rotary_factor") if fraction is None else fraction
    fraction = default_fraction if fraction is None else fraction
    return rope, as_float(fraction_key, fraction, 0.0, 1.0, open_low=True)


class GGUFMetadata(Protocol):
    """What a family reads of a GGUF file's metadata (implemented in `hubquant.convert.gguf`)."""

    arch: str
    path: Any

    def get(self, key: str, default: Any = None) -> Any: ...

    def arch_value(self, key: str, default: Any = None) -> Any: ...

    def require(self, key: str) -> Any: ...

    def arch_int(self, key: str, default: Any = ..., limit: str | None = None) -> Any:
        """`{arch}.{key}` as an int within `LIMITS[limit]` (or `default` when absent; `...`: required)."""
        ...

    def arch_float(self, key: str, default: float, *, low: float = 0.0, open_low: bool = True) -> float:
        """`{arch}.{key}` as a finite float above `low` (at least `low` unless `open_low`)."""
        ...

    def refuse(self, message: str) -> Exception:
        """A one-line error about this file: `message`, then the file."""
        ...

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
        if not isinstance(hf, dict):
            raise HubquantError(
                f"config.json holds a JSON {_kind(hf)}, not an object of settings; re-download or fix it"
            )
        given = {key: value for key, value in hf.items() if value is not None}
        return {**cls.defaults, **given}

    @classmethod
    def tied(cls, hf: dict[str, Any]) -> bool:
        """Whether the head shares the embeddings: config.json's word, else the family's default.

        The one tie rule: loading, conversion and export all call this.
        """
        return bool_param(cls.with_defaults(hf), "tie_word_embeddings", default=False)

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
        hidden = int_param(hf, "hidden_size", "n_embd", "d_model")
        heads = int_param(hf, "num_attention_heads", "n_head")
        vocab = int_param(hf, "vocab_size")
        intermediate = int_param(hf, "intermediate_size", "n_inner")
        layers = int_param(hf, "num_hidden_layers", "n_layer")
        kv_heads = int_param(hf, "num_key_value_heads", default=heads)
        rope, fraction = rope_from_hf(hf, cls.default_rope, cls.default_rotary_fraction)
        return dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim(hf, hidden, heads),
            max_position=int_param(hf, "max_position_embeddings", default=2048),
            rope=rope,
            rotary_fraction=fraction,
            tie_embeddings=cls.tied(hf),
            bos_token_id=token_id_param(hf, "bos_token_id"),
            eos_token_ids=token_ids_param(hf, "eos_token_id"),
            pad_token_id=token_id_param(hf, "pad_token_id"),
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
        the model; a tied head is absent (it is the embedding). The last few answers are kept: a
        GGUF read asks for the same config's shapes several times.
        """
        return dict(_hub_shapes(cls, json.dumps(hf, sort_keys=True, default=repr)))

    # -- GGUF -----------------------------------------------------------------------------

    @classmethod
    def gguf_config(cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int, tied: bool) -> dict[str, Any]:  # fmt: skip
        """config.json for a GGUF file of this family. Every key is written out, so that no
        reader's class defaults can change the model."""
        raise HubquantError(f"{cls.name} checkpoints cannot be read from GGUF files")

    @classmethod
    def gguf_common(cls, meta: GGUFMetadata, special_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """The hyperparameters every llama.cpp architecture stores under the same keys."""
        heads = meta.arch_int("attention.head_count", limit="num_attention_heads")
        kv_heads = meta.arch_int("attention.head_count_kv", heads, limit="num_key_value_heads")
        if heads % kv_heads:
            raise meta.refuse(
                f"GGUF metadata '{meta.arch}.attention.head_count' ({heads}) is not a multiple of "
                f"'{meta.arch}.attention.head_count_kv' ({kv_heads})"
            )
        config: dict[str, Any] = {
            "architectures": [cls.architectures[0]],
            "model_type": cls.model_type,
            "vocab_size": meta.arch_int("vocab_size", vocab_size, limit="vocab_size"),
            "hidden_size": meta.arch_int("embedding_length", limit="hidden_size"),
            "intermediate_size": meta.arch_int("feed_forward_length", limit="intermediate_size"),
            "num_hidden_layers": meta.arch_int("block_count", limit="num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": meta.arch_int("context_length", 2048, limit="max_position_embeddings"),
            "rope_theta": meta.arch_float("rope.freq_base", 10000.0),
        }
        for role in ("bos", "eos", "pad"):
            if role in special_ids:
                config[f"{role}_token_id"] = special_ids[role]
        return config

    @classmethod
    def gguf_head_dim(cls, meta: GGUFMetadata, config: dict[str, Any], *keys: str) -> int:
        """The head size: the first of `keys` the file gives, else embedding_length / head_count,
        which must then divide."""
        for key in keys:
            value = meta.arch_int(key, None, limit="head_dim")
            if value:
                return value
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        if hidden % heads:
            raise meta.refuse(
                f"GGUF metadata '{meta.arch}.embedding_length' ({hidden}) is not a multiple of "
                f"'{meta.arch}.attention.head_count' ({heads})"
            )
        return hidden // heads

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
        head = head_dim(hf, int_param(hf, "hidden_size"), int_param(hf, "num_attention_heads"))
        if cls.gguf_permute_qk and module.endswith((".self_attn.q_proj", ".self_attn.k_proj")):
            return _unpermute(head), head
        if cls.gguf_norm_offset and hub_name.endswith("norm.weight"):
            offset = np.float32(cls.gguf_norm_offset)
            return (lambda w: w - offset), 1
        return None, 1


@functools.lru_cache(maxsize=8)
def _hub_shapes(family: type[Family], config_json: str) -> dict[str, tuple[int, ...]]:
    import torch

    from ..encoder import build_model, expected_tensors

    with torch.device("meta"):
        model = build_model(family.config(json.loads(config_json)))
    return {family.to_hub(name): tuple(t.shape) for name, t in expected_tensors(model).items()}


def _unpermute(head_dim: int) -> Transform:
    """Inverse of llama.cpp's q/k row permutation, on any whole number of heads: within each
    head, rows (i, half) go back to (half, i)."""

    def undo(w: np.ndarray) -> np.ndarray:
        heads = w.shape[0] // head_dim
        return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return undo


def activation(name: str) -> str:
    """hubquant's name for a transformers activation name (config.json's hidden_act), or a one-line error."""
    if not isinstance(name, str):
        raise bad_value("hidden_act", name, f"one of {', '.join(_ACT_NAMES)}")
    if name not in _ACT_NAMES:
        raise HubquantError(
            f"config.json's hidden_act {_show(name)} is not supported; supported: {', '.join(_ACT_NAMES)}"
        )
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
