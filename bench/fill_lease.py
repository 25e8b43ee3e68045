"""Latency of the site-wide fill lease (mirror/cluster/lease.py) on a local PostgreSQL.

    python bench/fill_lease.py [--rounds 500]

Starts a throw-away cluster (tests/support/postgres.py: Debian's postgresql, fsync off,
127.0.0.1) and times, over ``--rounds`` digests, each through its own asyncpg pool:

  acquire     a free digest's lease (the INSERT)
  held        the same digest from another replica (no row back, then the holder)
  heartbeat   one extension with progress
  release     DELETE + NOTIFY, committed
  wake        from release's start to a waiting replica's wait() returning

and prints the median and 99th percentile in milliseconds of each.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from mirror.cluster.lease import Lease, Leases, Waited, migrate  # noqa: E402
from tests.support.postgres import PostgresCluster, pg_bin  # noqa: E402


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"median {statistics.median(ordered) * 1000:7.2f} ms   p99 {p99 * 1000:7.2f} ms"


async def bench(dsn: str, rounds: int) -> dict[str, list[float]]:
    a = Leases(await asyncpg.create_pool(dsn, min_size=2, max_size=4))
    b = Leases(await asyncpg.create_pool(dsn, min_size=2, max_size=4))
    async with a.pool.acquire() as conn:
        await migrate(conn)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("acquire", "held", "heartbeat", "release", "wake")}
    for i in range(rounds):
        digest = "sha256:" + hashlib.sha256(b"%d" % i).hexdigest()
        t = time.perf_counter()
        lease = await a.acquire(digest, "a", "http://a", ttl=30)
        times["acquire"].append(time.perf_counter() - t)
        assert isinstance(lease, Lease)
        t = time.perf_counter()
        await b.acquire(digest, "b", "http://b", ttl=30)
        times["held"].append(time.perf_counter() - t)
        t = time.perf_counter()
        await lease.heartbeat(done=i)
        times["heartbeat"].append(time.perf_counter() - t)
        waiting = asyncio.create_task(b.wait(digest, timeout=30))
        while b._listener is None or digest not in b._waiters:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.005)                  # past its look at the row
        t = time.perf_counter()
        await lease.release(committed=True)
        times["release"].append(time.perf_counter() - t)
        assert await waiting is Waited.RELEASED
        times["wake"].append(time.perf_counter() - t)
    for replica in (a, b):
        await replica.close()
        await replica.pool.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    bin_dir = pg_bin()
    if bin_dir is None:
        sys.exit("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    with PostgresCluster(bin_dir) as cluster:
        times = asyncio.run(bench(cluster.dsn(), args.rounds))
    for name, values in times.items():
        print(f"{name:10} {_ms(values)}   ({len(values)} rounds)")


if __name__ == "__main__":
    main()
