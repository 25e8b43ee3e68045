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

``in_progress`` lists the downloads running in any process of the server (for the web
page's overview), from the claim files and their headers. A one-process server claims
its downloads the same way, so it is listed too. Whether a claim's lock is held is read
from ``/proc/locks``, not tried: trying it (even shared, for a moment) could make a
process claiming the blob right then think someone else downloads it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from . import fileio

POLL = 0.02              # seconds between looks at a followed download's header
ALIVE_EVERY = 1.0        # seconds between checks that its owner still holds the lock

# magic, generation, state, size, written, pid, started (epoch seconds), temp
_HEADER = struct.Struct("<4sIiqqqd256s")
_MAGIC = b"MFL2"

DOWNLOADING, COMMITTED, FAILED, PASSED = 0, 1, 2, 3   # PASSED: verified, too big to cache
STATES = {DOWNLOADING: "downloading", COMMITTED: "committed", FAILED: "failed",
          PASSED: "passed"}


@dataclass(frozen=True)
class Header:
    generation: int
    state: int
    size: int | None
    written: int
    pid: int
    started: float      # when the claim was taken, then when its download (re)started
    temp: str           # "" until the download starts (it may wait for a fill slot)


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
        self._started = time.time()
        self._temp = ""

    # -- the owner's side -----------------------------------------------------------------

    def _publish(self) -> None:
        os.pwrite(self.fd, _HEADER.pack(_MAGIC, self._generation, self._state,
                                        -1 if self._size is None else self._size,
                                        self._written, os.getpid(), self._started,
                                        self._temp.encode()[:256]), 0)

    def begin(self, temp: Path, generation: int) -> None:
        """A (new) download into ``temp``: followers of an older generation abort."""
        self._temp, self._generation = str(temp), generation
        self._state, self._size, self._written = DOWNLOADING, None, 0
        self._started = time.time()
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
        _, generation, state, size, written, pid, started, temp = _HEADER.unpack(first)
        return Header(generation, state, None if size < 0 else size, written, pid, started,
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


# -- every download running, for the web page --------------------------------------------


@dataclass(frozen=True)
class FillProgress:
    digest: str
    size: int | None            # None until upstream said it
    done: int                   # bytes written so far
    started_at: float | None    # epoch seconds: the claim, then the download's (re)start
    state: str                  # waiting (for a fill slot), downloading, committed, failed,
                                # passed (the last three only for the moment before it ends)


async def in_progress(data_dir: Path) -> list[FillProgress]:
    """The blob downloads running in any process of the server using ``data_dir``,
    oldest first: each claim file whose lock a process holds."""
    return await fileio.run(_in_progress, data_dir)


def _in_progress(data_dir: Path) -> list[FillProgress]:
    held = _flocked()
    found = []
    try:
        paths = list((data_dir / "tmp").glob("*.fill"))
    except OSError:
        return []
    for path in paths:
        algorithm, _, hexpart = path.name.removesuffix(".fill").partition("-")
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue                         # ended meanwhile
        try:
            inode = os.fstat(fd).st_ino
            header = Claim(path, fd, owner=False).read()
        finally:
            os.close(fd)
        if header is None:
            continue
        running = inode in held if held is not None else _alive(header.pid)
        if not running:
            continue
        state = "waiting" if header.state == DOWNLOADING and not header.temp else \
            STATES.get(header.state, "unknown")
        found.append(FillProgress(f"{algorithm}:{hexpart}", header.size, header.written,
                                  header.started or None, state))
    return sorted(found, key=lambda f: (f.started_at or 0.0, f.digest))


def _flocked() -> set[int] | None:
    """The inodes of the files some process holds an exclusive flock on; None where
    /proc/locks cannot be read (then a claim counts as running while its owner lives)."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    held = set()
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:2149289 0 EOF" ("->" marks a waiter)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE":
            try:
                held.add(int(fields[5].rsplit(":", 1)[1]))
            except (IndexError, ValueError):
                pass
    return held


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return pid > 0
