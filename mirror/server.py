"""uvicorn under the app, bounded so slow or idle clients cannot hold the server:

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
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .config import LimitsConfig


class HeaderTimeout:
    """Mixin for uvicorn's HTTP protocols (h11 or httptools): closes the connection
    when a request's headers have not all arrived ``header_timeout`` seconds after the
    connection opened, or after the first byte that came while no request was being
    served. Both protocols set ``self.cycle`` to a new request cycle the moment a
    request's headers are complete; that is the signal used."""

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
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

    def _expired(self) -> None:
        self._header_timer = None
        if self.cycle is self._awaiting and self._idle() and not self.transport.is_closing():
            self.transport.close()


def protocol_class(header_timeout: float, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's protocol (httptools when installed, else h11) with the header timeout."""
    return type(f"HeaderTimeout{base.__name__}", (HeaderTimeout, base),
                {"header_timeout": header_timeout})


def uvicorn_options(limits: LimitsConfig) -> dict[str, Any]:
    return {"http": protocol_class(limits.header_timeout),
            "timeout_keep_alive": limits.keepalive_timeout,
            # uvicorn refuses when connections >= limit, the asking one included.
            "limit_concurrency": limits.max_connections + 1}
