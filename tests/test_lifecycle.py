"""A cache with a budget: eviction keeps it inside, never breaks a pull, and keeps
what is used most, what is pinned and what is being served."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.support.client import RegistryClient
from tests.support.image_set import push_image, push_rotating_images
from tests.test_pull_through import pull

KB = 1000


@pytest.fixture
def rotating(make_registry, tmp_path):
    """Six ~600 KB images and one 'hot' image in a registry of the test's own."""
    registry = make_registry()
    with RegistryClient(registry.url) as client:
        images = push_rotating_images(tmp_path, client, seed=10_000)
        hot = push_image(tmp_path / "hot", client, "rot/hot", ["1"], [500 * KB], seed=20_000)
    return registry, images, hot


def budget_config(registry, max_size, **extra):
    return {"upstreams": {"docker.io": {"url": registry.url, "tag_ttl": "0s"}},
            "max_size": max_size, "high_watermark": "90%", "low_watermark": "70%", **extra}


def test_rotating_pulls_stay_inside_the_budget_and_the_hot_image_stays(make_mirror, rotating):
    registry, images, hot = rotating
    budget = 2_000 * KB                  # the working set is about 4.1 MB
    mirror = make_mirror(budget_config(registry, budget))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, hot)
        mark = registry.mark()
        peak = 0
        for round_ in range(14):
            pull(client, hot)
            pull(client, images[round_ % len(images)])
            peak = max(peak, mirror.stored_total())
            assert mirror.stored_total() <= budget
    hot_gets = [r for r in registry.requests(since=mark)
                if r.method == "GET" and r.path.startswith(f"/v2/{hot.repo}/")]
    assert hot_gets == []                 # revalidated with HEADs, never fetched again
    rotated = registry.count("GET", "/blobs/", since=mark)
    assert rotated > 2 * len(images)      # the rotating images really were evicted and refetched
    assert "evicted" in mirror.log_text()


def test_eviction_never_takes_a_blob_being_served(make_mirror, rotating, tmp_path):
    registry, images, _ = rotating
    # Bigger than what loopback socket buffers hold, so the response is still being
    # served (not just sitting in kernel buffers) while the client pauses.
    with RegistryClient(registry.url) as c:
        big = push_image(tmp_path / "big", c, "rot/big", ["1"], [24_000 * KB], seed=30_000)
    blob = big.largest_blob
    # The big image alone is under the high watermark (90% of 27.5 MB); three more
    # small images push the cache over it.
    mirror = make_mirror(budget_config(registry, 27_500 * KB))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, big)
        h = hashlib.sha256()
        with httpx.stream("GET", f"{mirror.url}/v2/{big.repo}/blobs/{blob.digest}") as resp:
            chunks = resp.iter_raw(16 * KB)
            h.update(next(chunks))
            # While this response is open, pull enough to push the cache past its
            # budget: the least recently used content is this very blob.
            for image in images[:3]:
                pull(client, image)
            assert mirror.is_cached(blob.digest), "a blob being served was evicted"
            for chunk in chunks:
                h.update(chunk)
        assert f"sha256:{h.hexdigest()}" == blob.digest
    assert "evicted" in mirror.log_text()


def test_expire_unused_removes_content_under_budget(make_mirror, rotating):
    import time
    registry, images, _ = rotating
    mirror = make_mirror(budget_config(registry, 100_000 * KB, expire_unused="1s"))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, images[0])
        assert mirror.stored_total() > 0
        time.sleep(1.5)
        mirror.restart()                 # the evictor takes a first look at start-up
        deadline = time.monotonic() + 10
        while mirror.stored_total() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mirror.stored_total() == 0
        mark = registry.mark()
        pull(client, images[0])          # and it comes back on the next pull
        assert registry.count("GET", "/blobs/", since=mark) == len(images[0].blobs)
