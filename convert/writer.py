"""Write a `SourceCheckpoint` as a clean Hub-layout folder: config, sharded safetensors, tokenizer, README.

Memory stays at one tensor: shards are planned from `TensorInfo` sizes before anything is read, then
each tensor (a large one slice by slice) is read, cast and appended to its shard file, and freed
before the next is read. The folder is built
under a temporary name beside OUT (same filesystem) and renamed into place only when complete, so an
interrupted or failed conversion never leaves a half-written OUT behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hubquant import __version__
from hubquant.errors import HubquantError
from hubquant.locks import out_lock
from hubquant.models import family_for
from hubquant.models.config import torch_dtype
from hubquant.models.hub import SAFETENSORS_INDEX
from hubquant.models.safetensors_file import SafetensorsWriter

from .source import SourceCheckpoint, TensorInfo

# Decimal units as transformers' `max_shard_size` reads them, plus the binary ones.
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes in a shard-size limit: "5GB", "500MB", "40KB" are decimal (as in transformers), "2GiB" binary.

    Args:
        size: a number of bytes, or a string with a unit.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if match is None:
            raise HubquantError(f"max shard size '{size}' is not a size; write it like 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise HubquantError(f"max shard size '{size}' must be larger than zero")
    return value


def check_out(out: Path, force: bool) -> None:
    """Refuse an OUT that would be overwritten without `force` (an empty folder is fine).

    Args:
        out: the output folder.
        force: replacing a non-empty OUT was asked for.
    """
    if force or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise HubquantError(f"{out} exists and is not empty; pass --force to replace it")


def output_size(info: TensorInfo, dtype: torch.dtype) -> int:
    """Bytes `info` takes once written: floating tensors in `dtype`, others as they are."""
    return math.prod(info.shape) * _out_dtype(info, dtype).itemsize


def plan_shards(tensors: list[TensorInfo], dtype: torch.dtype, limit: int) -> list[list[TensorInfo]]:
    """Group tensors, in order, into shards of at most `limit` bytes in the output dtype.

    Greedy, like transformers: a tensor is never split, and one larger than the limit gets a shard
    of its own.

    Args:
        tensors: the tensors to write, in order.
        dtype: the output dtype of floating tensors.
        limit: the maximum shard size in bytes.
    """
    shards: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    size = 0
    for info in tensors:
        nbytes = output_size(info, dtype)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(info)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _family(config: dict[str, Any]) -> Any:
    """hubquant's family for this config, or None: converting does not need hubquant to load it."""

    try:
        return family_for(config)
    except HubquantError:
        return None


def tensors_to_write(src: SourceCheckpoint) -> list[TensorInfo]:
    """The source's tensors minus those a loader re-derives: a tied `lm_head.weight`, RoPE tables."""
    family = _family(src.config)
    # The family's tie rule; for an architecture hubquant does not load, config.json's word alone.
    tied = family.tied(src.config) if family is not None else bool(src.config.get("tie_word_embeddings"))
    kept = []
    for info in src.tensors:
        if tied and info.name == "lm_head.weight":
            continue  # safetensors cannot store shared tensors; transformers and hubquant re-tie
        if family is not None and family.to_canonical(info.name) == (True, None):
            continue  # e.g. rotary_emb.inv_freq: derived from config.json, dropped by every loader
        kept.append(info)
    return kept


