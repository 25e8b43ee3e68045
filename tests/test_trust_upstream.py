"""Trusting upstreams no more than needed: credentials stay on the upstream's own site,
token answers are read with a cap, token caches are bounded, transport errors keep their
cause, and a manifest HEAD costs upstream one request at most."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time

import httpx
import pytest
from starlette.responses import JSONResponse, RedirectResponse, Response

from mirror import upstream_auth, upstream_client
from mirror.certs import make_certs
from mirror.config import ConfigError, UpstreamConfig, load_config
from mirror.errors import ManifestUnknown, NameUnknown, UpstreamUnavailable
from mirror.upstream import Upstream
from tests.support.client import MANIFEST_V2, OCI_MANIFEST, RegistryClient
from tests.support.fixtures import USERS
from tests.support.image_set import push_image
from tests.support.ports import free_port
from tests.support.scripted import Scripted
from tests.support.token_server import TokenServer
from tests.test_pull_through import check_manifest, get_manifest, hub_config
from tests.test_upstream_auth import pull_and_check

BOB = "Basic " + base64.b64encode(b"bob:hunter2").decode()


def _manifest_for(blob: bytes) -> tuple[bytes, str, str]:
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_V2,
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                      "digest": digest, "size": len(blob)},
                           "layers": []}).encode()
    return manifest, f"sha256:{hashlib.sha256(manifest).hexdigest()}", digest


# -- item 1: credentials never leave the upstream's own site -------------------------------

def test_a_cdn_asking_for_a_token_never_gets_the_credentials(make_mirror):
    """A blob redirected to a CDN that answers 401 with a Bearer realm elsewhere: neither
    the realm nor the CDN sees the upstream's credentials, and the upstream's own (Basic)
    challenge keeps working for the next request."""
    blob = b"config bytes " * 100
    manifest, manifest_digest, blob_digest = _manifest_for(blob)
    realm = Scripted(lambda r: JSONResponse({"token": "stolen"}), name="realm")
    cdn = Scripted(lambda r: Response(status_code=401, headers={
        "WWW-Authenticate": f'Bearer realm="{realm.url}/token",service="cdn"'}), name="cdn")

    def api(request):
        if request.headers.get("authorization") != BOB:
            return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "login"}]}, 401,
                                headers={"WWW-Authenticate": 'Basic realm="fake"'})
        if "/manifests/" in request.url.path:
            return Response(manifest, media_type=MANIFEST_V2,
                            headers={"Docker-Content-Digest": manifest_digest})
        return RedirectResponse(f"{cdn.url}/data/{blob_digest}", status_code=307)

    with realm, cdn, Scripted(api, name="api") as origin:
        mirror = make_mirror({"upstreams": {"fake.test": {
            "url": origin.url, "username": "bob", "password": "hunter2"}}, "default": "fake.test"})
        with httpx.Client(base_url=mirror.url, timeout=30) as client:
            assert client.get("/v2/fake/repo/manifests/1").status_code == 200
            resp = client.get(f"/v2/fake/repo/blobs/{blob_digest}")
            assert 400 <= resp.status_code < 500 and resp.json()["errors"][0]["code"] == "DENIED"
            # The upstream's stored challenge is still its own Basic one.
            resp = client.get("/v2/fake/repo/manifests/2")
            assert resp.status_code == 200 and resp.content == manifest
        assert cdn.requests, "the blob was redirected to the CDN"
        assert not any("authorization" in seen.headers for seen in cdn.requests)
        assert realm.requests == []
    assert "its challenge is ignored" in mirror.log_text()
    assert "hunter2" not in mirror.log_text()


def test_a_token_realm_on_another_site_gets_credentials_only_when_listed(make_mirror,
                                                                           make_registry, tmp_path):
    """The registry (127.0.0.1) names a realm on "localhost": another host. Refused with
    a clear log line until ``token_realms`` lists it; then the pull works."""
    with TokenServer(users=USERS) as tokens:
        tokens.realm = tokens.realm.replace("127.0.0.1", "localhost")
        registry = make_registry(auth="token", token_server=tokens)
        with RegistryClient(registry.url, "alice", USERS["alice"]) as client:
            image = push_image(tmp_path / "img", client, "elsewhere/app", ["1"], [3000])
        upstream = {"url": registry.url, "username": "alice", "password": USERS["alice"]}
        refused = make_mirror({"upstreams": {"tok.test": upstream}, "default": "tok.test"})
        before = len(tokens.requests)
        resp = httpx.get(f"{refused.url}/v2/elsewhere/app/manifests/1", timeout=30)
        assert resp.status_code == 403
        error = resp.json()["errors"][0]
        assert error["code"] == "DENIED" and "token_realms" in error["message"]
        assert len(tokens.requests) == before               # not asked at all
        assert "refusing to send credentials to token realm http://localhost:" in refused.log_text()

        allowed = make_mirror({
            "upstreams": {"tok.test": {**upstream, "token_realms": ["localhost"]}},
            "default": "tok.test"})
        pull_and_check(allowed.url, "elsewhere/app", image)
        assert [(r.user, r.status) for r in tokens.requests[before:]] == [("alice", 200)]


@pytest.mark.parametrize("host, domain", [
    ("registry-1.docker.io", "docker.io"), ("auth.docker.io", "docker.io"),
    ("ghcr.io", "ghcr.io"), ("a.b.example.com", "example.com"),
    ("registry.example.co.uk", "example.co.uk"), ("example.co.uk", "example.co.uk"),
    ("x.y.example.com.au", "example.com.au"), ("registry.example.com.", "example.com"),
    ("co.example.de", "example.de"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
    ("localhost", "localhost"), ("registry", "registry"),
])
def test_registrable_domain(host, domain):
    assert upstream_auth.registrable_domain(host) == domain


def test_which_token_realms_get_credentials():
    realm_allowed = upstream_auth.realm_allowed
    assert realm_allowed("https://registry-1.docker.io", "https://auth.docker.io/token")
    assert realm_allowed("https://ghcr.io", "https://ghcr.io/token")
    assert realm_allowed("http://127.0.0.1:5000", "http://127.0.0.1:5001/token")   # port aside
    assert not realm_allowed("http://127.0.0.1:5000", "http://localhost:5001/token")
    assert not realm_allowed("http://127.0.0.1:5000", "http://127.0.0.2/token")
    assert not realm_allowed("https://registry.example.com", "https://example.net/token")
    assert not realm_allowed("https://registry.example.co.uk", "https://auth.other.co.uk/token")
    assert not realm_allowed("https://quay.io", "https://quay.io.evil.net/token")
    host = ("auth.example.net",)
    url = ("https://auth.example.net/token",)
    assert realm_allowed("https://registry.example.com", "https://auth.example.net/v2/token", host)
    assert realm_allowed("https://registry.example.com", "https://auth.example.net/token/", url)
    assert not realm_allowed("https://registry.example.com", "https://auth.example.net/other", url)
    assert not realm_allowed("https://registry.example.com", "http://auth.example.net/token", url)
    assert not realm_allowed("https://registry.example.com", "https://x.auth.example.net/token",
                             host)


def test_token_realms_and_revalidate_timeout_config(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("upstreams:\n  r.test:\n    url: https://r.example.com\n"
                    "    token_realms: [Auth.Example.NET, 'https://login.example.org/token']\n"
                    "    revalidate_timeout: 2s\n")
    up = load_config(path).upstreams["r.test"]
    assert up.token_realms == ("auth.example.net", "https://login.example.org/token")
    assert up.revalidate_timeout == 2
    assert load_config(None).upstreams["docker.io"].revalidate_timeout == 5
    for bad, key in [("token_realms: auth.example.net", "upstreams.r.test.token_realms"),
                     ("token_realms: ['bad host/x']", "upstreams.r.test.token_realms[0]"),
                     ("token_realms: ['ftp://x/']", "upstreams.r.test.token_realms[0]"),
                     ("revalidate_timeout: 0s", "upstreams.r.test.revalidate_timeout"),
                     ("revalidate_timeout: soon", "upstreams.r.test.revalidate_timeout")]:
        path.write_text(f"upstreams:\n  r.test:\n    url: https://r.example.com\n    {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        message = str(info.value)
        assert f": {key}: " in message and "\n" not in message, message


def test_token_answers_are_read_with_a_size_cap():
    padding = {"size": 70 * 1024}
    tokens = Scripted(lambda r: JSONResponse({"token": "t", "padding": "x" * padding["size"]}))

    def api(request):
        if request.headers.get("authorization") != "Bearer t":
            return Response(status_code=401,
                            headers={"WWW-Authenticate": f'Bearer realm="{tokens.url}/token"'})
        return Response(b"{}", headers={"Docker-Content-Digest": f"sha256:{'a' * 64}",
                                        "Content-Type": MANIFEST_V2})

    async def head(origin):
        up = Upstream(UpstreamConfig("cap.test", origin.url, username="bob", password="pw",
                                     retries=0))
        try:
            return await up.head_manifest("some/repo", "1", [])
        finally:
            await up.aclose()

    with tokens, Scripted(api) as origin:
        with pytest.raises(UpstreamUnavailable, match="more than 64 KiB"):
            asyncio.run(head(origin))
        padding["size"] = 1000
        assert asyncio.run(head(origin)).digest == f"sha256:{'a' * 64}"


# -- item 14: errors keep their cause ----------------------------------------------------------

def test_connection_errors_keep_their_cause(make_mirror, tmp_path):
    certs = make_certs(tmp_path / "certs", ["127.0.0.1"])
    closed = free_port()
    ok = lambda r: JSONResponse({})                                   # noqa: E731
    tls_files = {"ssl_certfile": str(certs.cert), "ssl_keyfile": str(certs.key)}
    with Scripted(ok, name="plain") as plain, Scripted(ok, name="tls", **tls_files) as tls:
        mirror = make_mirror({"upstreams": {
            "closed.test": {"url": f"http://127.0.0.1:{closed}", "retries": 0},
            "plain.test": {"url": f"https://{plain.host}", "retries": 0},     # https to plain HTTP
            "selfsigned.test": {"url": tls.url, "retries": 0}},               # CA not trusted
            "default": "closed.test"})
        for name, reason in [("closed.test", "Connection refused"), ("plain.test", "SSL"),
                             ("selfsigned.test", "certificate verify failed")]:
            resp = httpx.get(f"{mirror.url}/v2/{name}/team/app/manifests/1", timeout=30)
            assert resp.status_code == 503, resp.text
            error = resp.json()["errors"][0]
            assert error["code"] == "MANIFEST_UNKNOWN" and error["detail"]["code"] == "UNAVAILABLE"
            assert f"upstream {name}: could not connect: " in error["message"], error
            assert error["message"].endswith("(ConnectError)")
            assert reason in error["detail"]["reason"] and reason in error["message"], error
    log = mirror.log_text()
    assert "could not connect: Connection refused (ConnectError)" in log
    assert "certificate verify failed" in log


# -- item 16: bounded token caches; one upstream request per question ---------------------------

def test_token_cache_and_locks_are_bounded_and_expire(token_upstream, token_server, monkeypatch):
    monkeypatch.setattr(upstream_client, "TOKEN_SCOPES_MAX", 4)

    async def run():
        up = Upstream(UpstreamConfig("tok.test", token_upstream.url, username="alice",
                                     password=USERS["alice"]))
        try:
            async def ask(repo):
                with pytest.raises((ManifestUnknown, NameUnknown)):
                    await up.head_manifest(repo, "latest", [])
            before = len(token_server.requests)
            await asyncio.gather(*(ask("bounded/same") for _ in range(8)))
            assert len(token_server.requests) - before == 1       # one fetch per scope
            for i in range(10):
                await ask(f"bounded/repo{i}")
            sizes = [len(up._http.tokens), len(up._http.tokens.locks)]
            monkeypatch.setattr(token_server, "expires_in", 16)    # cached for 1 s
            for i in range(3):
                await ask(f"bounded/short{i}")
            await asyncio.sleep(1.1)
            await ask("bounded/last")
            return sizes + [list(up._http.tokens), len(up._http.tokens.locks)]
        finally:
            await up.aclose()

    # At most 4 tokens, least recently used out first; no lock kept once idle; the three
    # short-lived tokens (which pushed out repo6..8) are dropped once expired.
    assert asyncio.run(run()) == [4, 0, ["repository:bounded/repo9:pull",
                                         "repository:bounded/last:pull"], 0]


def test_revalidating_heads_with_different_accept_are_not_shared(make_mirror, faulty_upstream,
                                                                 image_set):
    image = image_set.docker                   # a Docker schema 2 manifest under tag v1
    mirror = make_mirror(hub_config(faulty_upstream, ttl="1s"))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        check_manifest(get_manifest(client, image.repo, "v1"), image)
    time.sleep(1.1)
    # Both clients take the cached form, but ask upstream with their own Accept.
    faulty_upstream.arm("hang", path_contains="/manifests/v1", method="HEAD", times=None, seconds=1)
    before = faulty_upstream.count("HEAD", "/manifests/v1")
    results = []

    def one(accept):
        with httpx.Client(base_url=mirror.url, timeout=30) as client:
            results.append(get_manifest(client, image.repo, "v1", accept=accept))

    threads = [threading.Thread(target=one, args=(accept,))
               for accept in (MANIFEST_V2, f"{MANIFEST_V2}, {OCI_MANIFEST}")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for resp in results:
        check_manifest(resp, image)
    assert faulty_upstream.count("HEAD", "/manifests/v1") - before == 2


def test_a_manifest_head_by_digest_asks_upstream_once(make_mirror, upstream, image_set):
    cached, other = image_set.docker, image_set.oci
    mirror = make_mirror(hub_config(upstream))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        check_manifest(get_manifest(client, cached.repo, cached.digest), cached)
        # Cached for another repository, which upstream says does not hold it.
        mark = upstream.mark()
        resp = get_manifest(client, other.repo, cached.digest, method="HEAD")
        assert resp.status_code == 404
        assert len(upstream.requests(since=mark)) == 1
        assert upstream.count("HEAD", f"{other.repo}/manifests/{cached.digest}", since=mark) == 1
        # Not cached at all: one GET, which also fills the cache.
        mark = upstream.mark()
        resp = get_manifest(client, other.repo, other.digest, method="HEAD")
        assert resp.status_code == 200 and resp.headers["docker-content-digest"] == other.digest
        assert len(upstream.requests(since=mark)) == 1
