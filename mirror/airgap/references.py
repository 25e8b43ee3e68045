"""Image references as users type them, and back.

``parse(text, config)`` turns ``alpine:3.19``, ``ghcr.io/org/app:1``,
``docker.io/library/busybox@sha256:…`` or ``myorg/app:1`` (hosted) into an ``ImageRef``:
the route (upstream and repository, as the server's router would choose for a pull)
plus the tag and/or digest. A first component that looks like a registry host (has a
``.`` or a ``:``, or is ``localhost``) selects the upstream whose name or URL host is it
(``docker.io``, ``index.docker.io`` and ``registry-1.docker.io`` are one registry);
otherwise the router decides (upstream-name prefix, hosted glob, default upstream).

``full_name(config, upstream, repository)`` is the other direction: the reference a
client anywhere would use. The registry part is the upstream's name when that looks
like a host (``docker.io``, ``ghcr.io``: what users and containerd's ``ns`` call it,
whatever URL it is fetched from, e.g. an accelerator), else its URL's ``host[:port]``
(``docker.io`` for Docker Hub's URLs); a hosted repository is its own name. So a
bundle's names route back to the same upstreams on a mirror configured alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import Config
from ..errors import RegistryError
from ..models import HOSTED, validate_digest, validate_name, validate_tag
from ..routing import Route, Router

DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


class BadReference(ValueError):
    """A reference that cannot be parsed or routes nowhere; the message says why."""


@dataclass(frozen=True)
class ImageRef:
    upstream: str            # HOSTED ("") for a hosted repository
    repository: str          # as the index keys it (``library/alpine``)
    tag: str | None
    digest: str | None
    text: str                # as the user typed it

    @property
    def reference(self) -> str:
        """What to ask ``/v2/<name>/manifests/`` for: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def hosted(self) -> bool:
        return self.upstream == HOSTED


def registry_host(config: Config, upstream: str) -> str:
    """The upstream's name if it looks like a host, else its URL's ``host[:port]``
    (``docker.io`` for Docker Hub's); "" for hosted."""
    if upstream == HOSTED:
        return ""
    if _looks_like_host(upstream):
        return "docker.io" if upstream.lower() in DOCKER_HUB else upstream
    host = urlsplit(config.upstreams[upstream].url).netloc.rpartition("@")[2].lower()
    return "docker.io" if host in DOCKER_HUB else host


def full_name(config: Config, upstream: str, repository: str) -> str:
    host = registry_host(config, upstream)
    return f"{host}/{repository}" if host else repository


def _upstream_for_host(config: Config, host: str) -> str | None:
    host = host.lower()
    wanted = {"docker.io"} if host in DOCKER_HUB else {host}
    if host in config.upstreams:
        return host
    for name in config.upstreams:
        if registry_host(config, name) in wanted:
            return name
    return None


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def split(text: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@digest]`` -> (name, tag, digest), validated; no routing."""
    rest, at, digest = text.strip().partition("@")
    if at:
        try:
            validate_digest(digest)
        except RegistryError:
            raise BadReference(f"{text!r}: {digest!r} is not a digest (sha256:<64 hex>)") from None
    name, tag = rest, None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1:]
        try:
            validate_tag(tag)
        except RegistryError:
            raise BadReference(f"{text!r}: {tag!r} is not a valid tag") from None
    if not name:
        raise BadReference(f"{text!r}: no repository name")
    return name, tag, (digest if at else None)


def parse(text: str, config: Config, router: Router | None = None) -> ImageRef:
    name, tag, digest = split(text)
    router = router or Router(config)
    first, _, rest = name.partition("/")
    try:
        if rest and _looks_like_host(first) and first not in config.upstreams:
            upstream = _upstream_for_host(config, first)
            if upstream is None:
                configured = ", ".join(sorted(config.upstreams)) or "none"
                raise BadReference(f"{text!r}: no upstream is configured for registry "
                                   f"{first!r} (configured: {configured})")
            route: Route = router.resolve(rest, ns=upstream)
        else:
            route = router.resolve(name)
        validate_name(route.repository)
    except RegistryError as exc:
        raise BadReference(f"{text!r}: {exc.message}") from None
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(route.upstream, route.repository, tag, digest, text.strip())
