"""The upstream status of a site of replicas, in PostgreSQL: what each process of each
replica saw of each upstream source (mirror/upstream_status.py keeps it and writes it to
its data directory's files; here it also reaches the other replicas' web pages).

``upstream_status(replica, pid, upstream, source, up, since, seen_at, last_error,
last_error_at, last_success_at, ratelimit_remaining, ratelimit_at, heartbeat_at,
stopped)``: one row per process (``replica`` is its ``cluster.advertise`` URL) and
source, times in epoch seconds as in the files. ``SiteStatus`` is the recorder's
``Shared``:

- ``write``: an upsert of an upstream's rows, when the recorder writes its file (at
  most every ``WRITE_EVERY`` seconds per upstream, at once on up or down), from its
  writer task, never a request's; a failure is logged (once until one succeeds again).
- a heartbeat every ``HEARTBEAT`` seconds sets ``heartbeat_at = now()`` on the
  process's rows (the database's clock: whether a replica is alive does not depend on
  the replicas' clocks; which one looked last does, as the times are theirs). A process
  that stops sets ``stopped``, as does one starting on the rows an earlier process of
  its replica left under the same pid (a restarted container's pid 1). A row has a say
  on up or down while it is not stopped and its heartbeat is younger than ``ALIVE``
  seconds: a killed replica's say ends within ``ALIVE``, a stopped one's at once.
- while this process leads the site (cluster/leader.py), the heartbeat also deletes,
  every ``PRUNE_EVERY`` seconds, the rows whose heartbeat is older than
  upstream_status.KEPT (processes gone for that long).
- ``views``: every row, for upstream_status.merge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..upstream_status import KEPT, View
from . import schema

log = logging.getLogger("mirror.upstream")

COMPONENT = "upstream_status"
HEARTBEAT = 10.0           # seconds between a process's heartbeats
ALIVE = 35.0               # a row whose heartbeat is older has no say on up or down
PRUNE_EVERY = 3600.0       # seconds between the leader's pruning runs
TIMEOUT = 5.0              # seconds a statement may take

MIGRATIONS: list[list[str]] = [
    [   # 1: the table
        """CREATE TABLE upstream_status (
            replica             text NOT NULL,
            pid                 integer NOT NULL,
            upstream            text NOT NULL,
            source              text NOT NULL,
            up                  boolean NOT NULL,
            since               double precision,
            seen_at             double precision,
            last_error          text,
            last_error_at       double precision,
            last_success_at     double precision,
            ratelimit_remaining bigint,
            ratelimit_at        double precision,
            heartbeat_at        timestamptz NOT NULL DEFAULT now(),
            stopped             boolean NOT NULL DEFAULT false,
            PRIMARY KEY (replica, pid, upstream, source)
        )""",
        "CREATE INDEX upstream_status_heartbeat ON upstream_status (heartbeat_at)",
    ],
]

_FIELDS = ("since", "seen_at", "last_error", "last_error_at", "last_success_at",
           "ratelimit_remaining", "ratelimit_at")

_UPSERT = """
INSERT INTO upstream_status (replica, pid, upstream, source, up, since, seen_at, last_error,
                             last_error_at, last_success_at, ratelimit_remaining, ratelimit_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (replica, pid, upstream, source) DO UPDATE SET
    up = EXCLUDED.up, since = EXCLUDED.since, seen_at = EXCLUDED.seen_at,
    last_error = EXCLUDED.last_error, last_error_at = EXCLUDED.last_error_at,
    last_success_at = EXCLUDED.last_success_at,
    ratelimit_remaining = EXCLUDED.ratelimit_remaining,
    ratelimit_at = EXCLUDED.ratelimit_at, heartbeat_at = now(), stopped = false"""

_VIEWS = """
SELECT replica, upstream, source, up, since, seen_at, last_error, last_error_at,
       last_success_at, ratelimit_remaining, ratelimit_at,
       NOT stopped AND heartbeat_at > now() - make_interval(secs => $1) AS alive
FROM upstream_status"""


async def migrate(conn: Any) -> int:
    return await schema.apply(conn, COMPONENT, MIGRATIONS)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class SiteStatus:
    """This process's rows in ``upstream_status`` (the recorder's ``Shared``)."""

    def __init__(self, pool: Any, replica: str, *,
                 leading: Callable[[], bool] = lambda: False,
                 heartbeat: float = HEARTBEAT, alive: float = ALIVE) -> None:
        self.pool = pool
        self.replica = replica
        self.pid = os.getpid()
        self.leading = leading
        self.heartbeat = heartbeat
        self.alive = alive
        self._task: asyncio.Task[None] | None = None
        self._pruned = -PRUNE_EVERY
        self._failing = False

    async def start(self) -> None:
        """Apply the table's migrations (raises when it cannot), then beat."""
        async with self.pool.acquire(timeout=TIMEOUT) as conn:
            await migrate(conn)
            # rows of an earlier process of this replica given the same pid (a container
            # restarted: pid 1 again) are that process's, which has stopped
            await conn.execute("UPDATE upstream_status SET stopped = true "
                               "WHERE replica = $1 AND pid = $2", self.replica, self.pid,
                               timeout=TIMEOUT)
        self._task = asyncio.create_task(self._beat(), name="upstream status heartbeat")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._run("mark its upstream status stopped",
                        "UPDATE upstream_status SET stopped = true "
                        "WHERE replica = $1 AND pid = $2", self.replica, self.pid)

    async def write(self, upstream: str, sources: dict[str, dict[str, Any]]) -> None:
        rows = []
        for source, state in sources.items():
            remaining = _int(state.get("ratelimit_remaining"))
            rows.append((self.replica, self.pid, upstream, source, bool(state.get("up")),
                         *(_num(state.get(f)) for f in _FIELDS[:2]),
                         None if state.get("last_error") is None
                         else str(state["last_error"]),
                         *(_num(state.get(f)) for f in _FIELDS[3:5]),
                         remaining if remaining is None or abs(remaining) < 2**62 else None,
                         _num(state.get("ratelimit_at"))))
        if rows:
            await self._run("write its upstream status", _UPSERT, rows, many=True)

    async def views(self) -> list[View]:
        async with self.pool.acquire(timeout=TIMEOUT) as conn:
            rows = await conn.fetch(_VIEWS, self.alive, timeout=TIMEOUT)
        return [(bool(r["alive"]), r["upstream"], r["source"],
                 {"up": r["up"], **{f: r[f] for f in _FIELDS}}, r["replica"])
                for r in rows]

    async def prune(self) -> int:
        """Drop the rows of processes gone for ``KEPT`` seconds; how many."""
        async with self.pool.acquire(timeout=TIMEOUT) as conn:
            done = await conn.execute(
                "DELETE FROM upstream_status WHERE heartbeat_at < now() - "
                "make_interval(secs => $1)", KEPT, timeout=TIMEOUT)
        return int(done.split()[-1])

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            await self._run("beat", "UPDATE upstream_status SET heartbeat_at = now() "
                            "WHERE replica = $1 AND pid = $2 AND NOT stopped",
                            self.replica, self.pid)
            if self.leading() and time.monotonic() - self._pruned >= PRUNE_EVERY:
                self._pruned = time.monotonic()
                try:
                    gone = await self.prune()
                except Exception as exc:  # noqa: BLE001 (again in PRUNE_EVERY)
                    log.warning("cannot prune the site's upstream status: %s",
                                f"{type(exc).__name__}: {exc}"[:300])
                else:
                    if gone:
                        log.info("dropped the upstream status of %d sources of processes "
                                 "gone for %gs", gone, KEPT)

    async def _run(self, what: str, sql: str, *args: Any, many: bool = False) -> None:
        """One statement; a failure is logged, once until one succeeds again."""
        try:
            async with self.pool.acquire(timeout=TIMEOUT) as conn:
                if many:
                    await conn.executemany(sql, args[0], timeout=TIMEOUT)
                else:
                    await conn.execute(sql, *args, timeout=TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (the status is for the page: never fatal)
            if not self._failing:
                self._failing = True
                log.warning("replica %s pid %d cannot %s in PostgreSQL: %s", self.replica,
                            self.pid, what, f"{type(exc).__name__}: {exc}"[:300])
            return
        if self._failing:
            self._failing = False
            log.info("replica %s pid %d writes its upstream status again", self.replica,
                     self.pid)
