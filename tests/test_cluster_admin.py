"""What one replica of a site is told, every replica does: `mirror rm`, `mirror pin`
and a hosted DELETE made through one replica, seen by the others.

Three real mirror processes share one real PostgreSQL and one bucket on a real moto S3
server (tests/support/replicas.py), in front of a real upstream registry of the test's
own; the maintenance commands run as real subprocesses with one replica's config file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import httpx
import pytest

from tests.support import postgres as _postgres
from tests.support import s3 as _s3
from tests.support.client import RegistryClient
from tests.support.image_set import push_image, push_rotating_images
from tests.support.replicas import Replicas
from tests.test_cli import FLUSH, ok
from tests.test_pull_through import ALL_ACCEPT, get_manifest, pull

# the fixtures this module uses (tests/support/postgres.py, s3.py)
postgres, pg_dsn, moto = _postgres.postgres, _postgres.pg_dsn, _s3.moto

KB = 1000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def keys_of(site, image) -> set[str]:
    """The object keys of an image's manifest and blobs in the site's bucket."""
    s3 = site.storage["s3"]
    return {_s3.stored_key(s3, d) for d in [image.digest, *(b.digest for b in image.blobs)]}


def served_digest(mirror, repo: str, tag: str) -> str:
    r = httpx.get(f"{mirror.url}/v2/{repo}/manifests/{tag}", headers={"Accept": ALL_ACCEPT},
                  timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["Docker-Content-Digest"]


def wait_until(predicate, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.1)


def test_a_tag_removed_through_one_replica_is_served_by_none_of_them(
        tmp_path, pg_dsn, moto, make_registry):
    """`mirror rm` with replica 1's config: the tag, its manifest and its blobs go from
    the site's index and bucket, and no replica answers from what it held: upstream has
    moved the tag meanwhile (the old manifest is still there by digest), and every
    replica now serves the new one, though the tag's TTL is far from over."""
    registry = make_registry()
    with RegistryClient(registry.url) as client:
        old = push_image(tmp_path / "old", client, "app/one", ["1"], [300_000], seed=801)
    config = {"upstreams": {"docker.io": {"url": registry.url, "tag_ttl": "1h"}}}
    with Replicas(tmp_path, 3, pg_dsn, config, s3=moto) as site:
        for mirror in site:                       # each replica has it in memory
            with httpx.Client(base_url=mirror.url, timeout=30) as c:
                pull(c, old)
            assert served_digest(mirror, old.repo, "1") == old.digest
        assert keys_of(site, old) <= set(site.objects())
        with RegistryClient(registry.url) as client:     # upstream moves the tag
            new = push_image(tmp_path / "new", client, "app/one", ["1"], [200_000], seed=802)
        for mirror in site:                       # cached, within its TTL: the old one
            assert served_digest(mirror, old.repo, "1") == old.digest

        out = ok(site[1], "rm", "app/one:1")
        assert old.digest in out
        assert not keys_of(site, old) & set(site.objects()), site.objects()
        for mirror in site:
            assert not mirror.is_cached(old.blobs[-1].digest)
            wait_until(lambda m=mirror: served_digest(m, old.repo, "1") == new.digest, 10,
                       lambda: site.log_text())
        # and the removed blobs come back from upstream when asked for by digest
        mark = registry.mark()
        with httpx.Client(base_url=site[2].url, timeout=30) as c:
            pull(c, dataclasses.replace(old, tags=[]))
        assert registry.count("GET", f"/blobs/{old.blobs[-1].digest}", since=mark) == 1


@pytest.fixture
def small_images(make_registry, tmp_path):
    """Six ~600 KB images in a registry of the test's own."""
    registry = make_registry()
    with RegistryClient(registry.url) as client:
        images = push_rotating_images(tmp_path, client, seed=41_000)
    return registry, images


