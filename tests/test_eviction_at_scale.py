"""Eviction works at any size: a plan over more digests than SQLite takes variables
applies; without a budget the evictor never reads the index; a pin reloads nothing in
the server; a blob bigger than the budget streams through uncached, evicting nothing."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time

import httpx

from mirror import cache_maps, evict
from mirror.cache import LocalCache
from tests.test_cli import on_disk
from tests.test_pull_through import hub_config, pull

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


async def fill_index(cache: LocalCache, manifests: int, blobs_each: int = 2) -> None:
    """Rows (no files) for ``manifests`` manifests of ``blobs_each`` blobs each, and
    one index manifest over every ten manifests."""
    now = time.time()
    blobs = [digest(i) for i in range(manifests * blobs_each)]
    mans = [digest(10**9 + i) for i in range(manifests)]
    tops = [digest(2 * 10**9 + i) for i in range(0, manifests, 10)]
    refs = [(m, blobs[i * blobs_each + k], "blob") for i, m in enumerate(mans)
            for k in range(blobs_each)]
    refs += [(tops[i // 10], m, "manifest") for i, m in enumerate(mans)]
    await cache.index._write(
        ("INSERT INTO blobs (digest, size, first_seen, last_access) VALUES (?, 10, ?, ?)",
         [(b, now, now) for b in blobs]),
        ("INSERT INTO manifests (digest, media_type, size, first_seen, last_access) "
         "VALUES (?, ?, 1, ?, ?)", [(m, OCI_MANIFEST, now, now) for m in (*mans, *tops)]),
        ("INSERT INTO manifest_refs (manifest, child, kind) VALUES (?, ?, ?)", refs))
    await cache.resync()


def run(coro):
    return asyncio.run(coro)


def test_a_plan_over_more_digests_than_sqlite_takes_variables_applies(tmp_path):
    async def scenario():
        cache = await LocalCache.open(tmp_path, server=False)
        try:
            db = cache.index.db._db
            # Stock SQLite takes 32,766 variables, Debian's 250,000; 999 keeps the test small.
            await db._execute(db._conn.setlimit, sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
            await fill_index(cache, 1500)                 # 3000 blobs, 1650 manifests
            removal = await evict.plan(cache, evict.Budget(max_size=1000))
            assert len(removal.blobs) == 3000 and len(removal.manifests) == 1650
            assert "references evicted content" in removal.reason.values()
            await evict.apply(cache, removal)
            assert await cache.index.totals() == {"blobs": 0, "manifests": 0, "tags": 0,
                                                  "pins": 0}
            assert cache.size == 0
        finally:
            await cache.close()
    run(scenario())


def index_reads(statements: list[str]) -> list[str]:
    """Statements that read content rows (not the generation counters in meta)."""
    return [s for s in statements
            if any(f"FROM {t}" in s for t in ("blobs", "manifests", "tags", "repo_links"))
            and s.lstrip().upper().startswith(("SELECT", "WITH"))]


def test_without_a_budget_the_evictor_never_reads_the_index(tmp_path):
    async def scenario():
        cache = await LocalCache.open(tmp_path, server=False)
        try:
            await fill_index(cache, 100)
            statements: list[str] = []
            await cache.index.db._db.set_trace_callback(statements.append)
            evictor = evict.Evictor(cache, evict.Budget(max_size=None), interval=0.01)
            evictor.start()
            await asyncio.sleep(0.5)       # its first look at start-up, and many intervals
            await evictor.stop()
            await cache.index.db._db.set_trace_callback(None)
            assert any("meta" in s for s in statements)    # it did run: it looked for changes
            assert index_reads(statements) == []
        finally:
            await cache.close()
    run(scenario())


def admin(*args, data_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MIRROR_CONFIG"}
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=data_dir)


def test_a_pin_reloads_nothing_in_the_server_and_verify_reloads_the_content(tmp_path,
                                                                           monkeypatch):
    loads: list[object] = []
    real = cache_maps.read

    def counted(db):
        loads.append(db)
        return real(db)
    monkeypatch.setattr(cache_maps, "read", counted)

    async def scenario():
        cache = await LocalCache.open(tmp_path, server=False)   # stands in for the server
        try:
            await fill_index(cache, 10)
            statements: list[str] = []
            await cache.index.db._db.set_trace_callback(statements.append)
            loads.clear()

            for command in ("pin", "unpin"):
                done = admin(command, "alpine:3.19", data_dir=tmp_path)
                assert done.returncode == 0, done.stderr
                assert await cache.resync_if_changed() == {"pins"}
            assert index_reads(statements) == [] and loads == []
            assert cache.blob_size(digest(0)) == 10

            # The rows have no files: verify forgets them all, and that the server reloads.
            found = admin("verify", data_dir=tmp_path)
            assert found.returncode == 1 and found.stdout.endswith(": 0 corrupt, 31 missing\n")
            assert await cache.resync_if_changed() == {"content"}
            assert len(loads) == 1              # the maps were loaded again (cache_maps.read)
            assert cache.blob_size(digest(0)) is None and cache.size == 0
        finally:
            await cache.close()
    run(scenario())


def test_a_blob_bigger_than_the_budget_streams_through_uncached(make_mirror, upstream,
                                                               image_set):
    big = image_set.big.largest_blob
    # Everything else fits easily; the big layer alone is twice the budget.
    mirror = make_mirror(hub_config(upstream, ttl="0s", max_size=big.size // 2))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in (image_set.docker, image_set.oci):
            pull(client, image)
        before = on_disk(mirror)
        mark = upstream.mark()
        pull(client, image_set.big)                   # byte-exact: pull() checks every hash
        assert upstream.count("GET", f"/blobs/{big.digest}", since=mark) == 1
        after = on_disk(mirror)
        assert big.digest not in after
        assert before.items() <= after.items()        # nothing evicted for it
        assert sum(after.values()) <= big.size // 2
        deadline = time.monotonic() + 10              # its temp file goes with its readers
        while any((mirror.data_dir / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any((mirror.data_dir / "tmp").iterdir())

        mark = upstream.mark()
        pull(client, image_set.big)                   # again from upstream: it was not kept
        assert upstream.count("GET", f"/blobs/{big.digest}", since=mark) == 1
    assert "passed through (too big to cache)" in mirror.log_text()
    assert "evicted" not in mirror.log_text()
