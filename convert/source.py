"""What every converter reads: a checkpoint described before any tensor is loaded."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a source, known without reading its data.

    Attributes:
        name: the Hugging Face (Hub layout) name, e.g. "model.layers.0.self_attn.q_proj.weight".
        shape: its shape in the Hub layout.
        dtype: the torch dtype `read()` returns before any cast.
        row_block: `read_rows` reads each row once only when asked on multiples of this many rows
            (a GGUF q/k projection: one head, which llama.cpp's permutation mixes within).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    row_block: int = 1


@dataclass
class SourceCheckpoint:
    """A checkpoint in any format, exposed in Hub layout and read tensor by tensor.

    Attributes:
        config: the Hub `config.json` content.
        generation_config: `generation_config.json` content, when known.
        tokenizer_files: file name -> content (tokenizer.json, tokenizer_config.json,
            special_tokens_map.json...), written beside the weights.
        tensors: every tensor, in the order they should be written.
        read: loads one tensor by name (Hub layout, already dequantised/permuted as needed).
        provenance: where it came from, for the output's README (source, format, revision or
            sha256 of the file...).
        read_rows: optional; `read_rows(name, start, stop)` reads rows `start:stop` of dim 0
            only, so that a large tensor can be cast in slices instead of whole (less memory).
    """

    config: dict[str, Any]
    generation_config: dict[str, Any] | None
    tokenizer_files: dict[str, bytes]
    tensors: list[TensorInfo]
    read: Callable[[str], torch.Tensor]
    provenance: dict[str, str] = field(default_factory=dict)
    read_rows: Callable[[str, int, int], torch.Tensor] | None = None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (it identifies a converted file in READMEs).

    Args:
        path: the file to hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
