"""The mirror with its blobs in an S3-compatible store (``storage: {s3: ...}``), against
a real moto server and a real upstream registry, over real sockets: pulls are
byte-exact cold, warm and with Range; wrong upstream bytes leave no object and no
multipart upload; ``redirect: true`` answers GETs of committed blobs with a 307 that
real clients follow; deletes delete objects; a restart with nothing but the index in
the data directory serves from the bucket; an unusable store is a one-line start-up
error."""

# ruff: noqa: F811  (the moto fixture is imported, then named by the tests)

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import httpx
import pytest
import yaml

from tests.support.client import read_blob
from tests.support.ports import free_port
from tests.support.s3 import (  # noqa: F401
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    moto,
    open_uploads,
    s3_storage,
    stored_bytes,
    stored_keys,
)
from tests.test_pull_through import fetch_blob, pull

PART = 8 << 20          # S3Store's part size: a bigger blob goes up as a multipart upload


def config_for(url: str, moto, **s3) -> dict:
    return {"upstreams": {"docker.io": {"url": url, "tag_ttl": "5m"}},
            "default": "docker.io", "storage": s3_storage(moto, **s3)}


def key_of(digest: str) -> str:
    algorithm, hexpart = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexpart[:2]}/{hexpart}"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def local_blobs(mirror) -> list[str]:
    root = mirror.data_dir / "blobs"
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_pull_through_is_byte_exact_cold_warm_and_ranged(make_mirror, upstream, image_set,
                                                         moto):
    image = image_set.big
    blob = image.largest_blob
    assert blob.size > PART        # streamed up as a multipart upload
    mirror = make_mirror(config_for(upstream.url, moto))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        mark = upstream.mark()
        pull(client, image)                                   # cold: checks every hash
        assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1
        assert sha(mirror.cached_bytes(blob.digest)) == blob.digest
        assert sha(mirror.cached_bytes(image.digest)) == image.digest   # manifests too
        mark = upstream.mark()
        pull(client, image)                                   # warm: from the bucket
        assert upstream.requests(since=mark) == []
        whole = blob.path.read_bytes()
        for first, last in ((0, 99), (PART - 10, PART + 10), (blob.size - 5, blob.size - 1)):
            resp = client.get(f"/v2/{image.repo}/blobs/{blob.digest}",
                              headers={"Range": f"bytes={first}-{last}"})
            assert resp.status_code == 206
            assert resp.content == whole[first:last + 1]
            assert resp.headers["content-range"] == f"bytes {first}-{last}/{blob.size}"
    assert local_blobs(mirror) == []                       # nothing kept as files
    assert list((mirror.data_dir / "tmp").glob("*-*-*")) == []   # temp files are gone
    assert open_uploads(mirror.config) == []
    assert "blobs in bucket" in mirror.log_text()


def test_wrong_bytes_leave_no_object_and_no_upload(make_mirror, faulty_upstream, image_set,
                                                   moto):
    image = image_set.big
    blob = image.largest_blob
    assert blob.size > PART
    mirror = make_mirror(config_for(faulty_upstream.url, moto))
    faulty_upstream.arm("corrupt", path_contains=blob.digest, method="GET", offset=PART + 1000)
    n, _, error = read_blob(mirror, image.repo, blob)
    assert error is not None and n < blob.size
    deadline = time.monotonic() + 10
    while open_uploads(mirror.config) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_uploads(mirror.config) == []
    assert key_of(blob.digest) not in stored_keys(mirror.config)
    assert not mirror.is_cached(blob.digest)
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    assert sha(mirror.cached_bytes(blob.digest)) == blob.digest


