"""A cancelled fill never writes into someone else's file.

A worker thread cannot be stopped: a fill cancelled while its write (or its
preallocation) runs must not close the temp file's descriptor until that thread is
done, or the thread's bytes go into whichever file is opened next and gets the
same descriptor number. The fill here runs in-process against the real upstream
registry; only the disk call is held at a gate, so the timing is exact.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from mirror import fileio
from mirror.cache import LocalCache
from mirror.config import UpstreamConfig
from mirror.fill import Fill
from mirror.upstream_group import UpstreamGroup


def gated(real):
    """``real`` wrapped so that its first call waits at a gate:
    (wrapper, entered, gate, left)."""
    entered, gate, left = threading.Event(), threading.Event(), threading.Event()

    def call(*args):
        if entered.is_set():
            return real(*args)
        entered.set()
        gate.wait(20)
        try:
            return real(*args)
        finally:
            left.set()
    return call, entered, gate, left


@pytest.mark.parametrize("held", ["write", "preallocate"])
def test_a_cancelled_fill_waits_for_its_disk_call_before_closing_the_file(
        tmp_path, monkeypatch, upstream, image_set, held):
    image = image_set.big
    blob = image.largest_blob
    if held == "write":
        slow, entered, gate, left = gated(fileio.writev_all)
        monkeypatch.setattr(fileio, "writev_all", slow)
    else:
        slow, entered, gate, left = gated(os.posix_fallocate)
        monkeypatch.setattr(os, "posix_fallocate", slow)
    unrelated = tmp_path / "unrelated"

    async def scenario() -> tuple[bool, bool]:
        cache = await LocalCache.open(tmp_path / "data")
        remote = UpstreamGroup(UpstreamConfig("docker.io", upstream.url))
        try:
            fill = Fill(cache, remote, image.repo, blob.digest).start()
            assert await asyncio.to_thread(entered.wait, 20), "the fill never reached the disk"
            temp = fill._temp
            fill.task.cancel()
            # Every chance for the cancelled fill to close its file (today: at once).
            await asyncio.wait({fill.task}, timeout=0.5)
            closed_under_the_thread = temp.closed
            fd = os.open(unrelated, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                gate.set()
                assert await asyncio.to_thread(left.wait, 20)
                await asyncio.wait({fill.task}, timeout=20)
            finally:
                os.close(fd)
            assert fill.done and fill.error is not None
            return closed_under_the_thread, temp.path.exists()
        finally:
            gate.set()
            await remote.aclose()
            await cache.close()

    closed_under_the_thread, temp_left = asyncio.run(scenario())
    assert unrelated.stat().st_size == 0, "the cancelled fill's disk call hit another file"
    assert not closed_under_the_thread
    assert not temp_left
    blob_path = tmp_path / "data" / "blobs" / "sha256" / blob.digest[7:9] / blob.digest[7:]
    assert not blob_path.exists()
