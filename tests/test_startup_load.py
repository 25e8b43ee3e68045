"""Start-up loads the index into memory once when the files and the index agree (a
million rows take seconds to load), and again only when reconciliation dropped rows
whose files were missing, so the maps never name what is gone."""

from __future__ import annotations

import asyncio
import gc

from mirror.cache import LocalCache
from mirror.index import Index
from tests.test_cache_totals import add_blob


def test_a_clean_start_loads_the_index_once_and_a_reconciled_one_again(tmp_path, monkeypatch):
    loads: list[int] = []
    real = Index.load_blobs

    async def counted(self):
        blobs = await real(self)
        loads.append(len(blobs))
        return blobs
    monkeypatch.setattr(Index, "load_blobs", counted)

    async def scenario():
        cache = await LocalCache.open(tmp_path, server=True)
        try:
            kept = await add_blob(cache, b"kept" * 10)
            lost = await add_blob(cache, b"lost" * 5)
        finally:
            await cache.close()

        loads.clear()
        cache = await LocalCache.open(tmp_path, server=True)      # files and rows agree
        try:
            assert loads == [2]
            assert cache.blob_size(kept) == 40 and cache.size == 60
        finally:
            await cache.close()

        cache.path_for(lost).unlink()
        loads.clear()
        cache = await LocalCache.open(tmp_path, server=True)      # a row without its file
        try:
            assert loads == [2, 1]                   # reloaded after the row was dropped
            assert cache.blob_size(lost) is None and cache.size == 40
            assert cache.recount() == (40, 0)
        finally:
            await cache.close()
    asyncio.run(scenario())


def test_the_loaded_maps_are_kept_out_of_the_cyclic_collectors_walks(tmp_path):
    """A full collection walks every object it tracks (120 ms of stalled event loop with
    a million blobs): the maps are frozen out of it once loaded, and again on a reload."""
    async def scenario():
        cache = await LocalCache.open(tmp_path, server=True)
        try:
            await add_blob(cache, b"x" * 10)
            for _ in range(2):
                tracked = {id(o) for o in gc.get_objects()}
                assert id(cache._links) not in tracked and id(cache._tags) not in tracked
                await cache.resync()
        finally:
            await cache.close()
    asyncio.run(scenario())
