"""uvicorn under the app: start-up, signals, and bounds on what clients may hold.

Start-up (``listen`` then ``run``): the socket is bound first, so a port in use is
one line and exit status 1 before anything else happens; then the cache opens (a data
directory the mirror cannot use is one line too); "mirror ready" is logged once
uvicorn accepts on the bound socket. Signals: ``SIGHUP`` re-reads the TLS certificate
and key (new handshakes get the new certificate, open connections go on) and the
htpasswd file; ``SIGTERM`` and ``SIGINT`` stop accepting, let running responses
finish for up to ``shutdown_grace``, and exit 0.

Bounds, so slow or idle clients cannot hold the server:

- ``limits.header_timeout``: a request's headers must arrive within this long of a
  connection opening or of its first byte after a response (uvicorn has no such
  timeout: a client dripping one header line a second holds a connection forever);
- ``limits.keepalive_timeout``: an idle keep-alive connection is closed (uvicorn's
  ``timeout_keep_alive``);
- ``limits.max_connections``: past this many open connections, requests get 503
  (uvicorn's ``limit_concurrency``, which counts the connection asking too).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from . import __version__
from .app import Mirror, Role, StartupError
from .config import Config, LimitsConfig, TlsConfig
from .workers import WorkerArgs
from .zerocopy import mixins

log = logging.getLogger("mirror")


class ListenError(Exception):
    """The listening socket cannot be had: one line naming the address."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or ListenError."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        bound = socket.create_server((host, port), family=family, backlog=2048)
        # create_server makes the socket with protocol 0, and asyncio turns Nagle off
        # (TCP_NODELAY) only on connections accepted from an IPPROTO_TCP socket: with
        # Nagle on, a keep-alive response written as headers then body waited 40 ms for
        # the client's delayed ACK (25 small requests a second per connection). The
        # same descriptor, re-opened, says what it is (workers' sockets already do).
        return socket.socket(fileno=bound.detach())
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {where}: {exc.strerror} (the host part of "
                          "--listen or listen: must be an address of this machine)") from None
    except OSError as exc:
        hint = {errno.EADDRINUSE: "address already in use (another mirror or registry? "
                                  "choose another --listen)",
                errno.EACCES: "permission denied (ports below 1024 need root or "
                              "CAP_NET_BIND_SERVICE; choose a port above 1023)",
                errno.EADDRNOTAVAIL: "address not available (not an address of this "
                                     "machine; choose another --listen)"}.get(exc.errno or 0)
        raise ListenError(f"cannot listen on {where}: "
                          f"{hint or (exc.strerror or str(exc)).lower()}") from None


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context with the configured certificate and key. server.py keeps it
    for the process's life: SIGHUP loads the files into it again."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["http/1.1"])
    load_certificate(context, tls)
    return context


def load_certificate(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """(Re)load the certificate chain and key into ``context``; StartupError (one line)
    when they cannot be read or do not belong together, ``context`` then unchanged."""
    trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)   # a bad pair must not half-load
    for target in (trial, context):
        try:
            target.load_cert_chain(str(tls.cert), str(tls.key))
        except OSError as exc:
            path = getattr(exc, "filename", None)
            reason = exc.strerror if isinstance(exc.strerror, str) else str(exc)
            if isinstance(exc, ssl.SSLError):
                reason = (exc.reason or str(exc)).lower().replace("_", " ")
            raise StartupError(f"tls: cannot load {path or f'{tls.cert} and {tls.key}'}: "
                               f"{reason} (tls.cert must be a PEM certificate chain, tls.key "
                               "its PEM private key)") from None


def describe_certificate(path: Path) -> str:
    """``subject, expires DATE`` of the first certificate in ``path``, for the log."""
    try:
        from cryptography import x509
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        expires = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
        return f"{cert.subject.rfc4514_string()}, expires {expires:%Y-%m-%d}"
    except Exception:                      # only for the log line
        return str(path)


_tls_explained = False