def test_redirect_answers_committed_blob_gets_with_a_307_clients_follow(
        make_mirror, upstream, image_set, moto, tmp_path):
    image = image_set.docker
    blob = image.blobs[-1]
    mirror = make_mirror(config_for(upstream.url, moto, redirect=True))
    url = f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}"
    with httpx.Client(timeout=60) as client:
        first = client.get(url)                     # not committed yet: served as today
        assert first.status_code == 200 and sha(first.content) == blob.digest
        resp = client.get(url)
        assert resp.status_code == 307, resp.text
        assert resp.headers["docker-content-digest"] == blob.digest
        location = resp.headers["location"]
        assert location.startswith(moto.url) and "X-Amz-Signature" in location
        head = client.head(url)                     # HEAD is never redirected
        assert head.status_code == 200 and head.headers["content-length"] == str(blob.size)
        followed = client.get(url, follow_redirects=True)
        assert followed.status_code == 200 and sha(followed.content) == blob.digest
        ranged = client.get(url, headers={"Range": "bytes=10-19"}, follow_redirects=True)
        assert ranged.status_code == 206 and ranged.content == blob.path.read_bytes()[10:20]
    out = tmp_path / "curl.out"
    subprocess.run(["curl", "-sSfL", "-o", str(out), url], check=True, timeout=60)
    assert sha(out.read_bytes()) == blob.digest
    skopeo = shutil.which("skopeo")
    if skopeo is not None:
        subprocess.run([skopeo, "--insecure-policy", "copy", "--src-tls-verify=false",
                        f"docker://{mirror.host}/alpinetest:v1", f"dir:{tmp_path / 'img'}"],
                       check=True, timeout=120, capture_output=True)
        for b in image.blobs:
            assert sha((tmp_path / "img" / b.digest.split(":", 1)[1]).read_bytes()) == b.digest


def test_rm_deletes_the_objects(make_mirror, upstream, image_set,
                                            moto):
    docker, oci = image_set.docker, image_set.oci
    mirror = make_mirror(config_for(upstream.url, moto))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, docker)
        pull(client, oci)
    keys = stored_keys(mirror.config)
    assert {key_of(b.digest) for b in docker.blobs} <= set(keys)
    result = subprocess.run([sys.executable, "-m", "mirror", "rm", "--config",
                             str(mirror.config_path), f"{docker.repo}:*"],
                            capture_output=True, text=True, timeout=60, cwd=mirror.dir)
    assert result.returncode == 0, result.stdout + result.stderr
    left = set(stored_keys(mirror.config))
    gone = {key_of(b.digest) for b in docker.blobs} | {key_of(docker.digest)}
    assert not gone & left, result.stdout
    assert {key_of(b.digest) for b in oci.blobs} <= left      # the other image stays



def test_eviction_deletes_the_objects(make_mirror, upstream, image_set, moto):
    docker, oci = image_set.docker, image_set.oci
    # A budget the two images cannot share, tags never fresh: pulling the second
    # evicts the first, least recently used, from the bucket.
    docker_bytes = sum(b.size for b in docker.blobs) + len(docker.manifest)
    config = config_for(upstream.url, moto)
    config["upstreams"]["docker.io"]["tag_ttl"] = "0s"
    mirror = make_mirror({**config, "max_size": int(docker_bytes / 0.7) + 1024,
                          "high_watermark": "90%", "low_watermark": "70%"})
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, oci)
        assert {key_of(b.digest) for b in oci.blobs} <= set(stored_keys(mirror.config))
        pull(client, docker)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = set(stored_keys(mirror.config))
        if not {key_of(b.digest) for b in oci.blobs} & left:
            break
        time.sleep(0.2)
    assert not {key_of(b.digest) for b in oci.blobs} & left, mirror.log_text()[-2000:]
    assert "evicted" in mirror.log_text()


