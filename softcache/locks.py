"""One writer at a time: an exclusive OS lock (`fcntl.flock`) on a lock file, held while a dump or a training
run writes.

A cache's lock file sits beside it (`CACHE.lock`, `CACHE.h5.lock`), so replacing the cache never removes the
lock; a run folder's is `RUN/.lock`. Each holds the pid of the process that holds the lock. The OS releases the
lock when that process ends, however it ends, so a lock file left behind by a killed process locks nothing.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from softcache.errors import SoftcacheError


def cache_lock_path(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".lock")


def run_lock_path(run: str | Path) -> Path:
    return Path(run) / ".lock"


def file_in_the_way(path: Path) -> Path | None:
    """The first folder on the way to `path` that exists as a file, if any."""
    return next((p for p in reversed(Path(path).parents) if p.exists() and not p.is_dir()), None)


def _pid(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 32).decode(errors="replace").strip() or "unknown"


def _busy(what: str, pid: str) -> SoftcacheError:
    return SoftcacheError(f"{what} is being written by another softcache process (pid {pid}); wait for it to "
                          "finish or stop it, or choose another --out (nothing was changed)")


def refuse_if_held(path: Path, what: str) -> None:
    """Refuse at once when another process holds the lock at `path`: a command calls it first, before loading
    anything, so a second writer hears it in a fraction of a second (the lock itself is taken later)."""
    pid = holder(path)
    if pid is not None:
        raise _busy(what, pid)


class WriterLock:
    """`with WriterLock(path, what):` holds the exclusive lock on `path`, or refuses at once, naming the pid
    of the process that holds it; `what` names the thing written, e.g. "cache 'c'". The lock file is removed
    when the lock is released, so a command that was refused, or one that finished, leaves none behind."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, -1

    def __enter__(self) -> WriterLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            blocker = file_in_the_way(self.path)
            reason = f"'{blocker}' is a file, not a folder" if blocker else f"{err.strerror}: {err.filename}"
            raise SoftcacheError(f"cannot write {self.what} ({reason}); give --out a path in a folder that can be "
                                 "written") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid(fd)
            os.close(fd)
            raise _busy(self.what, pid) from None
        if not _same_file(fd, self.path):  # its holder removed it between our open and our lock: start again
            os.close(fd)
            return self.__enter__()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        # removed while still held: a process that opened the file meanwhile finds it gone once it has the
        # lock (`_same_file`) and opens the path again
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def holder(path: Path) -> str | None:
    """The pid holding the lock at `path`, or None when nobody does (no file, or its process ended)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid(fd)
    finally:
        os.close(fd)
    return None
