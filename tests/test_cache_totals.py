"""The cache's size totals (``LocalCache.size``, ``hosted_size``: the budget, /metrics,
`mirror stats`) are kept up to date as content comes and goes instead of being summed
over every item on each call; they stay equal to a full recount after adds, links,
unlinks, removals, vanished files, hosted gc, eviction and a resync after another
process changed the index."""

from __future__ import annotations

import asyncio
import hashlib
import json

from mirror import evict
from mirror.cache import LocalCache
from mirror.hosted import gc as hosted_gc
from mirror.models import HOSTED, Manifest, References
from tests.support import index_backend

index_config = index_backend.index_config     # the fixture: each index backend

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def add_blob(cache: LocalCache, data: bytes) -> str:
    temp = await cache.new_temp()
    await temp.write([data])
    digest = sha(data)
    await cache.commit_blob(temp, digest)
    return digest


def image(blobs: list[tuple[str, int]]) -> tuple[Manifest, References]:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": blobs[0][0], "size": blobs[0][1]},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": d, "size": s} for d, s in blobs[1:]]}
    data = json.dumps(doc).encode()
    return Manifest(data, OCI_MANIFEST, sha(data)), References(tuple(d for d, _ in blobs), ())


def check(cache: LocalCache, size: int, hosted: int) -> None:
    """The kept totals, the expected figures and a full recount all agree."""
    assert (cache.size, cache.hosted_size) == (size, hosted)
    assert cache.recount() == (size, hosted)


def test_size_totals_follow_every_change_and_match_a_recount(tmp_path, index_config):
    async def scenario():
        cache = await LocalCache.open(tmp_path, server=False, index=index_config)
        other = None
        try:
            check(cache, 0, 0)
            a = await add_blob(cache, b"a" * 100)
            b = await add_blob(cache, b"b" * 30)
            c = await add_blob(cache, b"c" * 7)
            check(cache, 137, 0)
            await add_blob(cache, b"a" * 100)            # again: counted once
            check(cache, 137, 0)

            # Hosted: a pushed image (links from two hosted repositories to b).
            pushed, refs = image([(b, 30), (c, 7)])
            await cache.put_manifest(HOSTED, "team/app", pushed, refs)
            m = pushed.size
            check(cache, 137 + m, 37 + m)
            await cache.link(HOSTED, "team/other", [b])
            check(cache, 137 + m, 37 + m)                # b is stored (and counted) once
            await cache.unlink(HOSTED, "team/other", digests=[b])
            check(cache, 137 + m, 37 + m)                # team/app still links it
            await cache.unlink(HOSTED, "team/app", digests=[c])
            check(cache, 137 + m, 30 + m)
            await cache.refresh_links(HOSTED, "team/app", [c, a], create=True)
            check(cache, 137 + m, 137 + m)
            await cache.unlink(HOSTED, "team/app", digests=[a])
            check(cache, 137 + m, 37 + m)

            # A hosted-linked blob added after its link counts as hosted once there.
            d_data = b"d" * 11
            await cache.link(HOSTED, "team/app", [sha(d_data)])
            check(cache, 137 + m, 37 + m)
            d = await add_blob(cache, d_data)
            check(cache, 148 + m, 48 + m)

            # Gone from under the server: a blob's file vanishes, a manifest's file too.
            cache.vanished(d)
            check(cache, 137 + m, 37 + m)
            cache.path_for(pushed.digest).unlink()
            cache._hot.clear()
            assert await cache.read_manifest(pushed.digest) is None
            check(cache, 137, 37)

            # Removed (eviction's way): a hosted-linked blob and an unlinked one.
            await cache.remove([c, a], [])
            check(cache, 30, 30)

            # Another process changes the index; the server picks it up with a resync.
            e = await add_blob(cache, b"e" * 5)
            check(cache, 35, 30)
            other = await LocalCache.open(tmp_path, server=False, index=index_config)
            check(other, 46 + m, 41 + m)       # the index still had what vanished
            await other.remove([e, d], [pushed.digest])
            await other.index.bump_generation()
            assert "content" in await cache.resync_if_changed()
            check(cache, 30, 30)

            # Hosted gc: unlinked hosted content older than the grace goes.
            swept = await hosted_gc.collect(cache, grace=-1, delete_untagged=True)
            assert b in swept.blobs
            check(cache, 0, 0)

            # Eviction down to a budget.
            f = await add_blob(cache, b"f" * 40)
            await add_blob(cache, b"g" * 40)
            check(cache, 80, 0)
            removal = await evict.plan(cache, evict.Budget(max_size=50, high=0.9, low=0.5),
                                       force=True)
            await evict.apply(cache, removal)
            assert cache.size <= 25 and removal
            check(cache, 80 - removal.bytes, 0)
            assert f in removal.blobs or cache.blob_size(f) == 40
        finally:
            if other is not None:
                await other.close()
            await cache.close()
    asyncio.run(scenario())