def test_a_restart_with_only_the_index_serves_from_the_bucket(make_mirror, upstream,
                                                              image_set, moto):
    image = image_set.oci
    mirror = make_mirror(config_for(upstream.url, moto))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
    mirror.stop()
    for entry in mirror.data_dir.iterdir():                # everything but the index
        if not entry.name.startswith("index.db"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    mirror.reconfigure(upstreams={"docker.io": {"url": upstream.url, "offline": True}})
    mirror.start()
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        mark = upstream.mark()
        for blob in image.blobs:
            fetch_blob(client, image.repo, blob)
        resp = client.get(f"/v2/{image.repo}/manifests/{image.digest}",
                          headers={"Accept": image.media_type})
        assert resp.status_code == 200 and resp.content == image.manifest
        assert upstream.requests(since=mark) == []


def serve_once(tmp_path, config: dict) -> subprocess.CompletedProcess:
    config = {"listen": f"127.0.0.1:{free_port()}", "data_dir": str(tmp_path / "data"),
              "workers": 1, **config}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=90, cwd=tmp_path)


def one_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, out
    return lines[0]


def test_an_unreachable_store_is_a_one_line_startup_error(tmp_path, upstream,
                                                          moto):
    storage = s3_storage(moto)
    storage["s3"]["endpoint"] = f"http://127.0.0.1:{free_port()}"     # nothing listens
    line = one_line(serve_once(tmp_path, {"upstreams": {"docker.io": {"url": upstream.url}},
                                          "storage": storage}))
    assert "storage.s3.bucket" in line and "storage.s3.endpoint" in line
    assert storage["s3"]["endpoint"] in line


def test_a_missing_bucket_is_a_one_line_startup_error(tmp_path, upstream,
                                                      moto):
    storage = s3_storage(moto, bucket="no-such-bucket-here")
    line = one_line(serve_once(tmp_path, {"upstreams": {"docker.io": {"url": upstream.url}},
                                          "storage": storage}))
    assert "storage.s3.bucket 'no-such-bucket-here'" in line and "NoSuchBucket" in line


def test_s3_without_obstore_is_a_one_line_startup_error(tmp_path, upstream,
                                                        moto):
    # A module of that name that cannot be imported is what an install without the
    # s3 extra looks like to the mirror.
    fake = tmp_path / "no_obstore"
    (fake / "obstore").mkdir(parents=True)
    (fake / "obstore" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'obstore'\", name='obstore')\n")
    config = {"listen": f"127.0.0.1:{free_port()}", "data_dir": str(tmp_path / "data"),
              "workers": 1, "upstreams": {"docker.io": {"url": upstream.url}},
              "storage": s3_storage(moto)}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": f"{fake}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    line = one_line(proc)
    assert "storage.s3.bucket" in line and "mirror[s3]" in line


@pytest.mark.parametrize("kind", ["verify", "export"])
def test_verify_and_export_read_through_the_bucket(make_mirror, upstream, image_set, moto,
                                                   tmp_path, kind):
    image = image_set.docker
    mirror = make_mirror(config_for(upstream.url, moto))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
    if kind == "verify":
        result = subprocess.run([sys.executable, "-m", "mirror", "verify", "--config",
                                 str(mirror.config_path)], capture_output=True, text=True,
                                timeout=60, cwd=mirror.dir)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 corrupt, 0 missing" in result.stdout
        return
    out = tmp_path / "bundle.tar"
    result = subprocess.run([sys.executable, "-m", "mirror", "export", "--config",
                             str(mirror.config_path), "--all", "-o", str(out)],
                            capture_output=True, text=True, timeout=60, cwd=mirror.dir)
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
        for blob in image.blobs:
            member = next(n for n in names if n.endswith(blob.digest.split(":", 1)[1]))
            data = tar.extractfile(member).read()
            assert sha(data) == blob.digest


