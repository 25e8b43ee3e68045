"""The Notifier: takes events as they happen, queues them on disk per endpoint, and
(on one process) sends them.

- ``accept`` (events.sink) is all a request pays: a look at the endpoint's ignore rules
  and an append to a list in memory. Past ``queue_limit`` events waiting in memory the
  event is dropped (counted) rather than let memory grow while the disk is slow.
- The flusher, in every worker, moves those lists to the endpoints' queues on disk
  (queue.py) a moment later, in one transaction each; what does not fit under the bound
  is dropped, counted in ``mirror_notification_events_dropped_total{endpoint}`` and
  logged at most once per ``LOG_EVERY`` seconds per endpoint.
- The senders run on the leader only (``send=True``; Role.leader in app.py), one per
  endpoint: they POST the oldest events (up to ``BATCH`` in one envelope, in queue order)
  and delete them once the endpoint answers 2xx or 3xx (as registry:2 counts success).
  A failure is retried: after ``threshold`` consecutive failures the sender waits
  ``backoff``, doubling at each further round, up to ``MAX_BACKOFF``. Events are thus
  delivered at least once: a POST cut short by a stop is sent again after the restart.
- Several replicas (cluster mode): each replica's queues are in its own data directory,
  so each replica's worker 0 sends its own, whichever replica leads the site's chores
  (mirror/cluster/leader.py): delivery is per replica, in order per replica, and an
  event a follower saw is never lost waiting for a leader that cannot read its queue.

The webhook client is an httpx client of its own (no redirects, the endpoint's
``timeout``, its ``headers``); it has nothing to do with the upstreams'.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from .. import __version__, fileio, metrics
from ..config import EndpointConfig, NotificationsConfig
from .events import Event
from .queue import Queue

log = logging.getLogger("mirror.notify")

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
FLUSH_EVERY = 0.1        # seconds between the flusher's writes (events batch up meanwhile)
IDLE_POLL = 0.5          # seconds a sender waits for other workers' events when idle
BATCH = 100              # events per POST at most
RETRY_PAUSE = 0.05       # seconds between failed tries before the threshold
MAX_BACKOFF = 60.0       # the longest wait (or backoff, if longer)
LOG_EVERY = 30.0         # seconds between an endpoint's "dropped" lines

_HOST = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,300}")


class CannotQueue(Exception):
    """An endpoint's queue file cannot be opened: one line naming it."""


class _Endpoint:
    def __init__(self, config: EndpointConfig, data_dir: Path) -> None:
        self.config = config
        self.queue = Queue(data_dir, config.name, config.queue_limit)
        self.pending: list[Event] = []
        self.wake = asyncio.Event()
        self.dropped_unlogged = 0
        self.last_drop_log = 0.0

    def wants(self, event: Event) -> bool:
        c = self.config
        return event.action not in c.ignored_actions and \
            not (event.media_type and event.media_type in c.ignored_media_types)


