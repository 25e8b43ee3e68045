"""Zero-copy response bodies: the ASGI "http.response.zerocopysend" extension, offered
by our uvicorn protocol on plain-HTTP httptools connections.

A cached blob served through uvicorn is read into Python and written back out, and
most of a warm serve's CPU went to that copy and uvicorn's socket send. With the
extension the app sends ``{"type": "http.response.zerocopysend", "file": f,
"offset": o, "count": n, "more_body": True}`` after ``http.response.start`` (as the
ASGI spec's "Zero Copy Send" extension describes), and the protocol moves the bytes
from the file to the socket with ``os.sendfile``: the kernel copies page cache to
socket, Python only loops over readiness.

How (``ZeroCopySend``, mixed into the protocol class in server.py):

- advertised only where it can work: plain-HTTP (not TLS: the kernel would send
  plaintext) httptools connections whose transport has a socket. The app stays a
  plain ASGI callable: without the extension it streams as before;
- the headers (and anything an earlier response left queued) are flushed through the
  transport first, so bytes never overtake each other on the wire;
- the socket is written through a duplicate of its descriptor, closed at the end of
  every message: the transport may close its own descriptor under us (the client
  left) and the number be reused by another connection, the duplicate never is;
- the socket is non-blocking: when it is full the send waits on the loop for it to
  be writable, so a client that stops reading holds only its own response;
- file bytes in the page cache are sent on the loop; a window that would have to be
  read from the disk (``mincore`` says which) is sent from a worker thread, so the
  loop never waits on the disk (fileio's rule);
- uvicorn's own bookkeeping (Content-Length accounting, response completion,
  keep-alive, pipelining) is kept: the count is taken off the expected length, and
  the final ``http.response.body`` message goes through uvicorn as usual;
- the client leaving (reset, broken pipe) ends the send quietly: the connection is
  aborted and the cycle marked disconnected, as uvicorn does for a lost connection.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import socket
from typing import Any

from . import fileio, metrics

log = logging.getLogger("mirror")

EXTENSION = "http.response.zerocopysend"
WINDOW = 8 * 1024 * 1024        # bytes checked for page-cache residency at once
SNDBUF = 4 * 1024 * 1024        # the socket's send buffer while sending (Linux doubles it)
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)


class ZeroCopySend:
    """Mixin for uvicorn's httptools protocol: offers ``EXTENSION`` in the scope of
    every request on a plain-HTTP connection and serves its messages."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()  # type: ignore[misc]
        cycle = self.cycle
        if cycle is before or cycle is None or not able(self.transport):
            return
        cycle.scope.setdefault("extensions", {})[EXTENSION] = {}
        plain_send = cycle.send
        transport = self.transport

        async def send(message: Any) -> None:
            if message["type"] == EXTENSION:
                await send_file(cycle, transport, message)
                if not message.get("more_body", False):
                    await plain_send({"type": "http.response.body", "body": b""})
            else:
                await plain_send(message)
        cycle.send = send


def mixins(base: type) -> tuple[type, ...]:
    """``(ZeroCopySend,)`` when ``base`` is uvicorn's httptools protocol (the one this
    was written against), else nothing: h11 connections stream as before."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return ()
    return (ZeroCopySend,) if issubclass(base, HttpToolsProtocol) and _LIBC else ()


def able(transport: asyncio.Transport) -> bool:
    """Whether bytes may go straight to this transport's socket: plain TCP only."""
    if transport.get_extra_info("sslcontext") is not None:
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and _LIBC is not None


