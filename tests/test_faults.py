"""Every fault a real network has, injected between the mirror and a real upstream:
no corrupt or partial blob is ever served from the cache, every client gets the
right bytes or a clean error, and the next pull after the fault clears works."""

from __future__ import annotations

import hashlib
import threading
import time

import httpx
import pytest

from tests.support.client import read_blob
from tests.support.fixtures import USERS
from tests.test_pull_through import check_manifest, fetch_blob, get_manifest, pull


def config_for(url: str, **upstream) -> dict:
    return {"upstreams": {"docker.io": {"url": url, **upstream}}, "default": "docker.io"}


def two_workers(url: str, **upstream) -> dict:
    """This file's faults hit a mirror of two worker processes, as a site runs it on two
    cores: every fault must be survived whichever worker a request reaches."""
    return {**config_for(url, **upstream), "workers": 2}


@pytest.fixture
def big(image_set):
    image = image_set.big
    return image, image.largest_blob


def test_reset_mid_body_is_resumed_with_range(make_mirror, faulty_upstream, big):
    image, blob = big
    mirror = make_mirror(two_workers(faulty_upstream.url))
    fault = faulty_upstream.arm("reset", path_contains=blob.digest, method="GET", times=2)
    n, digest, error = read_blob(mirror, image.repo, blob)
    assert (n, digest, error) == (blob.size, blob.digest, None)
    assert fault.hits == 2
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 3
    assert "resuming" in mirror.log_text()


def test_reset_without_range_support_restarts_and_skips(make_mirror, faulty_upstream, big):
    image, blob = big
    mirror = make_mirror(two_workers(faulty_upstream.url))
    faulty_upstream.arm("reset", path_contains=blob.digest, method="GET", times=1)
    faulty_upstream.arm("range_ignored", path_contains=blob.digest, times=None)
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)


def test_a_stream_that_keeps_breaking_aborts_clients_and_caches_nothing(make_mirror,
                                                                       faulty_upstream, big):
    image, blob = big
    mirror = make_mirror(two_workers(faulty_upstream.url))
    faulty_upstream.arm("reset", path_contains=blob.digest, method="GET", times=None,
                        after=blob.size // 10)      # 4 tries x 1/10: never complete
    n, _, error = read_blob(mirror, image.repo, blob)
    assert isinstance(error, httpx.HTTPError) and n < blob.size      # aborted, never "complete"
    assert not mirror.is_cached(blob.digest)
    faulty_upstream.clear()
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    assert mirror.is_cached(blob.digest)


def test_wrong_bytes_are_never_served_complete_nor_cached(make_mirror, faulty_upstream, big):
    image, blob = big
    mirror = make_mirror(two_workers(faulty_upstream.url))
    faulty_upstream.arm("corrupt", path_contains=blob.digest, method="GET", offset=1000)
    n, _, error = read_blob(mirror, image.repo, blob)
    assert error is not None and n < blob.size          # the last byte was held back
    assert not mirror.is_cached(blob.digest)
    assert "does not match" in mirror.log_text() or "hashed to" in mirror.log_text()
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)


def test_corrupt_manifest_is_refused(make_mirror, faulty_upstream, image_set):
    image = image_set.oci
    mirror = make_mirror(two_workers(faulty_upstream.url))
    faulty_upstream.arm("corrupt", path_contains=f"/manifests/{image.digest}", offset=5)
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        resp = get_manifest(client, image.repo, image.digest)
        assert resp.status_code == 502 and resp.json()["errors"][0]["code"] == "DIGEST_INVALID"
        check_manifest(get_manifest(client, image.repo, image.digest), image)


def test_5xx_is_retried_then_reported(make_mirror, faulty_upstream, image_set):
    image = image_set.docker
    mirror = make_mirror(two_workers(faulty_upstream.url))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        faulty_upstream.arm("status", path_contains="/manifests/v1", status=503, times=1)
        check_manifest(get_manifest(client, image.repo, "v1"), image)   # retried: fine
        faulty_upstream.arm("status", path_contains="/manifests/alias", status=500, times=None)
        started = time.monotonic()
        resp = get_manifest(client, image.repo, "alias")
        assert time.monotonic() - started < 5
        assert resp.status_code == 503
        error = resp.json()["errors"][0]
        assert error["code"] == "MANIFEST_UNKNOWN" and "500" in error["message"]
        assert error["detail"]["code"] == "UNAVAILABLE"
        assert faulty_upstream.count("GET", "/manifests/alias") == 3      # 1 + 2 retries


