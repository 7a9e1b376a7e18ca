"""Read safetensors files with plain reads, one tensor at a time, into memory we own.

Two ways to get a tensor, chosen by what happens to it next:
- `read()`: the bytes are read with `readinto` into memory the tensor owns. For tensors about to be
  cast (or written elsewhere): the source bytes are freed as soon as the cast copy exists, so
  streaming a 1 GB shard costs one tensor, not the shard (a memory map would keep every page it
  touched resident until closed).
- `map()`: a copy-on-write memory map of the tensor's bytes. For tensors kept as stored: nothing is
  copied, the pages are shared with the OS page cache and become resident only when used.
The format is simple: an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then the data.

What is a valid file is the `safetensors` library's call, not ours: every file is first opened
with `safetensors.safe_open`, which parses and checks the header only (it maps the file without
reading it: tens of microseconds, a few hundred for a 300-tensor header, less than our own JSON
parse). Its rules: a UTF-8 JSON object of at most 100 MB, `__metadata__` a str -> str map, every
entry a known dtype, a shape of unsigned ints and two offsets, byte sizes that match, offsets
contiguous from 0 with no gap or overlap and ending exactly at the end of the file. A file it
refuses is refused here, with its reason, in one line naming the file. We then parse the same
header bytes ourselves (for the offsets) and check it again, and refuse what torch cannot hold
(the F6 dtypes, F4 with an odd last dimension, sizes beyond int64): the library refuses those
only when the tensor is read. `tests/test_fuzz_safetensors.py` compares both on mutated files.
"""

from __future__ import annotations

import json
import math
import mmap
import operator
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hubquant.errors import HubquantError

# Every dtype code the library knows, with its size in bits.
BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",  # two F4 values per byte: the last dimension is halved
}
# The codes this torch can hold (the F6 dtypes have no torch equivalent).
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)
}
PACKED = "F4"
MAX_HEADER = 100_000_000  # the format's own limit
MAX_DIM = 2**63 - 1  # torch's sizes are int64
MAX_SIZE = 2**64 - 1  # the library's sizes are u64


