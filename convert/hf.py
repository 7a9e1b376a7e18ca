"""Read a transformers checkpoint folder (safetensors or pickle `.bin` shards) as a `SourceCheckpoint`.

Safetensors shards are read tensor by tensor from their headers. Pickle shards are only ever opened
with `torch.load(weights_only=True, mmap=True)`: PyTorch's restricted unpickler, which builds tensors
and plain containers and refuses everything else. A file that needs the full unpickler (a class
instance, a function...) could run arbitrary code when loaded, so it is refused, never loaded.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from hubquant.errors import HubquantError
from hubquant.files import read_json
from hubquant.models.checkpoint import read_index
from hubquant.models.hub import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    SENTENCE_FILES,
    SLOW_TOKENIZER_FILES,
    TOKENIZER_FILES,
    sentence_module_paths,
)
from hubquant.models.safetensors_file import SafetensorsFile

from .source import SourceCheckpoint, TensorInfo

# Tokenizer files copied beside the weights, fast and slow alike, and a sentence-transformers
# model's pipeline files (with its module folders' configs).
CARRIED_FILES = (*TOKENIZER_FILES, *SLOW_TOKENIZER_FILES, *SENTENCE_FILES)
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_DIGITS = re.compile(r"(\d+)")


def read_hf_folder(folder: str | Path) -> SourceCheckpoint:
    """A transformers checkpoint folder, exposed tensor by tensor.

    Args:
        folder: holds config.json and either `model*.safetensors` (with or without
            model.safetensors.index.json) or `pytorch_model*.bin` (with or without
            pytorch_model.bin.index.json). Safetensors win when both are present.

    Returns:
        The checkpoint; its tensors are read only when the writer asks for them.
    """
    folder = Path(folder)
    config = _json(folder / "config.json", required=True)
    generation = _json(folder / "generation_config.json", required=False)
    carried = [*CARRIED_FILES, *(f"{path}/config.json" for path in sentence_module_paths(folder))]
    tokenizer = {name: (folder / name).read_bytes() for name in carried if (folder / name).is_file()}
    shards = _shards(folder, SAFETENSORS_INDEX, "model*.safetensors")
    if shards:
        reader: _SafetensorsReader | _BinReader = _SafetensorsReader(folder, shards)
    else:
        shards = _shards(folder, BIN_INDEX, "pytorch_model*.bin")
        if not shards:
            raise HubquantError(
                f"{folder} holds no weights (model*.safetensors or pytorch_model*.bin); "
                "point at a checkpoint folder or a .gguf file"
            )
        reader = _BinReader(folder, shards)
    return SourceCheckpoint(
        config=config,
        generation_config=generation,
        tokenizer_files=tokenizer,
        tensors=reader.tensors,
        read=reader.read,
        provenance={"source": str(folder), "format": reader.format},
        read_rows=getattr(reader, "read_rows", None),
    )


def _json(path: Path, *, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise HubquantError(
                f"{path.parent} has no {path.name}; point at a transformers checkpoint folder, "
                "a Hub repo id or a .gguf file"
            )
        return None
    return read_json(path, path.name)


def _shards(folder: Path, index_name: str, pattern: str) -> list[str]:
    """Shard file names: those the index lists, else the files matching `pattern`, in order."""
    index = folder / index_name
    if not index.is_file():
        return sorted((p.name for p in folder.glob(pattern) if p.is_file()), key=_natural)
    return sorted(read_index(index), key=_natural)


def _natural(name: str) -> list[Any]:
    """Sort key putting layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(name)]


class _SafetensorsReader:
    """Shapes and dtypes from the shard headers; data read one tensor at a time with plain reads."""

    format = "safetensors"

    def __init__(self, folder: Path, shards: list[str]) -> None:
        self.folder = folder
        self.where: dict[str, str] = {}
        self.tensors: list[TensorInfo] = []
        self._open: dict[str, SafetensorsFile] = {}
        for shard in shards:
            with SafetensorsFile(folder / shard) as handle:
                for name in sorted(handle.keys(), key=_natural):
                    if name in self.where:
                        raise HubquantError(f"tensor {name} appears in both {self.where[name]} and {shard}")
                    self.tensors.append(TensorInfo(name, handle.shape(name), handle.dtype(name)))
                    self.where[name] = shard
        self._left = {shard: 0 for shard in shards}
        for shard in self.where.values():
            self._left[shard] += 1

    def read(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, (start, stop))

    def _read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        shard = self.where[name]
        if shard not in self._open:
            self._open[shard] = SafetensorsFile(self.folder / shard)
        tensor = self._open[shard].read(name, rows)
        if rows is None or rows[1] == self._open[shard].shape(name)[0]:  # the tensor's last read
            self._left[shard] -= 1
            if self._left[shard] <= 0:
                self._open.pop(shard).close()  # a finished shard's file handle is not kept
        return tensor


class _BinReader:
    """Pickle shards, each loaded (memory-mapped) when its first tensor is read and dropped after."""

    format = "pytorch pickle (weights_only)"

    def __init__(self, folder: Path, shards: list[str]) -> None:
        self.folder = folder
        self.where: dict[str, str] = {}
        self.tensors: list[TensorInfo] = []
        self._shard: str | None = None
        self._state: dict[str, torch.Tensor] = {}
        # Listing needs each shard's shapes; with mmap that touches headers, not tensor data.
        for shard in shards:
            for name, tensor in load_pickle_state(folder / shard).items():
                if name in self.where:
                    raise HubquantError(f"tensor {name} appears in both {self.where[name]} and {shard}")
                self.tensors.append(TensorInfo(name, tuple(tensor.shape), tensor.dtype))
                self.where[name] = shard

    def read(self, name: str) -> torch.Tensor:
        shard = self.where[name]
        if self._shard != shard or name not in self._state:
            self._state = {}  # drop the previous shard before loading the next
            self._state = load_pickle_state(self.folder / shard)
            self._shard = shard
        tensor = self._state.pop(name)  # popped: the shard is gone once its last tensor is read
        if not self._state:
            self._shard = None
        return tensor


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict through PyTorch's restricted unpickler, refusing anything but tensors.

    Args:
        path: a `pytorch_model*.bin` file.

    Returns:
        name -> tensor, memory-mapped from the file where it is in the zip format.
    """
    try:
        state = _torch_load(path)
    except pickle.UnpicklingError as error:
        found = _REFUSED_GLOBAL.search(str(error))
        what = f" ({found.group(1).rstrip('.')})" if found else ""
        raise HubquantError(
            f"{path} holds more than tensors{what} and would need full unpickling, which can execute "
            "arbitrary code; refused. Re-save its state_dict with safetensors where you trust it"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubquantError(
            f"{path} is not a readable PyTorch checkpoint ({first}); re-download it"
        ) from None
    if not isinstance(state, dict):
        raise HubquantError(
            f"{path} holds a {type(state).__name__}, not a state_dict of tensors; refused (loading other "
            "objects needs full unpickling, which can execute arbitrary code)"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise HubquantError(
                f"{path} holds a non-tensor value under '{key}' ({type(value).__name__}); only plain "
                "state_dicts of tensors are converted, since anything else needs full unpickling, which "
                "can execute arbitrary code"
            )
    return state


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except RuntimeError as error:
        # Files from before PyTorch 1.6 are not zip archives and cannot be memory-mapped; they are
        # still read with the restricted unpickler, only fully into memory.
        if "mmap" not in str(error) and "zipfile" not in str(error):
            raise
    return torch.load(path, weights_only=True, mmap=False, map_location="cpu")
