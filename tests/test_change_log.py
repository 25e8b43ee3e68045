"""The index's change log: every process's writes to blobs, manifests, tags and links
reach every other worker's in-memory maps (``LocalCache.follow_changes``), and a
worker that fell behind a prune reloads everything instead of missing changes.

Two ``LocalCache`` objects on one data directory stand for two worker processes
(they share nothing but the files and the index, as two processes do)."""

from __future__ import annotations

import asyncio
import time

from mirror.cache import LocalCache
from mirror.models import HOSTED
from tests.support import index_backend
from tests.test_cache_totals import add_blob, image

index_config = index_backend.index_config     # the fixture: each index backend


def view(cache: LocalCache) -> tuple:
    """Everything a worker answers lookups from."""
    return (dict(cache._blobs), dict(cache._manifests), dict(cache._tags), set(cache._links),
            cache.size, cache.hosted_size)


def test_another_workers_adds_and_removals_reach_this_one(tmp_path, index_config):
    async def run() -> None:
        one = await LocalCache.open(tmp_path, own_lock=False, index=index_config)
        two = await LocalCache.open(tmp_path, server=True, prepare=False, own_lock=False,
                                    index=index_config)
        try:
            a = await add_blob(one, b"a" * 1000)
            b = await add_blob(one, b"b" * 2000)
            manifest, refs = image([(a, 1000), (b, 2000)])
            await one.put_manifest("docker.io", "lib/x", manifest, refs)
            await one.set_tag("docker.io", "lib/x", "1", manifest.digest, 300)
            await one.link(HOSTED, "team/app", [a])
            assert two.blob_size(a) is None and two.tag("docker.io", "lib/x", "1") is None
            assert await two.follow_changes() > 0
            assert view(two) == view(one)
            assert two.hosted_size == 1000
            # removals, and a change made on this side too
            await one.remove([b], [manifest.digest])
            await one.unlink(HOSTED, "team/app", digests=[a])
            c = await add_blob(two, b"c" * 500)
            await two.follow_changes()
            await one.follow_changes()
            assert view(two) == view(one)
            assert two.blob_size(b) is None and two.tag("docker.io", "lib/x", "1") is None
            assert one.blob_size(c) == 500 and two.hosted_size == 0
            assert await two.follow_changes() == 0          # nothing new: nothing done
        finally:
            await two.close()
            await one.close()
    asyncio.run(run())


def test_a_worker_behind_a_prune_reloads_everything(tmp_path, index_config):
    async def run() -> None:
        one = await LocalCache.open(tmp_path, own_lock=False, index=index_config)
        two = await LocalCache.open(tmp_path, server=True, prepare=False, own_lock=False,
                                    index=index_config)
        try:
            await add_blob(one, b"x" * 10)
            await two.follow_changes()
            late = await add_blob(one, b"y" * 20)
            await one.index.prune_changes(time.time() + 1)      # everything so far
            assert await two.index.changes_since(two._change_seq) is None
            await two.follow_changes()
            assert two.blob_size(late) == 20
            assert view(two) == view(one)
            await add_blob(one, b"z" * 30)                       # and on from there
            assert await two.follow_changes() == 1
            assert view(two) == view(one)
        finally:
            await two.close()
            await one.close()
    asyncio.run(run())
