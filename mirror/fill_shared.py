"""Single flight across the worker processes of one server (workers.py).

Each blob download has a **claim file**, ``data_dir/tmp/<algorithm>-<hex>.fill``,
named after the digest. The process that downloads the blob (its owner) holds an
exclusive ``flock`` on it for as long as the download runs and keeps a small header
in it up to date: the download's generation, state, size, bytes written so far and
the temp file they are in. A process whose clients ask for the same blob meanwhile
finds the lock taken and *follows*: it reads the header every ``POLL`` seconds and
sends its clients the bytes from the owner's temp file as they land, holding back
the last byte until the header says the blob was verified and committed. So 16
clients spread over any number of workers cost one upstream download.

- **Claiming** (``claim``): open or create the file, try the lock without waiting.
  Got it: this process owns the download (after the caller checked, under the lock,
  that no one committed the blob meanwhile). Not got: someone else downloads it; follow.
- **The owner's end:** the header says committed (or failed), then the file is
  unlinked, then closed, which drops the lock.
- **An owner that dies** (killed) drops the lock with its descriptor, the header still
  saying "downloading": followers find the lock free (checked every ``ALIVE_EVERY``
  seconds) and end their responses aborted; the client's retry starts a new download
  (the next claimant gets the lock on the same file). Nothing partial is ever visible:
  only a verified, committed file is a cache entry.

The header is fixed-size, written with one ``pwrite``; readers read it twice and
use it only when both reads agree.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

POLL = 0.02              # seconds between looks at a followed download's header
ALIVE_EVERY = 1.0        # seconds between checks that its owner still holds the lock

_HEADER = struct.Struct("<4sIiqqq256s")   # magic, generation, state, size, written, pid, temp
_MAGIC = b"MFL1"

DOWNLOADING, COMMITTED, FAILED, PASSED = 0, 1, 2, 3   # PASSED: verified, too big to cache


@dataclass(frozen=True)
class Header:
    generation: int
    state: int
    size: int | None
    written: int
    pid: int
    temp: str


def claim_path(data_dir: Path, digest: str) -> Path:
    algorithm, hexpart = digest.split(":", 1)
    return data_dir / "tmp" / f"{algorithm}-{hexpart}.fill"


class Claim:
    """An open claim file: owned (``owner``, the flock held) or followed."""

    def __init__(self, path: Path, fd: int, owner: bool) -> None:
        self.path = path
        self.fd = fd
        self.owner = owner
        self._generation = 0
        self._state = DOWNLOADING
        self._size: int | None = None
        self._written = 0
        self._temp = ""

    # -- the owner's side -----------------------------------------------------------------

    def _publish(self) -> None:
        os.pwrite(self.fd, _HEADER.pack(_MAGIC, self._generation, self._state,
                                        -1 if self._size is None else self._size,
                                        self._written, os.getpid(),
                                        self._temp.encode()[:256]), 0)

    def begin(self, temp: Path, generation: int) -> None:
        """A (new) download into ``temp``: followers of an older generation abort."""
        self._temp, self._generation = str(temp), generation
        self._state, self._size, self._written = DOWNLOADING, None, 0
        self._publish()

    def sized(self, size: int | None) -> None:
        self._size = size
        self._publish()

    def progress(self, written: int) -> None:
        self._written = written
        self._publish()

    def finish(self, state: int) -> None:
        """The download ended (COMMITTED, PASSED or FAILED): said in the header,
        then the file goes and the lock with it."""
        if self.fd < 0:
            return
        try:
            if self.owner:
                self._state = state
                self._publish()
                self.path.unlink(missing_ok=True)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the follower's side --------------------------------------------------------------

    def read(self) -> Header | None:
        """The header as the owner last wrote it; None before it wrote one."""
        first = os.pread(self.fd, _HEADER.size, 0)
        while True:
            second = os.pread(self.fd, _HEADER.size, 0)
            if first == second:
                break
            first = second
        if len(first) < _HEADER.size or first[:4] != _MAGIC:
            return None
        _, generation, state, size, written, pid, temp = _HEADER.unpack(first)
        return Header(generation, state, None if size < 0 else size, written, pid,
                      temp.rstrip(b"\0").decode(errors="replace"))

    def owner_alive(self) -> bool:
        """Whether a process still holds the lock (taken and dropped at once if not)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False


def claim(data_dir: Path, digest: str) -> Claim:
    """Own the download of ``digest`` or follow the process that does (blocking file
    calls: run it on a thread)."""
    path = claim_path(data_dir, digest)
    for _ in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Claim(path, fd, owner=False)
        except BaseException:
            os.close(fd)
            raise
        # Locked; but the owner before may have unlinked this very file after we opened
        # it (and a new one may exist under the name): only the file at the path counts.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            owned = Claim(path, fd, owner=True)
            owned._publish()      # at once: followers wait for a header, not a stale one
            return owned
        os.close(fd)
    raise OSError(errno.EAGAIN, f"could not claim the download of {digest}")


async def wait_header(claim: Claim, timeout: float = 5.0) -> Header | None:
    """The followed download's first header (an owner writes it right after taking the
    lock); None if none came (the owner died at once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        header = claim.read()
        if header is not None or loop.time() > deadline:
            return header
        await asyncio.sleep(POLL)
