"""Hosted repositories with the real clients our users run (issue 11): podman push and
pull over plain HTTP, skopeo ``copy --all`` of multi-arch indexes, the seeds' private
registry (registry:2 with TLS and htpasswd) done with the mirror alone: ``mirror certs``,
``mirror htpasswd add``, login, push, ``_catalog``, ``tags/list``, pull back byte-exact,
and dockerd ``docker login`` + ``docker push`` + ``docker pull``.

One plain-HTTP private mirror and one TLS + htpasswd private mirror serve the whole
module (real processes); each test pushes to repository names of its own. podman and
dockerd run as root with their own state, as in tests/test_real_clients.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.clients import (
    ClientError,
    DockerdProcess,
    Podman,
    check_dir_image,
    needs,
    registries_conf,
    run,
    which,
)
from tests.support.mirror import MirrorProcess
from tests.support.ports import free_port, stop_process, wait_http

PRIVATE = {"upstreams": {}, "hosted": {"repositories": ["*"]}}
PASSWORD = "s3cret-Pa55"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def skopeo():
    path = which("skopeo")
    if path is None:
        pytest.fail("skopeo is required (apt-get install skopeo; scripts/test does)")

    def skopeo(*args, **kwargs):
        return run([path, "--insecure-policy", *args], **kwargs)
    return skopeo


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain private registry over HTTP, no logins: the mirror alone."""
    mirror = MirrorProcess(tmp_path_factory.mktemp("plain"), PRIVATE).start()
    yield mirror
    mirror.stop()


def mirror_cli(*args, input=None):
    proc = subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, input=input, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


@dataclass
class Seeds:
    mirror: MirrorProcess
    certs: Path      # ca.crt, server.crt, server.key from `mirror certs`
    cert_dir: Path   # what a client trusts: ca.crt only

    def http(self, password: str = PASSWORD) -> httpx.Client:
        ca = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        return httpx.Client(base_url=self.mirror.url, verify=ca, auth=("alice", password),
                            timeout=30)


def start_seeds(base: Path, hosted: dict) -> Seeds:
    """The seeds' registry:2 set-up (TLS, htpasswd) made with the mirror's own commands,
    hosting ``hosted``, under ``base``; the caller stops ``.mirror``."""
    mirror_cli("certs", "127.0.0.1", "--out", str(base / "certs"))
    mirror_cli("htpasswd", "add", "alice", "--file", str(base / "htpasswd"),
               input=PASSWORD + "\n")
    config = {"tls": {"cert": str(base / "certs" / "server.crt"),
                      "key": str(base / "certs" / "server.key")},
              "auth": {"htpasswd": str(base / "htpasswd")},
              "upstreams": {}, "hosted": hosted}
    mirror = MirrorProcess(base / "mirror", config).start()
    cert_dir = base / "client-certs"
    cert_dir.mkdir()
    shutil.copy(base / "certs" / "ca.crt", cert_dir / "ca.crt")
    return Seeds(mirror, base / "certs", cert_dir)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    seeds = start_seeds(tmp_path_factory.mktemp("seeds"), PRIVATE["hosted"])
    yield seeds
    seeds.mirror.stop()


def head_digest(http: httpx.Client, repo: str, ref: str, accept: str) -> str:
    r = http.head(f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
    assert r.status_code == 200, (r.status_code, r.headers)
    return r.headers["docker-content-digest"]


# -- skopeo ------------------------------------------------------------------------------------

@pytest.mark.parametrize("attr", ["oci_index", "docker_list"])
def test_skopeo_copy_all_multiarch_into_hosted_and_back_byte_exact(
        attr, skopeo, plain, upstream, image_set, tmp_path):
    image = getattr(image_set, attr)
    dest = f"docker://{plain.host}/hosted/{attr}:multi"
    skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
           "--dest-tls-verify=false", f"docker://{upstream.host}/{image.ref}", dest)
    out = tmp_path / "back"
    skopeo("copy", "--all", "--src-tls-verify=false", dest, f"dir:{out}")
    check_dir_image(out, image)   # the index, every child manifest and every blob, byte-exact
    with httpx.Client(base_url=plain.url, timeout=30) as http:
        assert head_digest(http, f"hosted/{attr}", "multi", image.media_type) == image.digest
        for child in image.children:
            r = http.get(f"/v2/hosted/{attr}/manifests/{child.digest}",
                         headers={"Accept": child.media_type})
            assert r.status_code == 200 and r.content == child.manifest
        assert http.get(f"/v2/hosted/{attr}/tags/list").json()["tags"] == ["multi"]