class HeaderTimeout:
    """Mixin for uvicorn's HTTP protocols (h11 or httptools): closes the connection
    when a request's headers have not all arrived ``header_timeout`` seconds after the
    connection opened, or after the first byte that came while no request was being
    served. Both protocols set ``self.cycle`` to a new request cycle the moment a
    request's headers are complete; that is the signal used."""

    header_timeout: float = 10.0
    # What the uvicorn protocol class this is mixed into provides:
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._fresh = True
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._fresh:
            self._fresh = False
            if data[:2] == b"\x16\x03" and not self.transport.get_extra_info("sslcontext"):
                return self._tls_on_plain_port()
        if self._header_timer is None and self._idle():
            self._arm()
        super().data_received(data)  # type: ignore[misc]
        if self._header_timer is not None and self.cycle is not self._awaiting:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _idle(self) -> bool:
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    def _arm(self) -> None:
        self._awaiting = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _tls_on_plain_port(self) -> None:
        """A TLS handshake on the plain-HTTP port: clients try https first (skopeo
        with --tls-verify=false, containerd) and fall back to http on this answer.
        Said once, at debug level, instead of uvicorn's warning on every pull."""
        global _tls_explained
        if not _tls_explained:
            _tls_explained = True
            peer = self.transport.get_extra_info("peername") or ("-", 0)
            log.debug("a TLS handshake came to this plain-HTTP port (from %s): a client tried "
                      "https first, as skopeo with --tls-verify=false and containerd do; it "
                      "falls back to http. Said once; configure tls: to serve https", peer[0])
        body = b"this port speaks plain HTTP, not TLS: use http://\n"
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
        self._disarm()
        self.transport.close()

    def _expired(self) -> None:
        self._header_timer = None
        if self.cycle is self._awaiting and self._idle() and not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout: float, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's protocol (httptools when installed, else h11) with the header timeout,
    and zero-copy sends where it can (zerocopy.py)."""
    return type(f"HeaderTimeout{base.__name__}", (HeaderTimeout, *mixins(base), base),
                {"header_timeout": header_timeout})


def uvicorn_options(limits: LimitsConfig) -> dict[str, Any]:
    return {"http": protocol_class(limits.header_timeout),
            "timeout_keep_alive": limits.keepalive_timeout,
            # uvicorn refuses when connections >= limit, the asking one included.
            "limit_concurrency": limits.max_connections + 1}


# -- running ------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it is ready and when it starts to drain."""

    def __init__(self, config: uvicorn.Config, ready_line: str, grace: float,
                 worker: WorkerArgs | None = None) -> None:
        super().__init__(config)
        self.ready_line = ready_line
        self.grace = grace
        self.worker = worker
        self.stop_signal: int | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            if self.worker is None:
                log.info("%s", self.ready_line)
                return
            # The supervisor says "ready" once every worker has said so here.
            log.debug("worker %d (pid %d) ready", self.worker.index, os.getpid())
            try:
                os.write(self.worker.ready, b"ready\n")
            finally:
                os.close(self.worker.ready)

    def handle_exit(self, sig: int, frame) -> None:
        first = self.stop_signal is None
        if first:
            self.stop_signal = sig
        super().handle_exit(sig, frame)
        if first:
            try:     # not from inside a signal handler: it may interrupt a log call
                asyncio.get_running_loop().call_soon_threadsafe(self._say_stopping, sig)
            except RuntimeError:
                pass

    def _say_stopping(self, sig: int) -> None:
        if self.worker is not None:     # the supervisor says it, once
            return
        log.info("%s: stopping: no new connections; running responses get up to %gs",
                 signal.Signals(sig).name, self.grace)


def run(config: Config, sock: socket.socket, worker: WorkerArgs | None = None) -> int:
    """Serve on ``sock`` until SIGTERM or SIGINT (or, for a ``worker``, until its
    supervisor is gone); the exit status."""
    from .logs import setup
    setup(config.log_level, config.log_format, None if worker is None else worker.index)
    try:
        context = tls_context(config.tls) if config.tls else None
        return asyncio.run(_serve(config, sock, context, worker))
    except StartupError as exc:
        log.debug("start-up failed", exc_info=True)
        print(f"mirror: {exc}", file=sys.stderr)
        return 1


async def _serve(config: Config, sock: socket.socket, context: ssl.SSLContext | None,
                 worker: WorkerArgs | None = None) -> int:
    mirror = Mirror(config, Role() if worker is None else
                    Role(prepare=worker.prepare, leader=worker.index == 0, worker=worker.index,
                         previous_pid=worker.previous_pid))
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    uv_config = uvicorn.Config(mirror.asgi, log_config=None, log_level=config.log_level,
                               access_log=False,          # mirror.access logs instead
                               lifespan="off",            # _serve opens and closes the cache
                               # a float works (it is a wait timeout); the stub says int
                               timeout_graceful_shutdown=config.shutdown_grace,  # type: ignore[arg-type]
                               server_header=False, **uvicorn_options(config.limits))
    uv_config.load()
    uv_config.ssl = context                  # kept: SIGHUP loads new files into it
    server = _Server(uv_config, "", config.shutdown_grace, worker)
    loop = asyncio.get_running_loop()

    def early_stop(sig: int, frame) -> None:   # until uvicorn's own handlers are in
        server.should_exit = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, early_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload(mirror, context)))
    if worker is not None:
        def orphaned() -> None:             # the lifeline's far end closed: supervisor gone
            try:
                if os.read(worker.lifeline, 1):
                    return
            except BlockingIOError:
                return
            loop.remove_reader(worker.lifeline)
            log.warning("worker %d: the supervisor is gone; stopping", worker.index)
            server.should_exit = True
        os.set_blocking(worker.lifeline, False)
        loop.add_reader(worker.lifeline, orphaned)
    try:
        async with mirror.running():
            server.ready_line = (f"mirror {__version__} ready on "
                                 f"{'https' if context else 'http'}://{address} "
                                 f"({mirror.summary()})")
            await server.serve(sockets=[sock])
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
    if worker is None:
        log.info("mirror stopped")
    return 0


async def _reload(mirror: Mirror, context: ssl.SSLContext | None) -> None:
    """SIGHUP: the TLS certificate and key, and the htpasswd file, read again."""
    config = mirror.config
    done: list[str] = []
    if context is not None and config.tls is not None:
        try:
            load_certificate(context, config.tls)
        except StartupError as exc:
            log.error("SIGHUP: kept the previous TLS certificate: %s", exc)
        else:
            done.append(f"TLS certificate ({config.tls.cert}: "
                        f"{describe_certificate(config.tls.cert)})")
    if mirror.guard is not None:
        try:
            users = await mirror.guard.users.reload()
        except (OSError, UnicodeDecodeError) as exc:
            log.error("SIGHUP: kept the previous users: %s: %s", mirror.guard.users.path,
                      getattr(exc, "strerror", None) or exc)
        else:
            done.append(f"htpasswd ({users} user{'' if users == 1 else 's'})")
    if done:
        log.info("reloaded %s", " and ".join(done))
    elif context is None and mirror.guard is None:
        log.info("SIGHUP: nothing to reload (no tls or auth configured)")
