"""``mirror warm``: fills the cache through a mirror server (the running one, or one
it starts for the time of the warm), as a client pull would. Real processes: the
real upstream registry, the mirror CLI as a subprocess, ``make_mirror`` servers."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mirror.passwords import hash_password
from tests.support.client import MANIFEST_ACCEPT
from tests.support.ports import free_port

USERS = {"alice": "secret"}
ALL = ["alpinetest:v1", "org/team/app:1.0", "multiarch/oci:latest", "multiarch/docker:latest",
       "big/image:latest"]


def hub(url: str, **extra) -> dict:
    return {"upstreams": {"docker.io": {"url": url, "tag_ttl": "5m"}}, "default": "docker.io",
            **extra}


def write_config(tmp_path: Path, config: dict) -> Path:
    """A config for a warm with no server running (``listen`` is never bound)."""
    path = tmp_path / "warm.yml"
    path.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{free_port()}",
                                    "data_dir": str(tmp_path / "data"), **config}))
    return path


def warm(config: Path, *args: str, stdin: str | None = None, timeout: float = 60):
    """``mirror warm --json``: (exit status, summary or None, stderr)."""
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "mirror", "warm",
                             "--config", str(config), "--json", "--progress", "plain", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(stdin or "", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)          # faulthandler: where it hangs
        out, err = proc.communicate()
        pytest.fail(f"mirror warm did not end within {timeout} s:\n{err[-5000:]}")
    summary = json.loads(out) if out.strip() else None
    return proc.returncode, summary, err


def cached(data_dir: Path, digest: str) -> bool:
    algorithm, hexpart = digest.split(":", 1)
    return (data_dir / "blobs" / algorithm / hexpart[:2] / hexpart).is_file()


def sha256_of_stream(client: httpx.Client, path: str) -> str:
    h = hashlib.sha256()
    with client.stream("GET", path) as resp:
        assert resp.status_code == 200, resp.read()
        for chunk in resp.iter_raw():
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def test_warm_without_server_then_offline_mirror_serves_everything(
        tmp_path, upstream, image_set, make_mirror):
    config = write_config(tmp_path, hub(upstream.url))
    status, summary, err = warm(config, *ALL)
    assert status == 0, err
    assert summary["ok"] and len(summary["images"]) == 5 and summary["failed"] == 0
    every_blob = {b.digest: b.size for _, b in image_set.blobs()}
    assert summary["blobs"] == len(every_blob)
    assert summary["bytes"] == sum(every_blob.values())
    by_ref = {i["ref"]: i for i in summary["images"]}
    assert by_ref["multiarch/oci:latest"]["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert by_ref["big/image:latest"]["name"] == "docker.io/big/image:latest"
    assert by_ref["big/image:latest"]["digest"] == image_set.big.digest

    assert (tmp_path / "data" / "lock").read_text() == ""      # a clean stop
    # The warm's own server let go of the data directory: a server starts on it at once,
    # offline, with no upstream reachable, and serves every manifest and blob byte-exact.
    mirror = make_mirror({**hub(f"http://127.0.0.1:{free_port()}"), "offline": True,
                          "data_dir": str(tmp_path / "data")})
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        for image in image_set.images:
            name = image.repo.removeprefix("library/")
            for ref in [image.tags[0], *(m.digest for m in image.manifests())]:
                resp = client.get(f"/v2/{name}/manifests/{ref}",
                                  headers={"Accept": MANIFEST_ACCEPT})
                assert resp.status_code == 200, (name, ref, resp.text)
                expected = next(m for m in image.manifests() if ref in (m.digest, *m.tags))
                assert hashlib.sha256(resp.content).hexdigest() == expected.digest[7:]
            for blob in image.blobs:
                assert sha256_of_stream(client, f"/v2/{name}/blobs/{blob.digest}") == blob.digest


def test_platform_choice_warms_only_that_child(tmp_path, upstream, image_set):
    config = write_config(tmp_path, hub(upstream.url))
    amd64, arm64 = image_set.oci_index.children
    status, summary, err = warm(config, "multiarch/oci:latest", "--platform", "linux/arm64")
    assert status == 0, err
    assert summary["images"][0]["platforms"] == ["linux/arm64/v8"]
    data = tmp_path / "data"
    assert all(cached(data, b.digest) for b in arm64.blobs)
    assert not any(cached(data, b.digest) for b in amd64.blobs)
    assert not cached(data, amd64.digest) and cached(data, arm64.digest)

    # A platform no child has: a warning; an image with no child left fails.
    status, summary, err = warm(config, "multiarch/docker:latest", "--platform",
                                "linux/arm64,linux/s390x")
    assert status == 0, err
    status, summary, err = warm(config, "multiarch/docker:latest", "--platform", "linux/s390x")
    assert status == 1
    assert "multiarch/docker:latest" in err and "platform" in err


def test_rerun_transfers_nothing(tmp_path, upstream, image_set):
    config = write_config(tmp_path, hub(upstream.url))
    refs = ["alpinetest:v1", "multiarch/docker:latest"]
    status, first, err = warm(config, *refs)
    assert status == 0 and first["blobs"] > 0, err
    mark = upstream.mark()
    status, again, err = warm(config, *refs)
    assert status == 0, err
    assert upstream.count("GET", "/blobs/", since=mark) == 0
    assert (again["blobs"], again["bytes"]) == (0, 0)
    assert again["skipped"] == first["blobs"]
    assert again["skipped_bytes"] == first["bytes"]


def htpasswd_config(tmp_path: Path) -> dict:
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in USERS.items()))
    return {"htpasswd": str(path), "anonymous": "none", "token": False}


def test_beside_running_server_one_upstream_fetch_and_logins(
        tmp_path, upstream, faulty_upstream, image_set, make_mirror):
    """A client pull of the big blob and a warm of its image at the same time, on a
    mirror with logins: the warm goes through the local token, and upstream sees one
    GET of the blob."""
    big = image_set.big.largest_blob
    mirror = make_mirror(hub(faulty_upstream.url, auth=htpasswd_config(tmp_path)))
    # Upstream slowed to ~3 s for the big blob, so the two surely overlap.
    faulty_upstream.arm("drip", path_contains=big.digest, method="GET",
                        chunk=max(big.size // 30, 1024), delay=0.1)
    mark = upstream.mark()
    pulled: list[str] = []

    def client_pull() -> None:
        with httpx.Client(base_url=mirror.url, auth=("alice", "secret"), timeout=60) as c:
            pulled.append(sha256_of_stream(c, f"/v2/big/image/blobs/{big.digest}"))

    puller = threading.Thread(target=client_pull)
    puller.start()
    deadline = time.monotonic() + 10
    while not faulty_upstream.count("GET", big.digest) and time.monotonic() < deadline:
        time.sleep(0.02)
    status, summary, err = warm(mirror.config_path, "big/image:latest")
    puller.join(60)
    assert status == 0, err
    assert pulled == [big.digest]
    assert faulty_upstream.count("GET", f"/blobs/{big.digest}") == 1
    assert upstream.wait_count("GET", f"/blobs/{big.digest}", 1, since=mark) == 1
    assert summary["images"][0]["ok"]
    assert cached(mirror.data_dir, big.digest)


@pytest.mark.parametrize("token", [False, True], ids=["basic", "token"])
def test_local_token_is_the_only_way_past_logins(tmp_path, upstream, image_set, make_mirror,
                                                  token):
    auth = {**htpasswd_config(tmp_path), "token": token}
    mirror = make_mirror(hub(upstream.url, auth=auth))
    secret = (mirror.data_dir / "local.token").read_text().strip()
    assert len(secret) >= 32
    assert (mirror.data_dir / "local.token").stat().st_mode & 0o777 == 0o600
    path = "/v2/alpinetest/manifests/v1"
    with httpx.Client(base_url=mirror.url, timeout=30,
                      headers={"Accept": MANIFEST_ACCEPT}) as client:
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {secret[:-1]}x"}) \
            .status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer x"}).status_code == 401
        resp = client.get(path, headers={"Authorization": f"Bearer {secret}"})
        assert resp.status_code == 200 and resp.content == image_set.docker.manifest
    # A new secret at each start: the old one is refused.
    mirror.restart()
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        assert client.get(path, headers={"Authorization": f"Bearer {secret}"}) \
            .status_code == 401
    status, summary, err = warm(mirror.config_path, "alpinetest:v1")
    assert status == 0, err


def test_upstream_breaking_mid_blob_fails_then_rerun_completes(
        tmp_path, upstream, faulty_upstream, image_set):
    config = write_config(tmp_path, hub(faulty_upstream.url))
    big = image_set.big.largest_blob
    fault = faulty_upstream.arm("reset", path_contains=big.digest, method="GET", times=None)
    status, summary, err = warm(config, "big/image:latest", "alpinetest:v1")
    assert status == 1
    assert big.digest in err and "big/image:latest" in err
    by_ref = {i["ref"]: i for i in summary["images"]}
    assert not by_ref["big/image:latest"]["ok"] and by_ref["alpinetest:v1"]["ok"]
    assert big.digest in by_ref["big/image:latest"]["error"]
    assert summary["failed"] == 1
    # The broken blob's bytes are not counted as transferred.
    assert summary["bytes"] == sum(b.size for b in image_set.docker.blobs) \
        + image_set.big.blobs[0].size
    assert not cached(tmp_path / "data", big.digest)

    faulty_upstream.disarm(fault)
    mark = upstream.mark()
    status, summary, err = warm(config, "big/image:latest", "alpinetest:v1")
    assert status == 0, err
    assert upstream.count("GET", "/blobs/", since=mark) == 1       # only the missing one
    assert upstream.count("GET", f"/blobs/{big.digest}", since=mark) == 1
    assert summary["blobs"] == 1 and summary["bytes"] == big.size
    assert cached(tmp_path / "data", big.digest)


def test_pin_and_reference_lists(tmp_path, upstream, image_set):
    config = write_config(tmp_path, hub(upstream.url))
    listing = tmp_path / "images.txt"
    listing.write_text("# what the site needs\n\nalpinetest:v1   # the base\n"
                       "  org/team/app:1.0\n")
    status, summary, err = warm(config, "-f", str(listing), "--pin")
    assert status == 0, err
    assert [i["ref"] for i in summary["images"]] == ["alpinetest:v1", "org/team/app:1.0"]
    status, _, err = warm(config, "-f", "-", stdin=f"multiarch/oci@{image_set.oci_index.digest}\n")
    assert status == 0, err

    def pins(name: str) -> list[str]:
        out = subprocess.run([sys.executable, "-m", "mirror", "ls", "--config", str(config),
                              "--json", name], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["pins"]
    assert pins("alpinetest") == ["v1"]
    assert pins("org/team/app") == ["1.0"]
    assert pins("multiarch/oci") == []          # warmed without --pin


def test_bad_references_exit_2_before_anything_is_fetched(tmp_path, upstream, image_set):
    config = write_config(tmp_path, hub(upstream.url, hosted={"repositories": ["myorg/*"]}))
    mark = upstream.mark()
    status, summary, err = warm(config, "alpinetest:v1", "alpine:not a tag")
    assert status == 2 and summary is None
    assert "'alpine:not a tag'" in err and "tag" in err
    status, _, err = warm(config, "alpinetest:v1", "myorg/app:1")
    assert status == 2 and "hosted" in err
    status, _, err = warm(config, "-f", str(tmp_path / "missing.txt"))
    assert status == 2 and "missing.txt" in err
    status, _, err = warm(config, "alpinetest:v1", "--platform", "linux")
    assert status == 2 and "--platform" in err
    assert upstream.count(since=mark) == 0
    assert not (tmp_path / "data" / "index.db").exists()


def test_a_server_started_during_a_warm_is_refused_naming_it(
        tmp_path, upstream, faulty_upstream, image_set):
    """With no server running, warm holds the data directory for the time of the warm."""
    big = image_set.big.largest_blob
    faulty_upstream.arm("drip", path_contains=big.digest, method="GET",
                        chunk=max(big.size // 30, 1024), delay=0.1)
    config = write_config(tmp_path, hub(faulty_upstream.url))
    warming = subprocess.Popen([sys.executable, "-m", "mirror", "warm", "--config", str(config),
                                "--progress", "none", "big/image:latest"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not faulty_upstream.count("GET", big.digest) and time.monotonic() < deadline:
            time.sleep(0.02)
        serve = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                               capture_output=True, text=True, timeout=30)
        assert serve.returncode == 1
        assert f"pid {warming.pid}" in serve.stderr
        assert warming.wait(60) == 0, warming.stderr.read()
    finally:
        if warming.poll() is None:
            warming.kill()
            warming.wait()
        warming.stderr.close()
