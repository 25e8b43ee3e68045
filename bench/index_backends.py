"""The index's hot paths on each backend: SQLite (index.db in a temp dir) and
PostgreSQL (a throw-away cluster from tests/support/postgres.py, on loopback).

    python bench/index_backends.py [--rows 100000] [--touches 1000] [--changes 1000]

  usage flush   ``--touches`` distinct blobs touched (and as many counter bumps), then
                one ``flush_usage`` (the once-a-second write of every process); median of 5
  follow        another process's ``--changes`` blobs added, then one
                ``LocalCache.follow_changes`` reading and applying them; median of 5
  idle follow   ``follow_changes`` with nothing new (what each process pays each second)
  miss writes   ``add_blob`` one at a time (a fill's commit), per call, median of 200
  maps load     ``LocalCache.resync`` of ``--rows`` blobs (start-up, and a reload)

Prints one row per backend (milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirror.cache import LocalCache  # noqa: E402
from mirror.config_scale import IndexConfig, PostgresConfig  # noqa: E402
from tests.support.postgres import PostgresCluster, pg_bin  # noqa: E402


def digest(prefix: str, i: int) -> str:
    return "sha256:" + hashlib.sha256(f"{prefix}{i}".encode()).hexdigest()


async def measure(config: IndexConfig, args: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-index-"))
    one = await LocalCache.open(work, own_lock=False, index=config)
    two = await LocalCache.open(work, server=True, prepare=False, own_lock=False, index=config)
    found: dict[str, float] = {}
    try:
        async with one.index.db.writing() as tx:
            now = time.time()
            await tx.executemany("INSERT INTO blobs (digest, size, first_seen, last_access) "
                                 "VALUES (?, ?, ?, ?)",
                                 [(digest("row", i), i, now, now) for i in range(args.rows)])
        began = time.perf_counter()
        await two.resync()
        found["maps load"] = time.perf_counter() - began
        times = []
        for _ in range(5):
            for i in range(args.touches):
                one.index.touch(digest("row", i))
                one.index.count("blob_hits")
            began = time.perf_counter()
            await one.index.flush_usage()
            times.append(time.perf_counter() - began)
        found["usage flush"] = statistics.median(times)
        times = []
        for n in range(5):
            async with one.index.db.writing() as tx:
                await tx.executemany(
                    "INSERT INTO blobs (digest, size, first_seen, last_access) "
                    "VALUES (?, ?, ?, ?)",
                    [(digest(f"new{n}-", i), i, now, now) for i in range(args.changes)])
            began = time.perf_counter()
            applied = await two.follow_changes()
            times.append(time.perf_counter() - began)
            assert applied == args.changes, applied
        found["follow"] = statistics.median(times)
        times = []
        for _ in range(50):
            began = time.perf_counter()
            await two.follow_changes()
            times.append(time.perf_counter() - began)
        found["idle follow"] = statistics.median(times)
        times = []
        for i in range(200):
            began = time.perf_counter()
            await one.index.add_blob(digest("miss", i), i)
            times.append(time.perf_counter() - began)
        found["miss writes"] = statistics.median(times)
    finally:
        await two.close()
        await one.close()
    return {k: v * 1000 for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--touches", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=1000)
    args = parser.parse_args()
    bin_dir = pg_bin()
    if bin_dir is None:
        sys.exit("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    rows = {"sqlite": asyncio.run(measure(IndexConfig(), args))}
    with PostgresCluster(bin_dir) as cluster:
        dsn = cluster.dsn(cluster.new_database())
        rows["postgres"] = asyncio.run(measure(IndexConfig(postgres=PostgresConfig(dsn)), args))
    keys = list(rows["sqlite"])
    print(f"{'ms':<10}" + "".join(f"{k:>14}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<10}" + "".join(f"{row[k]:>14.2f}" for k in keys))


if __name__ == "__main__":
    main()
