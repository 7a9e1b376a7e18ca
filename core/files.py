"""Reading and writing the small files hubquant keeps (JSON settings, results, reports, cards).

One reader of JSON objects that fails in one line naming the file and the fix, and one atomic
writer: readers (or a rerun after `kill -9`) see the previous file or the new one, never part of one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError

# The temporary files a killed write leaves beside its target: `.NAME.<random>.tmp`.
TEMPORARY_PATTERN = ".{name}.*.tmp"


def read_json(
    path: Path, what: str, fix: str = "re-download or fix it", kind: type = dict, name: str | None = None
) -> Any:
    """A JSON object (or, with `kind=list`, a list) from `path`, or a one-line error naming the file:
    missing, unreadable, not JSON, or JSON of another kind (config.json, modules.json, results.json...).

    Args:
        path: the file.
        what: how the message names the file when it is missing ("config.json").
        fix: what the message tells the user to do about a damaged file.
        kind: `dict` or `list`, what the file must hold.
        name: how the message names a damaged file (default: its path), e.g. "X of org/repo".

    Raises:
        HubquantError: the file is missing, unreadable, not JSON or not of `kind`.
    """
    path = Path(path)
    where = name or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HubquantError(f"{path} not found: the folder has no {what}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, 4300-digit numbers
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise HubquantError(f"{where} is not valid JSON ({detail}); {fix}") from None
    except OSError as error:
        raise HubquantError(f"cannot read {path} ({error.strerror or error}); check the file") from None
    if not isinstance(data, kind):
        found = "null" if data is None else type(data).__name__
        wanted = "an object" if kind is dict else f"a {kind.__name__}"
        raise HubquantError(f"{where} holds a JSON {found}, not {wanted}; {fix}")
    return data


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to a temporary file beside `path`, flush it to disk, rename it into place.

    The file gets the mode an ordinary new file gets (0666 less the umask), not the private mode
    of a temporary file. A killed write leaves at most a `.NAME.<random>.tmp` beside `path`
    (`TEMPORARY_PATTERN`), which `remove_temporary_files` clears.

    Args:
        path: the file to write; its folder is created if missing.
        text: the contents.

    Returns:
        `path`.

    Raises:
        HubquantError: it cannot be written (disk full, read-only folder): one line naming the file
            and the fix; the previous file is left as it was and the temporary file is removed.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # renamed only once its bytes are on disk
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        fix = "free disk space or choose another --out" if full else f"check that {path.parent} is writable"
        kept = f"the previous {path.name} is unchanged" if path.is_file() else "nothing was written"
        raise HubquantError(f"cannot write {path}: {error.strerror or error}; {fix} ({kept})") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Any) -> Path:
    """`data` as indented JSON (no NaN or infinity: strict JSON readers refuse them), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def remove_temporary_files(folder: Path, names: list[str]) -> list[Path]:
    """Remove what killed atomic writes of `names` left in `folder`; call it holding the folder's
    lock. Returns what was removed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(TEMPORARY_PATTERN.format(name=name)):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed
