"""Atomic writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to a temporary file beside `path`, then rename it into place.

    Args:
        path: the file to write; its folder is created if missing.
        text: the contents.

    Returns:
        `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is meant to be shared
        os.replace(tmp, path)
    except OSError as error:
        from hubquant.errors import HubquantError

        Path(tmp).unlink(missing_ok=True)
        raise HubquantError(
            f"cannot write {path}: {error.strerror or error}; free disk space or choose another --out "
            f"(the previous {path.name} is unchanged)"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