# -- podman ------------------------------------------------------------------------------------

@needs("podman")
def test_podman_push_then_pull_back_over_plain_http(as_root, plain, upstream, image_set,
                                                     tmp_path):
    conf = registries_conf(tmp_path / "registries.conf", plain.host)
    source = image_set.docker
    with Podman(tmp_path / "podman", conf) as podman:
        podman.run("pull", "--tls-verify=false", f"{upstream.host}/{source.ref}")
        image_id = podman.inspect(f"{upstream.host}/{source.ref}")["Id"]
        target = f"{plain.host}/team/podman:1"
        podman.run("tag", f"{upstream.host}/{source.ref}", target)
        digest_file = tmp_path / "digest"
        podman.run("push", "--tls-verify=false", "--digestfile", digest_file, target)
        pushed = digest_file.read_text().strip()
        assert pushed.startswith("sha256:")
        with httpx.Client(base_url=plain.url, timeout=30) as http:
            accept = ("application/vnd.docker.distribution.manifest.v2+json, "
                      "application/vnd.oci.image.manifest.v1+json")
            assert head_digest(http, "team/podman", "1", accept) == pushed
            assert http.get("/v2/team/podman/tags/list").json() == {"name": "team/podman",
                                                                    "tags": ["1"]}

        podman.run("rmi", "--all", "--force")
        podman.run("pull", "--tls-verify=false", target)
        info = podman.inspect(target)
        assert info["Digest"] == pushed
        assert info["Id"] == image_id      # the same config (image) after the round trip
        assert f"{plain.host}/team/podman@{pushed}" in info["RepoDigests"]


# -- the seeds' private registry: TLS and htpasswd -----------------------------------------------

def test_seeds_private_registry_over_tls_with_login(skopeo, seeds, upstream, image_set,
                                                    tmp_path):
    host, certs = seeds.mirror.host, str(seeds.cert_dir)
    with httpx.Client(base_url=seeds.mirror.url, timeout=30,
                      verify=ssl.create_default_context(cafile=str(seeds.certs / "ca.crt"))) as c:
        r = c.get("/v2/")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")

    auth_file = tmp_path / "auth.json"
    # skopeo login checks the password against GET /v2/ over verified TLS
    run([which("skopeo"), "login", "--cert-dir", certs, "--authfile", auth_file,
         "-u", "alice", "-p", PASSWORD, host])
    bad = run([which("skopeo"), "login", "--cert-dir", certs, "--authfile", tmp_path / "x.json",
               "-u", "alice", "-p", "wrong", host], check=False)
    assert bad.returncode != 0

    image = image_set.oci
    dest = f"docker://{host}/myorg/app:1.0"
    skopeo("copy", "--preserve-digests", "--src-tls-verify=false", "--dest-cert-dir", certs,
           "--dest-authfile", auth_file, f"docker://{upstream.host}/{image.ref}", dest)

    with seeds.http() as http:
        assert "myorg/app" in http.get("/v2/_catalog").json()["repositories"]
        assert http.get("/v2/myorg/app/tags/list").json() == {"name": "myorg/app",
                                                              "tags": ["1.0"]}
        assert head_digest(http, "myorg/app", "1.0", image.media_type) == image.digest
    out = tmp_path / "back"
    skopeo("copy", "--src-cert-dir", certs, "--src-authfile", auth_file, dest, f"dir:{out}")
    check_dir_image(out, image)

    # a wrong password pushes nothing
    with pytest.raises(ClientError):
        skopeo("copy", "--preserve-digests", "--src-tls-verify=false", "--dest-cert-dir",
               certs, "--dest-creds", "alice:wrong", f"docker://{upstream.host}/{image.ref}",
               f"docker://{host}/myorg/denied:1.0")
    with seeds.http() as http:
        assert "myorg/denied" not in http.get("/v2/_catalog").json()["repositories"]
        assert http.get("/v2/myorg/denied/tags/list").status_code == 404
        assert seeds.http("wrong").get("/v2/_catalog").status_code == 401
    # and no password at all cannot pull what alice pushed
    none = run([which("skopeo"), "--insecure-policy", "copy", "--src-cert-dir", certs,
                "--src-no-creds", dest, f"dir:{tmp_path / 'anon'}"], check=False)
    assert none.returncode != 0


