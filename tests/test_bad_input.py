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
    ("GET", "/v2/a/manifests/-tag", 400, "TAG_INVALID"),
    ("GET", "/v2/a/manifests/" + "t" * 129, 400, "TAG_INVALID"),
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
    ("GET", "/v2/a/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/a/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/a/tags/list?last=..%2F", 400, "TAG_INVALID"),
    ("GET", "/v2/_catalog?n=1e9", 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/_catalog?last=..", 400, "NAME_INVALID"),
    ("GET", "/v2/a/manifests/latest?ns=nope.example", 404, "NAME_UNKNOWN"),
    ("GET", "/v2/a/whatever", 404, "NOT_FOUND"),
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
