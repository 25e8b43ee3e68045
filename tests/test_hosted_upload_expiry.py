"""Abandoned upload sessions (issue 11): sessions no request wrote to for
``hosted.upload_ttl`` are swept while the server runs (not only at its start or when a
client touches them), and by `mirror gc`, which counts them in its summary; a session
that keeps receiving chunks lives on. Real mirror processes."""

from __future__ import annotations

import os
import time

import httpx
import yaml

from tests.test_cli import cli
from tests.test_hosted_push import errors


def start_upload(http: httpx.Client, repo: str = "team/app") -> tuple[str, str]:
    """A session with some bytes in it: (its Location, its id)."""
    r = http.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    r = http.patch(location, content=os.urandom(1000),
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    return r.headers["location"], location.rstrip("/").rsplit("/", 1)[-1].split("?")[0]


def test_expired_session_is_swept_while_the_server_runs(make_mirror):
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"],
                                                      "upload_ttl": "2s"}})
    folder_of = lambda upload_id: mirror.data_dir / "uploads" / upload_id  # noqa: E731
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        location, upload_id = start_upload(http)
        assert (folder_of(upload_id) / "data").stat().st_size == 1000
        deadline = time.monotonic() + 10
        while folder_of(upload_id).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        # gone without a restart and without a request touching it
        assert not folder_of(upload_id).exists()
        assert "dropped 1 upload session untouched for hosted.upload_ttl" in mirror.log_text()
        r = http.patch(location, content=b"more",
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 404 and errors(r) == ["BLOB_UPLOAD_UNKNOWN"], r.text
        # a new session works as before
        start_upload(http)


def test_a_session_that_keeps_receiving_chunks_outlives_the_ttl(make_mirror):
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"],
                                                      "upload_ttl": "2s"}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        location, upload_id = start_upload(http)
        sent = 1000
        started = time.monotonic()
        while time.monotonic() - started < 4.5:         # more than twice the TTL
            time.sleep(0.5)
            r = http.patch(location, content=b"x" * 100,
                           headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 202, (time.monotonic() - started, r.text)
            sent += 100
            location = r.headers["location"]
            assert r.headers["range"] == f"0-{sent - 1}"
        assert (mirror.data_dir / "uploads" / upload_id / "data").stat().st_size == sent


def test_mirror_gc_sweeps_expired_sessions_and_says_how_many(make_mirror):
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"]}})   # ttl 24h
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        old_location, old = start_upload(http)
        time.sleep(1.2)
        fresh_location, fresh = start_upload(http)
        # `mirror gc` beside the running server, with upload_ttl 1s: only the first is old
        data = dict(mirror.config)
        data["hosted"] = {**data["hosted"], "upload_ttl": "1s"}
        config = mirror.dir / "gc-ttl.yml"
        config.write_text(yaml.safe_dump(data))
        dry = cli(mirror, "gc", "--dry-run", config=config)
        assert dry.returncode == 0, dry.stderr
        assert "1 expired upload session would go (upload_ttl 1s)" in dry.stdout, dry.stdout
        assert (mirror.data_dir / "uploads" / old).exists()
        result = cli(mirror, "gc", config=config)
        assert result.returncode == 0, result.stderr
        assert "1 expired upload session dropped (upload_ttl 1s)" in result.stdout, result.stdout
        assert not (mirror.data_dir / "uploads" / old).exists()
        assert (mirror.data_dir / "uploads" / fresh).exists()
        r = http.patch(old_location, content=b"x",
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 404 and errors(r) == ["BLOB_UPLOAD_UNKNOWN"], r.text
        r = http.patch(fresh_location, content=b"x",
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        # with its own config (24h), nothing is expired
        result = cli(mirror, "gc")
        assert "0 expired upload sessions dropped (upload_ttl 86400s)" in result.stdout