def test_seeds_flow_end_to_end_with_delete_and_gc(skopeo, upstream, image_set, tmp_path):
    """The seeds' whole registry:2 life cycle with the mirror alone: certs, htpasswd,
    TLS, login, push, catalog, tags, delete (skopeo delete), `mirror gc` beside the
    running server, and the pull fails with 404 afterwards, the bytes gone."""
    seeds = start_seeds(tmp_path, {"repositories": ["*"], "delete": True, "gc_grace": "0s",
                                   "gc_interval": "off"})
    mirror = seeds.mirror
    try:
        host, certs, auth_file = mirror.host, str(seeds.cert_dir), tmp_path / "auth.json"
        run([which("skopeo"), "login", "--cert-dir", certs, "--authfile", auth_file,
             "-u", "alice", "-p", PASSWORD, host])
        image = image_set.oci
        dest = f"docker://{host}/team/app:2.0"
        skopeo("copy", "--preserve-digests", "--src-tls-verify=false", "--dest-cert-dir",
               certs, "--dest-authfile", auth_file, f"docker://{upstream.host}/{image.ref}",
               dest)
        with seeds.http() as http:
            assert "team/app" in http.get("/v2/_catalog").json()["repositories"]
            assert http.get("/v2/team/app/tags/list").json()["tags"] == ["2.0"]
            blobs = [b.digest for b in image.blobs]
            assert all(mirror.is_cached(d) for d in blobs)

            # registry:2's `skopeo delete`: DELETE of the manifest by digest.
            skopeo("delete", "--cert-dir", certs, "--authfile", auth_file, dest)
            r = http.get(f"/v2/team/app/manifests/{image.digest}",
                         headers={"Accept": image.media_type})
            assert r.status_code == 404
            r = http.get("/v2/team/app/tags/list")    # no tags left: empty, or 404 as registry:2
            assert r.status_code == 404 or r.json()["tags"] == [], r.text

            # Online gc (the server keeps running): the unreferenced blobs go.
            gc = mirror_cli("gc", "--config", str(mirror.config_path))
            assert "hosted: removed" in gc.stdout, gc.stdout
            for digest in blobs:
                assert not mirror.is_cached(digest), digest
            # The server picks the change up within about a second (index generation).
            deadline = time.monotonic() + 10
            while http.get(f"/v2/team/app/blobs/{blobs[0]}").status_code != 404:
                assert time.monotonic() < deadline, "the server still serves a swept blob"
                time.sleep(0.2)
            for digest in blobs:
                assert http.get(f"/v2/team/app/blobs/{digest}").status_code == 404
            assert http.get("/healthz").status_code == 200
        pulled = run([which("skopeo"), "--insecure-policy", "copy", "--src-cert-dir", certs,
                      "--src-authfile", auth_file, dest, f"dir:{tmp_path / 'gone'}"], check=False)
        assert pulled.returncode != 0
        assert "manifest unknown" in (pulled.stderr + pulled.stdout).lower()
    finally:
        mirror.stop()


