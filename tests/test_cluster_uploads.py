"""Hosted uploads whose requests reach different replicas (mirror/cluster/peer_uploads.py).

Three real mirror processes hosting every repository share one real PostgreSQL and one
bucket on a real moto S3 server (tests/support/replicas.py). The POST of an upload
goes to one replica, its PATCHes, status GETs and PUT to the others in turn: each is
forwarded to the replica holding the session. The blob is committed once, to the
site's bucket, and any replica serves it.
"""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest

from tests.support import postgres as _postgres
from tests.support import s3 as _s3
from tests.support.clients import check_dir_image, run, which
from tests.support.front import RoundRobinFront
from tests.support.replicas import Replicas

# the fixtures this module uses (tests/support/postgres.py, s3.py)
postgres, pg_dsn, moto = _postgres.postgres, _postgres.pg_dsn, _s3.moto

HOSTED = {"upstreams": {}, "hosted": {"repositories": ["*"], "delete": True}}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def site(tmp_path, pg_dsn, moto):
    with Replicas(tmp_path, 3, pg_dsn, HOSTED, s3=moto) as replicas:
        yield replicas


def upload_across(site, owner: int, repo: str, data: bytes, step: int) -> str:
    """POST on replica ``owner``, then PATCH chunks, a status GET and the PUT on the
    others in turn; the blob's digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.post(f"{site[owner].url}/v2/{repo}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    assert location.startswith(f"/v2/{repo}/blobs/uploads/")
    turn = owner
    for offset in range(0, len(data), step):
        turn = (turn + 1) % len(site)
        chunk = data[offset:offset + step]
        r = httpx.patch(f"{site[turn].url}{location}", content=chunk, timeout=30,
                        headers={"Content-Type": "application/octet-stream",
                                 "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
        assert r.status_code == 202, (turn, r.text)
        assert r.headers["Range"] == f"0-{offset + len(chunk) - 1}"
        location = r.headers["Location"]
        turn = (turn + 1) % len(site)
        status = httpx.get(f"{site[turn].url}{location}", timeout=30)
        assert status.status_code == 204, (turn, status.text)
        assert status.headers["Range"] == f"0-{offset + len(chunk) - 1}"
    turn = (turn + 1) % len(site)
    if turn == owner:
        turn = (turn + 1) % len(site)
    r = httpx.put(f"{site[turn].url}{location}", params={"digest": digest}, timeout=30)
    assert r.status_code == 201, (turn, r.text)
    assert r.headers["Docker-Content-Digest"] == digest
    return digest


def test_a_push_whose_requests_alternate_between_replicas_succeeds(site):
    layer = os.urandom(5 * 1024 * 1024 + 123)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer_digest = upload_across(site, 0, "team/app", layer, 1024 * 1024)
    config_digest = upload_across(site, 0, "team/app", config, 100)
    # committed once, to the site's bucket: what every replica reads
    assert site[1].cached_bytes(layer_digest) == layer
    assert site.objects() == sorted(f"blobs/sha256/{d[7:9]}/{d[7:]}"
                                    for d in (layer_digest, config_digest))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": len(layer)}]}).encode()
    r = httpx.put(f"{site[0].url}/v2/team/app/manifests/v1", content=manifest,
                  headers={"Content-Type": OCI_MANIFEST}, timeout=30)
    assert r.status_code == 201, r.text
    got = httpx.get(f"{site[0].url}/v2/team/app/manifests/v1",
                    headers={"Accept": OCI_MANIFEST}, timeout=30)
    assert got.status_code == 200 and got.content == manifest
    for mirror in site:
        for digest, data in ((layer_digest, layer), (config_digest, config)):
            blob = httpx.get(f"{mirror.url}/v2/team/app/blobs/{digest}", timeout=30)
            assert blob.status_code == 200 and blob.content == data
    # Every replica other than the owner forwarded some of the requests.
    for other in (1, 2):
        assert "PATCH /v2/team/app/blobs/uploads/" in site[other].log_text()


def test_an_upload_cancelled_on_another_replica_is_gone_everywhere(site):
    r = httpx.post(f"{site[1].url}/v2/team/tmp/blobs/uploads/", timeout=30)
    location = r.headers["Location"]
    r = httpx.patch(f"{site[2].url}{location}", content=b"x" * 1000, timeout=30,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    r = httpx.delete(f"{site[0].url}{location}", timeout=30)
    assert r.status_code == 204, r.text
    for mirror in site:
        r = httpx.get(f"{mirror.url}{location}", timeout=30)
        assert r.status_code == 404, r.text
        assert r.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    # an upload no replica holds is 404 everywhere, not forwarded anywhere
    unknown = "/v2/team/tmp/blobs/uploads/00000000-0000-4000-8000-000000000000"
    for mirror in site:
        r = httpx.patch(f"{mirror.url}{unknown}", content=b"y", timeout=30)
        assert r.status_code == 404, r.text


def test_the_peer_upload_endpoint_wants_the_site_signature(site):
    r = httpx.post(f"{site[0].url}/v2/team/x/blobs/uploads/", timeout=30)
    uuid = r.headers["Docker-Upload-UUID"]
    path = f"/_mirror/peer/v2/team/x/blobs/uploads/{uuid}"
    assert httpx.patch(f"{site[0].url}{path}", content=b"z", timeout=30).status_code == 401
    assert httpx.get(f"{site[0].url}{path}", timeout=30).status_code == 401
    assert httpx.put(f"{site[0].url}{path}?digest=sha256:{'0' * 64}",
                     timeout=30).status_code == 401


def test_a_replica_authorizes_the_client_before_it_forwards(tmp_path, pg_dsn, moto):
    from mirror.passwords import hash_password

    htpasswd = tmp_path / "htpasswd"
    hashed = hash_password("secret", rounds=4)
    htpasswd.write_text(f"alice:{hashed}\nbob:{hashed}\n")
    config = {**HOSTED, "auth": {"htpasswd": str(htpasswd), "acl": [
        {"match": {"account": "alice"}, "actions": ["*"]},
        {"match": {"account": "bob", "name": "team/*"}, "actions": ["pull"]}]}}
    with Replicas(tmp_path, 3, pg_dsn, config, s3=moto) as site:
        alice, bob = ("alice", "secret"), ("bob", "secret")
        r = httpx.post(f"{site[0].url}/v2/team/app/blobs/uploads/", auth=alice, timeout=30)
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
        patch = {"content": b"x" * 100, "timeout": 30,
                 "headers": {"Content-Type": "application/octet-stream"}}
        r = httpx.patch(f"{site[1].url}{location}", **patch)
        assert r.status_code == 401, r.text
        r = httpx.patch(f"{site[1].url}{location}", auth=bob, **patch)
        assert r.status_code == 403, r.text
        # neither reached the session
        r = httpx.get(f"{site[2].url}{location}", auth=alice, timeout=30)
        assert r.status_code == 204 and r.headers["Range"] == "0-0", r.headers
        r = httpx.patch(f"{site[1].url}{location}", auth=alice, **patch)
        assert r.status_code == 202 and r.headers["Range"] == "0-99", r.text


def test_a_finished_upload_is_forgotten_by_the_site(site, pg_dsn):
    import asyncio

    import asyncpg

    data = os.urandom(3000)
    upload_across(site, 2, "team/done", data, 1000)

    async def rows():
        conn = await asyncpg.connect(pg_dsn)
        try:
            return await conn.fetch("SELECT id FROM peer_uploads")
        finally:
            await conn.close()
    assert asyncio.run(rows()) == []


def test_an_upload_whose_replica_is_down_is_a_clear_503(site):
    r = httpx.post(f"{site[0].url}/v2/team/down/blobs/uploads/", timeout=30)
    location = r.headers["Location"]
    site[0].stop(kill=True)
    r = httpx.patch(f"{site[1].url}{location}", content=b"x" * 10, timeout=30,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 503, r.text
    error = r.json()["errors"][0]
    assert site[0].url in error["message"] and "cannot be reached" in error["message"], error


def test_skopeo_pushes_through_a_round_robin_front_and_every_replica_serves_it_back(
        site, upstream, image_set, tmp_path):
    """skopeo copies an image from the real upstream into the site through a front that
    sends each request of an upload to another replica; then every replica serves the
    image back, byte-exact."""
    skopeo = which("skopeo")
    if skopeo is None:
        pytest.fail("skopeo is required (apt-get install skopeo; scripts/test does)")
    image = image_set.oci
    with RoundRobinFront([m.url for m in site]) as front:
        run([skopeo, "--insecure-policy", "copy", "--src-tls-verify=false",
             "--dest-tls-verify=false", "--preserve-digests",
             f"docker://{upstream.host}/{image.repo}:{image.tags[0]}",
             f"docker://{front.host}/pushed/app:1"])
        uploads = front.uploads()
    # every blob was uploaded, each upload's requests spread over the replicas
    assert len(uploads) >= len(image.blobs), uploads
    for upload, requests in uploads.items():
        methods = [m for m, _ in requests]
        assert methods[0] == "POST" and methods[-1] == "PUT", (upload, requests)
        assert len({i for _, i in requests}) == min(len(requests), len(site)), requests
    assert any("PATCH" in [m for m, _ in r] for r in uploads.values()), uploads
    for i, mirror in enumerate(site):
        out = tmp_path / f"back-{i}"
        run([skopeo, "--insecure-policy", "copy", "--src-tls-verify=false",
             f"docker://{mirror.host}/pushed/app:1", f"dir:{out}"])
        check_dir_image(out, image)
