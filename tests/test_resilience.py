"""The mirror on a bad day: upstream down, offline mode, crashes, a full disk,
clients that hang up, many clients at once."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time

import httpx
import pytest

from tests.support.client import RegistryClient
from tests.support.image_set import push_image
from tests.support.s3 import using_s3
from tests.test_pull_through import check_manifest, fetch_blob, get_manifest, hub_config, pull


@pytest.fixture
def own_upstream(make_registry, tmp_path):
    """A registry of this test's own (so it can be stopped) holding one small image."""
    registry = make_registry()
    with RegistryClient(registry.url) as client:
        image = push_image(tmp_path / "img", client, "team/app", ["1", "2"], [30000, 20000])
    return registry, image


def test_upstream_down_serves_cached_tags_and_fails_fast_for_the_rest(make_mirror, own_upstream):
    registry, image = own_upstream
    mirror = make_mirror(hub_config(registry, ttl="1s"))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        check_manifest(get_manifest(client, image.repo, "1"), image)   # tag "2" stays uncached
        for blob in image.blobs:
            fetch_blob(client, image.repo, blob)
        assert client.get("/v2/team/app/tags/list").json()["tags"] == ["1", "2"]
        registry.stop()
        time.sleep(1.2)                                     # the tag TTL has passed
        # Cached: served stale, whatever the TTL.
        check_manifest(get_manifest(client, image.repo, "1"), image)
        head = get_manifest(client, image.repo, "1", method="HEAD")
        assert head.status_code == 200 and head.headers["docker-content-digest"] == image.digest
        for blob in image.blobs:
            fetch_blob(client, image.repo, blob)
        assert client.get("/v2/team/app/tags/list").json()["tags"] == ["1", "2"]
        # Not cached: a prompt OCI error that says upstream is unavailable.
        started = time.monotonic()
        resp = get_manifest(client, image.repo, "2")
        assert time.monotonic() - started < 5
        assert resp.status_code == 503
        error = resp.json()["errors"][0]
        assert error["code"] == "MANIFEST_UNKNOWN" and "docker.io" in error["message"]
        assert error["detail"]["code"] == "UNAVAILABLE"
        resp = client.get(f"/v2/{image.repo}/blobs/sha256:{'2' * 64}")
        assert resp.status_code == 503
    assert "serving stale" in mirror.log_text()


def test_offline_mode_serves_only_the_cache(make_mirror, own_upstream):
    registry, image = own_upstream
    mirror = make_mirror(hub_config(registry, ttl="1s"))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, image)
    mirror.reconfigure(offline=True)
    mirror.restart()
    time.sleep(1.1)
    mark = registry.mark()
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, image)                                  # tags past their TTL: served
        resp = get_manifest(client, image.repo, "never-pulled")
        assert resp.status_code == 404
        assert resp.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert "offline" in resp.json()["errors"][0]["message"]
        resp = client.get(f"/v2/{image.repo}/blobs/sha256:{'3' * 64}")
        assert resp.status_code == 404 and resp.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert registry.requests(since=mark) == []                # never contacted


def test_a_client_hanging_up_does_not_stop_the_fill(make_mirror, upstream, image_set):
    image = image_set.big
    blob = image.largest_blob
    mirror = make_mirror(hub_config(upstream))
    mark = upstream.mark()
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, "latest"), image)
        with client.stream("GET", f"/v2/{image.repo}/blobs/{blob.digest}") as resp:
            assert resp.status_code == 200
            next(resp.iter_raw(1024))                          # one chunk, then hang up
        deadline = time.monotonic() + 60
        while not mirror.is_cached(blob.digest) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mirror.is_cached(blob.digest), "the fill did not finish after its client left"
        fetch_blob(client, image.repo, blob)
    assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1


def test_sixteen_concurrent_cold_clients_one_upstream_get(make_mirror, upstream, image_set):
    image = image_set.big
    blob = image.largest_blob
    mirror = make_mirror(hub_config(upstream))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, "latest"), image)
    mark = upstream.mark()
    results: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            h = hashlib.sha256()
            with httpx.stream("GET", f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}",
                              timeout=120) as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_raw():
                    h.update(chunk)
            results.append(f"sha256:{h.hexdigest()}")
        except BaseException as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [blob.digest] * 16
    assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1


