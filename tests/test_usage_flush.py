"""Usage counts are never lost to a flush cut short: with several workers a flush often
waits for the database's write lock, and the server stopping cancels the periodic
flush right then (before flushing once more)."""

from __future__ import annotations

import asyncio
import sqlite3

from mirror.index import Index


def test_a_flush_cancelled_while_it_waits_for_the_lock_still_counts_everything(tmp_path):
    path = tmp_path / "index.db"

    async def run() -> int:
        index = await Index.open(path, flush=False)
        await index.add_blob("sha256:" + "a" * 64, 10)
        for _ in range(7):
            index.touch("sha256:" + "a" * 64)
        other = sqlite3.connect(path, timeout=30, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")            # another worker is writing
        flush = asyncio.ensure_future(index.flush_usage())
        await asyncio.sleep(0.3)                      # the flush waits for the lock
        flush.cancel()
        await asyncio.sleep(0.1)
        other.execute("COMMIT")                       # the other writer is done
        other.close()
        try:
            await flush
        except asyncio.CancelledError:
            pass
        for _ in range(3):
            index.touch("sha256:" + "a" * 64)
        await index.close()                           # the final flush
        db = sqlite3.connect(path)
        try:
            return db.execute("SELECT hits FROM blobs").fetchone()[0]
        finally:
            db.close()
    assert asyncio.run(run()) == 10
