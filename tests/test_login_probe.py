"""The login probe (``GET /v2/``) challenges whenever logins are configured, also when
anonymous pulls are allowed: clients learn the challenge and send the credentials
they have, a wrong password fails to log in, and anonymous clients keep exactly the
rights the ACL gives anonymous requests."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest

from tests.support.clients import ClientError, Podman, check_dir_image, registries_conf, run
from tests.test_auth import USERS, auth_config, basic, bearer, manifest, token
from tests.test_pull_through import check_manifest
from tests.test_real_clients import needs

# Anonymous requests may pull library images; bob may pull everything.
ACL = [
    {"match": {"account": "", "name": "docker.io/library/*"}, "actions": ["pull"]},
    {"match": {"account": "bob"}, "actions": ["pull"]},
]


@pytest.fixture(params=["basic", "token"])
def mirror(request, make_mirror, upstream, image_set, tmp_path):
    config = auth_config(upstream, tmp_path, token=request.param == "token", acl=ACL,
                         anonymous="pull")
    return make_mirror(config)


def test_the_probe_challenges_and_anonymous_keeps_anonymous_rights(mirror, image_set):
    m = mirror
    probe = httpx.get(f"{m.url}/v2/")
    assert probe.status_code == 401 and probe.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert probe.headers["www-authenticate"].startswith(("Basic ", "Bearer "))
    assert httpx.head(f"{m.url}/v2/").status_code == 401
    docker, oci = image_set.docker, image_set.oci
    if probe.headers["www-authenticate"].startswith("Basic "):
        assert httpx.get(f"{m.url}/v2/", headers=basic("bob", "WRONG")).status_code == 401
        assert httpx.get(f"{m.url}/v2/", headers=basic("bob", USERS["bob"])).status_code == 200
        anonymous = [{}, basic("", "")]       # what containers/image sends after a challenge
    else:
        assert token(m, "", "bob", "WRONG").status_code == 401
        assert httpx.get(f"{m.url}/v2/", headers=bearer(token(m, "", "bob", USERS["bob"]))
                         ).status_code == 200
        anonymous = [{}, bearer(token(m, f"repository:{docker.repo}:pull"))]
        # An anonymous token holds exactly the anonymous rights.
        resp = httpx.get(f"{m.url}/token", params={"service": "mirror", "scope": [
            f"repository:{docker.repo}:pull,push", f"repository:{oci.repo}:pull"]})
        claims = json.loads(base64.urlsafe_b64decode(resp.json()["token"].split(".")[1] + "=="))
        assert claims["sub"] == "" and claims["access"] == [
            {"type": "repository", "name": docker.repo, "actions": ["pull"]},
            {"type": "repository", "name": oci.repo, "actions": []}]
    for headers in anonymous:
        if "Authorization" in headers and headers["Authorization"].startswith("Bearer"):
            assert httpx.get(f"{m.url}/v2/", headers=headers).status_code == 200
        check_manifest(manifest(m, docker.repo, "v1", headers), docker)
        assert manifest(m, oci.repo, "1.0", headers).status_code == 401


def skopeo(*args, check=True):
    return run(["skopeo", *args], check=check)


def skopeo_login(m, authfile, password):
    return skopeo("login", "--tls-verify=false", "--authfile", authfile, "-u", "bob",
                  "-p", password, m.host, check=False)


def test_skopeo_login_checks_the_password_and_the_acl_applies(mirror, image_set, tmp_path):
    m = mirror
    authfile = tmp_path / "auth.json"
    wrong = skopeo_login(m, authfile, "WRONG")
    assert wrong.returncode != 0, wrong.stdout + wrong.stderr
    assert "Login Succeeded" not in wrong.stdout
    right = skopeo_login(m, authfile, USERS["bob"])
    assert right.returncode == 0 and "Login Succeeded" in right.stdout, right.stderr
    # Logged in, bob pulls what only the ACL gives him (anonymous may not).
    dest = tmp_path / "app"
    skopeo("--insecure-policy", "copy", "--src-tls-verify=false", "--src-authfile", authfile,
           f"docker://{m.host}/org/team/app:1.0", f"dir:{dest}")
    check_dir_image(dest, image_set.oci)
    # Anonymous: the library image, and nothing else.
    dest = tmp_path / "anon"
    skopeo("--insecure-policy", "copy", "--src-tls-verify=false", "--src-no-creds",
           f"docker://{m.host}/alpinetest:v1", f"dir:{dest}")
    check_dir_image(dest, image_set.docker)
    with pytest.raises(ClientError) as refused:
        skopeo("--insecure-policy", "copy", "--src-tls-verify=false", "--src-no-creds",
               f"docker://{m.host}/org/team/app:1.0", f"dir:{tmp_path / 'no'}")
    assert "unauthorized" in str(refused.value).lower() or "denied" in str(refused.value).lower()


@needs("podman")
def test_podman_pulls_anonymously_what_anonymous_may_pull(mirror, image_set, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("podman runs as root here (own storage, no systemd); run the tests as root")
    m = mirror
    authfile = tmp_path / "empty-auth.json"
    authfile.write_text("{}")
    conf = registries_conf(tmp_path / "registries.conf", m.host)
    with Podman(tmp_path / "podman", conf) as podman:
        podman.run("pull", "--tls-verify=false", "--authfile", authfile,
                   f"{m.host}/alpinetest:v1")
        assert podman.inspect(f"{m.host}/alpinetest:v1")["Digest"] == image_set.docker.digest
        with pytest.raises(ClientError):
            podman.run("pull", "--tls-verify=false", "--authfile", authfile,
                       f"{m.host}/org/team/app:1.0")
