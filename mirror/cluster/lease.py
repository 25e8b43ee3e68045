"""The site-wide fill lease: one replica at a time downloads a blob from upstream.

This is ``fill_shared.py``'s single flight (a claim file and an flock, one machine)
for several replicas sharing one PostgreSQL. Each download in progress has a row in
``fill_leases``, keyed by digest:

    digest        the blob (sha256:/sha512:, checked before any SQL)
    owner         the replica that downloads it (its id, for logs and the web page)
    peer_url      where the others may stream the bytes from while it fills
    token         a number from a sequence, new at every acquire: which grant this is
    expires_at    when the others may take over unless the owner heartbeats first
    heartbeat_at  the owner's last heartbeat
    size, done    the blob's size (once upstream said it) and bytes written so far

- **Acquire** (``Leases.acquire``): one statement, ``INSERT ... ON CONFLICT (digest)
  DO UPDATE ... WHERE fill_leases.expires_at < now() RETURNING``: a new row, or the
  takeover of an expired one; no row back means someone holds it (``Held``, with its
  owner and peer_url). PostgreSQL locks the conflicting row and re-checks the WHERE
  against its newest version, so of many replicas racing, exactly one gets it, and of
  many taking over one expired lease, exactly one does. Times are the database's
  (``now()``), never a replica's clock.
- **Heartbeat** (``Lease.heartbeat``, or ``Lease.keep_alive`` as a background task
  every ttl/3 while fetching): pushes ``expires_at`` on and records the progress, where
  the row still carries this grant's token; when it does not (taken over after an
  expiry, or deleted), ``LeaseLost`` is raised. A lease whose expiry passed but that
  no one took over is still this grant's and is extended.
- **Release** (``Lease.release``): deletes this grant's row and ``NOTIFY fill_done,
  '<digest>'`` in one transaction, whether the blob was committed or not.
- **Wait** (``Leases.wait``): ``LISTEN fill_done`` on one connection per process, then
  look at the row: gone (released), expired (the caller may take over), or sleep until
  its notification or its expiry, whichever comes first, and look again. A release
  wakes its waiters at once; nothing polls at the ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..models import DIGEST_RE
from . import schema

log = logging.getLogger("mirror.cluster.lease")

COMPONENT = "fill_lease"
CHANNEL = "fill_done"
MAX_TEXT = 512                  # owner and peer_url: generous, but bounded

MIGRATIONS: list[list[str]] = [
    [   # 1: the lease table
        "CREATE SEQUENCE fill_lease_tokens",
        """CREATE TABLE fill_leases (
            digest       text PRIMARY KEY,
            owner        text NOT NULL,
            peer_url     text NOT NULL,
            token        bigint NOT NULL,
            expires_at   timestamptz NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            size         bigint,
            done         bigint NOT NULL DEFAULT 0
        )""",
    ],
]

_ACQUIRE = """
INSERT INTO fill_leases AS l (digest, owner, peer_url, token, expires_at, heartbeat_at)
VALUES ($1, $2, $3, nextval('fill_lease_tokens'), now() + make_interval(secs => $4), now())
ON CONFLICT (digest) DO UPDATE
    SET owner = EXCLUDED.owner, peer_url = EXCLUDED.peer_url, token = EXCLUDED.token,
        expires_at = EXCLUDED.expires_at, heartbeat_at = EXCLUDED.heartbeat_at,
        size = NULL, done = 0
    WHERE l.expires_at < now()
RETURNING token, expires_at
"""

_HOLDER = "SELECT owner, peer_url, expires_at FROM fill_leases WHERE digest = $1"

_HEARTBEAT = """
UPDATE fill_leases
   SET expires_at = now() + make_interval(secs => $3), heartbeat_at = now(),
       done = $4, size = coalesce($5, size)
 WHERE digest = $1 AND token = $2
RETURNING expires_at
"""

_RELEASE = "DELETE FROM fill_leases WHERE digest = $1 AND token = $2"

_STATE = """
SELECT extract(epoch FROM expires_at - now())::float8
  FROM fill_leases WHERE digest = $1
