"""Start-up loads the index into memory once when the files and the index agree (a
million rows take seconds to load), and again only when reconciliation after an
unclean stop dropped rows whose files were missing, so the maps never name what is gone."""

from __future__ import annotations

import asyncio
import gc
import threading

from mirror import cache_maps
from mirror.cache import LocalCache
from mirror.models import HOSTED
from tests.test_cache_totals import add_blob, image


def test_a_clean_start_loads_the_index_once_and_a_reconciled_one_again(tmp_path, monkeypatch):
    loads: list[int] = []
    real = cache_maps.read

    def counted(db):
        maps = real(db)
        loads.append(len(maps.blobs))
        return maps
    monkeypatch.setattr(cache_maps, "read", counted)

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

        # A crash: the lock still names the server, and a file went with it.
        (tmp_path / "lock").write_text("999999999\n")
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


def test_a_reload_is_built_off_the_event_loop_and_keeps_what_changed_meanwhile(tmp_path,
                                                                              monkeypatch):
    """A reload (after `mirror gc` beside the server) builds the new maps on a worker
    thread (0.5 s at a million rows, which stalled the event loop when done on it) and
    swaps them in; what this process changed while they loaded is carried over, so
    the result is what a reload from the index gives afterwards."""
    snapshot_taken, go_on = threading.Event(), threading.Event()
    real = cache_maps.read

    def held_back(db):
        maps = real(db)                     # the index as it was before the changes below
        snapshot_taken.set()
        assert go_on.wait(10)
        return maps

    def state(cache):
        return (dict(cache._blobs.items()), dict(cache._manifests.items()), dict(cache._tags),
                set(cache._links), dict(cache._hosted), cache.size, cache.hosted_size)

    async def scenario():
        cache = await LocalCache.open(tmp_path, server=True)
        try:
            a = await add_blob(cache, b"a" * 10)
            c = await add_blob(cache, b"c" * 3)
            await cache.link(HOSTED, "team/old", [c])
            pushed, refs = image([(a, 10)])
            monkeypatch.setattr(cache_maps, "read", held_back)
            reload = asyncio.create_task(cache.resync())
            while not snapshot_taken.is_set():
                await asyncio.sleep(0.01)   # the event loop runs on meanwhile
            b = await add_blob(cache, b"b" * 7)
            await cache.put_manifest(HOSTED, "team/app", pushed, refs)
            await cache.set_tag("docker.io", "library/x", "1", pushed.digest, 60)
            await cache.unlink(HOSTED, "team/old", digests=[c])
            await cache.remove([c], [])
            go_on.set()
            await reload

            assert cache.blob_size(b) == 7 and cache.blob_size(c) is None
            assert cache.manifest_info(pushed.digest) is not None
            assert cache.tag("docker.io", "library/x", "1").digest == pushed.digest
            assert cache.linked(HOSTED, "team/app", a)
            assert not cache.linked(HOSTED, "team/old", c)
            assert (cache.size, cache.hosted_size) == (17 + pushed.size, 10 + pushed.size)
            assert cache.recount() == (cache.size, cache.hosted_size)
            carried = state(cache)
            monkeypatch.setattr(cache_maps, "read", real)
            await cache.resync()
            assert state(cache) == carried
        finally:
            go_on.set()
            await cache.close()
    asyncio.run(scenario())