def test_429_passes_retry_after_and_stale_is_served(make_mirror, faulty_upstream, image_set):
    image = image_set.docker
    mirror = make_mirror(two_workers(faulty_upstream.url, tag_ttl="1s"))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        check_manifest(get_manifest(client, image.repo, "v1"), image)
        faulty_upstream.arm("status", path_contains="/manifests/", status=429, times=None,
                            code="TOOMANYREQUESTS", message="slow down",
                            headers={"Retry-After": "7"})
        resp = get_manifest(client, image.repo, "alias")            # nothing cached
        assert resp.status_code == 429 and resp.headers["retry-after"] == "7"
        error = resp.json()["errors"][0]
        assert error["code"] == "TOOMANYREQUESTS" and "slow down" in error["message"]
        time.sleep(1.2)
        check_manifest(get_manifest(client, image.repo, "v1"), image)   # stale, not a 429
    assert "serving stale" in mirror.log_text()


def test_hung_upstream_times_out_to_an_error_or_a_stale_copy(make_mirror, faulty_upstream,
                                                             image_set):
    image = image_set.docker
    mirror = make_mirror(two_workers(faulty_upstream.url, tag_ttl="1s", timeout="1s"))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        check_manifest(get_manifest(client, image.repo, "v1"), image)
        faulty_upstream.arm("hang", path_contains="/manifests/", times=None)
        time.sleep(1.2)
        started = time.monotonic()
        check_manifest(get_manifest(client, image.repo, "v1"), image)   # stale
        resp = get_manifest(client, image.repo, "alias")
        assert resp.status_code == 503 and "timed out" in resp.json()["errors"][0]["message"]
        assert time.monotonic() - started < 6


def test_stalled_body_is_resumed(make_mirror, faulty_upstream, big):
    image, blob = big
    mirror = make_mirror(two_workers(faulty_upstream.url, timeout="1s"))
    faulty_upstream.arm("hang_body", path_contains=blob.digest, method="GET", after=100_000)
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 2


def test_slow_upstream_streams_to_every_client_at_once_with_one_fetch(make_mirror,
                                                                      faulty_upstream, image_set):
    image = image_set.docker
    blob = image.largest_blob
    mirror = make_mirror(two_workers(faulty_upstream.url))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        check_manifest(get_manifest(client, image.repo, "v1"), image)
    # ~2 s of drip for the whole blob.
    chunk = max(1024, blob.size // 40)
    faulty_upstream.arm("drip", path_contains=blob.digest, method="GET", chunk=chunk, delay=0.05)
    first_byte: list[float] = []
    results: list[tuple] = []
    start = time.monotonic()

    def client_thread() -> None:
        h, n = hashlib.sha256(), 0
        with httpx.stream("GET", f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}",
                          timeout=60) as resp:
            for data in resp.iter_raw():
                if n == 0:
                    first_byte.append(time.monotonic() - start)
                h.update(data)
                n += len(data)
        results.append((n, f"sha256:{h.hexdigest()}"))

    threads = [threading.Thread(target=client_thread) for _ in range(8)]
    for t in threads:
        t.start()
    # A Range request for bytes that do not exist yet waits for them.
    tail = httpx.get(f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}", timeout=60,
                     headers={"Range": f"bytes={blob.size - 10}-"})
    for t in threads:
        t.join()
    total = time.monotonic() - start
    assert results == [(blob.size, blob.digest)] * 8
    assert tail.status_code == 206 and tail.content == blob.path.read_bytes()[-10:]
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 1
    assert total > 1.0                                   # the drip really was slow
    assert max(first_byte) < total / 2, (first_byte, total)  # nobody waited for the whole blob


def test_redirect_to_another_host_never_carries_credentials(make_mirror, htpasswd_upstream,
                                                            tmp_path):
    from tests.support.client import RegistryClient
    from tests.support.faulty import FaultyUpstream
    from tests.support.image_set import push_image

    with RegistryClient(htpasswd_upstream.url, "alice", USERS["alice"]) as client:
        image = push_image(tmp_path / "img", client, "redir/app", ["1"], [70000, 3000], seed=9000)
    with FaultyUpstream(htpasswd_upstream.url) as proxy:
        proxy.arm("redirect", path_contains="/blobs/", method="GET", times=None)
        mirror = make_mirror(two_workers(proxy.url, username="alice", password=USERS["alice"]))
        with httpx.Client(base_url=mirror.url, timeout=30) as client:
            pull(client, image)
        assert len(proxy.cdn_log) == len(image.blobs)
        assert not any("authorization" in {k.lower() for k in h} for h in proxy.cdn_log)


def test_after_every_fault_the_next_pull_works(make_mirror, faulty_upstream, image_set):
    image = image_set.oci_index
    mirror = make_mirror(two_workers(faulty_upstream.url))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        for kind, params in [("drop", {}), ("status", {"status": 502}), ("reset", {}),
                             ("corrupt", {})]:
            faulty_upstream.arm(kind, path_contains="/blobs/", times=None, **params)
            for blob in image.blobs[:1]:
                n, digest, error = read_blob(mirror, image.repo, blob)
                assert error is not None or digest is None, kind
                assert not mirror.is_cached(blob.digest), kind
            faulty_upstream.clear()
        pull(client, image)
        for blob in image.blobs:
            fetch_blob(client, image.repo, blob)
