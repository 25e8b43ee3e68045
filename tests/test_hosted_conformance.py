"""Hosted repositories against the OCI distribution-spec v1.1.1 text, where the
conformance suite (opencontainers/distribution-spec conformance/, all four workflows,
see scripts/conformance) passes but the spec asks for more than the suite checks.
The mirror is a real process, a plain private registry."""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import pytest

from mirror.passwords import hash_password

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PRIVATE = {"upstreams": {}, "hosted": {"repositories": ["*"], "delete": True}}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def http(make_mirror):
    mirror = make_mirror(PRIVATE)
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        yield client


def push_blob(http, data: bytes, repo: str) -> dict:
    r = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data,
                  headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(data), "size": len(data)}


def test_manifest_over_the_size_limit_is_413(http):
    """spec.md "Pushing Manifests": a registry that limits manifest size SHOULD answer a
    push over the limit with 413 Payload Too Large; the body stays an OCI error."""
    config = push_blob(http, b"{}", "team/app")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                "layers": [], "annotations": {"padding": "x" * (4 * 1024 * 1024)}}
    body = json.dumps(manifest).encode()
    r = http.put("/v2/team/app/manifests/big", content=body,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 413, r.text
    assert [e["code"] for e in r.json()["errors"]] == ["SIZE_INVALID"]
    assert http.get("/v2/team/app/manifests/big").status_code == 404
    # Just under the limit is still taken (clients may expect at least 4 MB to work).
    manifest["annotations"]["padding"] = "x" * (4 * 1024 * 1024 - 1024)
    body = json.dumps(manifest).encode()
    assert len(body) <= 4 * 1024 * 1024
    r = http.put("/v2/team/app/manifests/big", content=body,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    assert http.get("/v2/team/app/manifests/big").content == body


def _challenge_scope(r: httpx.Response) -> str:
    header = r.headers["www-authenticate"]
    assert header.startswith("Bearer "), header
    params = dict(re.findall(r'(\w+)="([^"]*)"', header))
    return params["scope"]


def test_mount_challenge_names_the_source_so_a_challenge_following_client_mounts(
        make_mirror, tmp_path):
    """With token logins, the challenge to a cross-repository mount asks for pull on the
    `from` repository beside push on the target (as registry:2 does), and /token takes
    that space-separated scope in one parameter: a client that asks for exactly what the
    challenge names (the conformance suite's reggie) gets 201, not a fallback 202 upload.
    The token still grants only what the ACL allows: without pull on the source, 202."""
    htpasswd = tmp_path / "htpasswd"
    hashed = hash_password("secret", rounds=4)
    htpasswd.write_text(f"alice:{hashed}\nbob:{hashed}\n")
    mirror = make_mirror({**PRIVATE, "auth": {"htpasswd": str(htpasswd), "token": True, "acl": [
        {"match": {"account": "alice"}, "actions": ["*"]},
        {"match": {"account": "bob", "name": "bob/*"}, "actions": ["*"]}]}})
    data = b"a blob to mount"
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        def token(user: str, scope: str) -> str:
            r = http.get("/token", params={"service": "mirror", "scope": scope},
                         auth=(user, "secret"))
            assert r.status_code == 200, r.text
            return r.json()["token"]

        bearer = {"Authorization": "Bearer " + token("alice", "repository:team/src:push")}
        r = http.post("/v2/team/src/blobs/uploads/", params={"digest": sha(data)},
                      content=data, headers=bearer)
        assert r.status_code == 201, r.text

        for user, target, expected in (("alice", "team/dst", 201), ("bob", "bob/dst", 202)):
            mount = {"mount": sha(data), "from": "team/src"}
            r = http.post(f"/v2/{target}/blobs/uploads/", params=mount)
            assert r.status_code == 401
            scope = _challenge_scope(r)
            assert set(scope.split(" ")) == {f"repository:{target}:push",
                                             "repository:team/src:pull"}
            bearer = {"Authorization": "Bearer " + token(user, scope)}
            r = http.post(f"/v2/{target}/blobs/uploads/", params=mount, headers=bearer)
            assert r.status_code == expected, (user, r.text)
            r = http.head(f"/v2/{target}/blobs/{sha(data)}", headers={
                "Authorization": "Bearer " + token(user, f"repository:{target}:pull")})
            assert r.status_code == (200 if expected == 201 else 404)
