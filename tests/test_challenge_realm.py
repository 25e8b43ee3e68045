"""Challenges name the mirror as configured (``public_url``), not as the client says:
a ``Host`` header is echoed only when it is a plain host[:port]. And a request is
routed only after the auth check, so a client the ACL refuses cannot probe which
upstreams are configured."""

from __future__ import annotations

import httpx
import pytest

from tests.support.client import MANIFEST_ACCEPT
from tests.test_auth import USERS, auth_config, basic, bearer, error_code, token
from tests.test_pull_through import check_manifest

ACL = [
    {"match": {"account": "alice"}, "actions": ["*"]},
    {"match": {"account": "bob", "name": "docker.io/library/*"}, "actions": ["pull"]},
    {"match": {"account": "", "name": "docker.io/library/*"}, "actions": ["pull"]},
]


def realm(resp: httpx.Response) -> str:
    challenge = resp.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="'), challenge
    return challenge[len('Bearer realm="'):].split('"', 1)[0]


def test_public_url_names_the_token_endpoint_whatever_the_host(make_mirror, upstream, image_set,
                                                              tmp_path):
    config = auth_config(upstream, tmp_path, token=True)
    config["public_url"] = "https://mirror.example:8443"
    m = make_mirror(config)
    for host in (None, "evil.example", m.host):
        headers = {"Host": host} if host else {}
        resp = httpx.get(f"{m.url}/v2/", headers=headers)
        assert resp.status_code == 401 and realm(resp) == "https://mirror.example:8443/token"
    resp = httpx.get(f"{m.url}/v2/{image_set.docker.repo}/manifests/v1",
                     headers={"Host": "evil.example"})
    assert realm(resp) == "https://mirror.example:8443/token"


def test_a_host_header_is_echoed_only_when_it_is_a_host(make_mirror, upstream, tmp_path):
    m = make_mirror(auth_config(upstream, tmp_path, token=True))
    own = f"http://{m.host}/token"
    for host, expected in [("mirror.local:5000", "http://mirror.local:5000/token"),
                           ("10.1.2.3", "http://10.1.2.3/token"),
                           ("[::1]:5000", "http://[::1]:5000/token"),
                           ('evil",service="x', own), ("a b", own), ("x/y", own),
                           ("host:99999x", own), ("", own), ("a" * 300, own)]:
        resp = httpx.get(f"{m.url}/v2/", headers={"Host": host})
        assert resp.status_code == 401, host
        assert realm(resp) == expected, host
        assert resp.headers["www-authenticate"].count('"') == 4, resp.headers["www-authenticate"]


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_unknown_upstreams_are_not_revealed_before_auth(mode, make_mirror, upstream, image_set,
                                                        tmp_path):
    m = make_mirror(auth_config(upstream, tmp_path, token=mode == "token", acl=ACL,
                                anonymous="pull"))
    repo = image_set.docker.repo

    def creds(user):
        if user is None:
            return {}
        if mode == "basic":
            return basic(user, USERS[user])
        return bearer(token(m, f"repository:{repo}:pull", user, USERS[user]))

    def get(ns, user=None, name=repo):
        return httpx.get(f"{m.url}/v2/{name}/manifests/v1", params={"ns": ns} if ns else {},
                         headers={"Accept": MANIFEST_ACCEPT, **creds(user)}, timeout=30)

    check_manifest(get(None), image_set.docker)        # anonymous may pull library images
    # Anonymous and bob: an upstream that is not configured answers exactly as one that
    # is configured but refused to them.
    for user, status in ((None, 401), ("bob", 403)):
        configured, unknown = get("local.test", user), get("nowhere.example", user)
        assert (configured.status_code, error_code(configured)) == \
            (unknown.status_code, error_code(unknown)) == \
            (status, "UNAUTHORIZED" if status == 401 else "DENIED"), user
        assert "nowhere" not in unknown.text
    # An invalid name: refused like any other name the client may not pull.
    assert get(None, name="Bad..Name").status_code == 401
    # alice may pull anything, so she learns the upstream is not there.
    resp = get("nowhere.example", "alice")
    assert resp.status_code == 404 and error_code(resp) == "NAME_UNKNOWN"
    check_manifest(get("local.test", "alice"), image_set.docker)
