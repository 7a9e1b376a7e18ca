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
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from hubquant.errors import HubquantError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100_000_000  # the format's own limit


class SafetensorsFile:
    """One safetensors file: header parsed and checked on open, tensors read on demand.

    Args:
        path: the file.

    Raises:
        HubquantError: the file is truncated, corrupt, or holds a dtype torch cannot represent.
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
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            raise self._corrupt("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER or 8 + length > size:
            raise self._corrupt(f"header length {length} does not fit a {size}-byte file")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._corrupt(f"header is not JSON: {error}") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_size = size - 8 - length
        for name, entry in header.items():
            try:
                begin, end = entry["data_offsets"]
                dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"bad header entry for {name}") from None
            expected = dtype.itemsize * math.prod(shape)
            if not 0 <= begin <= end <= data_size or end - begin != expected:
                raise self._corrupt(f"tensor {name} lies outside the file or has the wrong byte size")
        return metadata, header, 8 + length

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
        out = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        if end > begin and self._file.readinto(memoryview(out.numpy())) != end - begin:
            raise self._corrupt(f"tensor {name} was cut short")
        return out.view(self.dtype(name)).reshape(shape)

    def map(self, name: str) -> torch.Tensor:
        """`name` as a copy-on-write view of the file: no copy; writes stay private to us."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(self.shape(name), dtype=self.dtype(name))
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
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

    The header is computed up front from the announced names, shapes and dtypes; data is then
    appended in that order. `close()` checks every announced byte arrived.

    Args:
        path: the file to create.
        entries: (name, shape, dtype) of every tensor, in the order their data will be written.
        metadata: the header's `__metadata__` (string values).
    """

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, shape, dtype in entries:
            size = dtype.itemsize * math.prod(shape)
            header[name] = {
                "dtype": CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._sizes.append((name, size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the format recommends
        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._total, self._written = offset, 0

    def write(self, tensor: torch.Tensor) -> None:
        """Append `tensor`'s bytes (a whole tensor or the next rows of one)."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._written += data.numel()

    def close(self, check: bool = True) -> None:
        """Finish the file; with `check`, an error if the bytes written differ from those announced."""
        self._file.close()
        if check and self._written != self._total:
            raise HubquantError(f"{self.path}: wrote {self._written} of {self._total} announced bytes")
