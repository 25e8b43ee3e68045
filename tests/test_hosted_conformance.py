"""Hosted repositories against the OCI distribution-spec v1.1.1 text, where the
conformance suite (opencontainers/distribution-spec conformance/, all four workflows,
see scripts/conformance) passes but the spec asks for more than the suite checks.
The mirror is a real process, a plain private registry."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

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