class Notifier:
    def __init__(self, config: NotificationsConfig, data_dir: Path,
                 name: Callable[[str, str], str], public_url: str | None = None,
                 port: int = 5000, send: bool = True) -> None:
        self.endpoints = [_Endpoint(e, data_dir) for e in config.endpoints if not e.disabled]
        self.name = name
        self.public_url = public_url
        self.send = send
        self.source = {"addr": f"{socket.gethostname()}:{port}", "instanceID": str(uuid.uuid4())}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Open the queues (CannotQueue: one is not usable) and start the flusher and,
        on the sending process, the senders."""
        opened: list[Queue] = []
        try:
            for ep in self.endpoints:
                try:
                    await fileio.run(ep.queue.open)
                except (OSError, sqlite3.Error) as exc:
                    raise CannotQueue(f"{ep.queue.path}: cannot open the notification queue "
                                      f"of {ep.config.name}: "
                                      f"{getattr(exc, 'strerror', None) or exc}") from None
                opened.append(ep.queue)
        except BaseException:
            for q in opened:
                q.close()
            raise
        for ep in self.endpoints:
            log.info("notifications to %s (%s), timeout=%gs, threshold=%d, backoff=%gs, "
                     "queue_limit=%d%s", ep.config.name, _safe_url(ep.config.url),
                     ep.config.timeout, ep.config.threshold, ep.config.backoff,
                     ep.config.queue_limit, "" if self.send else " (sent by worker 0)")
        if not self.endpoints:
            return
        self._tasks.append(asyncio.create_task(self._flusher(), name="notify flusher"))
        if self.send:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                             headers={"User-Agent": f"mirror/{__version__}"})
            self._tasks += [asyncio.create_task(self._sender(ep), name=f"notify {ep.config.name}")
                            for ep in self.endpoints]

    async def stop(self) -> None:
        """Stop sending, write what is still in memory to the queues, close."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self._flush()
        except Exception:          # noqa: BLE001 (stopping: say so, go on closing)
            log.exception("could not write the last notifications to their queues")
        for ep in self.endpoints:
            await fileio.run(ep.queue.close)
        if self._client is not None:
            await self._client.aclose()

    # -- taking events (on the request's path: memory only) ---------------------------------

    def accept(self, event: Event) -> None:
        for ep in self.endpoints:
            if not ep.wants(event):
                continue
            if len(ep.pending) >= ep.config.queue_limit:
                self._dropped(ep, 1)
                continue
            ep.pending.append(event)
            self._dirty.set()

    # -- to disk ----------------------------------------------------------------------------

    async def _flusher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._flush()
            except Exception:           # noqa: BLE001 (a full disk must not stop the server)
                log.exception("could not queue notifications")
            await asyncio.sleep(FLUSH_EVERY)

    async def _flush(self) -> None:
        for ep in self.endpoints:
            if not ep.pending:
                continue
            events, ep.pending = ep.pending, []
            # Rendered off the event loop too (a burst can be thousands of events); to its
            # end even if cancelled: the events are out of memory now.
            dropped, length = await fileio.run_to_end(self._append, ep, events)
            if dropped:
                self._dropped(ep, dropped)
            if self.send:
                metrics.notification_queue_length.labels(ep.config.name).set(length)
                ep.wake.set()

    def _append(self, ep: _Endpoint, events: list[Event]) -> tuple[int, int]:
        bodies = [json.dumps(e.render(self.name, self._base_url(e), self.source),
                             separators=(",", ":")) for e in events]
        return ep.queue.append(bodies)

    def _base_url(self, event: Event) -> str:
        if self.public_url:
            return self.public_url
        if event.request is None:
            return ""
        scope = event.request.scope
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"),
                    "")
        scheme = scope.get("scheme", "http")
        return f"{scheme}://{host}" if _HOST.fullmatch(host) and scheme in ("http", "https") \
            else ""

    def _dropped(self, ep: _Endpoint, n: int) -> None:
        metrics.notification_events_dropped.labels(ep.config.name).inc(n)
        ep.dropped_unlogged += n
        now = time.monotonic()
        if now - ep.last_drop_log >= LOG_EVERY:
            since = f" in the last {now - ep.last_drop_log:.0f}s" if ep.last_drop_log else ""
            log.warning("notifications to %s: the queue is full (queue_limit %d); dropped %d "
                        "event(s)%s", ep.config.name, ep.config.queue_limit, ep.dropped_unlogged,
                        since)
            ep.dropped_unlogged = 0
            ep.last_drop_log = now

    # -- to the endpoint (the leader only) --------------------------------------------------

    async def _sender(self, ep: _Endpoint) -> None:
        failures = rounds = 0
        name = ep.config.name
        while True:
            try:
                rows = await fileio.run(ep.queue.head, BATCH)
            except Exception:           # noqa: BLE001
                log.exception("notifications to %s: cannot read the queue", name)
                await asyncio.sleep(IDLE_POLL)
                continue
            if not rows:
                metrics.notification_queue_length.labels(name).set(0)
                ep.wake.clear()
                try:
                    await asyncio.wait_for(ep.wake.wait(), IDLE_POLL)
                except TimeoutError:
                    pass
                continue
            problem = await self._post(ep, [body for _, body in rows])
            if problem is None:
                length = await fileio.run(ep.queue.remove_through, rows[-1][0])
                metrics.notification_events_sent.labels(name).inc(len(rows))
                metrics.notification_queue_length.labels(name).set(length)
                if rounds or failures >= 1:
                    log.info("notifications to %s: delivered again after %d failed tries",
                             name, failures + rounds * ep.config.threshold)
                failures = rounds = 0
                continue
            metrics.notification_deliveries_failed.labels(name).inc()
            failures += 1
            if failures < ep.config.threshold:
                if failures == 1 and not rounds:
                    log.warning("notifications to %s: %s; retrying", name, problem)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            delay = min(ep.config.backoff * 2 ** rounds, max(ep.config.backoff, MAX_BACKOFF))
            rounds += 1
            failures = 0
            length = await fileio.run(ep.queue.length)
            metrics.notification_queue_length.labels(name).set(length)
            log.warning("notifications to %s: %d tries failed (%s); %d events queued; next try "
                        "in %gs", name, ep.config.threshold, problem, length, delay)
            await asyncio.sleep(delay)

    async def _post(self, ep: _Endpoint, bodies: list[str]) -> str | None:
        """None when the endpoint took the events, else what went wrong."""
        assert self._client is not None
        content = ('{"events":[' + ",".join(bodies) + "]}").encode()
        headers = [("Content-Type", MEDIA_TYPE)]
        headers += [(k, v) for k, values in ep.config.headers for v in values]
        try:
            response = await self._client.post(ep.config.url, content=content, headers=headers,
                                               timeout=ep.config.timeout)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= response.status_code < 400:
            return None
        return f"answered {response.status_code}"


def _safe_url(url: str) -> str:
    """The URL without its query or user info (either may hold a token)."""
    parts = httpx.URL(url)
    return str(parts.copy_with(query=None, userinfo=b""))
