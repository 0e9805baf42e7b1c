"""One daemon per SQLite database file: an exclusive OS lock (``fcntl.flock``) on a lock
file beside the database, held for the process's life and naming its holder's pid."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from gatekeeper.store.errors import DatabaseInUse, StoreUnavailable


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class DatabaseLock:
    """The OS lock (``fcntl.flock``, exclusive) on ``<database>.lock`` that makes a daemon
    the only one serving a SQLite database file; the caller gives the file's real path
    (links resolved), so every name of one file shares one lock (a hard link or a bind
    mount is not seen through). The file holds the holder's pid. The lock
    is released when ``release`` is called or the process ends, however it ends (the
    kernel drops it with the file descriptor); the file itself stays (removing it would
    let two processes each lock a different file)."""

    def __init__(self, path: Path) -> None:
        """Lock ``path``'s lock file. Raises ``DatabaseInUse`` naming the holder's pid when
        another process holds it, ``StoreUnavailable`` when the lock file cannot be
        created."""
        self.path = _lock_path(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot create the lock file {self.path} of database {path}: "
                f"{exc.strerror}; gatekeeper needs to write in the database's folder",
                "read_only" if exc.errno in (errno.EACCES, errno.EROFS) else "unavailable",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise StoreUnavailable(
                    f"cannot lock {self.path} (database {path}): {exc.strerror}"
                ) from exc
            who = f"pid {holder}" if holder is not None else "pid unknown"
            raise DatabaseInUse(
                f"database {path} is in use by another gatekeeper daemon ({who}, lock file "
                f"{self.path}): one daemon per SQLite database; stop that daemon or give "
                "this one another database:",
                holder,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
