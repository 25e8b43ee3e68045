"""The site's leader (mirror/cluster/leader.py) against a real PostgreSQL.

Each candidate is a ``PgLeadership`` with its own connection on one database made fresh
for each test, checking every ``PERIOD`` seconds (the server's default is 2 s); one runs
in a separate process to be killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from mirror.cluster import leader as leader_mod
from mirror.cluster.leader import Leadership, PgLeadership
from mirror.config import load_config
from tests.support import postgres as _postgres
from tests.support.ports import free_port

# the fixtures this module uses (tests/support/postgres.py)
postgres, pg_dsn = _postgres.postgres, _postgres.pg_dsn

PERIOD = 0.1
BOUND = 3.0          # seconds a takeover may take here (a few periods, on a loaded machine)
ROOT = Path(__file__).resolve().parent.parent


def run(coro):
    return asyncio.run(coro)


async def until(predicate, timeout: float = BOUND) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "not within the bound"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def lock_holders(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
            "((classid::bigint << 32) | objid::bigint) = $1", leader_mod.LOCK_KEY)
        return [r["pid"] for r in rows]
    finally:
        await conn.close()


async def takes_over(candidate: PgLeadership, dsn: str) -> float:
    """Seconds until ``candidate`` leads, failing after ``BOUND``; then it holds the
    advisory lock, and it alone."""
    took = await until(lambda: candidate.held)
    assert took < BOUND, took
    assert await lock_holders(dsn) == [candidate.pid]
    return took


def test_of_two_candidates_exactly_one_leads_and_a_clean_stop_hands_over(pg_dsn):
    async def main():
        a = PgLeadership(pg_dsn, period=PERIOD)
        b = PgLeadership(pg_dsn, period=PERIOD)
        await a.start()
        await b.start()
        try:
            assert (a.held, b.held) == (True, False)      # a tried first
            await asyncio.sleep(5 * PERIOD)               # b keeps trying, in vain
            assert (a.held, b.held) == (True, False)
            assert await lock_holders(pg_dsn) == [a.pid]
            await a.stop()
            assert not a.held
            await takes_over(b, pg_dsn)
        finally:
            await a.stop()
            await b.stop()
        assert await lock_holders(pg_dsn) == []
    run(main())


def test_a_leader_whose_session_is_terminated_steps_down_and_the_other_takes_over(pg_dsn):
    async def main():
        a = PgLeadership(pg_dsn, period=PERIOD)
        b = PgLeadership(pg_dsn, period=PERIOD)
        await a.start()
        await b.start()
        admin = await asyncpg.connect(pg_dsn)
        try:
            assert a.held and not b.held
            changed = asyncio.ensure_future(a.changed())
            old = a.pid
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", old)
            t0 = time.monotonic()
            assert await asyncio.wait_for(changed, BOUND) is False
            stepped_down = time.monotonic() - t0
            await takes_over(b, pg_dsn)
            assert not a.held                 # it sits out HOLD_OFF periods first
            assert stepped_down < 2 * PERIOD + 1, stepped_down
            # a competes again, in vain, and leads once b is gone
            await asyncio.sleep((leader_mod.HOLD_OFF + 3) * PERIOD)
            assert (a.held, b.held) == (False, True)
            await b.stop()
            await takes_over(a, pg_dsn)
            assert a.pid != old
        finally:
            await admin.close()
            await a.stop()
            await b.stop()
    run(main())


CANDIDATE = """
import asyncio, sys
from mirror.cluster.leader import PgLeadership

