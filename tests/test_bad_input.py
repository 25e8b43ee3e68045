"""Bad names, references, digests and parameters get 4xx OCI errors, never a 500,
and nothing is created outside the data directory."""

from __future__ import annotations

import http.client
import json
import os

import pytest

from tests.test_pull_through import hub_config

D = "sha256:" + "a" * 64

CASES = [
    # (method, raw path, status, code)
    ("GET", "/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/a..b/manifests/latest", 400, "NAME_INVALID"),
    # Neither a tag nor a digest: no such manifest (distribution and the OCI conformance
    # suite); a malformed digest is still DIGEST_INVALID.
    ("GET", "/v2/a/manifests/-tag", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/a/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("HEAD", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, None),
    ("GET", "/v2/a/manifests/sha256:abc", 400, "DIGEST_INVALID"),
    ("HEAD", "/v2/a/manifests/md5:" + "a" * 32, 400, None),
    ("GET", "/v2/a/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
    ("GET", "/v2/a/blobs/latest", 400, "DIGEST_INVALID"),
    ("GET", "/v2/a/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/../../etc/passwd/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/a/%2e%2e/%2e%2e/blobs/" + D, 400, "NAME_INVALID"),
    ("GET", "/v2/a%00b/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/a/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", 400, "DIGEST_INVALID"),
    ("GET", "/v2/" + "a" * 256 + "/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/a/tags/list?n=abc", 400, "UNSUPPORTED"),
    ("GET", "/v2/a/tags/list?n=-1", 400, "UNSUPPORTED"),
    ("GET", "/v2/a/tags/list?last=..%2F", 400, "UNSUPPORTED"),
    ("GET", "/v2/_catalog?n=1e9", 400, "UNSUPPORTED"),
    ("GET", "/v2/_catalog?last=..", 400, "NAME_INVALID"),
    ("GET", "/v2/a/manifests/latest?ns=nope.example", 404, "NAME_UNKNOWN"),
    ("GET", "/v2/a/whatever", 404, "UNSUPPORTED"),
    ("GET", "/nothing/here", 404, "UNSUPPORTED"),
    ("PUT", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/a/blobs/" + D, 405, "UNSUPPORTED"),
    ("POST", "/v2/a/blobs/uploads/", 405, "UNSUPPORTED"),
    ("PATCH", "/v2/a/blobs/uploads/123", 405, "UNSUPPORTED"),
    ("POST", "/v2/", 405, "UNSUPPORTED"),
]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, upstream):
    from tests.support.mirror import MirrorProcess

    with MirrorProcess(tmp_path_factory.mktemp("mirror"), hub_config(upstream)) as m:
        yield m


def raw_request(host: str, method: str, path: str, headers=None):
    """http.client sends the path exactly as given (httpx would normalise dots)."""
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# The OCI distribution spec's error code table: no other code may reach a client.
OCI_CODES = {"BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
             "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
             "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
             "TOOMANYREQUESTS"}


@pytest.mark.parametrize("method, path, status, code", CASES)
def test_bad_requests_are_oci_errors(mirror, method, path, status, code):
    got, headers, body = raw_request(mirror.host, method, path)
    assert got == status, body
    if method == "HEAD":
        assert body == b""
        return
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["errors"][0]
    assert error["code"] == code and error["message"]
    assert code in OCI_CODES


def test_nothing_is_written_outside_the_data_dir(mirror, tmp_path):
    before = set(os.listdir(mirror.dir))
    for method, path, _, _ in CASES:
        raw_request(mirror.host, method, path)
    assert set(os.listdir(mirror.dir)) == before
    assert not any(mirror.data_dir.joinpath("blobs").rglob("*")), "bad requests cached something"
    assert "Traceback" not in mirror.log_text()


@pytest.mark.parametrize("headers, manifest_status", [
    ({"Accept": "\x7f;;;,,,"}, 400),               # refused by the HTTP parser itself
    ({"Accept": "a" * 8000}, 200),                  # no valid type in it: as if none was sent
    ({"Accept": "text/html, */*;q=0.1, x\ty/z"}, 200),
    ({"Range": "bytes=zz-"}, 200), ({"Range": "bytes=-"}, 200), ({"Range": "items=0-1"}, 200),
])
def test_odd_headers_are_harmless(mirror, image_set, headers, manifest_status):
    image = image_set.docker
    status, _, body = raw_request(mirror.host, "GET", f"/v2/{image.repo}/manifests/v1", headers)
    assert status == manifest_status, body
    if status == 200:
        assert body == image.manifest
    blob = image.blobs[0]
    status, _, body = raw_request(mirror.host, "GET", f"/v2/{image.repo}/blobs/{blob.digest}",
                                  headers)
    assert status == manifest_status
    if status == 200:
        assert len(body) == blob.size
    assert "Traceback" not in mirror.log_text()


def test_range_positions_with_leading_zeros(mirror, image_set):
    image = image_set.docker
    blob = image.blobs[0]
    path = f"/v2/{image.repo}/blobs/{blob.digest}"
    status, _, full = raw_request(mirror.host, "GET", path)
    assert status == 200 and len(full) == blob.size
    for header, start, end in [("bytes=00000000000000000005-", 5, blob.size),
                               ("bytes=0005-0000000000000000000009", 5, 10),
                               ("bytes=-00000000000000000000003", blob.size - 3, blob.size)]:
        status, headers, body = raw_request(mirror.host, "GET", path, {"Range": header})
        assert status == 206, header
        assert headers["content-range"] == f"bytes {start}-{end - 1}/{blob.size}", header
        assert body == full[start:end], header
    status, headers, _ = raw_request(mirror.host, "GET", path,
                                     {"Range": "bytes=" + "9" * 40 + "-"})
    assert status == 416 and headers["content-range"] == f"bytes */{blob.size}"


def test_errors_when_upstream_is_down_use_oci_codes(make_mirror, tmp_path):
    from tests.support.ports import free_port
    dead = f"http://127.0.0.1:{free_port()}"
    m = make_mirror({"upstreams": {"dead.test": {"url": dead, "retries": 0}},
                     "default": "dead.test"})
    for path, code in [("/v2/a/manifests/latest", "MANIFEST_UNKNOWN"),
                       ("/v2/a/blobs/" + D, "BLOB_UNKNOWN"), ("/v2/a/tags/list", "NAME_UNKNOWN")]:
        status, _, body = raw_request(m.host, "GET", path)
        error = json.loads(body)["errors"][0]
        assert status == 503 and error["code"] == code, body
        assert error["detail"]["code"] == "UNAVAILABLE" and "dead.test" in error["message"]
