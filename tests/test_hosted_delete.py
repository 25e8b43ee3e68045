"""Hosted repositories, content management (issue 11): DELETE of manifests by digest, of
tags (untag) and of blobs, 405 when ``hosted.delete`` is off or the name is mirrored, the
``delete`` ACL action; and the cache budget counting cached bytes only, so hosted
content bigger than ``max_size`` neither is evicted nor pushes cached content out.
The mirror is a real process; the upstream a real registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from mirror.passwords import hash_password
from tests.test_hosted_push import errors, push_manifest, sha

DELETING = {"upstreams": {}, "hosted": {"repositories": ["*"], "delete": True}}


@pytest.fixture
def http(make_mirror):
    mirror = make_mirror(DELETING)
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        yield client


def tags(http, repo="team/app") -> list[str]:
    r = http.get(f"/v2/{repo}/tags/list")
    return r.json()["tags"] if r.status_code == 200 else []


def test_delete_manifest_by_digest_drops_it_and_its_tags(http):
    layer = os.urandom(4000)
    body, digest = push_manifest(http, [layer], ref="v1")
    for tag in ("v2", "latest"):
        assert http.put(f"/v2/team/app/manifests/{tag}", content=body,
                        headers={"Content-Type": json.loads(body)["mediaType"]}).status_code == 201
    other, other_digest = push_manifest(http, [os.urandom(100)], ref="other")
    assert tags(http) == ["latest", "other", "v1", "v2"]

    r = http.delete(f"/v2/team/app/manifests/{digest}")
    assert r.status_code == 202, r.text
    for ref in (digest, "v1", "v2", "latest"):
        r = http.get(f"/v2/team/app/manifests/{ref}")
        assert r.status_code == 404 and errors(r) == ["MANIFEST_UNKNOWN"], ref
        assert http.head(f"/v2/team/app/manifests/{ref}").status_code == 404
    assert tags(http) == ["other"]
    assert http.get("/v2/team/app/manifests/other").content == other
    # the blobs stay linked (garbage collection removes bytes, not DELETE)
    assert http.get(f"/v2/team/app/blobs/{sha(layer)}").content == layer
    # a second delete: unknown
    r = http.delete(f"/v2/team/app/manifests/{digest}")
    assert r.status_code == 404 and errors(r) == ["MANIFEST_UNKNOWN"]


def test_delete_manifest_only_in_its_repository(http):
    layer = os.urandom(1000)
    body, digest = push_manifest(http, [layer], repo="team/a", ref="v1")
    push_manifest(http, [layer], repo="team/b", ref="v1")
    assert http.delete(f"/v2/team/a/manifests/{digest}").status_code == 202
    assert http.get(f"/v2/team/a/manifests/{digest}").status_code == 404
    assert http.get(f"/v2/team/b/manifests/{digest}").content == body
    assert tags(http, "team/b") == ["v1"]


def test_delete_tag_untags_only(http):
    body, digest = push_manifest(http, [os.urandom(500)], ref="v1")
    assert http.put("/v2/team/app/manifests/v2", content=body,
                    headers={"Content-Type": json.loads(body)["mediaType"]}).status_code == 201
    r = http.delete("/v2/team/app/manifests/v1")
    assert r.status_code == 202, r.text
    assert http.get("/v2/team/app/manifests/v1").status_code == 404
    assert tags(http) == ["v2"]
    assert http.get(f"/v2/team/app/manifests/{digest}").content == body
    assert http.get("/v2/team/app/manifests/v2").content == body
    r = http.delete("/v2/team/app/manifests/v1")
    assert r.status_code == 404 and errors(r) == ["MANIFEST_UNKNOWN"]
    r = http.delete("/v2/team/app/manifests/no-such-tag")
    assert r.status_code == 404 and errors(r) == ["MANIFEST_UNKNOWN"]


def test_delete_blob_unlinks_it_from_the_repository(http):
    data = os.urandom(2000)
    for repo in ("team/a", "team/b"):
        assert http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)},
                         content=data).status_code == 201
    r = http.delete(f"/v2/team/a/blobs/{sha(data)}")
    assert r.status_code == 202, r.text
    r = http.get(f"/v2/team/a/blobs/{sha(data)}")
    assert r.status_code == 404 and errors(r) == ["BLOB_UNKNOWN"]
    assert http.head(f"/v2/team/a/blobs/{sha(data)}").status_code == 404
    assert http.get(f"/v2/team/b/blobs/{sha(data)}").content == data
    r = http.delete(f"/v2/team/a/blobs/{sha(data)}")
    assert r.status_code == 404 and errors(r) == ["BLOB_UNKNOWN"]
    r = http.delete("/v2/team/a/blobs/sha256:" + "0" * 64)
    assert r.status_code == 404 and errors(r) == ["BLOB_UNKNOWN"]
    r = http.delete("/v2/team/a/blobs/not-a-digest")
    assert r.status_code == 400 and errors(r) == ["DIGEST_INVALID"]


def test_deleting_survives_a_restart(make_mirror):
    mirror = make_mirror(DELETING)
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        body, digest = push_manifest(http, [os.urandom(300)], ref="v1")
        push_manifest(http, [os.urandom(300)], ref="v2")
        assert http.delete(f"/v2/team/app/manifests/{digest}").status_code == 202
        assert http.delete("/v2/team/app/manifests/v2").status_code == 202
    mirror.restart()
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        assert http.get(f"/v2/team/app/manifests/{digest}").status_code == 404
        assert tags(http) == []


def test_delete_is_405_when_disabled(make_mirror):
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"]}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        body, digest = push_manifest(http, [os.urandom(300)], ref="v1")
        layer = json.loads(body)["layers"][0]["digest"]
        for path in (f"manifests/{digest}", "manifests/v1", f"blobs/{layer}"):
            r = http.delete(f"/v2/team/app/{path}")
            assert r.status_code == 405 and errors(r) == ["UNSUPPORTED"], path
            assert "hosted.delete" in r.json()["errors"][0]["message"]
        assert http.get("/v2/team/app/manifests/v1").content == body
        assert http.get(f"/v2/team/app/blobs/{layer}").status_code == 200


def test_delete_on_a_mirrored_name_is_405(make_mirror, upstream, image_set):
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}, "default": "up",
                          "hosted": {"repositories": ["myorg/*"], "delete": True}})
    oci = image_set.oci
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = http.get(f"/v2/{oci.repo}/manifests/{oci.digest}", headers={"Accept": oci.media_type})
        assert r.status_code == 200
        r = http.delete(f"/v2/{oci.repo}/manifests/{oci.digest}")
        assert r.status_code == 405 and errors(r) == ["UNSUPPORTED"]
        assert "up" in r.json()["errors"][0]["message"]
        r = http.delete(f"/v2/{oci.repo}/blobs/{oci.blobs[0].digest}")
        assert r.status_code == 405 and errors(r) == ["UNSUPPORTED"]
        assert http.get(f"/v2/{oci.repo}/manifests/{oci.digest}",
                        headers={"Accept": oci.media_type}).status_code == 200


def test_without_hosted_delete_is_405(make_mirror, upstream):
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = http.delete("/v2/a/manifests/x")
        assert r.status_code == 405 and errors(r) == ["UNSUPPORTED"]


def test_delete_needs_the_delete_action(make_mirror, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    hashed = hash_password("secret", rounds=4)
    htpasswd.write_text(f"alice:{hashed}\nbob:{hashed}\n")
    mirror = make_mirror({**DELETING, "auth": {"htpasswd": str(htpasswd), "acl": [
        {"match": {"account": "alice"}, "actions": ["*"]},
        {"match": {"account": "bob", "name": "team/*"}, "actions": ["pull", "push"]}]}})
    with httpx.Client(base_url=mirror.url, timeout=30, auth=("bob", "secret")) as bob:
        body, digest = push_manifest(bob, [os.urandom(300)], ref="v1")
        layer = json.loads(body)["layers"][0]["digest"]
        for path in (f"manifests/{digest}", "manifests/v1", f"blobs/{layer}"):
            r = bob.delete(f"/v2/team/app/{path}")
            assert r.status_code == 403 and errors(r) == ["DENIED"], path
        assert bob.get("/v2/team/app/manifests/v1").content == body
    with httpx.Client(base_url=mirror.url, timeout=30) as anonymous:
        assert anonymous.delete("/v2/team/app/manifests/v1").status_code == 401
    with httpx.Client(base_url=mirror.url, timeout=30, auth=("alice", "secret")) as alice:
        assert alice.delete("/v2/team/app/manifests/v1").status_code == 202
        assert alice.delete(f"/v2/team/app/blobs/{layer}").status_code == 202


def test_metrics_count_pushes_and_deletes(http):
    body, digest = push_manifest(http, [os.urandom(300)], ref="v1")
    assert http.delete("/v2/team/app/manifests/v1").status_code == 202
    assert http.delete(f"/v2/team/app/manifests/{digest}").status_code == 202
    text = http.get("/metrics").text
    assert 'mirror_pushes_total{kind="blob"} 2.0' in text        # config + layer
    assert 'mirror_pushes_total{kind="manifest"} 1.0' in text
    assert 'mirror_deletes_total{kind="tag"} 1.0' in text
    assert 'mirror_deletes_total{kind="manifest"} 1.0' in text


# -- the budget counts cached bytes only -------------------------------------------------------


def test_hosted_content_does_not_push_cached_content_out(make_mirror, upstream, image_set):
    oci = image_set.oci
    pulled = len(oci.manifest) + sum(b.size for b in oci.blobs)
    max_size = 4 * pulled
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}, "default": "up",
                          "hosted": {"repositories": ["myorg/*"]}, "max_size": max_size})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        layers = [os.urandom(max_size // 2) for _ in range(3)]     # 1.5 x max_size hosted
        body, digest = push_manifest(http, layers, repo="myorg/app", ref="v1")
        # pulled by digest: no tag protects it; only the budget decides whether it stays
        r = http.get(f"/v2/{oci.repo}/manifests/{oci.digest}", headers={"Accept": oci.media_type})
        assert r.status_code == 200 and r.content == oci.manifest
        for blob in oci.blobs:
            assert http.get(f"/v2/{oci.repo}/blobs/{blob.digest}").status_code == 200
        time.sleep(2.5)             # the evictor looks on every commit and each second
        for d in (oci.digest, *(b.digest for b in oci.blobs)):
            assert mirror.is_cached(d), f"cached {d} was evicted"
        for d in (digest, *map(sha, layers)):
            assert mirror.is_cached(d), f"hosted {d} was evicted"
        assert http.get("/v2/myorg/app/manifests/v1").content == body
        r = http.get(f"/v2/{oci.repo}/blobs/{oci.blobs[-1].digest}")
        assert r.status_code == 200 and sha(r.content) == oci.blobs[-1].digest

    result = subprocess.run([sys.executable, "-m", "mirror", "stats", "--json", "--config",
                             str(mirror.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    hosted = len(body) + sum(map(len, layers))          # and a config blob of < 1 kB
    assert hosted < report["hosted_size"] < hosted + 1000
    assert pulled <= report["size"] < max_size
    result = subprocess.run([sys.executable, "-m", "mirror", "stats", "--config",
                             str(mirror.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "hosted" in lines and "cache" in lines
    assert "outside max_size" in lines["hosted"]
