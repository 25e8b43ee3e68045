"""Start-up after a clean stop does not walk every file in the cache (8 s at a million
files): the index names a file only once its bytes are on disk, so without a crash the
files and the rows agree. After an unclean stop the walk still runs and removes what
the crash left."""

from __future__ import annotations

import asyncio
import logging

from mirror import cache as cache_module
from mirror.cache import LocalCache
from tests.test_cache_totals import add_blob, sha


def test_only_an_unclean_stop_costs_the_walk_of_the_files(tmp_path, monkeypatch, caplog):
    walks: list[int] = []
    real = cache_module.scan_blobs

    def counted(root, expected):
        found = real(root, expected)
        walks.append(len(found[0]))
        return found
    monkeypatch.setattr(cache_module, "scan_blobs", counted)
    stray_digest = sha(b"renamed in, never indexed")
    stray = tmp_path / "blobs" / "sha256" / stray_digest[7:9] / stray_digest[7:]

    async def scenario():
        cache = await LocalCache.open(tmp_path, server=True)
        try:
            kept = await add_blob(cache, b"kept" * 10)
        finally:
            await cache.close()
        assert walks == []                                  # a new data directory

        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"renamed in, never indexed")
        cache = await LocalCache.open(tmp_path, server=True)    # after a clean stop
        try:
            assert walks == []
            assert cache.blob_size(kept) == 40 and cache.size == 40
            assert stray.exists()           # not walked (harmless: no row names it)
        finally:
            await cache.close()

        (tmp_path / "lock").write_text("999999999\n")      # the server was killed
        with caplog.at_level(logging.WARNING, logger="mirror.cache"):
            cache = await LocalCache.open(tmp_path, server=True)
        try:
            assert walks == [1]                             # walked once: the kept blob
            assert not stray.exists()
            assert cache.blob_size(kept) == 40 and cache.blob_size(stray_digest) is None
            assert "(pid 999999999) did not stop cleanly" in caplog.text
            assert "removed 1 stray files" in caplog.text
        finally:
            await cache.close()
    asyncio.run(scenario())


def test_a_row_whose_file_went_after_a_clean_stop_is_dropped_when_read(tmp_path):
    """Not walked at start-up, a row whose file someone removed by hand is found out
    the first time it is read, and fetched again from then on (as `mirror gc` beside a
    running server)."""
    async def scenario():
        cache = await LocalCache.open(tmp_path, server=True)
        try:
            gone = await add_blob(cache, b"gone" * 5)
        finally:
            await cache.close()
        cache.path_for(gone).unlink()
        cache = await LocalCache.open(tmp_path, server=True)
        try:
            assert cache.blob_size(gone) == 20
            assert await cache.open_blob(gone) is None
            assert cache.blob_size(gone) is None and cache.size == 0
        finally:
            await cache.close()
    asyncio.run(scenario())
