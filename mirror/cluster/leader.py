"""Which process runs the site's chores: the leader.

One machine (no ``index.postgres``): the leader is worker 0 (or the only process),
decided at start-up (``app.Role.leader``), and it never changes: ``Leadership.of``
gives a static answer, opens nothing and imports nothing new.

Several replicas sharing one PostgreSQL (``index.postgres`` set): worker 0 of each
replica is a candidate (the other workers never are). A candidate keeps one dedicated
asyncpg connection (not from any pool) and every ``period`` seconds:

- while it does not lead: ``SELECT pg_try_advisory_lock(LOCK_KEY)``; true makes it the
  site's leader. The lock belongs to the connection's session, so PostgreSQL releases
  it when the session ends, however the leader ended: a stop closes the connection, a
  killed process's socket is closed by its kernel (the backend sees it at once), and a
  machine that vanished is noticed by the server's TCP keepalives, which this
  connection sets short (``KEEPALIVE``: about 11 s).
- while it leads: a cheap query that the session still holds the lock. If the query
  fails or times out, or the connection is gone, it steps down at once (closing the
  connection, so that its lock cannot outlive its belief) and competes again only
  after ``HOLD_OFF`` periods, so that a replica whose link flaps hands over rather than
  snatching the lock back.

So a leader that dies is replaced within about one ``period`` of PostgreSQL noticing
(at once for a killed process), and a leader cut off from PostgreSQL stops its chores
within ``period`` + ``timeout``, before the server's keepalives give its lock away. A
chore that was running when its process stepped down finishes that one run.

``held`` says whether this process leads now; ``changed()`` waits for it to change.
The lines "leader: ..." and "no longer leader: ..." are logged once per change, and the
gauge ``mirror_cluster_leader`` is 1 in the leading process. Which chores follow the
site's leader and which stay with worker 0 of each replica: app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from .. import metrics
from ..config import Config

log = logging.getLogger("mirror.cluster")

LOCK_KEY = 0x6C6561646572      # "leader": the session advisory lock the site leader holds
PERIOD = 2.0                   # seconds between checks (tests use less)
HOLD_OFF = 2                   # periods a process that stepped down waits before competing
# The server side of the leader's connection: a peer that vanished without closing its
# socket is given up after idle + interval * count seconds (PostgreSQL's own settings,
# per session; they apply over TCP, not a unix socket).
KEEPALIVE = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
             "tcp_keepalives_count": "3"}

_HOLDS = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND objsubid = 1
  AND ((classid::bigint << 32) | objid::bigint) = $1"""


class Leadership:
    """Whether this process leads the site's chores: fixed (one machine, or a worker
    that is not a candidate), or ``PgLeadership`` (a candidate in cluster mode)."""

    def __init__(self, held: bool = False) -> None:
        self._held = held
        self._changed = asyncio.Event()

    @classmethod
    def of(cls, config: Config, candidate: bool, *,
           period: float = PERIOD) -> Leadership:
        """The leadership of a process: ``candidate`` is ``Role.leader`` (worker 0, or
        the only process). Without ``index.postgres`` that is the answer, for good."""
        postgres = config.index.postgres
        if postgres is None or not candidate:
            return cls(candidate and postgres is None)
        return PgLeadership(postgres.dsn, period=period, name=postgres.safe_dsn)

    @property
    def held(self) -> bool:
        return self._held

    async def changed(self, timeout: float | None = None) -> bool:
        """Wait until ``held`` changes (or ``timeout`` passes); ``held`` then."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return self._held

    def _set(self, held: bool, why: str = "") -> None:
        if held == self._held:
            return
        self._held = held
        metrics.cluster_leader.set(1 if held else 0)
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        if held:
            log.info("leader: this replica (pid %d) runs the site's chores: eviction, "
                     "hosted gc, pruning of the change log and hourly counters", os.getpid())
        else:
            log.warning("no longer leader: %s; the site's chores stop here", why)

    async def start(self) -> None:
        metrics.cluster_leader.set(1 if self._held else 0)

    async def stop(self) -> None:
        pass


class PgLeadership(Leadership):
    """A candidate for the site's leadership: a session advisory lock in PostgreSQL."""

    def __init__(self, dsn: str, *, period: float = PERIOD, timeout: float | None = None,
                 name: str = "PostgreSQL") -> None:
        super().__init__(False)
        self.dsn = dsn
        self.name = name                  # the DSN without its password, for logs
        self.period = period
        self.timeout = timeout if timeout is not None else max(period, 1.0)
        self.pid: int | None = None       # the backend of our connection (for the tests)
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._rest = 0                    # periods to sit out after stepping down
        self._unreachable = False         # the last connect failed (logged once)

    async def start(self) -> None:
        """A first try now (so that a lone replica leads from its first request), then
        one every ``period`` in the background. PostgreSQL being down is not fatal here:
        the replica serves, and keeps trying."""
        await super().start()
        await self._check()
        self._task = asyncio.create_task(self._loop(), name="cluster leadership")

    async def stop(self) -> None:
        """Stop competing; a leader hands over at once (its session ends)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._drop()
        if self._held:
            self._held = False
            metrics.cluster_leader.set(0)
            log.info("no longer leader: stopping")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            await self._check()

    async def _check(self) -> None:
        try:
            if self._held:
                await self._still_held()
            elif self._rest > 0:
                self._rest -= 1
            else:
                await self._try()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (any failure: not leading, try again later)
            problem = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
            await self._drop()
            if self._held:
                self._rest = HOLD_OFF
                self._set(False, f"lost PostgreSQL ({problem})")
            elif not self._unreachable:
                self._unreachable = True
                log.warning("cannot compete for the site's leadership: %s: %s; trying again "
                            "every %gs", self.name, problem, self.period)

    async def _try(self) -> None:
        conn = await self._connection()
        got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY,
                                  timeout=self.timeout)
        if self._unreachable:
            self._unreachable = False
            log.info("reached %s again for the site's leadership", self.name)
        if got:
            self._set(True)

    async def _still_held(self) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            raise ConnectionError("the connection closed")
        if not await conn.fetchval(_HOLDS, LOCK_KEY, timeout=self.timeout):
            raise RuntimeError("the session no longer holds the lock")

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        await self._drop()
        import asyncpg  # type: ignore[import-untyped]  # cluster mode only (the postgres extra)
        self._conn = await asyncpg.connect(
            self.dsn, timeout=self.timeout,
            server_settings={"application_name": "mirror leadership", **KEEPALIVE})
        self.pid = self._conn.get_server_pid()
        return self._conn

    async def _drop(self) -> None:
        """Close the connection (and with it any lock it holds); never waits long."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), self.timeout)
        except Exception:  # noqa: BLE001 (unreachable: drop the socket, the server follows)
            conn.terminate()
