"""Logins to the mirror: htpasswd users over Basic or the token flow, ACLs, and the
auth matrix. A refused request reveals nothing about what is cached."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest

from mirror.passwords import hash_password
from mirror.tokens import Tokens
from tests.support.client import MANIFEST_ACCEPT
from tests.support.keys import signing_key
from tests.test_pull_through import check_manifest, hub_config

USERS = {"alice": "wonderland", "bob": "builder"}
ACL = [
    {"match": {"account": "alice"}, "actions": ["*"]},
    {"match": {"account": "bob", "name": "docker.io/library/*"}, "actions": ["pull"]},
]


def auth_config(upstream, tmp_path, token: bool, acl=ACL, anonymous="none"):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{hash_password(p, rounds=4)}\n" for u, p in USERS.items()))
    auth = {"htpasswd": str(htpasswd), "anonymous": anonymous, "token": token}
    if acl is not None:
        auth["acl"] = acl
    return {**hub_config(upstream), "auth": auth}


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def manifest(mirror, name, ref, headers=None, method="GET"):
    return httpx.request(method, f"{mirror.url}/v2/{name}/manifests/{ref}",
                         headers={"Accept": MANIFEST_ACCEPT, **(headers or {})}, timeout=30)


def token(mirror, scope=None, user=None, password=None) -> httpx.Response:
    params = {"service": "mirror"}
    if scope:
        params["scope"] = scope
    auth = (user, password) if user else None
    return httpx.get(f"{mirror.url}/token", params=params, auth=auth, timeout=30)


def bearer(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def error_code(resp) -> str:
    return resp.json()["errors"][0]["code"]


@pytest.fixture
def basic_mirror(make_mirror, upstream, image_set, tmp_path):
    return make_mirror(auth_config(upstream, tmp_path, token=False))


@pytest.fixture
def token_mirror(make_mirror, upstream, image_set, tmp_path):
    return make_mirror(auth_config(upstream, tmp_path, token=True))


def test_basic_auth_matrix(basic_mirror, image_set):
    m = basic_mirror
    docker, oci = image_set.docker, image_set.oci
    # The login probe.
    resp = httpx.get(f"{m.url}/v2/")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == 'Basic realm="mirror"'
    assert httpx.get(f"{m.url}/v2/", headers=basic("alice", "nope")).status_code == 401
    assert httpx.get(f"{m.url}/v2/", headers=basic("nobody", "x")).status_code == 401
    assert httpx.get(f"{m.url}/v2/", headers=basic("alice", USERS["alice"])).status_code == 200
    # Pulls.
    check_manifest(manifest(m, docker.repo, "v1", basic("alice", USERS["alice"])), docker)
    check_manifest(manifest(m, oci.repo, "1.0", basic("alice", USERS["alice"])), oci)   # cached now
    check_manifest(manifest(m, "alpinetest", "v1", basic("bob", USERS["bob"])), docker)
    resp = manifest(m, oci.repo, "1.0", basic("bob", USERS["bob"]))
    assert resp.status_code == 403 and error_code(resp) == "DENIED"
    resp = manifest(m, docker.repo, "v1")
    assert resp.status_code == 401 and error_code(resp) == "UNAUTHORIZED"
    # Blobs are guarded the same way.
    blob = oci.blobs[0]
    url = f"{m.url}/v2/{oci.repo}/blobs/{blob.digest}"
    assert httpx.get(url, headers=basic("alice", USERS["alice"])).status_code == 200
    assert httpx.get(url, headers=basic("bob", USERS["bob"])).status_code == 403
    assert httpx.head(url).status_code == 401


def test_a_refused_pull_reveals_nothing_about_the_cache(basic_mirror, token_mirror, image_set):
    oci, index = image_set.oci, image_set.oci_index

    def creds(m, who, repo):
        """Headers for ``who`` (None, (user, password)) pulling ``repo`` from mirror ``m``."""
        if who is None:
            return {}
        if m is basic_mirror:
            return basic(*who)
        resp = token(m, f"repository:{repo}:pull", *who)
        return bearer(resp) if resp.status_code == 200 else basic(*who)

    for m in (basic_mirror, token_mirror):
        check_manifest(manifest(m, oci.repo, "1.0", creds(m, ("alice", USERS["alice"]),
                                                            oci.repo)), oci)      # cached now
        for who in (None, ("bob", USERS["bob"]), ("bob", "wrong")):
            cached = manifest(m, oci.repo, "1.0", creds(m, who, oci.repo))
            uncached = manifest(m, index.repo, "latest", creds(m, who, index.repo))
            blob_cached = httpx.get(f"{m.url}/v2/{oci.repo}/blobs/{oci.blobs[0].digest}",
                                    headers=creds(m, who, oci.repo))
            blob_uncached = httpx.get(f"{m.url}/v2/{index.repo}/blobs/{index.blobs[0].digest}",
                                      headers=creds(m, who, index.repo))
            assert cached.status_code in (401, 403), who
            assert (cached.status_code, error_code(cached)) == \
                (uncached.status_code, error_code(uncached)), who
            assert cached.status_code == blob_cached.status_code == blob_uncached.status_code


def test_token_auth_matrix(token_mirror, image_set):
    m = token_mirror
    docker, oci = image_set.docker, image_set.oci
    resp = httpx.get(f"{m.url}/v2/")
    assert resp.status_code == 401
    challenge = resp.headers["www-authenticate"]
    assert challenge == f'Bearer realm="{m.url}/token",service="mirror"'
    # Bad credentials at the token endpoint.
    assert token(m, f"repository:{docker.repo}:pull", "alice", "nope").status_code == 401
    # Anonymous token: no access granted, so the pull asks for a better one.
    anon = bearer(token(m, f"repository:{docker.repo}:pull"))
    resp = manifest(m, docker.repo, "v1", anon)
    assert resp.status_code == 401
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    assert f'scope="repository:{docker.repo}:pull"' in resp.headers["www-authenticate"]
    # A valid user with the right scope.
    alice = bearer(token(m, f"repository:{docker.repo}:pull", "alice", USERS["alice"]))
    check_manifest(manifest(m, docker.repo, "v1", alice), docker)
    assert httpx.get(f"{m.url}/v2/", headers=alice).status_code == 200
    # A token for another repository's scope.
    other = bearer(token(m, f"repository:{oci.repo}:pull", "alice", USERS["alice"]))
    resp = manifest(m, docker.repo, "v1", other)
    assert resp.status_code == 401 and error_code(resp) == "UNAUTHORIZED"
    # A user the ACL denies: the token names the repository with no actions.
    bob = bearer(token(m, f"repository:{oci.repo}:pull", "bob", USERS["bob"]))
    resp = manifest(m, oci.repo, "1.0", bob)
    assert resp.status_code == 403 and error_code(resp) == "DENIED"
    claims = json.loads(base64.urlsafe_b64decode(bob["Authorization"].split(".")[1] + "=="))
    assert claims["access"] == [{"type": "repository", "name": oci.repo, "actions": []}]
    # Expired and tampered tokens.
    tokens = Tokens(signing_key(m, "token"), "mirror", "mirror", ttl=-120)
    expired = tokens.issue("alice", [])
    resp = manifest(m, docker.repo, "v1", {"Authorization": f"Bearer {expired}"})
    assert resp.status_code == 401 and 'error="invalid_token"' in resp.headers["www-authenticate"]
    head, body, sig = alice["Authorization"][7:].split(".")
    forged_claims = {"sub": "alice",
                     "access": [{"type": "repository", "name": oci.repo, "actions": ["pull"]}]}
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).decode().rstrip("=")
    resp = manifest(m, oci.repo, "1.0", {"Authorization": f"Bearer {head}.{forged}.{sig}"})
    assert resp.status_code == 401
    # OAuth2 password grant (containerd), and the catalog scope.
    resp = httpx.post(f"{m.url}/token", data={"grant_type": "password", "service": "mirror",
                                                 "username": "alice", "password": USERS["alice"],
                                                 "scope": f"repository:{docker.repo}:pull"})
    check_manifest(manifest(m, docker.repo, "v1", bearer(resp)), docker)
    resp = httpx.get(f"{m.url}/v2/_catalog", headers=alice)
    assert resp.status_code == 401
    assert 'scope="registry:catalog:*"' in resp.headers["www-authenticate"]
    cat = bearer(token(m, "registry:catalog:*", "alice", USERS["alice"]))
    assert httpx.get(f"{m.url}/v2/_catalog", headers=cat).json()["repositories"] == \
        ["library/alpinetest"]
    bob_cat = bearer(token(m, "registry:catalog:*", "bob", USERS["bob"]))
    assert httpx.get(f"{m.url}/v2/_catalog", headers=bob_cat).json()["repositories"] == \
        ["library/alpinetest"]
    check_manifest(manifest(m, oci.repo, "1.0",
                            bearer(token(m, f"repository:{oci.repo}:pull", "alice",
                                         USERS["alice"]))), oci)
    assert httpx.get(f"{m.url}/v2/_catalog", headers=bob_cat).json()["repositories"] == \
        ["library/alpinetest"]                            # bob never sees org/team/app
    assert httpx.get(f"{m.url}/v2/_catalog", headers=cat).json()["repositories"] == \
        ["library/alpinetest", "org/team/app"]


def test_anonymous_pull_can_be_allowed(make_mirror, upstream, image_set, tmp_path):
    m = make_mirror(auth_config(upstream, tmp_path, token=False, acl=None, anonymous="pull"))
    # The login probe challenges all the same (issue 9), so clients send credentials...
    assert httpx.get(f"{m.url}/v2/").status_code == 401
    # ...and anonymous pulls go on: with no Authorization, or the empty Basic login
    # containers/image sends once it has seen a Basic challenge.
    check_manifest(manifest(m, image_set.docker.repo, "v1"), image_set.docker)
    check_manifest(manifest(m, image_set.docker.repo, "v1", basic("", "")), image_set.docker)
    check_manifest(manifest(m, image_set.docker.repo, "v1", basic("bob", USERS["bob"])),
                   image_set.docker)                      # no ACL: users may do everything
    assert httpx.get(f"{m.url}/v2/", headers=basic("bob", "wrong")).status_code == 401


def test_htpasswd_changes_apply_without_restart(basic_mirror, image_set, tmp_path):
    m = basic_mirror
    assert httpx.get(f"{m.url}/v2/", headers=basic("carol", "pw")).status_code == 401
    htpasswd = tmp_path / "htpasswd"
    time.sleep(0.01)
    with htpasswd.open("a") as f:
        f.write(f"carol:{hash_password('pw', rounds=4)}\n")
    assert httpx.get(f"{m.url}/v2/", headers=basic("carol", "pw")).status_code == 200


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_skopeo_logs_in_and_copies(mode, basic_mirror, token_mirror, image_set, tmp_path):
    m = basic_mirror if mode == "basic" else token_mirror
    image = image_set.docker
    dest = tmp_path / "copy"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                    "--src-creds", f"bob:{USERS['bob']}", f"docker://{m.host}/alpinetest:v1",
                    f"dir:{dest}"], check=True, capture_output=True, timeout=120)
    assert (dest / "manifest.json").read_bytes() == image.manifest
    denied = subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                             "--src-creds", f"bob:{USERS['bob']}",
                             f"docker://{m.host}/org/team/app:1.0", f"dir:{tmp_path / 'no'}"],
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
    assert "denied" in denied.stderr.lower() or "unauthorized" in denied.stderr.lower()
    wrong = subprocess.run(["skopeo", "--insecure-policy", "inspect", "--tls-verify=false",
                            "--creds", "bob:wrong", f"docker://{m.host}/alpinetest:v1"],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0
    assert USERS["bob"] not in m.log_text() and "wrong" not in m.log_text()


@pytest.mark.skipif(shutil.which("dockerd") is None, reason="docker.io is not installed")
def test_docker_login_and_pull(token_mirror, image_set, tmp_path):
    """dockerd treats 127.0.0.0/8 registries as plain HTTP, so login runs the token flow."""
    from tests.support.clients import DockerdProcess
    m = token_mirror
    with DockerdProcess(tmp_path / "dockerd", m.url) as dockerd:
        wrong = subprocess.run([dockerd.cli, "-H", f"unix://{dockerd.socket}", "login", "-u",
                                "bob", "--password-stdin", m.host], input="nope\n", text=True,
                               capture_output=True, env={**os.environ, "DOCKER_CONFIG":
                                                         str(dockerd.cli_config)}, timeout=120)
        assert wrong.returncode != 0
        dockerd.docker("login", "-u", "bob", "-p", USERS["bob"], m.host)
        dockerd.docker("pull", f"{m.host}/alpinetest:v1")
        info = dockerd.inspect(f"{m.host}/alpinetest:v1")
        assert info["Id"] == image_set.docker.blobs[0].digest          # the config digest
        denied = subprocess.run([dockerd.cli, "-H", f"unix://{dockerd.socket}", "pull",
                                 f"{m.host}/org/team/app:1.0"], capture_output=True, text=True,
                                env={**os.environ, "DOCKER_CONFIG": str(dockerd.cli_config)},
                                timeout=120)
        assert denied.returncode != 0 and "denied" in denied.stderr.lower()


def test_a_token_does_not_follow_ns_to_another_upstream(make_mirror, upstream, image_set,
                                                        tmp_path):
    """bob may pull docker.io/library/*; a token for library/alpinetest must not open
    local.test/library/alpinetest by adding ?ns=local.test."""
    m = make_mirror(auth_config(upstream, tmp_path, token=True))
    docker = image_set.docker
    bob = bearer(token(m, f"repository:{docker.repo}:pull", "bob", USERS["bob"]))
    check_manifest(manifest(m, docker.repo, "v1", bob), docker)
    resp = httpx.get(f"{m.url}/v2/{docker.repo}/manifests/v1", params={"ns": "local.test"},
                     headers={"Accept": MANIFEST_ACCEPT, **bob})
    assert resp.status_code == 403 and error_code(resp) == "DENIED"
