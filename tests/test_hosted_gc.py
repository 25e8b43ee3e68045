"""Online garbage collection of hosted content (issue 11): `mirror gc` beside a serving
mirror sweeps hosted blobs and (``--delete-untagged``) manifests nothing references,
after ``hosted.gc_grace``; it keeps what a push in progress uploaded and what the cache
shares. Real mirror processes, pushes with raw HTTP as in test_hosted_push.py."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import yaml

from tests.test_cli import cli, ok
from tests.test_hosted_push import OCI_MANIFEST, push_manifest, sha

HOSTED = {"repositories": ["team/*"]}


def gc(mirror, *args, grace: str | None = None) -> str:
    """`mirror gc` against the running mirror's data directory; ``grace`` overrides
    hosted.gc_grace in a copy of its config."""
    config = None
    if grace is not None:
        data = dict(mirror.config)
        data["hosted"] = {**data["hosted"], "gc_grace": grace}
        config = mirror.dir / f"gc-{grace}.yml"
        config.write_text(yaml.safe_dump(data))
    result = cli(mirror, "gc", *args, config=config)
    assert result.returncode == 0, result.stderr
    return result.stdout


def status(http, path: str, want: int, within: float = 5.0) -> int:
    """HEAD ``path`` until it answers ``want`` (the server reloads its view of the
    index within about a second of `mirror gc`); the last status."""
    deadline = time.monotonic() + within
    while True:
        code = http.head(path).status_code
        if code == want or time.monotonic() > deadline:
            return code
        time.sleep(0.2)


def upload(http, data: bytes, repo="team/app") -> str:
    r = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data)
    assert r.status_code == 201, r.text
    return sha(data)


@pytest.fixture
def private(make_mirror):
    return make_mirror({"upstreams": {}, "hosted": {**HOSTED, "repositories": ["*"]}})


@pytest.fixture
def http(private):
    with httpx.Client(base_url=private.url, timeout=30) as client:
        yield client


def test_unreferenced_blob_past_grace_is_swept_and_404s(private, http):
    kept = os.urandom(2000)
    body, digest = push_manifest(http, [kept])
    stray = upload(http, os.urandom(3000))
    out = gc(private, grace="0s")
    assert "hosted: removed 0 manifests and 1 blob" in out, out
    assert status(http, f"/v2/team/app/blobs/{stray}", 404) == 404
    assert http.get(f"/v2/team/app/blobs/{stray}").status_code == 404
    # what the tagged manifest references stays, byte-exact
    assert http.get(f"/v2/team/app/blobs/{sha(kept)}").content == kept
    assert http.get("/v2/team/app/manifests/v1",
                    headers={"Accept": OCI_MANIFEST}).content == body
    assert not private.is_cached(stray)           # the file, or the object in the bucket


def test_blob_of_a_manifest_not_pushed_yet_survives_within_the_grace(private, http):
    pending = upload(http, os.urandom(2500))
    out = gc(private)                                       # default grace 1h
    assert "hosted: removed 0 manifests and 0 blobs" in out, out
    assert status(http, f"/v2/team/app/blobs/{pending}", 200, within=0) == 200
    # the manifest arrives after gc: the push completes
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    upload(http, config)
    layer_digest = pending
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": 2500}]}).encode()
    r = http.put("/v2/team/app/manifests/v1", content=manifest,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    # the same blob with no grace is collected: the grace is what kept it
    other = upload(http, os.urandom(1000), repo="team/other")
    assert "hosted: removed 0 manifests and 1 blob" in gc(private, grace="0s")
    assert status(http, f"/v2/team/other/blobs/{other}", 404) == 404
    assert status(http, f"/v2/team/app/blobs/{pending}", 200, within=0) == 200


def test_delete_untagged_removes_untagged_manifest_and_its_blobs(private, http):
    old_layer, new_layer = os.urandom(2000), os.urandom(2100)
    _, old = push_manifest(http, [old_layer], ref="v1")
    _, new = push_manifest(http, [new_layer], ref="v1")          # re-tag: old is untagged
    out = gc(private, grace="0s")                                # untagged manifests stay
    assert "hosted: removed 0 manifests and 0 blobs" in out, out
    assert status(http, f"/v2/team/app/manifests/{old}", 200, within=0) == 200
    out = gc(private, "--delete-untagged", grace="0s")
    assert "hosted: removed 1 manifest and 1 blob" in out, out   # config blob is shared
    assert status(http, f"/v2/team/app/manifests/{old}", 404) == 404
    assert status(http, f"/v2/team/app/blobs/{sha(old_layer)}", 404) == 404
    assert status(http, f"/v2/team/app/manifests/{new}", 200, within=0) == 200
    assert http.get(f"/v2/team/app/blobs/{sha(new_layer)}").content == new_layer


def test_dry_run_changes_nothing(private, http):
    stray = upload(http, os.urandom(1500))
    out = gc(private, "--dry-run", grace="0s")
    assert "hosted: would remove 0 manifests and 1 blob" in out, out
    assert stray in out
    time.sleep(1.5)                     # a reload, had anything changed
    assert http.head(f"/v2/team/app/blobs/{stray}").status_code == 200
    assert "hosted: removed 0 manifests and 1 blob" in gc(private, grace="0s")


def test_delete_untagged_needs_hosted(make_mirror):
    mirror = make_mirror({})
    result = cli(mirror, "gc", "--delete-untagged")
    assert result.returncode == 2
    assert "no hosted repositories" in result.stderr
    assert "hosted:" not in ok(mirror, "gc")


def push_upstream(upstream, repo: str, layer: bytes) -> None:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    with httpx.Client(base_url=upstream.url, timeout=30) as up:
        for data in (config, layer):
            r = up.post(f"/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["location"]
            loc += ("&" if "?" in loc else "?") + "digest=" + sha(data)
            r = up.put(loc, content=data,
                       headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": sha(layer), "size": len(layer)}]}).encode()
        r = up.put(f"/v2/{repo}/manifests/v1", content=body,
                   headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201, r.text


def test_blob_shared_with_a_cached_image_is_kept(make_mirror, upstream):
    layer = os.urandom(4000)
    push_upstream(upstream, "gc/shared", layer)
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}, "default": "up",
                          "hosted": HOSTED})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = http.get("/v2/gc/shared/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200, r.text
        assert http.get(f"/v2/gc/shared/blobs/{sha(layer)}").content == layer     # cached
        upload(http, layer, repo="team/app")       # pushed too, no hosted manifest uses it
        out = gc(mirror, grace="0s")
        assert "hosted: removed 0 manifests and 0 blobs" in out, out
        assert "1 repository link dropped" in out
        assert status(http, f"/v2/team/app/blobs/{sha(layer)}", 404) == 404
        assert http.get(f"/v2/gc/shared/blobs/{sha(layer)}").content == layer
