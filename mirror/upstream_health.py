"""Whether an upstream is up, and the deadline of requests a cached copy could answer.

A transport failure on the upstream's own origin marks it down (``mark_down``); from
then on a background task probes ``/v2/`` (after ``PROBE_FIRST`` seconds, doubling up to
``PROBE_MAX``) until any HTTP answer marks it up again, as does any answer to a
request meanwhile (``mark_up``). ``bounded`` runs a request that has a fallback (tag
revalidation: a cached copy can stand in) within ``revalidate_timeout``, and not at
all while the upstream is down, so stale copies are served without waiting. The
``mirror_upstream_up`` gauge follows the state of the whole group (upstream_group.py):
any of the upstream's sources up. Each change, and each failed probe, goes to
upstream_status.py too (shared with the other worker processes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from . import upstream_errors, upstream_status
from .config import UpstreamConfig
from .errors import UpstreamUnavailable

log = logging.getLogger("mirror.upstream")
T = TypeVar("T")

PROBE_FIRST = 1.0           # seconds from "down" to the first background probe; doubles ...
PROBE_MAX = 30.0            # ... up to this


class Health:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient, source: str) -> None:
        self.config = config
        self.name = config.name
        self.source = source                                 # host[:port] of config.url
        self._client = client                                # the probes go out on it
        self._down_since: float | None = None                # monotonic; None while up
        self._probe: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    @property
    def up(self) -> bool:
        """False after a transport failure until a probe (or any request) gets an answer."""
        return self._down_since is None

    async def bounded(self, fallback: bool, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``; when a cached copy can stand in, within ``revalidate_timeout``,
        and not at all while the upstream is down."""
        if not fallback:
            return await call()
        if self._down_since is not None:
            raise UpstreamUnavailable(
                f"upstream {self.name}: down for {time.monotonic() - self._down_since:.0f}s, "
                f"not asked for {what} (probing in the background)",
                detail={"upstream": self.name, "reason": "down"})
        limit = self.config.revalidate_timeout
        try:
            async with asyncio.timeout(limit):
                return await call()
        except TimeoutError:
            self.mark_down(f"no answer within revalidate_timeout {limit:g}s")
            raise UpstreamUnavailable(f"upstream {self.name}: timed out revalidating {what} "
                                      f"(revalidate_timeout {limit:g}s)",
                                      detail={"upstream": self.name, "reason": "timeout"}) from None

    def mark_down(self, reason: str) -> None:
        upstream_status.down(self.name, self.source, reason)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("upstream %s is down (%s): cached copies are served without asking it "
                        "until a probe of %s/v2/ answers", self.name, reason, self.config.url)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    def mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("upstream %s is back after %.1fs", self.name,
                        time.monotonic() - self._down_since)
            self._down_since = None
            upstream_status.up(self.name, self.source)

    async def _probe_until_up(self) -> None:
        delay = PROBE_FIRST
        while self._down_since is not None:
            await asyncio.sleep(delay)
            if self._down_since is None:
                return
            request = self._client.build_request("GET", f"{self.config.url}/v2/",
                                                 timeout=self.config.revalidate_timeout)
            try:
                resp = await self._client.send(request)
            except httpx.TransportError as exc:
                message = upstream_errors.unavailable(self.name, exc, "probing").message
                log.info("upstream %s still down: %s", self.name, message)
                upstream_status.error(self.name, self.source,
                                      message.removeprefix(f"upstream {self.name}: "))
                delay = min(delay * 2, PROBE_MAX)
                continue
            await resp.aclose()
            self.mark_up()         # any HTTP answer (401 included) means it is there again
