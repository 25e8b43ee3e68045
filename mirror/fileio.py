"""File I/O that never blocks the event loop: every syscall that may touch the disk
runs on the default thread pool. Reads are 1 MiB, which measured several times
cheaper per byte than Starlette's 64 KiB ``FileResponse`` chunks.

A thread cannot be cancelled: a write (or preallocation) whose caller is cancelled
goes on using its file descriptor. ``run_to_end`` therefore lets the cancellation
through only once the thread is done, so whoever closes the descriptor next can
never close it under a write that would then land in whatever file reuses the
number.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable
from typing import TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

CHUNK = 1024 * 1024


async def run(fn: Callable[[*Ts], T], *args: *Ts) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def run_to_end(fn: Callable[[*Ts], T], *args: *Ts) -> T:
    """``run``, except that a cancelled caller still waits for the thread to finish
    before the cancellation goes on (for calls that use a descriptor someone will
    close as soon as the cancellation reaches them)."""
    return await finish(asyncio.get_running_loop().run_in_executor(None, fn, *args))


async def finish(fut: asyncio.Future[T]) -> T:
    """Await ``fut`` to its end, however many times the caller is cancelled meanwhile
    (``fut`` itself is never cancelled); then raise the cancellation, if any, or
    return ``fut``'s outcome."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait({fut})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return fut.result()


IOV_MAX = 512


async def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for a file about to be written (ENOSPC raises); a file
    system that cannot preallocate is simply written as it comes."""
    def fallocate() -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    await run_to_end(fallocate)


def writev_all(fd: int, chunks: list[bytes]) -> None:
    """Write every chunk, in order, with as few system calls as writev allows (call it
    from a worker thread: it blocks)."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views[:IOV_MAX])
        while n:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


async def open_read(path: str | os.PathLike[str]) -> int:
    return await run(os.open, path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def _read_nowait(fd: int, n: int, pos: int) -> bytearray | None:
    """Up to ``n`` bytes at ``pos`` if they are in the page cache, without waiting for
    the disk (preadv with RWF_NOWAIT); None when a read would have to wait."""
    global NOWAIT
    flags = NOWAIT
    if flags is None:         # no RWF_NOWAIT here: every read goes to a thread
        return None
    buf = bytearray(n)
    try:
        got = os.preadv(fd, [buf], pos, flags)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            NOWAIT = None        # this kernel or file system cannot: threads from now on
        return None
    if got <= 0:
        return None
    del buf[got:]
    return buf


NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


async def read_range(fd: int, start: int, end: int,
                     chunk: int = CHUNK) -> AsyncIterator[bytes | bytearray]:
    """Bytes [start, end) of an open file, in chunks; stops early at EOF (a chunk
    copied from the page cache is a bytearray: not copied again to make it bytes).

    Bytes already in the page cache are copied on the event loop (a 1 MiB copy is
    ~0.1 ms, and half the CPU of a thread hop); anything that would wait for the
    disk is read on a thread, so the loop never blocks on I/O."""
    pos = start
    while pos < end:
        n = min(chunk, end - pos)
        data: bytes | bytearray | None = _read_nowait(fd, n, pos)
        if data is None:
            data = await run(os.pread, fd, n, pos)
            if not data:
                return
        pos += len(data)
        yield data
