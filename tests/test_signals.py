"""Signals, sent to a real mirror process: SIGHUP re-reads the TLS certificate and key
and the htpasswd file without dropping connections (it used to kill the server
silently); SIGTERM stops accepting, lets running responses finish within
``shutdown_grace``, and exits 0."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import ssl
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mirror.certs import make_certs
from mirror.passwords import hash_password
from tests.test_auth import USERS, auth_config
from tests.test_faults import config_for


def wait_for_log(mirror, pattern: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, mirror.log_text())
        if found:
            return found.group(0)
        assert mirror.proc.poll() is None, f"the mirror died:\n{mirror.log_text()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the log:\n{mirror.log_text()[-2000:]}")


def first_cert_der(path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def test_sighup_reloads_the_certificate_and_htpasswd_keeping_connections(
        make_mirror, upstream, tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs, ["127.0.0.1"])
    config = auth_config(upstream, tmp_path, token=False, acl=None)
    config["tls"] = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    config["limits"] = {"keepalive_timeout": "60s"}
    mirror = make_mirror(config)
    htpasswd = tmp_path / "htpasswd"
    old_ca = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    port = int(mirror.host.rsplit(":", 1)[1])

    with httpx.Client(base_url=mirror.url, verify=old_ca, auth=("alice", USERS["alice"]),
                      timeout=10) as kept:
        first = kept.get("/v2/")
        assert first.status_code == 200
        kept_addr = first.extensions["network_stream"].get_extra_info("client_addr")

        # A new certificate from a new CA, and a new user written so that the file's
        # mtime does not change: only SIGHUP can make the mirror read it.
        fresh = tmp_path / "fresh"
        make_certs(fresh, ["127.0.0.1"])
        os.replace(fresh / "server.crt", certs / "server.crt")
        os.replace(fresh / "server.key", certs / "server.key")
        before = htpasswd.stat()
        with htpasswd.open("a") as f:
            f.write(f"carol:{hash_password('pw', rounds=4)}\n")
        os.utime(htpasswd, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert httpx.get(f"{mirror.url}/v2/", auth=("carol", "pw"),
                         verify=False).status_code == 401

        os.kill(mirror.proc.pid, signal.SIGHUP)
        line = wait_for_log(mirror, r"reloaded TLS certificate \(.*\) and htpasswd \(3 users\)")
        assert "CN=127.0.0.1" in line and str(certs / "server.crt") in line

        # New handshakes get the new certificate; the open connection goes on.
        served = ssl.get_server_certificate(("127.0.0.1", port))
        assert ssl.PEM_cert_to_DER_cert(served) == first_cert_der(certs / "server.crt")
        again = kept.get("/v2/")
        assert again.status_code == 200
        assert again.extensions["network_stream"].get_extra_info("client_addr") == kept_addr
        new_ca = ssl.create_default_context(cafile=str(fresh / "ca.crt"))
        assert httpx.get(f"{mirror.url}/v2/", auth=("carol", "pw"),
                         verify=new_ca).status_code == 200
    assert mirror.proc.poll() is None


def test_sighup_keeps_the_old_certificate_when_the_new_one_is_bad(make_mirror, upstream,
                                                                   tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs, ["127.0.0.1"])
    config = config_for(upstream.url)
    config["tls"] = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    mirror = make_mirror(config)
    good = first_cert_der(certs / "server.crt")
    (certs / "server.key").write_text("not a key\n")
    os.kill(mirror.proc.pid, signal.SIGHUP)
    wait_for_log(mirror, r"SIGHUP: kept the previous TLS certificate: .*server.key")
    port = int(mirror.host.rsplit(":", 1)[1])
    assert ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port))) == good
    ca = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    assert httpx.get(f"{mirror.url}/v2/", verify=ca).status_code == 200


@pytest.fixture
def layer(image_set):
    image = image_set.docker
    return image, max(image.blobs, key=lambda b: b.size)


def test_sigterm_lets_a_running_download_finish_then_exits_0(make_mirror, faulty_upstream,
                                                             layer):
    image, blob = layer
    # The upstream drips the blob for about three seconds: a download still running.
    faulty_upstream.arm("drip", path_contains=blob.digest, method="GET",
                        chunk=max(1024, blob.size // 30), delay=0.1)
    mirror = make_mirror(config_for(faulty_upstream.url))
    digest = hashlib.sha256()
    with httpx.stream("GET", f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}",
                      timeout=30) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_raw()
        digest.update(next(chunks))
        os.kill(mirror.proc.pid, signal.SIGTERM)
        wait_for_log(mirror, r"SIGTERM: stopping")
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):          # no new connections
            httpx.get(f"{mirror.url}/v2/", timeout=5)
        assert mirror.proc.poll() is None                # still sending
        for chunk in chunks:
            digest.update(chunk)
    assert f"sha256:{digest.hexdigest()}" == blob.digest
    assert mirror.proc.wait(timeout=15) == 0
    assert (mirror.data_dir / "lock").read_text() == ""  # a clean stop
    assert mirror.cached_path(blob.digest).stat().st_size == blob.size


def test_sigterm_waits_no_longer_than_the_grace(make_mirror, faulty_upstream, layer):
    image, blob = layer
    faulty_upstream.arm("hang_body", path_contains=blob.digest, method="GET", after=1024)
    mirror = make_mirror({**config_for(faulty_upstream.url), "shutdown_grace": "1s"})
    with httpx.stream("GET", f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}",
                      timeout=30) as resp:
        assert resp.status_code == 200
        started = time.monotonic()
        os.kill(mirror.proc.pid, signal.SIGTERM)
        assert mirror.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 8            # 1s of grace, not the hour's hang
    assert "Traceback" not in mirror.log_text()           # the cut is one line, not a trace
