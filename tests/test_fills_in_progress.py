"""``fill_shared.in_progress``: the blob downloads running in any process of a server,
read by another process (as the web page's worker would) from the claim files in
``data_dir/tmp``. A real server in front of the real upstream, through the
fault-injecting proxy dripping the blob so the download is caught half-way; a one-
process server is seen as well as one of two workers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mirror import fill_shared
from tests.support.client import read_blob
from tests.test_pull_through import hub_config
from tests.test_workers import REPO, fresh_blob

SIZE = 512 * 1024


@pytest.mark.parametrize("workers", [1, 2])
def test_a_download_half_way_is_listed_with_its_progress_then_gone(
        workers, make_mirror, faulty_upstream, upstream, tmp_path):
    blob = fresh_blob(tmp_path, upstream, SIZE, f"progress{workers}")
    faulty_upstream.arm("drip", path_contains=f"/blobs/{blob.digest}", method="GET",
                        chunk=16 * 1024, delay=0.1)
    mirror = make_mirror({**hub_config(faulty_upstream), "workers": workers})
    began = time.time()
    result: list = []
    reader = threading.Thread(target=lambda: result.append(read_blob(mirror, REPO, blob)))
    reader.start()
    try:
        seen: list[fill_shared.FillProgress] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = asyncio.run(fill_shared.in_progress(mirror.data_dir))
            if seen and seen[0].done > 0:
                break
            time.sleep(0.05)
        assert len(seen) == 1, seen
        fill = seen[0]
        assert fill.digest == blob.digest
        assert fill.state == "downloading"
        assert fill.size == blob.size
        assert 0 < fill.done < blob.size
        assert fill.started_at is not None and began - 1 <= fill.started_at <= time.time()
    finally:
        reader.join(60)
    assert result and result[0][2] is None and result[0][1] == blob.digest
    assert asyncio.run(fill_shared.in_progress(mirror.data_dir)) == []


def test_a_claim_whose_lock_is_not_held_is_not_running(tmp_path):
    (tmp_path / "tmp").mkdir()
    digest = "sha256:" + "ab" * 32
    claim = fill_shared.claim(tmp_path, digest)
    claim.begin(tmp_path / "tmp" / "t", 1)
    claim.sized(100)
    claim.progress(40)
    running = asyncio.run(fill_shared.in_progress(tmp_path))
    assert [(f.digest, f.size, f.done, f.state) for f in running] == \
        [(digest, 100, 40, "downloading")]
    claim.close()                     # its owner died: the file stays, the lock goes
    assert claim.path.exists()
    assert asyncio.run(fill_shared.in_progress(tmp_path)) == []