def write_checkpoint(
    src: SourceCheckpoint,
    out: str | Path,
    *,
    dtype: str | torch.dtype = "bf16",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write `src` to `out` as a Hub-layout folder both hubquant and transformers load unchanged.

    Args:
        src: the checkpoint to write.
        out: the output folder; built beside itself under a temporary name and renamed when complete.
        dtype: floating tensors are cast to this ("bf16", "fp16", "fp32").
        max_shard_size: the largest shard, e.g. "5GB", "500MB", "2GiB" (a bigger tensor gets its own).
        force: replace a non-empty `out` (only once the new folder is complete).
        progress: show a progress bar over tensors.

    Returns:
        The output folder.
    """
    target = torch_dtype(dtype)
    limit = parse_size(max_shard_size)
    out = Path(out).expanduser().absolute()
    check_out(out, force)
    tensors = tensors_to_write(src)
    if not tensors:
        raise HubquantError("the source holds no tensors to write; check it is a model checkpoint")
    plan = plan_shards(tensors, target, limit)
    with _staging(out, force) as tmp:
        weight_map, total = _write_shards(src, plan, tmp, target, progress)
        _write_metadata(src, tmp, target, weight_map, total, len(src.tensors))
    return out


def _write_shards(
    src: SourceCheckpoint, plan: list[list[TensorInfo]], tmp: Path, dtype: torch.dtype, progress: bool
) -> tuple[dict[str, str], int]:
    """Read, cast and append each tensor (large ones slice by slice) straight to its shard file.

    Memory holds one tensor (or one slice) at a time, whatever the shard size. Returns
    (weight_map, total bytes).
    """
    from tqdm.auto import tqdm

    weight_map: dict[str, str] = {}
    total = 0
    count = sum(len(shard) for shard in plan)
    with tqdm(total=count, desc="converting", unit="tensor", disable=not progress, leave=False) as bar:
        for i, infos in enumerate(plan, 1):
            name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            entries = [(info.name, tuple(info.shape), _out_dtype(info, dtype)) for info in infos]
            # OSErrors (disk full...) become one line, with the fix, in `_staging`.
            writer = SafetensorsWriter(tmp / name, entries, metadata={"format": "pt"})
            try:
                for info, (_, _, out_dtype) in zip(infos, entries, strict=True):
                    for part in _read_cast(src, info, out_dtype):
                        writer.write(part)
                        total += part.nbytes
                        del part  # hold nothing while the next slice or tensor is read
                    weight_map[info.name] = name
                    bar.update()
            except BaseException:
                writer.close(check=False)  # the staging folder is removed by the caller
                raise
            writer.close()
    return weight_map, total


ROW_CHUNK_BYTES = 8 * 2**20  # slices a large tensor is read and cast in, when the source can


def _out_dtype(info: TensorInfo, dtype: torch.dtype) -> torch.dtype:
    return dtype if info.dtype.is_floating_point else info.dtype


def _read_cast(src: SourceCheckpoint, info: TensorInfo, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """`info`'s tensor cast to `dtype`: whole, or as consecutive row slices when it is large and
    the source can read rows, so that its full-precision copy never exists whole."""
    nbytes = math.prod(info.shape) * info.dtype.itemsize
    if src.read_rows is None or len(info.shape) < 2 or nbytes <= ROW_CHUNK_BYTES:
        yield _checked(src.read(info.name), tuple(info.shape), info.name).to(dtype)
        return
    step = max(1, ROW_CHUNK_BYTES // (math.prod(info.shape[1:]) * info.dtype.itemsize))
    step = max(info.row_block, step - step % info.row_block)  # whole blocks: each row read once
    for start, stop in _spans(info.shape[0], step):
        part = src.read_rows(info.name, start, stop)
        yield _checked(part, (stop - start, *info.shape[1:]), info.name).to(dtype)


def _checked(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise HubquantError(
            f"tensor {name} was read with shape {list(tensor.shape)} but announced as {list(shape)}; "
            "the source is inconsistent"
        )
    return tensor


def _spans(rows: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _write_metadata(
    src: SourceCheckpoint,
    tmp: Path,
    dtype: torch.dtype,
    weight_map: dict[str, str],
    total: int,
    source_count: int,
) -> None:
    """config.json (dtype updated), generation config, index, tokenizer files and README."""

    dtype_name = str(dtype).removeprefix("torch.")
    config = {**src.config, "dtype": dtype_name, "torch_dtype": dtype_name}
    _write_json(tmp / "config.json", config)
    if src.generation_config is not None:
        _write_json(tmp / "generation_config.json", src.generation_config)
    for name, content in src.tokenizer_files.items():
        # A plain name, or one module folder deep (1_Pooling/config.json); never outside OUT.
        parts = [part for part in Path(name).parts if part not in ("", ".", "..", "/")][-2:]
        target = tmp.joinpath(*parts)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(content)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    details = {
        "source": str(src.provenance.get("source", "unknown")),
        **{k: str(v) for k, v in src.provenance.items()},
        "dtype": dtype_name,
        "tensors": str(len(weight_map)),
        "source_tensors": str(source_count),
        "converted_at": when,
        "hubquant_version": __version__,
    }
    index = {"metadata": {"total_size": total, **details}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(tmp / SAFETENSORS_INDEX, index)
    (tmp / "README.md").write_text(readme(details, config))


def readme(details: dict[str, str], config: dict[str, Any]) -> str:
    """A model card saying where the folder came from; `details` lines are `- key: value`."""
    arch = (config.get("architectures") or ["?"])[0]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [hubquant]",
        "---",
        "",
        f"# {details.get('name') or Path(details.get('source', 'model')).name}",
        "",
        f"A {arch} checkpoint converted by hubquant {details['hubquant_version']} to Hub-layout "
        f"safetensors ({details['dtype']}). It loads with `hubquant.load(folder)` and with "
        "transformers' `AutoModelForCausalLM.from_pretrained(folder)`.",
        "",
        "## Provenance",
        "",
        *[f"- {key}: {value}" for key, value in details.items()],
        "",
    ]
    return "\n".join(lines)


def read_readme_details(folder: Path) -> dict[str, str]:
    """The `- key: value` provenance lines of a README written by `readme` ({} when absent).

    Args:
        folder: a converted folder.
    """
    path = folder / "README.md"
    if not path.is_file():
        return {}
    pairs = (line[2:].split(": ", 1) for line in path.read_text().splitlines() if line.startswith("- "))
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _staging(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` on success and removed on any failure.

    The run holds `out`'s lock (`hubquant.locks`) from before the folder is made until `out` is in
    place, so a second run writing the same `out` is refused in one line. Holding it, the debris of
    a killed run is cleared first: its staging folders are removed, and a previous `out` that a
    killed `--force` had swapped aside is put back. A failed write (disk full, file-size limit...)
    is one line naming `out` and the fix, and leaves no temporary folder behind.
    """

    with out_lock(out):  # creates OUT's parent folder, with the one-line error when it cannot
        try:
            clear_debris(out)
        except OSError as error:
            raise HubquantError(
                f"cannot clear what an earlier run left beside {out}: {error.strerror or error} "
                f"({error.filename}); remove it by hand and retry"
            ) from None
        check_out(out, force)  # the debris may have held the previous OUT
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; OUT should be like any new folder
        except OSError as error:
            raise HubquantError(_os_error_message(out, error)) from None
        try:
            yield tmp
            _publish(tmp, out, force)
        except OSError as error:
            _remove(tmp)
            raise HubquantError(_os_error_message(out, error)) from None
        except BaseException:  # KeyboardInterrupt included: never leave a half-written folder
            _remove(tmp)
            raise


staging = _staging  # the public name: quantize writes its folders the same way


def clear_debris(out: Path) -> None:
    """Remove what killed runs left beside `out`; call it holding `out`'s lock.

    A `.OUT.tmp-*` staging folder is an unfinished output, a `.OUT.del-*` folder a replaced one
    being deleted: both removed. A `.OUT.old-*` folder is a whole previous OUT that a `--force` run
    swapped aside before renaming its new folder into place: when OUT is missing the run died
    between the two renames, and the old folder is put back; otherwise it was replaced: removed.

    Args:
        out: the output folder.
    """
    pattern = glob.escape(f".{out.name}.")
    for debris in [*out.parent.glob(pattern + "tmp-*"), *out.parent.glob(pattern + "del-*")]:
        _remove(debris)
    olds = sorted(out.parent.glob(pattern + "old-*"))
    if olds and not (out.exists() or out.is_symlink()) and olds[0].is_dir():
        os.rename(olds.pop(0), out)
    for old in olds:
        _remove(old)


def _os_error_message(out: Path, error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or choose another --out; the partial output was removed"
    elif error.errno == errno.EFBIG:
        fix = (
            "the file-size limit was reached (ulimit -f, or the filesystem's largest file): raise it or "
            "choose another --out; the partial output was removed"
        )
    else:
        fix = "check the source is readable and OUT's folder is writable"
    return f"writing {out} failed: {error.strerror or error}{where}; {fix}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`; an old `out` is swapped away first and deleted last."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not force:  # something appeared at OUT while we were converting
        raise HubquantError(f"{out} exists and is not empty; pass --force to replace it")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous folder back
        raise
    # Renamed before it is deleted, so that a `.old-*` folder is always whole (see clear_debris).
    trash = old.with_name(f".{out.name}.del-{old.name.rsplit('-', 1)[-1]}")
    os.rename(old, trash)
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
