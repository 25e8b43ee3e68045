"""Self-tests of tests/support/faulty.py against the real registry (no mirror)."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import pytest

from tests.support.client import MANIFEST_ACCEPT, RegistryClient
from tests.support.faulty import FaultyUpstream, LogEntry
from tests.support.fixtures import USERS
from tests.support.images import make_layer, push_blob
from tests.support.ports import free_port
from tests.support.server_thread import ServerThread

# headers the proxy must hand back exactly as the registry sent them
PASSED = ["content-length", "content-type", "docker-content-digest", "etag",
          "docker-distribution-api-version"]


@pytest.fixture(scope="module")
def http():
    """One client for the module (creating an httpx.Client costs ~25 ms)."""
    with httpx.Client(timeout=10) as client:
        yield client


def blob_url(base, repo, blob):
    return f"{base}/v2/{repo}/blobs/{blob.digest}"


def manifest_url(base, image):
    return f"{base}/v2/{image.repo}/manifests/{image.tags[0]}"


def small_layer(image_set):
    """(repo, Blob) of the 1 MiB-content docker layer."""
    return image_set.docker.repo, image_set.docker.blobs[1]


def get_partial(http, url, **kwargs) -> tuple[httpx.Response, bytes, Exception]:
    """Stream ``url``; return the response, the bytes read and the error that ended it."""
    got = bytearray()
    with http.stream("GET", url, **kwargs) as r:
        with pytest.raises(httpx.HTTPError) as err:
            for chunk in r.iter_raw():
                got += chunk
    return r, bytes(got), err.value


# -- pass-through ------------------------------------------------------------

def test_manifest_passes_through_byte_exact(faulty_upstream, upstream, image_set, http):
    for image in (image_set.docker, image_set.oci_index):
        direct = http.get(manifest_url(upstream.url, image), headers={"Accept": MANIFEST_ACCEPT})
        proxied = http.get(manifest_url(faulty_upstream.url, image),
                            headers={"Accept": MANIFEST_ACCEPT})
        assert proxied.status_code == 200
        assert proxied.content == image.manifest
        assert "sha256:" + hashlib.sha256(proxied.content).hexdigest() == image.digest
        for name in PASSED:
            assert proxied.headers[name] == direct.headers[name], name
        assert len(proxied.headers.get_list("date")) == 1
        head = http.head(manifest_url(faulty_upstream.url, image),
                          headers={"Accept": MANIFEST_ACCEPT})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(image.manifest))
        assert head.headers["docker-content-digest"] == image.digest


def test_blob_passes_through_byte_exact(faulty_upstream, upstream, image_set, http):
    for repo, blob in [small_layer(image_set), (image_set.oci.repo, image_set.oci.blobs[0])]:
        direct = http.head(blob_url(upstream.url, repo, blob))
        h, size = hashlib.sha256(), 0
        with http.stream("GET", blob_url(faulty_upstream.url, repo, blob)) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                h.update(chunk)
                size += len(chunk)
        assert ("sha256:" + h.hexdigest(), size) == (blob.digest, blob.size)
        for name in ("content-length", "docker-content-digest", "etag", "accept-ranges"):
            assert r.headers[name] == direct.headers[name], name
    # Range is passed through (206 + Content-Range)
    repo, blob = small_layer(image_set)
    r = http.get(blob_url(faulty_upstream.url, repo, blob), headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == blob.path.read_bytes()[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{blob.size}"


def test_request_bodies_are_forwarded(faulty_upstream, upstream, tmp_path, http):
    """A push through the proxy (POST, chunked PATCH, PUT) lands in the target."""
    layer = make_layer(tmp_path, 300_000, seed=77)
    with httpx.Client(base_url=faulty_upstream.url) as client:
        push_blob(client, None, "faulty/push", layer)
    r = http.get(f"{upstream.url}/v2/faulty/push/blobs/{layer.digest}")
    assert r.status_code == 200 and r.content == layer.path.read_bytes()
    methods = {e.method for e in faulty_upstream.log}
    assert {"POST", "PUT"} <= methods


@pytest.fixture
def echo():
    """A target answering every request with the request it saw, as JSON."""
    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen = json.dumps({"method": scope["method"], "path": scope["raw_path"].decode(),
                           "query": scope["query_string"].decode(), "body": body.decode(),
                           "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"x-echo", b"1")]})
        await send({"type": "http.response.body", "body": seen.encode()})

    with ServerThread(app, "echo") as server:
        yield server


def test_request_is_forwarded_faithfully(echo):
    with FaultyUpstream(echo.url) as proxy, httpx.Client() as client:
        # a bare Request carries no Accept/User-Agent: none may be added on the way
        request = httpx.Request("PUT", f"{proxy.url}/v2/a%2Fb/x?digest=sha256%3A1&n=2",
                                headers=[("Authorization", "Basic eA=="), ("X-Dup", "1"),
                                         ("X-Dup", "2")], content=b"payload")
        seen = client.send(request).json()
        headers = [tuple(h) for h in seen["headers"]]
        names = [k for k, _ in headers]
        assert (seen["method"], seen["path"], seen["query"], seen["body"]) == (
            "PUT", "/v2/a%2Fb/x", "digest=sha256%3A1&n=2", "payload")
        assert ("host", echo.host) in headers and names.count("host") == 1
        assert ("x-forwarded-host", proxy.host) in headers
        assert ("authorization", "Basic eA==") in headers
        assert [v for k, v in headers if k == "x-dup"] == ["1", "2"]
        assert ("content-length", "7") in headers and "transfer-encoding" not in names
        assert not {"accept", "user-agent", "accept-encoding"} & set(names)
        # a streamed (chunked) body stays chunked
        seen = client.post(f"{proxy.url}/up", content=iter([b"ab", b"cd"])).json()
        assert seen["body"] == "abcd" and ("transfer-encoding", "chunked") in [
            tuple(h) for h in seen["headers"]]
        # range_ignored strips Range on the way
        proxy.arm("range_ignored")
        seen = client.get(f"{proxy.url}/r", headers={"Range": "bytes=1-"}).json()
        assert "range" not in [k for k, _ in seen["headers"]]
        r = client.get(f"{proxy.url}/r", headers={"Range": "bytes=1-"})
        assert ["range", "bytes=1-"] in r.json()["headers"]
        assert r.headers["x-echo"] == "1" and r.headers["content-type"] == "application/json"


def test_unreachable_target_is_a_502(http):
    with FaultyUpstream(f"http://127.0.0.1:{free_port()}") as proxy:
        r = http.get(f"{proxy.url}/v2/")
        assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNKNOWN"
        assert proxy.log == [LogEntry("GET", "/v2/", 502, None)]


def test_log_counts_requests(faulty_upstream, image_set, http):
    repo, blob = small_layer(image_set)
    url = blob_url(faulty_upstream.url, repo, blob)
    for _ in range(3):
        http.get(url)
    http.head(url)
    http.get(f"{faulty_upstream.url}/v2/{repo}/manifests/nope?x=1")
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 3
    assert faulty_upstream.count(None, "/blobs/") == 4
    assert faulty_upstream.count("GET", "/manifests/", status=404) == 1
    assert faulty_upstream.log[-1] == LogEntry("GET", f"/v2/{repo}/manifests/nope?x=1", 404, None)
    assert faulty_upstream.log[0] == LogEntry("GET", f"/v2/{repo}/blobs/{blob.digest}", 200, None)


# -- faults ------------------------------------------------------------------

def test_status_with_retry_after_then_exhausted(faulty_upstream, upstream, image_set, http):
    url = manifest_url(faulty_upstream.url, image_set.docker)
    mark = upstream.mark()
    fault = faulty_upstream.arm("status", "/manifests/", status=429, headers={"Retry-After": "7"})
    r = http.get(url)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json() == {"errors": [{"code": "UNKNOWN", "message": "injected"}]}
    assert upstream.count(since=mark) == 0  # never reached the target
    assert http.get(url).status_code == 200  # times=1 exhausted
    assert fault.hits == 1 and fault.exhausted
    assert [e.status for e in faulty_upstream.log] == [429, 200]
    assert [e.fault for e in faulty_upstream.log] == ["status", None]
    assert http.head(url).status_code == 200


def test_times_order_method_and_clear(faulty_upstream, image_set, http):
    repo, blob = small_layer(image_set)
    url = blob_url(faulty_upstream.url, repo, blob)
    first = faulty_upstream.arm("status", "/blobs/", times=2, status=500)
    second = faulty_upstream.arm("status", "/blobs/", times=None, status=503)
    head_only = faulty_upstream.arm("status", "", method="HEAD", times=None, status=404)
    assert [http.get(url).status_code for _ in range(4)] == [500, 500, 503, 503]
    assert http.head(url).status_code == 503  # earlier fault matches first
    assert http.head(f"{faulty_upstream.url}/v2/").status_code == 404
    assert http.get(f"{faulty_upstream.url}/v2/").status_code == 200
    assert (first.hits, second.hits, head_only.hits) == (2, 3, 1)
    faulty_upstream.clear()
    assert http.get(url).status_code == 200
    assert faulty_upstream.count(fault="status") == 6
    assert faulty_upstream.count(fault=None) == 2


def test_reset_gives_incomplete_body(faulty_upstream, image_set, http):
    repo, blob = small_layer(image_set)
    url = blob_url(faulty_upstream.url, repo, blob)
    faulty_upstream.arm("reset", "/blobs/")
    r, got, err = get_partial(http, url)
    assert r.status_code == 200 and int(r.headers["content-length"]) == blob.size
    assert isinstance(err, httpx.RemoteProtocolError)
    assert len(got) == blob.size // 2
    assert got == blob.path.read_bytes()[: blob.size // 2]

    faulty_upstream.arm("reset", "/blobs/", after=100)
    r, got, err = get_partial(http, url)
    assert isinstance(err, httpx.RemoteProtocolError) and len(got) == 100

    faulty_upstream.arm("reset", "/blobs/", after=0)
    r, got, err = get_partial(http, url)
    assert isinstance(err, httpx.RemoteProtocolError) and got == b""
    assert http.get(url).content == blob.path.read_bytes()  # the next one is fine
    assert [e.status for e in faulty_upstream.log] == [200] * 4


def test_drop_closes_without_response(faulty_upstream, upstream, image_set, http):
    url = manifest_url(faulty_upstream.url, image_set.docker)
    mark = upstream.mark()
    faulty_upstream.arm("drop", "/manifests/")
    with pytest.raises(httpx.RemoteProtocolError, match="without sending"):
        http.get(url)
    assert faulty_upstream.log[-1].status is None
    assert upstream.count(since=mark) == 0
    assert http.get(url).status_code == 200


def test_corrupt_flips_exactly_one_byte(faulty_upstream, image_set, http):
    repo, blob = small_layer(image_set)
    url = blob_url(faulty_upstream.url, repo, blob)
    good = blob.path.read_bytes()
    clean = http.get(url)
    for offset in (0, 70_000, blob.size - 1):
        faulty_upstream.arm("corrupt", "/blobs/", offset=offset)
        r = http.get(url)
        assert r.status_code == 200 and len(r.content) == blob.size
        got = r.content
        assert got[:offset] == good[:offset] and got[offset + 1:] == good[offset + 1:]
        assert got[offset] == good[offset] ^ 0xFF
        for name in ("content-length", "docker-content-digest", "etag"):
            assert r.headers[name] == clean.headers[name]


def test_drip_is_slow_but_complete(faulty_upstream, image_set, http):
    image = image_set.docker
    faulty_upstream.arm("drip", "/manifests/", chunk=100, delay=0.02)
    start = time.monotonic()
    sizes = []
    with http.stream("GET", manifest_url(faulty_upstream.url, image),
                      headers={"Accept": MANIFEST_ACCEPT}) as r:
        body = b""
        for chunk in r.iter_raw():
            sizes.append(len(chunk))
            body += chunk
    elapsed = time.monotonic() - start
    pieces = -(-len(image.manifest) // 100)
    assert body == image.manifest and pieces >= 3
    assert elapsed >= (pieces - 1) * 0.02
    assert max(sizes) <= 100


def test_hang_times_out_the_client(faulty_upstream, image_set, http):
    url = manifest_url(faulty_upstream.url, image_set.docker)
    faulty_upstream.arm("hang", "/manifests/")
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        http.get(url, timeout=0.2)
    assert time.monotonic() - start < 2
    assert faulty_upstream.log[-1][2:] == (None, "hang")
    # the hung handler notices the client left and ends; the next request is fine
    assert http.get(url, timeout=5).status_code == 200


def test_short_hang_then_answers(faulty_upstream, image_set, http):
    url = manifest_url(faulty_upstream.url, image_set.docker)
    faulty_upstream.arm("hang", "/manifests/", seconds=0.2)
    start = time.monotonic()
    r = http.get(url, headers={"Accept": MANIFEST_ACCEPT}, timeout=5)
    assert r.content == image_set.docker.manifest and time.monotonic() - start >= 0.2


def test_hang_body_sends_headers_then_stalls(faulty_upstream, image_set, http):
    repo, blob = small_layer(image_set)
    faulty_upstream.arm("hang_body", "/blobs/", after=10)
    r, got, err = get_partial(http, blob_url(faulty_upstream.url, repo, blob), timeout=0.3)
    assert r.status_code == 200 and r.headers["content-length"] == str(blob.size)
    assert isinstance(err, httpx.ReadTimeout)
    assert got == blob.path.read_bytes()[:10]


def test_stop_aborts_hanging_requests_quickly(upstream, image_set, http):
    proxy = FaultyUpstream(upstream.url).start()
    proxy.arm("hang", "/manifests/")
    proxy.arm("hang_body", "/blobs/", times=None)
    repo, blob = small_layer(image_set)
    outcomes = []

    def fetch(url):
        try:
            outcomes.append(http.get(url, timeout=30).status_code)
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=fetch, args=(u,)) for u in
               (manifest_url(proxy.url, image_set.docker), blob_url(proxy.url, repo, blob))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5  # until the hang_body one has sent its headers
    while [e.status for e in proxy.log if "/blobs/" in e.path] != [200]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    proxy.stop()
    assert time.monotonic() - start < 2
    for t in threads:
        t.join(5)
    # nothing hangs: the header-less one gets uvicorn's 500, the other a broken body
    assert sorted(map(str, outcomes)) == ["500", "RemoteProtocolError"]


def test_redirect_goes_to_cdn_without_authorization(faulty_upstream, image_set, http):
    repo, blob = small_layer(image_set)
    faulty_upstream.arm("redirect", "/blobs/", method="GET")
    r = http.get(blob_url(faulty_upstream.url, repo, blob), follow_redirects=True,
                 headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 200 and r.content == blob.path.read_bytes()
    assert [h.status_code for h in r.history] == [307]
    assert str(r.url).startswith(faulty_upstream.cdn_url + "/cdn/")
    assert faulty_upstream.cdn_url != faulty_upstream.url
    assert faulty_upstream.log[-1][2:] == (307, "redirect")
    [seen] = faulty_upstream.cdn_log
    assert "authorization" not in seen
    # the CDN log does record an Authorization that is sent to it
    http.get(str(r.url), headers={"Authorization": "Bearer leaked"})
    assert faulty_upstream.cdn_log[-1]["authorization"] == "Bearer leaked"
    # an unknown URL is refused, as an expired pre-signed URL would be
    assert http.get(f"{faulty_upstream.cdn_url}/cdn/bogus/x").status_code == 403


def test_redirect_works_for_an_authenticated_target(htpasswd_upstream, tmp_path):
    layer = make_layer(tmp_path, 50_000, seed=5)
    with RegistryClient(htpasswd_upstream.url, *next(iter(USERS.items()))) as client:
        push_blob(client, None, "auth/repo", layer)
        with FaultyUpstream(htpasswd_upstream.url) as proxy:
            proxy.arm("redirect", "/blobs/", method="GET")
            client.follow_redirects = True
            r = client.get(f"{proxy.url}/v2/auth/repo/blobs/{layer.digest}")
            assert r.status_code == 200 and r.content == layer.path.read_bytes()
            assert [h.status_code for h in r.history] == [307]
            # the CDN got the blob from the Basic-auth target, with no credentials sent to it
            assert proxy.cdn_log and all("authorization" not in h for h in proxy.cdn_log)


def test_range_ignored_returns_full_body(faulty_upstream, image_set, http):
    repo, blob = small_layer(image_set)
    url = blob_url(faulty_upstream.url, repo, blob)
    faulty_upstream.arm("range_ignored", "/blobs/")
    r = http.get(url, headers={"Range": "bytes=100-"})
    assert r.status_code == 200 and r.content == blob.path.read_bytes()
    assert "content-range" not in r.headers
    assert http.get(url, headers={"Range": "bytes=100-"}).status_code == 206


def test_unknown_fault_is_refused(faulty_upstream):
    with pytest.raises(ValueError):
        faulty_upstream.arm("explode")
    with pytest.raises(ValueError):
        faulty_upstream.arm("status")


# -- big bodies ----------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_big_blob_streams_without_buffering(faulty_upstream, image_set, http):
    """The big layer (MIRROR_TEST_BIG_LAYER_MB, 100 by default) streams through
    the proxy (which runs in this process) while RSS stays flat."""
    repo, blob = image_set.big.repo, image_set.big.blobs[1]
    baseline, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    h, size, paused = hashlib.sha256(), 0, False
    try:
        with http.stream("GET", blob_url(faulty_upstream.url, repo, blob), timeout=30) as r:
            for chunk in r.iter_raw():
                h.update(chunk)
                size += len(chunk)
                if size > 1024 * 1024 and not paused:  # a stalled reader: back-pressure,
                    paused = True                      # not buffering, in the proxy
                    time.sleep(0.3)
    finally:
        done.set()
        sampler.join()
    assert ("sha256:" + h.hexdigest(), size) == (blob.digest, blob.size)
    print(f"RSS {baseline >> 20} MiB, peak +{(peak[0] - baseline) >> 20} MiB for {size >> 20} MiB")
    assert peak[0] - baseline < 40 * 1024 * 1024, (baseline, peak[0])
