"""The site-wide fill lease (mirror/cluster/lease.py) against a real PostgreSQL.

Each "replica" is its own asyncpg pool (its own connections) on one database, made
fresh for each test.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import asyncpg
import pytest

from mirror.cluster import lease as leases_mod
from mirror.cluster.lease import Held, Lease, LeaseLost, Leases, Waited, migrate
from tests.support import postgres as _postgres

# the fixtures this module uses (tests/support/postgres.py)
postgres, pg_dsn = _postgres.postgres, _postgres.pg_dsn

DIGEST = "sha256:" + hashlib.sha256(b"one blob").hexdigest()


def run(coro):
    return asyncio.run(coro)


async def _replica(dsn: str, size: int = 2) -> Leases:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=size)
    return Leases(pool)


async def _close(*replicas: Leases) -> None:
    for replica in replicas:
        await replica.close()
        await replica.pool.close()


async def _migrated(dsn: str, n: int) -> list[Leases]:
    replicas = [await _replica(dsn) for _ in range(n)]
    async with replicas[0].pool.acquire() as conn:
        await migrate(conn)
    return replicas


async def _row(replica: Leases, digest: str = DIGEST):
    async with replica.pool.acquire() as conn:
        return await conn.fetchrow(
            "SELECT *, extract(epoch FROM expires_at - now())::float8 AS left "
            "FROM fill_leases WHERE digest = $1", digest)


def test_one_of_many_racing_acquires_wins_and_losers_learn_the_holder(pg_dsn):
    async def main():
        replicas = await _migrated(pg_dsn, 12)
        try:
            results = await asyncio.gather(*(
                r.acquire(DIGEST, f"replica-{i}", f"http://10.0.0.{i}:5000", ttl=30)
                for i, r in enumerate(replicas)))
            winners = [x for x in results if isinstance(x, Lease)]
            assert len(winners) == 1, results
            winner = winners[0]
            losers = [x for x in results if isinstance(x, Held)]
            assert len(losers) == 11
            assert {(h.owner, h.peer_url) for h in losers} == {(winner.owner, winner.peer_url)}
            row = await _row(replicas[0])
            assert (row["owner"], row["token"]) == (winner.owner, winner.token)
            assert 25 < row["left"] <= 30
            # the holder itself, asking again, is told it holds it: no second grant
            again = await replicas[0].acquire(DIGEST, "replica-0", "http://x", ttl=30)
            assert again == Held(winner.owner, winner.peer_url)
            await winner.release(committed=True)
            assert await _row(replicas[0]) is None
        finally:
            await _close(*replicas)
    run(main())


def test_many_rounds_of_racing_acquires_never_grant_two(pg_dsn):
    async def main():
        replicas = await _migrated(pg_dsn, 6)
        try:
            for round_ in range(20):
                digest = "sha256:" + hashlib.sha256(b"%d" % round_).hexdigest()
                results = await asyncio.gather(*(
                    r.acquire(digest, f"r{i}", f"http://r{i}", ttl=30)
                    for i, r in enumerate(replicas)))
                assert sum(isinstance(x, Lease) for x in results) == 1, (round_, results)
        finally:
            await _close(*replicas)
    run(main())


def test_heartbeat_extends_the_lease_and_records_progress(pg_dsn):
    async def main():
        a, b = await _migrated(pg_dsn, 2)
        try:
            lease = await a.acquire(DIGEST, "a", "http://a", ttl=1.5)
            assert isinstance(lease, Lease)
            first = await _row(a)
            await asyncio.sleep(1.0)
            await lease.heartbeat(done=4096, size=1 << 20)
            row = await _row(a)
            assert row["expires_at"] > first["expires_at"]
            assert row["heartbeat_at"] > first["heartbeat_at"]
            assert (row["done"], row["size"]) == (4096, 1 << 20)
            await asyncio.sleep(0.8)          # past the first expiry, not the extended one
            assert await b.acquire(DIGEST, "b", "http://b", ttl=1.5) == Held("a", "http://a")
            # the background heartbeat keeps it for several ttls
            written = [0]
            lease.keep_alive(lambda: written[0])
            for _ in range(6):
                written[0] += 100
                await asyncio.sleep(0.5)
                assert await b.acquire(DIGEST, "b", "http://b", ttl=1.5) == \
                    Held("a", "http://a")
            assert (await _row(a))["done"] > 0
            lease.check()
            assert await lease.release(committed=True)
        finally:
            await _close(a, b)
    run(main())


def test_an_expired_lease_is_taken_over_by_exactly_one_waiter(pg_dsn):
    async def main():
        owner, *waiters = await _migrated(pg_dsn, 6)
        try:
            dead = await owner.acquire(DIGEST, "dead", "http://dead", ttl=1)
            assert isinstance(dead, Lease)       # and never heartbeats: it "died"

            async def waiter(i: int, replica: Leases):
                assert await replica.wait(DIGEST, timeout=20) is Waited.EXPIRED
                return await replica.acquire(DIGEST, f"w{i}", f"http://w{i}", ttl=30)

            started = time.monotonic()
            results = await asyncio.gather(*(waiter(i, r) for i, r in enumerate(waiters)))
            took = time.monotonic() - started
            winners = [x for x in results if isinstance(x, Lease)]
            assert len(winners) == 1, results
            assert all(x == Held(winners[0].owner, winners[0].peer_url)
                       for x in results if isinstance(x, Held))
            assert took < 10                      # woken at the expiry, not the timeout
            # the dead owner, back, has lost it: it cannot extend or delete the new grant
            with pytest.raises(LeaseLost):
                await dead.heartbeat(done=0)
            assert not await dead.release(committed=False)
            assert (await _row(owner))["owner"] == winners[0].owner
        finally:
            await _close(owner, *waiters)
    run(main())


def test_release_wakes_a_waiter_through_notify_promptly(pg_dsn):
    async def main():
        a, b, c = await _migrated(pg_dsn, 3)
        try:
            lease = await a.acquire(DIGEST, "a", "http://a", ttl=60)
            assert isinstance(lease, Lease)
            waits = [asyncio.create_task(r.wait(DIGEST, timeout=50)) for r in (b, b, c)]
            await asyncio.sleep(0.5)              # all of them are waiting
            assert not any(w.done() for w in waits)
            released_at = time.monotonic()
            assert await lease.release(committed=True)
            done = await asyncio.wait_for(asyncio.gather(*waits), 10)
            latency = time.monotonic() - released_at
            assert done == [Waited.RELEASED] * 3
            assert latency < 5, latency           # the ttl (60 s) would be a poll
            # after the waits, no listening connection is left taken from the pool
            assert b._listener is None and c._listener is None
            # a lease released before anyone waits: the wait returns at once
            assert await b.wait(DIGEST, timeout=5) is Waited.RELEASED
        finally:
            await _close(a, b, c)
    run(main())


def test_a_waiter_whose_listening_connection_dies_listens_anew(pg_dsn):
    async def main():
        a, b = await _migrated(pg_dsn, 2)
        try:
            lease = await a.acquire(DIGEST, "a", "http://a", ttl=60)
            waiting = asyncio.create_task(b.wait(DIGEST, timeout=50))
            await asyncio.sleep(0.5)
            pid = b._listener.get_server_pid()
            async with a.pool.acquire() as conn:
                assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            for _ in range(100):                  # it listens again, on a new connection
                await asyncio.sleep(0.05)
                if b._listener is not None and not leases_mod._dead(b._listener) \
                        and b._listener.get_server_pid() != pid:
                    break
            assert not waiting.done()
            await lease.release(committed=True)
            assert await asyncio.wait_for(waiting, 10) is Waited.RELEASED
        finally:
            await _close(a, b)
    run(main())


def test_a_wait_times_out_while_the_owner_heartbeats(pg_dsn):
    async def main():
        a, b = await _migrated(pg_dsn, 2)
        try:
            lease = await a.acquire(DIGEST, "a", "http://a", ttl=0.9)
            lease.keep_alive(lambda: 1)
            assert await b.wait(DIGEST, timeout=2.0) is Waited.TIMEOUT
            await lease.release(committed=False)
        finally:
            await _close(a, b)
    run(main())


def test_a_lost_lease_makes_heartbeat_raise(pg_dsn):
    async def main():
        a, b = await _migrated(pg_dsn, 2)
        try:
            # taken over after expiry
            lease = await a.acquire(DIGEST, "a", "http://a", ttl=0.5)
            await asyncio.sleep(0.8)
            taker = await b.acquire(DIGEST, "b", "http://b", ttl=30)
            assert isinstance(taker, Lease) and taker.token != lease.token
            with pytest.raises(LeaseLost):
                await lease.heartbeat(done=10)
            assert lease.lost
            assert (await _row(b))["owner"] == "b"
            await taker.release(committed=True)
            # even when the same replica took it over again: the grant is what counts
            old = await a.acquire(DIGEST, "a", "http://a", ttl=0.5)
            await asyncio.sleep(0.8)
            new = await a.acquire(DIGEST, "a", "http://a", ttl=30)
            assert isinstance(new, Lease)
            with pytest.raises(LeaseLost):
                await old.heartbeat(done=0)
            await new.heartbeat(done=0)
            await new.release(committed=False)
            # deleted under it, with the background heartbeat running: loud, and on_lost
            lease = await a.acquire(DIGEST, "a", "http://a", ttl=0.6)
            told: list[LeaseLost] = []
            lease.keep_alive(lambda: 0, on_lost=told.append)
            async with b.pool.acquire() as conn:
                await conn.execute("DELETE FROM fill_leases")
            await asyncio.sleep(0.6)
            assert len(told) == 1
            with pytest.raises(LeaseLost):
                lease.check()
            assert not await lease.release(committed=False)
        finally:
            await _close(a, b)
    run(main())


def test_a_heartbeat_that_gets_no_answer_past_the_expiry_is_a_lost_lease(pg_dsn):
    async def main():
        a, b = await _migrated(pg_dsn, 2)
        try:
            lease = await a.acquire(DIGEST, "a", "http://a", ttl=0.9)
            told: list[LeaseLost] = []
            lease.keep_alive(lambda: 0, on_lost=told.append)
            async with b.pool.acquire() as conn:
                async with conn.transaction():      # the row locked: heartbeats hang
                    await conn.execute(
                        "SELECT 1 FROM fill_leases WHERE digest = $1 FOR UPDATE", DIGEST)
                    await asyncio.sleep(2.0)
                    assert len(told) == 1, "the owner must know it may have lost the lease"
            with pytest.raises(LeaseLost):
                lease.check()
        finally:
            await _close(a, b)
    run(main())


def test_migrate_twice_is_a_no_op_and_concurrent_migrations_take_turns(pg_dsn):
    async def main():
        replicas = [await _replica(pg_dsn) for _ in range(4)]
        try:
            async def migrate_on(r: Leases) -> int:
                async with r.pool.acquire() as conn:
                    return await migrate(conn)
            ran = await asyncio.gather(*(migrate_on(r) for r in replicas))
            assert sorted(ran) == [0, 0, 0, len(leases_mod.MIGRATIONS)]
            lease = await replicas[0].acquire(DIGEST, "a", "http://a", ttl=30)
            assert isinstance(lease, Lease)
            assert await migrate_on(replicas[1]) == 0     # and the lease survives it
            assert (await _row(replicas[0]))["owner"] == "a"
            async with replicas[0].pool.acquire() as conn:
                versions = await conn.fetch("SELECT component, version FROM schema_versions")
            assert [tuple(v) for v in versions] == [("fill_lease", 1)]
        finally:
            await _close(*replicas)
    run(main())


@pytest.mark.parametrize("digest", [
    "", "sha256:", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "md5:" + "0" * 32,
    "sha256:" + "0" * 64 + "'; DROP TABLE fill_leases; --", "../../etc/passwd",
    "sha256:" + "0" * 64 + "\n", None,
])
def test_a_bad_digest_is_refused_before_any_sql(pg_dsn, digest):
    async def main():
        a, = await _migrated(pg_dsn, 1)
        closed = await _replica(pg_dsn)
        await closed.pool.close()        # any SQL through it would raise InterfaceError
        try:
            for call in (lambda: closed.acquire(digest, "a", "http://a", ttl=30),
                         lambda: closed.wait(digest, timeout=1),
                         lambda: closed.holder(digest)):
                with pytest.raises(ValueError):
                    await call()
            for owner, peer_url, ttl in (("", "http://a", 30), ("a", "", 30),
                                         ("a\n", "http://a", 30), ("a", "http://a", 0),
                                         ("a" * 600, "http://a", 30)):
                with pytest.raises(ValueError):
                    await closed.acquire(DIGEST, owner, peer_url, ttl)
            async with a.pool.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM fill_leases") == 0
        finally:
            await _close(a)
    run(main())
