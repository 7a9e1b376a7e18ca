"""One run at a time per output folder: an advisory lock file beside OUT, held while the run writes.

`convert`, `quantize --out` and `eval` write their OUT under a lock: `.OUT.lock` in OUT's parent
folder (beside the `.OUT.tmp-*` staging folders), locked with `flock` and holding the writer's pid.
A second run that wants the same OUT is refused at once, in one line naming the first run's pid.
The kernel drops a `flock` when its holder dies, however it dies (`kill -9` included), so a lock file
left behind by a killed run is stale and never blocks: the next run takes it over. The file is
removed when the run ends.

`out_lock(out)` is a context manager. For a function that decides its OUT half-way through (eval
resolves the model first), `@lock_scope` opens a scope for the function's whole call and
`hold(out)` takes a lock inside it; the scope releases every lock it holds when the function
returns or raises.

Where `fcntl` does not exist (Windows) or the filesystem has no locks, runs are not locked.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hubquant.errors import HubquantError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])

_SCOPE: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar(
    "hubquant_lock_scope", default=None
)


def lock_path(out: Path) -> Path:
    """The lock file of output folder `out`: `.NAME.lock` beside it.

    Args:
        out: the output folder.
    """
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _busy(out: Path, pid: int | None) -> HubquantError:
    who = f"another hubquant run (pid {pid})" if pid else "another hubquant run"
    return HubquantError(f"{who} is writing {out}; wait for it to finish or pick another --out")


def _open_locked(out: Path, path: Path) -> int | None:
    """An fd of `path` holding its exclusive flock; None when locking is not possible here."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None  # OUT's folder is not ours to write: nothing to guard there
            raise HubquantError(
                f"cannot create the lock file {path} for {out}: {error.strerror or error}; "
                "check that OUT's folder is writable and has free space"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise _busy(out, pid) from None
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None  # a filesystem without locks
            raise
        # Its previous holder may have removed the file between our open and our flock; then
        # we hold a lock on a file nobody else will ever open: start over on the current path.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            return fd
        os.close(fd)


@contextlib.contextmanager
def out_lock(out: str | Path) -> Iterator[Path]:
    """Hold the lock of output folder `out` for the duration of the block.

    Args:
        out: the output folder (it need not exist; its parent folder is created if missing).

    Yields:
        The lock file's path.

    Raises:
        HubquantError: another live process holds the lock (the message names its pid and the
            fix), or the lock file cannot be created.
    """
    out = Path(out).expanduser().absolute()
    path = lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HubquantError(
            f"cannot create {out.parent}: {error.strerror or error}; pick another --out"
        ) from None
    if fcntl is None:
        yield path
        return
    fd = _open_locked(out, path)
    if fd is None:
        yield path
        return
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its pid goes unnamed
        yield path
    finally:
        # Removed while still locked, so that no one locks the old file after we let it go.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def lock_scope(func: F) -> F:
    """Decorate a function so that locks taken with `hold` inside it last until it returns.

    Args:
        func: the function (e.g. `run_eval`).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _SCOPE.set(stack)
            try:
                return func(*args, **kwargs)
            finally:
                _SCOPE.reset(token)

    return wrapper  # type: ignore[return-value]


def hold(out: str | Path) -> Path:
    """Take the lock of `out` until the enclosing `@lock_scope` function returns.

    Args:
        out: the output folder.

    Returns:
        The lock file's path.

    Raises:
        HubquantError: another live process holds it (see `out_lock`).
        RuntimeError: called outside a `@lock_scope` function (a programming error).
    """
    stack = _SCOPE.get()
    if stack is None:
        raise RuntimeError("hubquant.locks.hold() needs an enclosing @lock_scope function")
    return stack.enter_context(out_lock(out))
