"""Usage counts are never lost to a flush cut short: with several workers a flush often
waits for the database's write lock, and the server stopping cancels the periodic
flush right then (before flushing once more). On each index backend: another writer
holds SQLite's write lock (BEGIN IMMEDIATE) or PostgreSQL's writer lock."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg

from mirror.index import open_index
from mirror.index.pg_schema import WRITER_LOCK
from tests.support import index_backend

index_config = index_backend.index_config     # the fixture: each index backend


def test_a_flush_cancelled_while_it_waits_for_the_lock_still_counts_everything(tmp_path,
                                                                             index_config):
    async def run() -> int:
        index = await open_index(tmp_path, index_config, flush=False)
        await index.add_blob("sha256:" + "a" * 64, 10)
        for _ in range(7):
            index.touch("sha256:" + "a" * 64)
        if index_config.postgres is None:
            other = sqlite3.connect(tmp_path / "index.db", timeout=30, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")            # another worker is writing
        else:
            conn = await asyncpg.connect(index_config.postgres.dsn)
            writing = conn.transaction()
            await writing.start()                       # another replica is writing
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITER_LOCK)
        flush = asyncio.ensure_future(index.flush_usage())
        await asyncio.sleep(0.3)                      # the flush waits for the lock
        assert not flush.done()
        flush.cancel()
        await asyncio.sleep(0.1)
        if index_config.postgres is None:
            other.execute("COMMIT")                   # the other writer is done
            other.close()
        else:
            await writing.commit()
            await conn.close()
        try:
            await flush
        except asyncio.CancelledError:
            pass
        for _ in range(3):
            index.touch("sha256:" + "a" * 64)
        await index.close()                           # the final flush
        index = await open_index(tmp_path, index_config, flush=False)
        try:
            return int((await index.db.fetch("SELECT hits FROM blobs"))[0][0])
        finally:
            await index.close()
    assert asyncio.run(run()) == 10