"""


class LeaseLost(RuntimeError):
    """This grant of the lease is gone: another replica took it over, or it was
    deleted. The download must stop; its bytes may still be committed if verified."""


@dataclass(frozen=True)
class Held:
    """Someone else holds the lease."""
    owner: str
    peer_url: str


class Waited(enum.Enum):
    RELEASED = "released"       # the owner let go (committed or not): look for the blob
    EXPIRED = "expired"         # the owner stopped heartbeating: the caller may take over
    TIMEOUT = "timeout"         # neither within the time asked for


async def migrate(conn: Any) -> int:
    """Create or update the lease table (idempotent); the number of migrations run."""
    return await schema.apply(conn, COMPONENT, MIGRATIONS)


def _check(digest: str, owner: str = "x", peer_url: str = "x", ttl: float = 1.0) -> None:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a digest: {digest!r}")
    for what, text in (("owner", owner), ("peer_url", peer_url)):
        if not isinstance(text, str) or not text or len(text) > MAX_TEXT \
                or not text.isprintable():
            raise ValueError(f"bad {what}: {text!r}")
    if not (0 < ttl <= 86400):
        raise ValueError(f"bad ttl: {ttl!r}")


class Lease:
    """A grant of the lease on ``digest``, held until released or lost."""

    def __init__(self, leases: Leases, digest: str, owner: str, peer_url: str,
                 token: int, ttl: float, asked: float) -> None:
        self.leases = leases
        self.digest = digest
        self.owner = owner
        self.peer_url = peer_url
        self.token = token
        self.ttl = ttl
        # by this process's clock, cautiously: from when the grant was asked for
        self._valid_until = asked + ttl
        self._lost: LeaseLost | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raise ``LeaseLost`` if the background heartbeat found the lease gone."""
        if self._lost is not None:
            raise self._lost

    async def heartbeat(self, done: int, size: int | None = None) -> None:
        """Extend the lease by its ttl and record the progress; ``LeaseLost`` if this
        grant is no longer the row's."""
        self.check()
        sent = time.monotonic()
        async with self.leases.pool.acquire() as conn:
            found = await conn.fetchval(_HEARTBEAT, self.digest, self.token,
                                        float(self.ttl), int(done), size)
        if found is None:
            self._lost = LeaseLost(f"the fill lease on {self.digest} (token {self.token}) "
                                   f"was taken over or deleted")
            raise self._lost
        self._valid_until = sent + self.ttl

    def keep_alive(self, progress: Callable[[], int],
                   size: Callable[[], int | None] = lambda: None,
                   on_lost: Callable[[LeaseLost], None] | None = None) -> None:
        """Heartbeat every ttl/3 in the background until released, with ``progress()``
        bytes done. A lost lease is logged as an error, kept for ``check()`` and passed
        to ``on_lost``; so is a database out of reach past the lease's expiry."""
        if self._task is None:
            self._task = asyncio.create_task(self._keep_alive(progress, size, on_lost))

    async def _keep_alive(self, progress: Callable[[], int],
                          size: Callable[[], int | None],
                          on_lost: Callable[[LeaseLost], None] | None) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                # a database that does not answer counts as one that fails
                await asyncio.wait_for(self.heartbeat(progress(), size()), self.ttl / 3)
                continue
            except LeaseLost:
                pass
            except Exception as exc:      # the database out of reach, or asyncpg's errors
                if time.monotonic() < self._valid_until:
                    log.warning("fill lease heartbeat for %s failed, retrying: %r",
                                self.digest, exc)
                    continue
                self._lost = LeaseLost(f"the fill lease on {self.digest} expired while "
                                       f"its heartbeat failed: {exc!r}")
            lost = self._lost
            assert lost is not None
            log.error("%s", lost)
            if on_lost is not None:
                on_lost(lost)
            return

    async def release(self, committed: bool) -> bool:
        """Let go of the lease and wake its waiters; False if it was no longer this
        grant's (nothing deleted: the row, if any, is another replica's)."""
        await self._stop()
        async with self.leases.pool.acquire() as conn:
            async with conn.transaction():
                deleted = await conn.execute(_RELEASE, self.digest, self.token)
                held: bool = deleted == "DELETE 1"
                if held:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.digest)
        log.debug("fill lease on %s released (%s)", self.digest,
                  "committed" if committed else "not committed")
        return held

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Leases:
    """The fill leases of one site, through an asyncpg pool; one listening connection
    per process (taken from the pool while anyone waits) wakes the waiters."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: Any = None
        self._listening = asyncio.Lock()

    async def acquire(self, digest: str, owner: str, peer_url: str,
                      ttl: float) -> Lease | Held:
        """The lease on ``digest`` (new, or taken over from an expired one), or who
        holds it."""
        _check(digest, owner, peer_url, ttl)
        async with self.pool.acquire() as conn:
            while True:
                asked = time.monotonic()
                row = await conn.fetchrow(_ACQUIRE, digest, owner, peer_url, float(ttl))
                if row is not None:
                    return Lease(self, digest, owner, peer_url, int(row["token"]), ttl,
                                 asked)
                holder = await conn.fetchrow(_HOLDER, digest)
                if holder is not None:
                    return Held(holder["owner"], holder["peer_url"])
                # released between the two statements: try again

    async def holder(self, digest: str) -> Held | None:
        """Who holds the lease on ``digest`` (expired or not); None if no one."""
        _check(digest)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_HOLDER, digest)
        return None if row is None else Held(row["owner"], row["peer_url"])

    async def wait(self, digest: str, timeout: float) -> Waited:
        """Until the lease on ``digest`` is released or expires, ``timeout`` at most."""
        _check(digest)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        event = asyncio.Event()
        self._waiters.setdefault(digest, set()).add(event)
        try:
            while True:
                event.clear()
                await self._listen()       # again after a lost listening connection
                async with self.pool.acquire() as conn:
                    remaining = await conn.fetchval(_STATE, digest)
                if remaining is None:
                    return Waited.RELEASED
                if remaining <= 0:
                    return Waited.EXPIRED
                left = deadline - loop.time()
                if left <= 0:
                    return Waited.TIMEOUT
                with contextlib.suppress(asyncio.TimeoutError):
                    # just past the expiry, so that the database sees it passed
                    await asyncio.wait_for(event.wait(), min(left, remaining + 0.05))
        finally:
            waiting = self._waiters.get(digest)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiters[digest]
            await self._unlisten()

    async def close(self) -> None:
        """Stop listening (the pool is the caller's to close)."""
        async with self._listening:
            await self._drop_listener()

    # -- the listening connection ----------------------------------------------------------

    async def _listen(self) -> None:
        async with self._listening:
            if self._listener is not None and _dead(self._listener):
                await self._drop_listener()
            if self._listener is None:
                conn = await self.pool.acquire()
                try:
                    await conn.add_listener(CHANNEL, self._notified)
                    conn.add_termination_listener(self._terminated)
                except BaseException:
                    await self.pool.release(conn)
                    raise
                self._listener = conn

    async def _unlisten(self) -> None:
        if self._waiters:
            return
        async with self._listening:
            if not self._waiters:
                await self._drop_listener()

    async def _drop_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        if _dead(conn):
            # The pool let go of it when it died; its proxy may refuse every call.
            with contextlib.suppress(Exception):
                await self.pool.release(conn)
            return
        with contextlib.suppress(Exception):
            conn.remove_termination_listener(self._terminated)
            await conn.remove_listener(CHANNEL, self._notified)
        await self.pool.release(conn)

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        for event in self._waiters.get(payload, ()):
            event.set()

    def _terminated(self, conn: Any) -> None:
        # Notifications may have been missed: every waiter looks again (and listens anew).
        for events in self._waiters.values():
            for event in events:
                event.set()


def _dead(conn: Any) -> bool:
    """Whether a listening connection is gone (closed, or released by the pool)."""
    try:
        return bool(conn.is_closed())
    except Exception:                # asyncpg's proxy of a connection the pool took back
        return True
