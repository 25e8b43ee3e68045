"""The mirror logs in to upstreams: htpasswd (Basic), token (Bearer), and redirects
that must never carry the credentials to another host."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from tests.support.client import MANIFEST_ACCEPT, MANIFEST_V2, RegistryClient
from tests.support.fake_upstream import REPO, FakeUpstream
from tests.support.fixtures import USERS
from tests.support.image_set import push_image


def pull_and_check(mirror_url, name, image):
    with httpx.Client(base_url=mirror_url, timeout=60) as client:
        resp = client.get(f"/v2/{name}/manifests/{image.tags[0]}",
                          headers={"Accept": MANIFEST_ACCEPT})
        assert resp.status_code == 200, resp.text
        assert resp.content == image.manifest
        assert resp.headers["docker-content-digest"] == image.digest
        for blob in image.blobs:
            resp = client.get(f"/v2/{name}/blobs/{blob.digest}")
            assert resp.status_code == 200, resp.text
            assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == blob.digest


@pytest.fixture(scope="module")
def htpasswd_image(tmp_path_factory, htpasswd_upstream):
    with RegistryClient(htpasswd_upstream.url, "alice", USERS["alice"]) as client:
        return push_image(tmp_path_factory.mktemp("img"), client, "private/app", ["1"],
                          [4096, 9000])


@pytest.fixture(scope="module")
def token_image(tmp_path_factory, token_upstream):
    with RegistryClient(token_upstream.url, "alice", USERS["alice"]) as client:
        return push_image(tmp_path_factory.mktemp("img"), client, "secret/app", ["2"], [5000, 7000],
                          oci=True, seed=7000)


def test_htpasswd_upstream_with_credentials_from_the_environment(make_mirror, htpasswd_upstream,
                                                                 htpasswd_image):
    mirror = make_mirror({"upstreams": {"priv.test": {
        "url": htpasswd_upstream.url, "username": "alice", "password": "${PRIV_PASSWORD}"}},
        "default": "priv.test"}, env={"PRIV_PASSWORD": USERS["alice"]})
    pull_and_check(mirror.url, "private/app", htpasswd_image)
    assert USERS["alice"] not in mirror.log_text()


def test_htpasswd_upstream_without_credentials_is_denied_cleanly(make_mirror, htpasswd_upstream,
                                                                  htpasswd_image):
    mirror = make_mirror({"upstreams": {"priv.test": {"url": htpasswd_upstream.url}},
                          "default": "priv.test"})
    resp = httpx.get(f"{mirror.url}/v2/private/app/manifests/1")
    assert resp.status_code == 403
    error = resp.json()["errors"][0]
    assert error["code"] == "DENIED" and "priv.test" in error["message"]


def test_token_upstream_one_token_per_scope(make_mirror, token_server, token_upstream, token_image):
    mirror = make_mirror({"upstreams": {"tok.test": {
        "url": token_upstream.url, "username": "alice", "password": USERS["alice"]}},
        "default": "tok.test"})
    before = len(token_server.requests)
    pull_and_check(mirror.url, "secret/app", token_image)
    fetched = token_server.requests[before:]
    assert [(r.user, r.scopes, r.status) for r in fetched] == \
        [("alice", ["repository:secret/app:pull"], 200)]


def test_token_upstream_with_wrong_password(make_mirror, token_upstream, token_image):
    mirror = make_mirror({"upstreams": {"tok.test": {
        "url": token_upstream.url, "username": "alice", "password": "wrong"}},
        "default": "tok.test"})
    resp = httpx.get(f"{mirror.url}/v2/secret/app/manifests/2")
    assert resp.status_code == 403 and resp.json()["errors"][0]["code"] == "DENIED"
    assert "wrong" not in mirror.log_text()


def small_image():
    """(blobs by digest, manifest bytes, manifest digest) of a one-layer image."""
    layer = b"layer bytes " * 5000
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    digests = {f"sha256:{hashlib.sha256(b).hexdigest()}": b for b in (layer, config)}
    (layer_d, config_d) = list(digests)
    layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_V2,
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                      "digest": config_d, "size": len(config)},
                           "layers": [{"mediaType": layer_type,
                                       "digest": layer_d, "size": len(layer)}]}).encode()
    manifest_d = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    return digests, manifest, manifest_d


def test_redirected_blobs_never_carry_authorization_to_the_other_host(make_mirror, tmp_path):
    digests, manifest, manifest_d = small_image()
    with FakeUpstream(digests, manifest, MANIFEST_V2, manifest_d) as fake:
        mirror = make_mirror({"upstreams": {"fake.test": {
            "url": fake.api.url, "username": "bob", "password": "hunter2"}},
            "default": "fake.test"})
        with httpx.Client(base_url=mirror.url, timeout=30) as client:
            resp = client.get(f"/v2/{REPO}/manifests/latest")
            assert resp.status_code == 200 and resp.content == manifest
            for digest, data in digests.items():
                resp = client.get(f"/v2/{REPO}/blobs/{digest}")
                assert resp.status_code == 200 and resp.content == data
        assert len(fake.cdn_headers) == 2
        assert not any("authorization" in h for h in fake.cdn_headers)
        assert any(h.get("authorization") == fake.auth for h in fake.api_headers)


def test_blob_head_without_an_upstream_size_has_no_content_length(make_mirror):
    digests, manifest, manifest_d = small_image()
    with FakeUpstream(digests, manifest, MANIFEST_V2, manifest_d, blob_head_size=False) as fake:
        mirror = make_mirror({"upstreams": {"fake.test": {
            "url": fake.api.url, "username": "bob", "password": "hunter2"}},
            "default": "fake.test"})
        digest = next(iter(digests))
        resp = httpx.head(f"{mirror.url}/v2/{REPO}/blobs/{digest}", timeout=30)
        assert resp.status_code == 200 and resp.headers["docker-content-digest"] == digest
        # Unknown is said by leaving it out; "0" would tell the client the blob is empty.
        assert "content-length" not in resp.headers