def test_kill_9_leaves_no_partial_blob_and_restart_reconciles(make_mirror, upstream, image_set):
    image = image_set.big
    blob = image.largest_blob
    mirror = make_mirror(hub_config(upstream))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image_set.docker)
        check_manifest(get_manifest(client, image.repo, "latest"), image)
        with client.stream("GET", f"/v2/{image.repo}/blobs/{blob.digest}") as resp:
            next(resp.iter_raw(1024))
            mirror.stop(kill=True)                            # SIGKILL mid-fill
    if mirror.on_s3:
        # No files to damage: a fill's parts go to a multipart upload, which the kill
        # leaves uncompleted, so nothing appears under the blob's key; and no walk of
        # the bucket at start-up, only a word to run `mirror verify`.
        mirror.start()
        assert "did not stop cleanly" in mirror.log_text()
    else:
        blobs_dir = mirror.data_dir / "blobs"
        # Damage the cache the ways a crash or an operator can: a stray file, a file
        # whose index row is missing, a row whose file is missing, a truncated file.
        stray = blobs_dir / "sha256" / "zz" / "not-a-digest"
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"junk")
        d_layer, d_small = image_set.docker.blobs[1], image_set.docker.blobs[0]
        mirror.drop_cached(d_layer.digest)
        mirror.replace_cached(d_small.digest, b"truncated")
        mirror.start()
        assert not any((mirror.data_dir / "tmp").iterdir()), "temp files survived the restart"
        assert not stray.exists() and not mirror.is_cached(d_small.digest)
        assert "reconciled cache with index" in mirror.log_text()
    stored = mirror.cached_bytes(blob.digest)
    if stored is not None:                  # the fill may have finished before the kill
        assert hashlib.sha256(stored).hexdigest() == blob.digest[7:]
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image_set.docker)                       # refetched, byte-exact
        fetch_blob(client, image.repo, blob)


def test_disk_full_fails_the_fill_cleanly_and_cached_content_still_serves(
        make_mirror, upstream, image_set, tmp_path):
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("mounting a small tmpfs needs root")
    if using_s3():
        pytest.skip("about a full data directory: with blobs on S3 a fill writes nothing "
                    "to the local disk")
    data = tmp_path / "small"
    data.mkdir()
    big = image_set.big.largest_blob
    small = sum(b.size for b in image_set.docker.blobs)
    size_kib = (small + 1024 * 1024) // 1024            # the small image and the index fit
    assert big.size > size_kib * 1024
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(data)],
                   check=True)
    try:
        mirror = make_mirror({**hub_config(upstream), "data_dir": str(data)})
        with httpx.Client(base_url=mirror.url, timeout=60) as client:
            pull(client, image_set.docker)
            check_manifest(get_manifest(client, image_set.big.repo, "latest"), image_set.big)
            got = 0
            with pytest.raises(httpx.HTTPError):
                with client.stream("GET", f"/v2/{image_set.big.repo}/blobs/{big.digest}") as resp:
                    if resp.status_code != 200:
                        raise httpx.HTTPStatusError("refused", request=resp.request, response=resp)
                    for chunk in resp.iter_raw():
                        got += len(chunk)
            assert got < big.size                               # never a complete-looking body
            time.sleep(0.5)
            assert not any((data / "tmp").iterdir()), "half-written file left behind"
            pull(client, image_set.docker)                      # the cache still serves
            # Again: a clean OCI error if the disk fills before the first byte, else an
            # aborted body; never the whole blob.
            got, status, body = 0, None, b""
            try:
                with client.stream("GET", f"/v2/{image_set.big.repo}/blobs/{big.digest}") as resp:
                    status = resp.status_code
                    if status != 200:
                        body = resp.read()
                    else:
                        for chunk in resp.iter_raw():
                            got += len(chunk)
            except httpx.HTTPError:
                assert status == 200 and got < big.size
            else:
                assert status == 503, (status, got)
                error = json.loads(body)["errors"][0]
                assert error["code"] == "BLOB_UNKNOWN" and "could not store" in error["message"]
                assert error["detail"]["code"] == "UNAVAILABLE"
        log = mirror.log_text()
        assert "No space left on device" in log
        mirror.stop()
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_concurrent_manifest_misses_and_token_fetches_are_coalesced(make_mirror, token_server,
                                                                    token_upstream, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.faulty import FaultyUpstream
    from tests.support.fixtures import USERS
    with RegistryClient(token_upstream.url, "alice", USERS["alice"]) as client:
        image = push_image(tmp_path / "img", client, "flight/app", ["1"],
                           [1000 + i for i in range(6)], seed=8000)
    proxy = FaultyUpstream(token_upstream.url).start()
    # Every GET is held 0.5 s upstream, so concurrent misses really overlap: the blob
    # GETs all meet the first 401 together (one token fetch for their shared scope),
    # and 16 manifest misses are in flight at once (one upstream GET).
    proxy.arm("hang", method="GET", times=None, seconds=0.5)
    mirror = make_mirror({"upstreams": {"docker.io": {
        "url": proxy.url, "username": "alice", "password": USERS["alice"]}}})
    tokens_before = len(token_server.requests)
    mark = token_upstream.mark()

    def get(path):
        return httpx.get(f"{mirror.url}/v2/{image.repo}/{path}", timeout=30,
                         headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})

    try:
        with ThreadPoolExecutor(16) as pool:
            blobs = list(pool.map(get, [f"blobs/{b.digest}" for b in image.blobs]))
            manifests = list(pool.map(get, ["manifests/1"] * 16))
    finally:
        proxy.stop()
    assert [hashlib.sha256(r.content).hexdigest() for r in blobs] == \
        [b.digest[7:] for b in image.blobs]
    assert all(r.status_code == 200 and r.content == image.manifest for r in manifests)
    gets = [r for r in token_upstream.requests(since=mark)
            if r.method == "GET" and "/manifests/" in r.path and r.status == 200]
    assert len(gets) == 1
    assert len(token_server.requests) - tokens_before == 1, token_server.requests[tokens_before:]