@needs("podman")
def test_seeds_podman_login_push_pull_over_tls(as_root, seeds, upstream, image_set, tmp_path):
    host, certs = seeds.mirror.host, str(seeds.cert_dir)
    conf = registries_conf(tmp_path / "registries.conf", host)
    source = image_set.docker
    with Podman(tmp_path / "podman", conf) as podman:
        podman.run("pull", "--tls-verify=false", f"{upstream.host}/{source.ref}")
        target = f"{host}/ci/podman:tls"
        podman.run("tag", f"{upstream.host}/{source.ref}", target)
        with pytest.raises(ClientError):      # not logged in yet
            podman.run("push", "--cert-dir", certs, target)
        podman.run("login", "--cert-dir", certs, "-u", "alice", "-p", PASSWORD, host)
        digest_file = tmp_path / "digest"
        podman.run("push", "--cert-dir", certs, "--digestfile", digest_file, target)
        pushed = digest_file.read_text().strip()
        podman.run("rmi", "--all", "--force")
        podman.run("pull", "--cert-dir", certs, target)
        assert podman.inspect(target)["Digest"] == pushed
    with seeds.http() as http:
        assert http.get("/v2/ci/podman/tags/list").json()["tags"] == ["tls"]


# -- dockerd -----------------------------------------------------------------------------------

_PUSHED = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: \d+")


@needs("dockerd", "containerd")
def test_dockerd_login_push_and_pull(as_root, seeds, upstream, image_set, tmp_path):
    """docker treats 127.0.0.0/8 as an insecure registry: TLS without verifying the CA
    (/etc/docker/certs.d is the host's, not ours to write), Basic logins as registry:2's."""
    host = seeds.mirror.host
    dockerd = DockerdProcess(tmp_path / "dockerd", seeds.mirror.url)
    try:
        dockerd.start()
    except RuntimeError as exc:
        pytest.skip(f"dockerd cannot run here: {str(exc).splitlines()[0]}")
    try:
        source = image_set.docker
        dockerd.docker("pull", f"{upstream.host}/{source.ref}")
        image_id = dockerd.inspect(f"{upstream.host}/{source.ref}")["Id"]
        target = f"{host}/myorg/docker:v1"
        dockerd.docker("tag", f"{upstream.host}/{source.ref}", target)
        with pytest.raises(ClientError):      # no login: 401
            dockerd.docker("push", target)
        with pytest.raises(ClientError):
            dockerd.docker("login", "-u", "alice", "-p", "wrong", host)
        dockerd.docker("login", "-u", "alice", "-p", PASSWORD, host)
        out = dockerd.docker("push", target).stdout
        pushed = _PUSHED.search(out)
        assert pushed, out
        with seeds.http() as http:
            accept = "application/vnd.docker.distribution.manifest.v2+json"
            assert head_digest(http, "myorg/docker", "v1", accept) == pushed.group(1)
            assert http.get("/v2/myorg/docker/tags/list").json()["tags"] == ["v1"]
        dockerd.docker("rmi", target, f"{upstream.host}/{source.ref}")
        dockerd.docker("pull", target)
        info = dockerd.inspect(target)
        assert info["Id"] == image_id
        assert f"{host}/myorg/docker@{pushed.group(1)}" in info["RepoDigests"]
    finally:
        dockerd.stop()


# -- an OCI artifact ---------------------------------------------------------------------------

