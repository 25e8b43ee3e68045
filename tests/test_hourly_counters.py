"""Counters by the hour (the web page's overview): written by the index's batched flush
with the totals, into the hour they were counted in, kept across restarts, taken back
by a failed flush like the totals, and pruned after ``HOURLY_KEPT``."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import types

import httpx

from mirror.index import HOUR, HOURLY_KEPT, Index, IndexUnavailable, open_index
from mirror.index import core as index_module
from tests.support import index_backend
from tests.support.client import read_blob
from tests.support.index_backend import index_of
from tests.test_pull_through import hub_config
from tests.test_workers import REPO, fresh_blob

index_config = index_backend.index_config     # the fixture: each index backend


def test_counts_land_in_the_hour_they_were_counted_in_and_survive_a_reopen(tmp_path, monkeypatch,
                                                                           index_config):
    hour = 1_800_000_000 // HOUR * HOUR
    now = [hour - 0.5]                     # half a second before the hour turns
    monkeypatch.setattr(index_module, "time", types.SimpleNamespace(time=lambda: now[0]))

    async def first() -> None:
        index = await open_index(tmp_path, index_config, flush=False)
        index.count("blob_hits")
        index.count("bytes_from_cache", 100)
        now[0] = hour + 0.5                # the flush runs in the next hour
        await index.flush_usage()
        index.count("blob_hits", 2)
        index.count("bytes_from_upstream", 7)
        await index.close()                # the final flush

    async def second() -> tuple[dict, dict, dict]:
        index = await open_index(tmp_path, index_config, flush=False)
        try:
            return (await index.hourly(hour - 2 * HOUR), await index.hourly(hour + 10),
                    await index.counters())
        finally:
            await index.close()

    asyncio.run(first())
    everything, this_hour, totals = asyncio.run(second())
    assert everything == {hour - HOUR: {"blob_hits": 1, "bytes_from_cache": 100},
                          hour: {"blob_hits": 2, "bytes_from_upstream": 7}}
    assert this_hour == {hour: {"blob_hits": 2, "bytes_from_upstream": 7}}
    assert totals == {"blob_hits": 3, "bytes_from_cache": 100, "bytes_from_upstream": 7}

    async def prune() -> dict:
        index = await open_index(tmp_path, index_config, flush=False)
        try:
            await index.prune_hourly(hour + HOURLY_KEPT + 1 - HOURLY_KEPT)   # 8 days on
            return await index.hourly(0)
        finally:
            await index.close()
    assert asyncio.run(prune()) == {hour: {"blob_hits": 2, "bytes_from_upstream": 7}}


def test_a_failed_flush_takes_its_hourly_counts_back(tmp_path):
    path = tmp_path / "index.db"

    async def run() -> dict:
        index = await Index.open(path, flush=False)
        index.count("manifest_hits", 4)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("DROP TABLE hourly")         # the flush's write fails
        try:
            await index.flush_usage()
        except IndexUnavailable:                   # sqlite3's error, as the index's
            pass
        else:
            raise AssertionError("the flush should have failed")
        other.execute("CREATE TABLE hourly (hour INTEGER NOT NULL, name TEXT NOT NULL, "
                      "value INTEGER NOT NULL, PRIMARY KEY (hour, name))")
        other.close()
        index.count("manifest_hits")
        await index.close()                         # the next flush writes both
        index = await Index.open(path, flush=False)
        try:
            return await index.hourly(time.time() - HOUR)
        finally:
            await index.close()
    assert [v for v in asyncio.run(run()).values()] == [{"manifest_hits": 5}]


def test_an_existing_index_gets_the_table_on_open(tmp_path):
    path = tmp_path / "index.db"

    async def reopen_without_table() -> dict:
        await (await Index.open(path, flush=False)).close()      # an index.db ...
        db = sqlite3.connect(path)
        db.execute("DROP TABLE hourly")                          # ... from before hourly
        db.commit()
        db.close()
        index = await Index.open(path, flush=False)
        try:
            index.count("blob_misses")
            await index.flush_usage()
            return await index.hourly(0)
        finally:
            await index.close()
    assert list(asyncio.run(reopen_without_table()).values()) == [{"blob_misses": 1}]


def test_a_server_s_hourly_counts_are_there_after_a_restart(make_mirror, upstream, tmp_path):
    blob = fresh_blob(tmp_path, upstream, 300_000, "hourly")
    mirror = make_mirror(hub_config(upstream))
    began = time.time()
    got = read_blob(mirror, REPO, blob)
    assert got[2] is None and got[1] == blob.digest
    mirror.restart()
    got = read_blob(mirror, REPO, blob)             # a hit, counted by the new process
    assert got[2] is None
    httpx.get(f"{mirror.url}/v2/", timeout=10)
    mirror.stop()

    async def read() -> dict:
        index = await open_index(mirror.data_dir, index_of(mirror.config), flush=False)
        try:
            return await index.hourly(began)
        finally:
            await index.close()
    hours = asyncio.run(read())
    assert set(hours) <= {int(began) // HOUR * HOUR, int(time.time()) // HOUR * HOUR}
    summed: dict[str, int] = {}
    for names in hours.values():
        for name, value in names.items():
            summed[name] = summed.get(name, 0) + value
    assert summed["blob_misses"] == 1
    assert summed["blob_hits"] == 1
    assert summed["bytes_from_upstream"] == got[0]
    assert summed["bytes_from_cache"] == got[0]
