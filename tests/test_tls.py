"""TLS straight from the mirror, with a CA made by `mirror certs`, and real clients
logging in over it."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys

import httpx
import pytest

from tests.test_auth import USERS, auth_config


def mirror_cli(*args, input=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, input=input, timeout=120, cwd=cwd)


@pytest.fixture
def certs(tmp_path):
    out = tmp_path / "certs"
    proc = mirror_cli("certs", "127.0.0.1", "localhost", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "/etc/docker/certs.d/127.0.0.1:5000/ca.crt" in proc.stdout
    assert oct((out / "server.key").stat().st_mode & 0o777) == "0o600"
    return out


@pytest.fixture
def tls_mirror(make_mirror, upstream, image_set, tmp_path, certs):
    config = auth_config(upstream, tmp_path, token=True)
    config["tls"] = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    return make_mirror(config)


def test_certs_are_reused_and_verify(certs, tmp_path):
    ca_before = (certs / "ca.crt").read_bytes()
    proc = mirror_cli("certs", "mirror.example", "10.1.2.3", "--out", str(certs))
    assert proc.returncode == 0, proc.stderr
    assert (certs / "ca.crt").read_bytes() == ca_before        # the CA stays; clients keep trusting
    out = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                          str(certs / "server.crt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(certs / "server.crt")],
                          capture_output=True, text=True).stdout
    assert "DNS:mirror.example" in text and "IP Address:10.1.2.3" in text


def test_tls_login_and_pull_with_skopeo(tls_mirror, certs, image_set, tmp_path):
    m = tls_mirror
    https = f"https://{m.host}"
    ca = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with httpx.Client(base_url=https, verify=ca, timeout=30) as client:
        resp = client.get("/v2/")
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"].startswith(f'Bearer realm="{https}/token"')
    cert_dir = tmp_path / "client-certs"
    cert_dir.mkdir()
    shutil.copy(certs / "ca.crt", cert_dir / "ca.crt")
    dest = tmp_path / "copy"
    proc = subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-cert-dir", str(cert_dir),
                           "--src-creds", f"alice:{USERS['alice']}",
                           f"docker://{m.host}/org/team/app:1.0", f"dir:{dest}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "manifest.json").read_bytes() == image_set.oci.manifest
    # Without the CA, verification fails (TLS really is on).
    proc = subprocess.run(["skopeo", "--insecure-policy", "inspect", "--creds",
                           f"alice:{USERS['alice']}", f"docker://{m.host}/org/team/app:1.0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "certificate" in proc.stderr.lower()


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_podman_login_over_tls(tls_mirror, certs, image_set, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("podman tests run as root (scripts/test runs them so)")
    from tests.support.clients import Podman, registries_conf
    m = tls_mirror
    cert_dir = tmp_path / "client-certs"
    cert_dir.mkdir()
    shutil.copy(certs / "ca.crt", cert_dir / "ca.crt")
    conf = registries_conf(tmp_path / "registries.conf", m.host)
    with Podman(tmp_path / "podman", conf) as podman:
        podman.run("login", "--cert-dir", str(cert_dir), "-u", "alice", "-p", USERS["alice"],
                   m.host)
        podman.run("pull", "--cert-dir", str(cert_dir), f"{m.host}/org/team/app:1.0")
        info = podman.inspect(f"{m.host}/org/team/app:1.0")
        assert info["Digest"] == image_set.oci.digest


def test_htpasswd_command_edits_the_users_file(tmp_path):
    users = tmp_path / "htpasswd"
    proc = mirror_cli("htpasswd", "add", "dave", "--file", str(users), input="s3cret\n")
    assert proc.returncode == 0, proc.stderr
    line = users.read_text().strip()
    assert line.startswith("dave:$2y$") and "s3cret" not in line
    out = subprocess.run(["htpasswd", "-vb", str(users), "dave", "s3cret"], capture_output=True)
    assert out.returncode == 0                                  # Apache's tool agrees
    assert mirror_cli("htpasswd", "add", "eve", "--file", str(users), input="pw\n").returncode == 0
    assert mirror_cli("htpasswd", "remove", "dave", "--file", str(users)).returncode == 0
    assert users.read_text().startswith("eve:")
    proc = mirror_cli("htpasswd", "remove", "nobody", "--file", str(users))
    assert proc.returncode == 1 and "nobody" in proc.stderr
    proc = mirror_cli("htpasswd", "add", "bad:name", "--file", str(users), input="pw\n")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
