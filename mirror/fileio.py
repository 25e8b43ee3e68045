"""File I/O that never blocks the event loop: every syscall that may touch the disk
runs on the default thread pool. Reads are 1 MiB, which measured several times
cheaper per byte than Starlette's 64 KiB ``FileResponse`` chunks.
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

CHUNK = 1024 * 1024


async def run(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


async def write_all(fd: int, data: bytes) -> None:
    await run(_write_all, fd, data)


async def open_read(path: str | os.PathLike) -> int:
    return await run(os.open, path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


async def read_range(fd: int, start: int, end: int, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    """Bytes [start, end) of an open file, in chunks; stops early at EOF."""
    pos = start
    while pos < end:
        data = await run(os.pread, fd, min(chunk, end - pos), pos)
        if not data:
            return
        pos += len(data)
        yield data