def _one_line(text: str, limit: int = 240) -> str:
    """`text` (which may quote the file's own bytes) as one printable line of at most `limit` chars."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def library_problem(path: str | Path) -> str | None:
    """Why the safetensors library refuses the file at `path` (one line), or None if it accepts it.

    `safe_open` parses and checks the header and maps the file without reading the data.
    """
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except BaseException as error:  # SafetensorError, OSError, and pyo3's PanicException
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit
        why = str(error).removeprefix("Error while deserializing header: ")
        return _one_line(why or type(error).__name__)


def _empty(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    # A reshape of an empty buffer, not torch.empty(shape): the shape the library gives.
    return torch.empty(0, dtype=torch.uint8).view(dtype).reshape(shape)


class SafetensorsFile:
    """One safetensors file: header parsed and checked on open, tensors read on demand.

    Args:
        path: the file.

    Raises:
        HubquantError: the safetensors library refuses the file (truncated, corrupt, inconsistent
            header), or it holds a tensor torch cannot represent.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / the context manager
        self._map: mmap.mmap | None = None
        try:
            self.metadata, self._entries, self._data_start = self._parse()
        except BaseException:
            self._file.close()
            raise

    def _corrupt(self, why: str) -> HubquantError:
        return HubquantError(f"{self.path} is truncated or corrupt ({why}); delete and re-download it")

    def _parse(self) -> tuple[dict[str, str], dict[str, dict[str, Any]], int]:
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        # The library judges the very file we hold open (by descriptor where the OS allows it).
        same = f"/proc/self/fd/{fd}"
        problem = library_problem(same if os.path.exists(same) else self.path)
        if problem is not None:
            raise self._corrupt(problem)
        # It accepted these bytes; parse the same header for the offsets, and check again in case
        # the file changed between the two reads.
        raw = self._file.read(8)
        if len(raw) < 8:
            raise self._corrupt("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER or 8 + length > size:
            raise self._corrupt(f"header length {length} does not fit a {size}-byte file")
        try:
            header = json.loads(self._file.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise self._corrupt(f"header is not JSON: {_one_line(str(error))}") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._corrupt("__metadata__ is not a map of strings")
        entries = {name: self._entry(name, entry) for name, entry in header.items()}
        end = 0
        for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
            begin, stop = entry["data_offsets"]
            if begin != end:
                raise self._corrupt(f"tensor {_one_line(name)} does not start where the previous one ends")
            end = stop
        if end != size - 8 - length:
            raise self._corrupt(f"tensors cover {end} of the {size - 8 - length} data bytes")
        return metadata, entries, 8 + length

    def _entry(self, name: str, entry: Any) -> dict[str, Any]:
        """`entry` checked, with its shape as torch holds it (F4: pairs in the last dimension)."""
        try:
            code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            begin, end = offsets
            ints = [*shape, begin, end]
        except (KeyError, TypeError, ValueError):
            raise self._corrupt(f"bad header entry for {_one_line(name)}") from None
        if (
            not isinstance(code, str)
            or code not in BITS
            or not isinstance(shape, list)
            or not isinstance(offsets, list)
            or not all(type(n) is int and 0 <= n <= MAX_SIZE for n in ints)
            or not begin <= end
            or math.prod(shape) * BITS[code] != 8 * (end - begin)
        ):
            raise self._corrupt(f"bad header entry for {_one_line(name)}")
        label = _one_line(name) if code not in DTYPES or code == PACKED or end == begin else name
        if code not in DTYPES:
            raise HubquantError(
                f"{self.path}: tensor {label} has dtype {code}, which torch {torch.__version__} cannot "
                "represent; convert the checkpoint to a dtype torch has (e.g. BF16)"
            )
        if any(n > MAX_DIM for n in shape):
            raise HubquantError(
                f"{self.path}: tensor {label} has shape {shape}, beyond torch's int64 sizes; "
                "the file is corrupt or not meant for torch"
            )
        shape = list(shape)
        if code == PACKED:
            if not shape or shape[-1] % 2:
                raise HubquantError(
                    f"{self.path}: F4 tensor {label} has shape {shape}; torch stores F4 in pairs, so "
                    "the last dimension must be even: re-export the checkpoint with an even last dimension"
                )
            shape[-1] //= 2
        if end == begin:
            try:
                _empty(shape, DTYPES[code])
            except (RuntimeError, ValueError, TypeError, OverflowError):
                raise HubquantError(
                    f"{self.path}: empty tensor {label} has shape {shape}, which torch cannot "
                    "represent; the file is corrupt or not meant for torch"
                ) from None
        return {"dtype": code, "shape": shape, "data_offsets": [begin, end]}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A fresh tensor holding `name`'s data (it owns its memory; no file mapping).

        Args:
            name: the tensor.
            rows: read only rows `start:stop` of dim 0.
        """
        shape = list(self.shape(name))
        begin, end = self._entries[name]["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        if end == begin:
            return _empty(shape, self.dtype(name))
        out = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        if self._file.readinto(memoryview(out.numpy())) != end - begin:
            raise self._corrupt(f"tensor {_one_line(name)} was cut short")
        return out.view(self.dtype(name)).reshape(shape)

    def map(self, name: str) -> torch.Tensor:
        """`name` as a copy-on-write view of the file: no copy; writes stay private to us."""
        begin, end = self._entries[name]["data_offsets"]
        if end == begin:
            return _empty(list(self.shape(name)), self.dtype(name))
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        if self._data_start + end > len(self._map):
            raise self._corrupt(f"tensor {_one_line(name)} was cut short")
        # The tensor holds a reference to the map, which lives as long as any tensor uses it.
        flat = torch.frombuffer(
            self._map, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin
        )
        return flat.view(self.dtype(name)).reshape(self.shape(name))

    def close(self) -> None:
        self._map = None  # tensors from map() keep it alive; it is unmapped when they are gone
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CODES = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, slice by slice, holding none of it in memory.

    The header is computed up front from the announced names, shapes and dtypes, after checking
    the library will accept it (names unique UTF-8 strings, shapes of non-negative ints, dtypes
    the format knows, sizes within its limits); data is then appended in that order, each write
    checked against the tensor it belongs to. `close()` checks every announced byte arrived and
    that the library opens the finished file; a file that fails either is removed.

    Args:
        path: the file to create.
        entries: (name, shape, dtype) of every tensor, in the order their data will be written.
            The shape is torch's (for float4_e2m1fn_x2, in pairs: the header holds twice the
            last dimension).
        metadata: the header's `__metadata__` (string values).

    Raises:
        HubquantError: an entry or the metadata cannot be stored; nothing is written.
    """

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            if not all(_utf8(key) and _utf8(value) for key, value in metadata.items()):
                raise self._refuse("metadata keys and values must be UTF-8 strings")
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._sizes: list[tuple[str, torch.dtype, int]] = []
        for name, shape, dtype in entries:
            code, dims, size = self._check(name, shape, dtype, header)
            header[name] = {"dtype": code, "shape": dims, "data_offsets": [offset, offset + size]}
            self._sizes.append((name, dtype, size))
            offset += size
            if offset > MAX_SIZE:
                raise self._refuse("the tensors add up to more bytes than the format can address")
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the format recommends
        if len(raw) > MAX_HEADER:
            raise self._refuse(f"its header would be {len(raw)} bytes, over the format's {MAX_HEADER}")
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        try:
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:  # a full disk: no half-written file is left behind
            self._file.close()
            self.path.unlink(missing_ok=True)
            raise
        self._total, self._written = offset, 0
        self._index, self._left = 0, self._sizes[0][2] if self._sizes else 0

    def _refuse(self, why: str) -> HubquantError:
        return HubquantError(
            f"cannot write {self.path}: {why}; this is a bug in the caller, please report it"
        )

    def _check(self, name: Any, shape: Any, dtype: Any, header: dict[str, Any]) -> tuple[str, list[int], int]:
        """(code, header shape, byte size) of one entry, or a refusal naming it."""
        if not _utf8(name) or name == "__metadata__" or name in header:
            raise self._refuse(f"tensor name {_one_line(repr(name))} is not a new UTF-8 name")
        label = _one_line(name)
        if not isinstance(dtype, torch.dtype) or dtype not in CODES:
            raise self._refuse(f"tensor {label} has dtype {dtype}, which safetensors cannot store")
        try:
            given = tuple(shape)
            dims = [operator.index(n) for n in given]
        except TypeError:
            given, dims = (), None
        if (
            dims is None
            or any(isinstance(n, bool) for n in given)
            or not all(0 <= n <= MAX_DIM for n in dims)
        ):
            raise self._refuse(f"tensor {label} has shape {_one_line(repr(shape))}, not non-negative ints")
        code = CODES[dtype]
        size = math.prod(dims) * dtype.itemsize
        if code == PACKED:
            if not dims:
                raise self._refuse(f"F4 tensor {label} has no dimension to hold its pairs")
            dims[-1] *= 2
        product = 1
        for n in dims:  # the library multiplies left to right and refuses any overflow
            product *= n
            if product > MAX_SIZE:
                raise self._refuse(f"tensor {label} of shape {dims} is too large for the format")
        if product * BITS[code] > MAX_SIZE:
            raise self._refuse(f"tensor {label} of shape {dims} is too large for the format")
        return code, dims, size

    def write(self, tensor: torch.Tensor) -> None:
        """Append `tensor`'s bytes (a whole tensor or the next rows of one)."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        nbytes = data.numel()
        if nbytes:
            while self._left == 0 and self._index + 1 < len(self._sizes):
                self._index += 1
                self._left = self._sizes[self._index][2]
            name, dtype, _ = self._sizes[self._index] if self._sizes else ("", None, 0)
            if nbytes > self._left or tensor.dtype != dtype:
                raise HubquantError(
                    f"{self.path}: {nbytes} bytes of {tensor.dtype} do not fit tensor {_one_line(name)} "
                    f"({self._left} {dtype} bytes left); this is a bug in the caller, please report it"
                )
            self._left -= nbytes
        self._file.write(memoryview(data.numpy()))
        self._written += nbytes

    def close(self, check: bool = True) -> None:
        """Finish the file. An incomplete file is removed; with `check`, that is an error, and so is
        a file the safetensors library refuses (also removed)."""
        if self._file.closed:
            return
        self._file.close()
        problem = None
        if self._written != self._total:
            problem = f"wrote {self._written} of {self._total} announced bytes"
        elif check:
            problem = library_problem(self.path)
        if problem is not None:
            self.path.unlink(missing_ok=True)
            if check:
                raise HubquantError(f"{self.path}: {problem}; the file was removed, write it again")


def _utf8(text: Any) -> bool:
    """Whether `text` is a str the header's UTF-8 JSON can carry (no lone surrogates)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