def test_verify_finds_and_deletes_a_corrupt_object(make_mirror, upstream, image_set, moto):
    image = image_set.docker
    blob = image.blobs[0]
    mirror = make_mirror(config_for(upstream.url, moto))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
    s3 = mirror.config["storage"]["s3"]
    moto.inspect().put_object(Bucket=s3["bucket"], Key=key_of(blob.digest),
                              Body=b"x" * blob.size)
    result = subprocess.run([sys.executable, "-m", "mirror", "verify", "--config",
                             str(mirror.config_path)], capture_output=True, text=True,
                            timeout=60, cwd=mirror.dir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"corrupt blob {blob.digest}" in result.stdout
    assert "1 corrupt, 0 missing" in result.stdout
    assert key_of(blob.digest) not in stored_keys(mirror.config)
    with httpx.Client(base_url=mirror.url, timeout=60) as client:   # fetched again, right
        fetch_blob(client, image.repo, blob)


def test_after_an_unclean_stop_the_file_walk_is_skipped_and_said_so(make_mirror, upstream,
                                                                     image_set, moto):
    image = image_set.oci
    mirror = make_mirror(config_for(upstream.url, moto))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
    mirror.stop(kill=True)
    mirror.start()
    log = mirror.log_text()
    assert "did not stop cleanly" in log
    assert "does not apply to blobs in s3 (skipped)" in log
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        mark = upstream.mark()
        for blob in image.blobs:
            fetch_blob(client, image.repo, blob)
        assert upstream.count("GET", "/blobs/", since=mark) == 0


def test_credentials_region_and_endpoint_from_the_aws_environment(make_mirror, upstream,
                                                                  image_set, moto):
    image = image_set.oci
    bucket = moto.make_bucket()
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": REGION, "AWS_ENDPOINT_URL": moto.url}
    mirror = make_mirror({"upstreams": {"docker.io": {"url": upstream.url}},
                          "storage": {"s3": {"bucket": bucket}}}, env=env)
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
    s3 = {"endpoint": moto.url, "bucket": bucket}
    assert stored_bytes({"storage": {"s3": s3}}, image.digest) == image.manifest


def test_an_object_deleted_while_the_mirror_opens_it_is_fetched_again_not_served_broken(
        make_mirror, upstream, image_set, moto):
    """Another replica's eviction deletes an object just as this mirror starts to serve
    it: the mirror learns it before it sends a header (and fetches the blob again),
    never a 200 whose body then breaks off. The store's answers pass through a proxy
    that holds the object's next GET back while the test deletes the object."""
    from tests.support.faulty import FaultyUpstream
    image = image_set.docker
    blob = image.largest_blob
    with FaultyUpstream(moto.url, name="faulty-s3") as s3:
        config = config_for(upstream.url, moto)
        bucket = config["storage"]["s3"]["bucket"]
        config["storage"]["s3"]["endpoint"] = s3.url
        mirror = make_mirror(config)
        assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
        key = key_of(blob.digest)
        s3.arm("hang", path_contains=key, method="GET", times=1, seconds=1.5)
        seen, mark = s3.count(None, key), upstream.mark()
        result: list = []
        reader = threading.Thread(
            target=lambda: result.append(read_blob(mirror, image.repo, blob)))
        reader.start()
        deadline = time.monotonic() + 20
        while s3.count(None, key) == seen:        # the mirror has begun to open it
            assert time.monotonic() < deadline, mirror.log_text()
            time.sleep(0.005)
        moto.inspect().delete_object(Bucket=bucket, Key=key)
        reader.join(60)
        assert result == [(blob.size, blob.digest, None)], mirror.log_text()
        assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1
        assert "aborting response" not in mirror.log_text()


def test_readyz_says_not_ready_while_the_store_cannot_be_reached(make_mirror, upstream,
                                                                  tmp_path):
    """A load balancer takes a replica whose object store is gone out of rotation."""
    from tests.support.s3 import MotoServer
    (tmp_path / "own-moto").mkdir()
    server = MotoServer(tmp_path / "own-moto").start()
    try:
        mirror = make_mirror(config_for(upstream.url, server))
        assert httpx.get(f"{mirror.url}/readyz").text == "ready\n"
        server.stop()
        resp = httpx.get(f"{mirror.url}/readyz", timeout=30)
        assert resp.status_code == 503, resp.text
        assert resp.text.startswith("not ready: storage.s3: bucket "), resp.text
        assert httpx.get(f"{mirror.url}/healthz").status_code == 200     # alive all the same
    finally:
        server.stop()
