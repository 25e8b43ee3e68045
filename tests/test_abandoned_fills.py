"""Downloads no one waits for cannot starve the mirror.

At most ``max_fills`` blob downloads run per upstream (the rest wait for a slot),
blob bodies have their own connections so manifests and tokens never wait behind
them, and a download whose last client left is stopped after a short grace unless
it is at least half done (then it finishes for the cache).
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.support.images import make_layer, push_blob
from tests.test_faults import config_for
from tests.test_observability import scrape, value
from tests.test_pull_through import check_manifest, get_manifest

CLIENTS = 101          # one more than the connections the mirror used to share


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def fills(mirror) -> tuple[float, float]:
    values = scrape(mirror)
    return value(values, "mirror_fills_in_progress"), value(values, "mirror_fills_queued")


@pytest.fixture
def many_blobs(tmp_path, upstream, upstream_client):
    repo = "many/blobs"
    blobs = [make_layer(tmp_path, 4096, seed=f"abandoned-{i}") for i in range(CLIENTS)]
    for blob in blobs:
        push_blob(upstream_client, None, repo, blob)
    return repo, blobs


def test_clients_that_leave_slow_misses_starve_nothing(make_mirror, faulty_upstream, image_set,
                                                       many_blobs):
    repo, blobs = many_blobs
    mirror = make_mirror(config_for(faulty_upstream.url))     # max_fills: 32 (default)
    faulty_upstream.arm("hang_body", path_contains="/blobs/sha256:", method="GET", times=None)
    sockets = []
    try:
        for blob in blobs:          # start a GET of each blob, never read the answer
            s = socket.create_connection(("127.0.0.1", mirror.port))
            s.sendall(f"GET /v2/{repo}/blobs/{blob.digest} HTTP/1.1\r\n"
                      f"Host: {mirror.host}\r\n\r\n".encode())
            sockets.append(s)
        wait_for(lambda: faulty_upstream.count("GET", "/blobs/sha256:") >= 32, 20,
                 "32 blob downloads started upstream")
        time.sleep(0.5)             # and the other requests had time to queue
        started = time.monotonic()
        with httpx.Client(base_url=mirror.url, timeout=10) as client:
            check_manifest(get_manifest(client, image_set.docker.repo, "v1"), image_set.docker)
        assert time.monotonic() - started < 5
        assert wait_for(lambda: fills(mirror) == (32, CLIENTS - 32), 10,
                        "32 downloads running, the rest waiting for a slot")
        assert faulty_upstream.count("GET", "/blobs/sha256:") == 32
    finally:
        for s in sockets:
            s.close()
    # Every client left: after the grace every download is stopped, none of them cached.
    wait_for(lambda: fills(mirror) == (0, 0), 15, "the unread downloads stopped")
    assert "download stopped" in mirror.log_text()
    assert not any(mirror.is_cached(b.digest) for b in blobs)
    faulty_upstream.clear()
    with httpx.Client(base_url=mirror.url, timeout=10) as client:       # and the next pull works
        resp = client.get(f"/v2/{repo}/blobs/{blobs[0].digest}")
        assert resp.status_code == 200 and resp.content == blobs[0].path.read_bytes()


@pytest.mark.parametrize("share, finished", [(0.6, True), (0.1, False)])
def test_a_download_whose_client_left_finishes_only_if_well_advanced(make_mirror,
                                                                     faulty_upstream, image_set,
                                                                     share, finished):
    image = image_set.big
    blob = image.largest_blob
    mirror = make_mirror(config_for(faulty_upstream.url))
    # Upstream sends `share` of the blob, then stalls for 4 s (past the 2 s grace).
    faulty_upstream.arm("hang_body", path_contains=blob.digest, method="GET",
                        after=int(blob.size * share), seconds=4)
    # The client reads what upstream sent (so the mirror has it too), then goes away.
    received = 0
    with httpx.stream("GET", f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}",
                      timeout=30) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            received += len(chunk)
            if received >= blob.size * share - 1024 * 1024:
                break
    wait_for(lambda: fills(mirror)[0] == 0, 15, "the download ended")
    assert mirror.is_cached(blob.digest) == finished
    assert ("finishing it for the cache" if finished else "download stopped") in mirror.log_text()
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 1