async def main():
    me = PgLeadership(sys.argv[1], period=float(sys.argv[2]))
    await me.start()
    while not me.held:
        await me.changed()
    print("held", me.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_killed_leader_process_is_replaced_within_the_bound(pg_dsn):
    """SIGKILL: no stop, no close; the kernel closes the socket and PostgreSQL ends the
    session (and its lock) at once; the other candidate takes it at its next try."""
    proc = subprocess.Popen([sys.executable, "-c", CANDIDATE, pg_dsn, str(PERIOD)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("held "), line

        async def main():
            other = PgLeadership(pg_dsn, period=PERIOD)
            await other.start()
            try:
                await asyncio.sleep(3 * PERIOD)
                assert not other.held
                assert await lock_holders(pg_dsn) == [int(line.split()[1])]
                os.kill(proc.pid, signal.SIGKILL)
                return await takes_over(other, pg_dsn)
            finally:
                await other.stop()
        took = run(main())
        print(f"takeover after SIGKILL: {took:.3f}s (period {PERIOD}s)")
    finally:
        proc.kill()
        proc.wait()


def test_unreachable_postgresql_is_not_fatal_and_leads_once_reachable(postgres, pg_dsn,
                                                                       caplog):
    """A candidate whose PostgreSQL cannot be reached serves without leading, says so
    once, and leads once it can connect."""
    async def main():
        nobody = f"postgresql://mirror@127.0.0.1:{free_port()}/x"
        lost = PgLeadership(nobody, period=PERIOD, timeout=1.0)
        await lost.start()
        try:
            await asyncio.sleep(5 * PERIOD)
            assert not lost.held
            lost.dsn = pg_dsn             # the database is back (here: found)
            await until(lambda: lost.held)
        finally:
            await lost.stop()
    with caplog.at_level("INFO", logger="mirror.cluster"):
        run(main())
    text = caplog.text
    assert text.count("cannot compete for the site's leadership") == 1, text
    assert "reached" in text and "leader: this replica" in text


def test_outside_cluster_mode_leadership_is_the_role_and_fixed(tmp_path):
    plain = load_config(None, environ={}, data_dir=str(tmp_path))
    assert Leadership.of(plain, True).held is True
    assert Leadership.of(plain, False).held is False
    assert type(Leadership.of(plain, True)) is Leadership
    (tmp_path / "c.yml").write_text("index: {postgres: {dsn: 'postgresql://m@127.0.0.1/m'}}\n")
    clustered = load_config(tmp_path / "c.yml", environ={}, data_dir=str(tmp_path))
    assert isinstance(Leadership.of(clustered, True), PgLeadership)
    other_worker = Leadership.of(clustered, False)
    assert type(other_worker) is Leadership and not other_worker.held


# -- a chore that follows the leader: hosted gc ---------------------------------------------


async def _garbage(cache, data: bytes) -> str:
    """A blob pushed to a hosted repository and never referenced: hosted gc's garbage."""
    from mirror.models import HOSTED
    from tests.test_cache_totals import add_blob
    digest = await add_blob(cache, data)
    await cache.link(HOSTED, "team/app", [digest])
    return digest


def test_hosted_gc_runs_on_the_leader_only_and_moves_with_it(pg_dsn, tmp_path):
    """Two replicas (their own data directories), each with hosted gc every 0.2 s and no
    grace: only the leader's collects; once it stops, the other leads and collects."""
    from mirror.cache import LocalCache
    from mirror.config import HostedConfig
    from mirror.hosted.store import HostedStore
    from mirror.models import HOSTED

    async def replica(name: str):
        cache = await LocalCache.open(tmp_path / name)
        hosted = HostedStore(cache, HostedConfig(repositories=("*",), gc_grace=0,
                                                 gc_interval=0.2))
        leadership = PgLeadership(pg_dsn, period=PERIOD)
        await leadership.start()
        await hosted.open(leader=True, leading=lambda: leadership.held)
        return cache, hosted, leadership

    async def main():
        a_cache, a_hosted, a = await replica("a")
        b_cache, b_hosted, b = await replica("b")
        try:
            assert a.held and not b.held
            a_blob = await _garbage(a_cache, b"a's garbage")
            b_blob = await _garbage(b_cache, b"b's garbage")
            await until(lambda: not a_cache.linked(HOSTED, "team/app", a_blob))
            await asyncio.sleep(1.0)                     # five of b's gc periods
            assert b_cache.linked(HOSTED, "team/app", b_blob)
            await a.stop()
            await until(lambda: b.held)
            await until(lambda: not b_cache.linked(HOSTED, "team/app", b_blob))
            assert b_cache.blob_size(b_blob) is None
        finally:
            for hosted, leadership, cache in ((a_hosted, a, a_cache), (b_hosted, b, b_cache)):
                await hosted.aclose()
                await leadership.stop()
                await cache.close()
    run(main())


# -- a leader cut off from PostgreSQL (no FIN, no RST: the link just stops) -----------------


class Link:
    """A TCP relay on 127.0.0.1 to PostgreSQL that can ``freeze`` (stop relaying, keep
    every socket open: what a partition looks like to both ends) and ``cut``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> Link:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pump(src, dst) -> None:
            while not self.frozen.is_set():
                data = await src.read(65536)
                if not data or self.frozen.is_set():
                    return
                dst.write(data)
                await dst.drain()
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer),
                             return_exceptions=True)
        if not self.frozen.is_set():
            for w in (writer, up_writer):
                w.close()

    def cut(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()


def test_a_leader_cut_off_from_postgresql_steps_down_within_period_and_timeout(postgres,
                                                                               pg_dsn):
    """Its check hangs: it stops leading after at most a period and its timeout, though
    its session (and lock) live on at the server until the link goes; then the other
    candidate takes over."""
    async def main():
        link = await Link(postgres.host, postgres.port).start()
        via_link = pg_dsn.replace(f":{postgres.port}/", f":{link.port}/")
        a = PgLeadership(via_link, period=PERIOD, timeout=0.5)
        b = PgLeadership(pg_dsn, period=PERIOD)
        await a.start()
        await b.start()
        try:
            assert a.held and not b.held
            assert await a._conn.fetchval("SHOW tcp_keepalives_idle") == "5"
            link.frozen.set()
            stepped_down = await until(lambda: not a.held)
            assert stepped_down < PERIOD + 0.5 + 1.0, stepped_down
            assert not b.held                  # the server still has a's session
            link.cut()                         # what the server's keepalives would do
            await until(lambda: b.held)
            assert not a.held
        finally:
            link.cut()
            await a.stop()
            await b.stop()
    run(main())


# -- a chore that follows the leader: pruning the change log --------------------------------


def test_the_change_log_is_pruned_by_the_leader_only_and_then_by_its_successor(pg_dsn,
                                                                               tmp_path):
    """Two replicas' caches, each with its evictor (no budget: it only prunes): the
    leader's change log loses its rows older than CHANGES_KEPT, the follower's keeps
    them until it leads."""
    import sqlite3

    from mirror.cache import LocalCache
    from mirror.evict import Budget, Evictor
    from tests.test_cache_totals import add_blob

    def old_changes(name: str) -> int:
        db = sqlite3.connect(tmp_path / name / "index.db")
        try:
            return db.execute("SELECT count(*) FROM changes WHERE at < ?",
                              (time.time() - 3000,)).fetchone()[0]
        finally:
            db.close()

    def age_changes(name: str) -> None:
        db = sqlite3.connect(tmp_path / name / "index.db", timeout=10)
        try:
            with db:
                db.execute("UPDATE changes SET at = at - 3600")
        finally:
            db.close()

    async def replica(name: str):
        cache = await LocalCache.open(tmp_path / name)
        await add_blob(cache, f"{name}'s blob".encode())
        await asyncio.to_thread(age_changes, name)
        leadership = PgLeadership(pg_dsn, period=PERIOD)
        await leadership.start()
        evictor = Evictor(cache, Budget(None), leading=lambda: leadership.held)
        evictor.start()
        return cache, evictor, leadership

    async def main():
        a_cache, a_evictor, a = await replica("a")
        b_cache, b_evictor, b = await replica("b")
        try:
            assert a.held and not b.held
            await until(lambda: old_changes("a") == 0)
            await asyncio.sleep(1.5)                 # the evictor looks each second
            assert old_changes("b") > 0
            await a.stop()
            await until(lambda: b.held)
            await until(lambda: old_changes("b") == 0)
        finally:
            for evictor, leadership, cache in ((a_evictor, a, a_cache), (b_evictor, b, b_cache)):
                await evictor.stop()
                await leadership.stop()
                await cache.close()
    run(main())
