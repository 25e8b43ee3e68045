"""Blob bodies come through aiohttp (mirror/upstream_transport.py), over real sockets:
byte-exact whole and from an offset, every transport failure the same error as the
httpx transport gives, https with a CA of the site's own, and httpx kept when a
proxy is configured. (The faults through the mirror process, reset, wrong bytes,
drip, stalls and redirects, are in test_faults.py: they run on this transport.)"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from mirror import upstream_transport
from mirror.certs import make_certs
from mirror.config import UpstreamConfig
from mirror.errors import UpstreamUnavailable
from mirror.upstream import Upstream
from mirror.upstream_transport import AiohttpTransport
from tests.support.client import read_blob
from tests.support.faulty import FaultyUpstream
from tests.support.ports import free_port


def blob_transport(up: Upstream):
    return up._http._blob_client._transport


async def read(up: Upstream, repo: str, digest: str, offset: int = 0):
    """(start, size, sha256 of the bytes, bytes received) of one upstream blob stream."""
    h, n = hashlib.sha256(), 0
    async with up.stream_blob(repo, digest, offset) as stream:
        async for chunk in stream.chunks():
            h.update(chunk)
            n += len(chunk)
    return stream.start, stream.size, f"sha256:{h.hexdigest()}", n


def test_blob_bodies_are_read_through_aiohttp_byte_exact(upstream, image_set):
    image = image_set.big
    blob = image.largest_blob
    with open(blob.path, "rb") as f:
        f.seek(blob.size - 12345)
        tail_bytes = f.read()

    async def run():
        up = Upstream(UpstreamConfig("t", upstream.url))
        try:
            assert isinstance(blob_transport(up), AiohttpTransport)
            whole = await read(up, image.repo, blob.digest)
            offset = blob.size - 12345
            tail = await read(up, image.repo, blob.digest, offset)
            again = await read(up, image.repo, blob.digest)      # a pooled connection
            return whole, tail, again
        finally:
            await up.aclose()

    whole, tail, again = asyncio.run(run())
    assert whole == (0, blob.size, blob.digest, blob.size)
    assert again == whole
    assert tail == (blob.size - 12345, blob.size,
                    "sha256:" + hashlib.sha256(tail_bytes).hexdigest(), 12345)


def failures(url: str, repo: str, digest: str, proxy: FaultyUpstream) -> dict[str, str]:
    """What each transport failure becomes (the error's message) on a blob stream."""

    async def attempt(up: Upstream) -> str:
        try:
            await read(up, repo, digest)
        except UpstreamUnavailable as exc:
            return exc.message
        return "no error"

    async def run() -> dict[str, str]:
        out = {}
        closed = Upstream(UpstreamConfig("t", f"http://127.0.0.1:{free_port()}", retries=0))
        up = Upstream(UpstreamConfig("t", url, retries=1, timeout=1.0))
        try:
            out["refused"] = await attempt(closed)
            proxy.arm("reset", path_contains=digest, times=1, after=100_000)
            out["reset"] = await attempt(up)
            proxy.arm("drop", path_contains=digest, times=2)           # retried once, then
            out["drop"] = await attempt(up)
            proxy.arm("hang", path_contains=digest, times=1, seconds=5)
            out["hang"] = await attempt(up)
            proxy.arm("hang_body", path_contains=digest, times=1, after=50_000, seconds=5)
            out["hang_body"] = await attempt(up)
            out["after"] = await attempt(up)
        finally:
            await closed.aclose()
            await up.aclose()
        return out

    return asyncio.run(run())


def test_transport_failures_are_the_same_errors_as_with_httpx(faulty_upstream, image_set,
                                                              monkeypatch):
    image = image_set.big
    blob = image.largest_blob
    fast = failures(faulty_upstream.url, image.repo, blob.digest, faulty_upstream)
    monkeypatch.setattr(upstream_transport, "usable", lambda: False)   # httpx's own transport
    plain = failures(faulty_upstream.url, image.repo, blob.digest, faulty_upstream)
    assert fast["after"] == plain["after"] == "no error"
    assert fast["refused"] == plain["refused"]
    assert fast["refused"].endswith("could not connect: Connection refused (ConnectError)")
    assert fast["hang"] == plain["hang"] == \
        "upstream t: timed out waiting for an answer (ReadTimeout)"
    assert fast["hang_body"] == plain["hang_body"] == "upstream t: timed out mid-blob (ReadTimeout)"
    # The wording of a broken body is each library's own; what it is called is not.
    for kind, text in (("reset", "upstream t: connection broke mid-blob: "),
                       ("drop", "upstream t: connection broke connecting: ")):
        assert fast[kind].startswith(text) and plain[kind].startswith(text), (fast, plain)
        assert fast[kind].endswith("(RemoteProtocolError)")
        assert plain[kind].endswith("(RemoteProtocolError)")
    # 2 drops (a try and its retry) per transport, and nothing else went astray.
    assert faulty_upstream.count("GET", blob.digest, fault="drop") == 4


def test_https_upstream_with_its_own_ca(make_mirror, upstream, image_set, tmp_path):
    image = image_set.big
    blob = image.largest_blob
    certs = make_certs(tmp_path / "certs", ["127.0.0.1"])
    tls = {"ssl_certfile": str(certs.cert), "ssl_keyfile": str(certs.key)}
    with FaultyUpstream(upstream.url, name="tls-upstream", **tls) as proxy:
        assert proxy.url.startswith("https://")
        config = {"upstreams": {"docker.io": {"url": proxy.url, "retries": 0}},
                  "default": "docker.io"}
        untrusted = make_mirror(config)
        n, _, error = read_blob(untrusted, image.repo, blob)
        assert n == 0 and b"certificate verify failed" in error, error
        assert proxy.count("GET", blob.digest) == 0

        trusted = make_mirror(config, env={"SSL_CERT_FILE": str(certs.ca_cert)})
        fault = proxy.arm("reset", path_contains=blob.digest, method="GET", times=1)
        assert read_blob(trusted, image.repo, blob) == (blob.size, blob.digest, None)
        assert fault.hits == 1 and "resuming" in trusted.log_text()
        assert trusted.is_cached(blob.digest)


@pytest.mark.parametrize("env", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_configured_proxy_keeps_httpx(monkeypatch, env):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert upstream_transport.usable()
    monkeypatch.setenv(env, "http://127.0.0.1:9")
    assert not upstream_transport.usable()

    async def run():
        up = Upstream(UpstreamConfig("t", "https://registry.example"))
        try:
            return blob_transport(up)
        finally:
            await up.aclose()
    assert not isinstance(asyncio.run(run()), AiohttpTransport)