def test_a_pin_made_through_one_replica_keeps_the_image_from_the_leaders_eviction(
        tmp_path, pg_dsn, moto, small_images):
    """`mirror pin` with replica 2's config (a follower); the leader (replica 0, the
    first to start) evicts the site past its budget and keeps the pinned image."""
    registry, images = small_images
    pinned, rotating = images[0], images[1:]
    # tag_ttl 0s: a tag inside its TTL protects its image from eviction as a pin does
    config = {"upstreams": {"docker.io": {"url": registry.url, "tag_ttl": "0s"}},
              "max_size": 2_500 * KB, "high_watermark": "90%", "low_watermark": "70%"}
    with Replicas(tmp_path, 3, pg_dsn, config, s3=moto) as site:
        assert "leader: this replica" in site[0].log_text()
        with httpx.Client(base_url=site[1].url, timeout=30) as c:
            pull(c, pinned)
        out = ok(site[2], "pin", f"{pinned.repo}:1")
        assert out.startswith(f"pinned docker.io/{pinned.repo}:1 ({pinned.digest}, ")
        rr = site.round_robin()
        # ~3 MB of other images through a 2.5 MB budget, each pulled once: the leader
        # evicts what is no longer read. (Not twice: a follower reading a blob the
        # leader evicts at that moment loses the object under its response; a known
        # defect of a site's eviction, see the report of this branch.)
        for image in rotating:
            with httpx.Client(base_url=rr.next().url, timeout=30) as c:
                pull(c, image)
        time.sleep(FLUSH)
        wait_until(lambda: "evicted" in site[0].log_text(), 15, lambda: site.log_text())
        assert "evicted" not in site[1].log_text() + site[2].log_text()
        objects = set(site.objects())
        assert keys_of(site, pinned) <= objects, "the pinned image was evicted"
        assert not all(keys_of(site, i) <= objects for i in rotating)   # the budget bit
        # every replica serves it from the bucket: nothing fetched again
        mark = registry.mark()
        for mirror in site:
            with httpx.Client(base_url=mirror.url, timeout=30) as c:
                pull(c, pinned)
        assert registry.count("GET", "/blobs/", since=mark) == 0


def _upload(mirror, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.post(f"{mirror.url}/v2/{repo}/blobs/uploads/", params={"digest": digest},
                   content=data, headers={"Content-Type": "application/octet-stream"},
                   timeout=30)
    assert r.status_code == 201, r.text
    return digest


def test_a_hosted_manifest_and_blob_deleted_through_one_replica_are_gone_from_all(
        tmp_path, pg_dsn, moto):
    hosted = {"upstreams": {}, "hosted": {"repositories": ["*"], "delete": True}}
    with Replicas(tmp_path, 3, pg_dsn, hosted, s3=moto) as site:
        layer, cfg = os.urandom(300_000), json.dumps({"os": "linux"}).encode()
        layer_digest, cfg_digest = _upload(site[0], "team/app", layer), \
            _upload(site[0], "team/app", cfg)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cfg_digest, "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": len(layer)}]}).encode()
        r = httpx.put(f"{site[0].url}/v2/team/app/manifests/v1", content=manifest,
                      headers={"Content-Type": OCI_MANIFEST}, timeout=30)
        assert r.status_code == 201, r.text
        manifest_digest = r.headers["Docker-Content-Digest"]
        for mirror in site:                     # every replica has them in memory
            with httpx.Client(base_url=mirror.url, timeout=30) as c:
                assert get_manifest(c, "team/app", "v1").content == manifest
                assert c.get(f"/v2/team/app/blobs/{layer_digest}").content == layer
                assert c.head(f"/v2/team/app/blobs/{layer_digest}").status_code == 200

        r = httpx.delete(f"{site[1].url}/v2/team/app/manifests/{manifest_digest}", timeout=30)
        assert r.status_code == 202, r.text
        r = httpx.delete(f"{site[2].url}/v2/team/app/blobs/{layer_digest}", timeout=30)
        assert r.status_code == 202, r.text

        def gone(mirror) -> bool:
            with httpx.Client(base_url=mirror.url, timeout=30) as c:
                answers = [get_manifest(c, "team/app", "v1").status_code,
                           get_manifest(c, "team/app", manifest_digest).status_code,
                           get_manifest(c, "team/app", manifest_digest,
                                        method="HEAD").status_code,
                           c.get(f"/v2/team/app/blobs/{layer_digest}").status_code,
                           c.head(f"/v2/team/app/blobs/{layer_digest}").status_code]
            return answers == [404] * 5
        for mirror in site:
            wait_until(lambda m=mirror: gone(m), 10, lambda: site.log_text())
        # the config blob was not deleted: still served by all
        for mirror in site:
            r = httpx.get(f"{mirror.url}/v2/team/app/blobs/{cfg_digest}", timeout=30)
            assert r.status_code == 200 and r.content == cfg