def _write_blob(layout: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def artifact_layout(layout: Path, subject: dict) -> bytes:
    """An OCI image layout holding one artifact (an SBOM with a ``subject``), as oras
    or cosign push them: empty config, ``artifactType``, one non-image layer."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    config = {"mediaType": "application/vnd.oci.empty.v1+json", **_write_blob(layout, b"{}")}
    sbom = {"mediaType": "application/spdx+json",
            **_write_blob(layout, json.dumps({"spdxVersion": "SPDX-2.3"}).encode()),
            "annotations": {"org.opencontainers.image.title": "sbom.spdx.json"}}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "artifactType": "application/spdx+json", "config": config,
                           "layers": [sbom], "subject": subject}).encode()
    entry = {"mediaType": OCI_MANIFEST, **_write_blob(layout, manifest),
             "annotations": {"org.opencontainers.image.ref.name": "sbom"}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return manifest


def test_skopeo_copies_an_oci_artifact_into_hosted_and_back(skopeo, plain, upstream, image_set,
                                                            tmp_path):
    image = image_set.oci
    skopeo("copy", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
           f"docker://{upstream.host}/{image.ref}", f"docker://{plain.host}/art/app:1.0")
    subject = {"mediaType": image.media_type, "digest": image.digest,
               "size": len(image.manifest)}
    manifest = artifact_layout(tmp_path / "layout", subject)
    dest = f"docker://{plain.host}/art/app:sbom"
    skopeo("copy", "--preserve-digests", "--dest-tls-verify=false",
           f"oci:{tmp_path / 'layout'}:sbom", dest)
    with httpx.Client(base_url=plain.url, timeout=30) as http:
        r = http.get("/v2/art/app/manifests/sbom", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.content == manifest
    out = tmp_path / "back"
    skopeo("copy", "--src-tls-verify=false", dest, f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == manifest
    for layer in json.loads(manifest)["layers"]:
        assert (out / layer["digest"].split(":")[1]).read_bytes() == \
            (tmp_path / "layout" / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()


# -- the README's walkthrough --------------------------------------------------------------------

def walkthrough_blocks() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("#### A private registry with the mirror alone")
    return re.findall(r"```sh\n(.*?)```", text[start:], re.S)[:2]


def test_readme_private_registry_walkthrough_serves_as_written(tmp_path):
    """The server commands of the README's walkthrough, run as written (``mirror`` is
    ``python -m mirror``; MIRROR_LISTEN moves it off port 5000), then a login and a push
    checked against the certificate made for registry.example."""
    server, client = walkthrough_blocks()
    *setup, serve = server.strip().splitlines()
    assert serve == "mirror serve --config config.yml"
    assert "docker login" in client and "docker push" in client and "docker pull" in client
    mirror = f"{sys.executable} -m mirror "
    script = "set -e\n" + "\n".join(mirror + line[len("mirror "):] if line.startswith("mirror ")
                                    else line for line in setup)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, input=PASSWORD + "\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    serving = subprocess.Popen([sys.executable, "-m", "mirror", *serve.split()[1:]],
                               cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "MIRROR_LISTEN": f"127.0.0.1:{port}"})
    log.close()
    try:
        wait_http(f"https://127.0.0.1:{port}/v2/", timeout=20, verify=False,
                  alive=lambda: serving.poll() is None)
        ca = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
        sni = {"sni_hostname": "registry.example"}      # the name the certificate is for

        def client(auth):
            return httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ca, auth=auth,
                                timeout=30)
        with client(None) as anonymous:
            r = anonymous.post("/v2/myorg/alpine/blobs/uploads/", extensions=sni)
            assert r.status_code == 401
        with client(("alice", PASSWORD)) as alice:
            config = b'{"architecture":"amd64","os":"linux"}'
            digest = "sha256:" + hashlib.sha256(config).hexdigest()
            r = alice.post("/v2/myorg/alpine/blobs/uploads/", params={"digest": digest},
                           content=config, extensions=sni)
            assert r.status_code == 201, r.text
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": digest, "size": len(config)}}).encode()
            r = alice.put("/v2/myorg/alpine/manifests/3.19", content=body, extensions=sni,
                          headers={"Content-Type": OCI_MANIFEST})
            assert r.status_code == 201, r.text
            assert alice.get("/v2/_catalog", extensions=sni).json() == {
                "repositories": ["myorg/alpine"]}
            assert alice.get("/v2/myorg/alpine/tags/list", extensions=sni).json() == {
                "name": "myorg/alpine", "tags": ["3.19"]}
            assert alice.get("/v2/myorg/alpine/manifests/3.19", extensions=sni).content == body
    finally:
        stop_process(serving)
