"""Upstream: the one place that talks to an upstream registry.

``Upstream`` is the read API the proxy uses: manifests (GET, verified against the
digest asked for and the one upstream says; HEAD), blob sizes and bodies
(``stream_blob``, from an offset when upstream honours Range), and tag lists
(following pagination). Under it:

- ``upstream_client``: the HTTP itself: two ``httpx.AsyncClient``s per upstream
  (blob bodies on one sized to ``max_fills``, everything else on the other, so
  downloads never take the connections a manifest needs), logging in on a 401
  challenge (Basic, or a Bearer token from the challenge's realm), redirects
  followed by hand so ``Authorization`` only goes to the upstream's own origin,
  retries with backoff. The blob client's bodies are read by aiohttp under httpx
  (``upstream_transport``: the same requests and errors at a third of the CPU).
- ``upstream_auth``: credentials stay on the upstream's own site. Only a 401 from
  the upstream's own origin sets the challenge (a CDN's 401 is just an error), and a
  token realm gets the username and password only when its host is the upstream's
  host (any port), shares its registrable domain (``registrable_domain``:
  registry-1.docker.io and auth.docker.io), or is listed in ``token_realms``;
  otherwise it is refused. The bounded per-scope token cache lives there too.
- ``upstream_health``: requests that a cached copy could answer (``fallback=True``:
  tag revalidation) get ``revalidate_timeout`` for the whole exchange. A transport
  failure marks the upstream down: until a background probe of ``/v2/`` gets an
  answer, fallback requests fail at once without touching the network, so stale
  copies are served without waiting; misses (nothing cached) are still tried with
  the normal timeout.
- ``upstream_errors``: upstream failures become ``RegistryError``s there and nowhere
  else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote, urljoin

import httpx

from . import upstream_errors
from .config import UpstreamConfig
from .errors import (
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    UpstreamBadContent,
    UpstreamUnavailable,
)
from .models import (
    DEFAULT_ACCEPT,
    DIGEST_RE,
    DOCKER_SCHEMA1_SIGNED,
    MANIFEST_MAX,
    OCI_INDEX,
    SCHEMA1_TYPES,
    TAG_RE,
    Manifest,
    ManifestInfo,
    References,
    Referrer,
    is_digest,
    parse_manifest,
    referrers_of_index,
    schema1_digest,
)
from .upstream_auth import origin
from .upstream_client import UpstreamClient, read_limited

TAG_PAGES = 50          # tags/list pages followed before giving up on the rest
log = logging.getLogger("mirror.upstream")
REFERRER_PAGES = 20     # referrers pages followed (``Link: rel="next"``), at most
REFERRERS_MAX = 4 * MANIFEST_MAX    # bytes of referrers pages read in all, at most


class Upstream:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient | None = None,
                 mirror: bool = False) -> None:
        self.config = config
        self.name = config.name
        self._origin = origin(config.url)
        self._http = UpstreamClient(config, client, mirror)
        self._health = self._http.health
        # A mirror (accelerator) is told which registry is meant, as containerd tells
        # its mirrors: ``?ns=<upstream name>``. Registries ignore it; another mirror
        # (a regional one in front of several registries) routes by it.
        self._query = f"?ns={quote(config.name, safe='.:-_')}" if mirror else ""

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def up(self) -> bool:
        """False after a transport failure until a probe (or any request) gets an answer."""
        return self._health.up

    def mark_down(self, reason: str) -> None:
        """A request had no answer in time: fallback requests skip it until a probe answers."""
        self._health.mark_down(reason)

    @property
    def ratelimit_remaining(self) -> int | None:
        """The last ``ratelimit-remaining`` this source sent (None: never)."""
        return self._http.ratelimit_remaining

    # -- the read API --------------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str, accept: list[str],
                           fallback: bool = False) -> tuple[Manifest, References]:
        """``fallback``: the caller has a cached copy to serve instead (see the module doc)."""
        return await self._health.bounded(
            fallback, f"manifest {repository}:{reference}",
            lambda: self._get_manifest(repository, reference, accept))

    async def _get_manifest(self, repository: str, reference: str,
                            accept: list[str]) -> tuple[Manifest, References]:
        async with self._http.stream("GET", self._url(repository, "manifests", reference),
                                     repository, self._accept_headers(accept),
                                     what="manifest") as resp:
            received = bytearray()
            async for chunk in resp.aiter_bytes():
                received += chunk
                if len(received) > MANIFEST_MAX:
                    raise UpstreamBadContent(f"upstream {self.name}: manifest larger than "
                                             f"{MANIFEST_MAX} bytes")
            data = bytes(received)
            content_type = resp.headers.get("content-type")
            header_digest = resp.headers.get("docker-content-digest")
        try:
            media_type, refs = parse_manifest(data, content_type)
        except RegistryError as exc:
            raise UpstreamBadContent(f"upstream {self.name}: {exc.message}") from None
        algorithm = reference.split(":", 1)[0] if is_digest(reference) else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if media_type == DOCKER_SCHEMA1_SIGNED:
            # Its digest is over the payload without signatures (and registries that
            # convert to schema1 sign anew on every GET, so the bytes vary).
            digest = schema1_digest(data) or digest
        if is_digest(reference) and digest != reference:
            raise UpstreamBadContent(f"upstream {self.name}: manifest {reference} hashed to "
                                     f"{digest}")
        if (header_digest and header_digest.startswith(f"{algorithm}:")
                and header_digest != digest and media_type not in SCHEMA1_TYPES):
            raise UpstreamBadContent(f"upstream {self.name}: manifest for {reference} hashed to "
                                     f"{digest}, upstream said {header_digest[:80]}")
        return Manifest(data, media_type, digest), refs

    async def head_manifest(self, repository: str, reference: str, accept: list[str],
                            fallback: bool = False) -> ManifestInfo | None:
        """Digest, type and size from a HEAD (free on Docker Hub's pull limit);
        None when upstream does not say the digest."""
        return await self._health.bounded(
            fallback, f"manifest {repository}:{reference}",
            lambda: self._head_manifest(repository, reference, accept))

    async def _head_manifest(self, repository: str, reference: str,
                             accept: list[str]) -> ManifestInfo | None:
        resp = await self._http.request("HEAD", self._url(repository, "manifests", reference),
                                        repository, self._accept_headers(accept))
        if resp.status_code != 200:
            raise upstream_errors.error(self.name, resp, b"", "manifest", repository, reference)
        digest = resp.headers.get("docker-content-digest", "")
        media_type = resp.headers.get("content-type", "").split(";", 1)[0].strip()
        size = _number(resp.headers.get("content-length"))
        if not DIGEST_RE.fullmatch(digest) or not media_type or size is None:
            return None
        return ManifestInfo(digest, media_type, size)

    async def stat_blob(self, repository: str, digest: str) -> int:
        resp = await self._http.request("HEAD", self._url(repository, "blobs", digest),
                                        repository, [])
        if resp.status_code != 200:
            raise upstream_errors.error(self.name, resp, b"", "blob", repository, digest)
        size = _number(resp.headers.get("content-length"))
        return -1 if size is None else size

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str,
                          offset: int = 0) -> AsyncIterator[BlobStream]:
        """The upstream body of a blob, from ``offset`` when upstream honours Range
        (``stream.start`` says where the bytes really begin: ``offset`` or 0)."""
        headers = [("Accept-Encoding", "identity")]
        if offset:
            headers.append(("Range", f"bytes={offset}-"))
        async with self._http.stream_blob(self._url(repository, "blobs", digest), repository,
                                          headers) as resp:
            yield BlobStream.of(resp, offset, self.name)

    async def tags(self, repository: str, fallback: bool = False) -> list[str]:
        """The whole tag list, following upstream pagination."""
        return await self._health.bounded(fallback, f"tag list of {repository}",
                                          lambda: self._tags(repository))

    async def _tags(self, repository: str) -> list[str]:
        url = self._url(repository, "tags", "list")
        url += ("&" if self._query else "?") + "n=1000"
        tags: list[str] = []
        for _ in range(TAG_PAGES):
            resp = await self._http.request("GET", url, repository,
                                            [("Accept", "application/json")])
            body = await read_limited(resp, 16 * 1024 * 1024)
            if resp.status_code != 200:
                raise upstream_errors.error(self.name, resp, body, "name", repository, "")
            try:
                page = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                raise UpstreamBadContent(f"upstream {self.name}: tag list is not JSON") from None
            tags += [t for t in page if isinstance(t, str) and TAG_RE.fullmatch(t)]
            nxt = _next_link(resp.headers.get("link"))
            if not nxt:
                break
            url = urljoin(url, nxt)
            if origin(url) != self._origin:
                break
        return sorted(set(tags))

    async def referrers(self, repository: str, digest: str,
                        fallback: bool = False) -> list[Referrer]:
        """Upstream's referrers of ``digest``: its referrers API (pages of ``Link:
        rel="next"`` merged, on upstream's own origin, ``REFERRER_PAGES`` and
        ``REFERRERS_MAX`` bytes at most), or, where it has none (404), the index under
        the tag ``<alg>-<hex>`` (the OCI tag schema); none when neither is there."""
        return await self._health.bounded(fallback, f"referrers of {repository}@{digest}",
                                          lambda: self._referrers(repository, digest))

    async def _referrers(self, repository: str, digest: str) -> list[Referrer]:
        url = self._url(repository, "referrers", digest)
        found: dict[str, Referrer] = {}
        budget = REFERRERS_MAX
        for page in range(REFERRER_PAGES):
            resp = await self._http.request("GET", url, repository, [("Accept", OCI_INDEX)])
            body = await read_limited(resp, min(MANIFEST_MAX, budget) + 1)
            if resp.status_code == 404 and page == 0:
                return await self._tagged_referrers(repository, digest)
            if resp.status_code != 200:
                raise upstream_errors.error(self.name, resp, body, "name", repository, digest)
            if len(body) > min(MANIFEST_MAX, budget):
                if page == 0:
                    raise UpstreamBadContent(f"upstream {self.name}: referrers of {digest} "
                                             f"larger than {MANIFEST_MAX} bytes")
                # The pages so far are the list; the rest is more than the mirror keeps.
                log.warning("upstream %s: referrers of %s@%s larger than %d bytes: "
                            "the rest is not listed", self.name, repository, digest,
                            REFERRERS_MAX)
                break
            budget -= len(body)
            try:
                for referrer in referrers_of_index(json.loads(body)):
                    found.setdefault(referrer.digest, referrer)
            except ValueError:
                raise UpstreamBadContent(f"upstream {self.name}: referrers of {digest} "
                                         "are not JSON") from None
            nxt = _next_link(resp.headers.get("link"))
            if not nxt:
                break
            url = urljoin(url, nxt)
            if origin(url) != self._origin:
                log.warning("upstream %s: referrers of %s@%s continue on another origin: "
                            "not followed", self.name, repository, digest)
                break
        return list(found.values())

    async def _tagged_referrers(self, repository: str, digest: str) -> list[Referrer]:
        """The OCI tag schema fallback: the index under the tag ``<alg>-<hex>``."""
        try:
            manifest, _ = await self._get_manifest(repository, digest.replace(":", "-"),
                                                   [OCI_INDEX])
        except (ManifestUnknown, NameUnknown):
            return []
        try:
            return referrers_of_index(json.loads(manifest.data))
        except ValueError:
            return []

    # -- plumbing ------------------------------------------------------------------------

    def _url(self, repository: str, kind: str, reference: str) -> str:
        # repository and reference are validated by models before they get here.
        return f"{self.config.url}/v2/{repository}/{kind}/{reference}{self._query}"

    @staticmethod
    def _accept_headers(accept: list[str]) -> list[tuple[str, str]]:
        lines = accept or [DEFAULT_ACCEPT]
        return [("Accept", line) for line in lines]


@dataclass
class BlobStream:
    start: int                  # offset of the first byte of this body within the blob
    size: int | None            # the whole blob's size, when upstream said it
    _resp: httpx.Response
    _upstream: str

    @classmethod
    def of(cls, resp: httpx.Response, offset: int, upstream: str) -> BlobStream:
        if resp.status_code == 206:
            m = re.fullmatch(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)",
                             resp.headers.get("content-range", ""))
            if not m or int(m.group(1)) != offset:
                raise UpstreamUnavailable(
                    f"upstream {upstream}: unusable answer to a Range request")
            return cls(offset, _number(m.group(3)), resp, upstream)
        return cls(0, _number(resp.headers.get("content-length")), resp, upstream)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw body bytes (no content decoding); a broken stream is UpstreamUnavailable."""
        try:
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            raise upstream_errors.unavailable(self._upstream, exc, "mid-blob") from None


def _number(value: str | None) -> int | None:
    """A non-negative decimal header value (ASCII digits only), or None."""
    if value and len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


def _next_link(header: str | None) -> str | None:
    if not header:
        return None
    m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', header)
    return m.group(1) if m else None