async def send_file(cycle: Any, transport: asyncio.Transport, message: Any) -> None:
    """One ``EXTENSION`` message on ``cycle`` (a uvicorn httptools request cycle)."""
    if cycle.disconnected:
        return                             # as uvicorn's send: the client is gone
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError(f"Unexpected ASGI message {EXTENSION!r} outside a response body")
    if cycle.chunked_encoding:
        raise RuntimeError(f"{EXTENSION!r} needs a response with a Content-Length")
    file = message["file"]
    fd = file if isinstance(file, int) else file.fileno()
    offset = message.get("offset")
    if offset is None:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    count = message.get("count")
    if count is None:
        count = os.fstat(fd).st_size - offset
    if cycle.scope["method"] == "HEAD":
        return
    if count > cycle.expected_content_length:
        raise RuntimeError("Response content longer than Content-Length")
    if count <= 0:
        return
    loop = asyncio.get_running_loop()
    out = os.dup(transport.get_extra_info("socket").fileno())
    try:
        _widen(out)
        # What the transport still holds (these headers; the end of an earlier
        # response to a client that reads slowly) goes first, as the socket drains.
        while transport.get_write_buffer_size() and not transport.is_closing():
            await _writable(loop, out)
            await asyncio.sleep(0)          # the transport's own writer goes first
        if transport.is_closing():          # the client left (uvicorn will say so): the
            cycle.disconnected = True       # rest of the response is dropped, as uvicorn
            return                          # drops what is sent to a lost connection
        await _sendfile(loop, out, fd, offset, count)
    except OSError as exc:
        if exc.errno not in _GONE:
            raise
        log.debug("client left during a zero-copy send: %s", exc)
        cycle.disconnected = True
        transport.abort()
        return
    finally:
        os.close(out)
    cycle.expected_content_length -= count
    metrics.sendfile_bytes.inc(count)


async def _sendfile(loop: asyncio.AbstractEventLoop, out: int, fd: int,
                    offset: int, count: int) -> None:
    pos, end = offset, offset + count
    resident_to = pos
    while pos < end:
        if pos >= resident_to:
            window = min(WINDOW, end - pos)
            resident_to = pos + window if _resident(fd, pos, window) else pos
        try:
            if pos < resident_to:
                n = os.sendfile(out, fd, pos, resident_to - pos)
            else:                       # from the disk: a thread waits for it
                n = await fileio.run_to_end(os.sendfile, out, fd, pos, min(WINDOW, end - pos))
        except BlockingIOError:
            waited = loop.time()
            await _writable(loop, out)
            if loop.time() - waited > 1:    # a slow reader: the pages may have gone
                resident_to = pos
            continue
        if n == 0:
            raise OSError(errno.EIO, f"file ended at byte {pos}, before byte {end} "
                                     "the response promised")
        pos += n


def _widen(out: int) -> None:
    """A send buffer of at least SNDBUF: more queued per wake-up, so a busy machine's
    late wake-ups starve the client less (the queue holds page references, not
    copies). It stays for the connection's later responses."""
    sock = socket.socket(fileno=out)
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SNDBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    finally:
        sock.detach()


async def _writable(loop: asyncio.AbstractEventLoop, out: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)
    loop.add_writer(out, wake)
    try:
        await ready
    finally:
        loop.remove_writer(out)


# -- page-cache residency -----------------------------------------------------------------
#
# cachestat(2) (Linux 6.5) counts a range's cached pages in ~10 us per 8 MiB; mincore(2)
# on a fresh mapping of the range (older kernels) looks each page up, ~170 us per 8 MiB.

class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.syscall.restype = ctypes.c_long
        return libc
    except (OSError, AttributeError):
        return None


_LIBC: Any = _load_libc() if hasattr(os, "sendfile") else None
_CACHESTAT: int | None = 451 if os.uname().sysname == "Linux" else None   # one number
_PAGE = mmap.PAGESIZE                                   # on every architecture
_FAILED = ctypes.c_void_p(-1).value


def _resident(fd: int, offset: int, n: int) -> bool:
    """Whether bytes [offset, offset + n) of the file are all in the page cache (so a
    sendfile of them cannot wait for the disk). False when it cannot tell."""
    global _CACHESTAT
    if _CACHESTAT is not None:
        stat = _Stat()
        if _LIBC.syscall(ctypes.c_long(_CACHESTAT), ctypes.c_long(fd),
                         ctypes.byref(_Range(offset, n)), ctypes.byref(stat),
                         ctypes.c_long(0)) == 0:
            return stat.cache >= (offset + n - 1) // _PAGE - offset // _PAGE + 1
        _CACHESTAT = None                   # ENOSYS (older kernel), EPERM (seccomp): mincore
    start = offset - offset % _PAGE
    length = offset + n - start
    addr = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr is None or addr == _FAILED:
        return False
    try:
        vec = ctypes.create_string_buffer((length + _PAGE - 1) // _PAGE)
        if _LIBC.mincore(addr, length, vec) != 0:
            return False
        return b"\0" not in vec.raw
    finally:
        _LIBC.munmap(addr, length)
