"""The data directory's lock: one server per data directory.

``hold(data_dir)`` takes an exclusive ``flock`` on ``data_dir/lock`` for the rest of
the process's life and writes the process's PID into it; a second server on the
same directory gets ``DataDirInUse`` naming the holder's PID before it touches
anything (its start-up clean-up would delete the first one's downloads in
progress). ``release()`` at a clean stop empties the file, so a PID found in it
at the next start means the previous server did not stop cleanly. The
maintenance commands never take the lock: they are safe beside a running server.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

NAME = "lock"


class DataDirInUse(Exception):
    """Another process holds the data directory."""


class DataDirLock:
    def __init__(self, path: Path, fd: int, previous_pid: int | None) -> None:
        self.path = path
        self.fd = fd
        self.previous_pid = previous_pid    # a holder that did not stop cleanly

    def release(self) -> None:
        """Empty the file (a clean stop) and let go of the lock."""
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)               # closing the file description drops the flock
            self.fd = -1
            _held.pop(self.path, None)


_held: dict[Path, DataDirLock] = {}


def held(data_dir: str | os.PathLike[str]) -> DataDirLock | None:
    """The lock this process holds on ``data_dir``, if it holds one."""
    return _held.get(Path(data_dir).resolve() / NAME)


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def hold(data_dir: str | os.PathLike[str]) -> DataDirLock:
    """Lock ``data_dir`` for this process (again: the lock it already holds), or raise
    DataDirInUse. Blocking file-system calls: call it before the event loop runs, or
    on a worker thread."""
    data_dir = Path(data_dir).resolve()
    path = data_dir / NAME
    lock = _held.get(path)
    if lock is not None:
        return lock
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            raise DataDirInUse(f"data directory {data_dir} is in use by another mirror "
                               f"(pid {pid if pid is not None else 'unknown'})") from None
        previous = _pid_in(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    lock = _held[path] = DataDirLock(path, fd, previous if previous != os.getpid() else None)
    return lock
