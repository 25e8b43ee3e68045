"""How the mirror logs in to upstreams, apart from the HTTP itself (upstream.py):
parsing ``WWW-Authenticate`` challenges, deciding which token realms may receive an
upstream's credentials, and the bounded per-scope token cache.

A token realm gets the username and password only when its host is the upstream's
host (any port), shares its registrable domain (``registrable_domain``: the last two
labels, or three under co/com/org/net/gov/ac/edu of a two-letter country code, so
registry-1.docker.io and auth.docker.io), or is listed in ``token_realms``.
Imports nothing of the mirror's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

# Second-level labels under which names are registered below a country code (co.uk, com.au).
_GENERIC_SECOND_LEVEL = {"co", "com", "org", "net", "gov", "ac", "edu"}


# One auth-param of a challenge: name=token or name="quoted string".
_PARAM_RE = re.compile(r'([A-Za-z_]+)=(?:(")([^"]*)"|([^",\s]*))')


@dataclass(frozen=True)
class Challenge:
    scheme: str                 # "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v1 if v1 is not None and q else v2
              for k, q, v1, v2 in ((m.group(1), m.group(2), m.group(3), m.group(4))
                                   for m in _PARAM_RE.finditer(rest))}
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    return Challenge(scheme, params)


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def registrable_domain(host: str) -> str:
    """The part of ``host`` a party registers: the last two labels (docker.io), or the
    last three under a generic second level of a two-letter country code (example.co.uk).
    IP addresses, localhost and one-label names are themselves."""
    host = host.lower().rstrip(".")
    labels = host.split(".")
    if _is_ip(host) or len(labels) < 2:
        return host
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _GENERIC_SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def realm_allowed(upstream_url: str, realm: str, token_realms: tuple[str, ...] = ()) -> bool:
    """Whether a token realm may receive an upstream's credentials: its host is the
    upstream's (any port), or shares its registrable domain, or ``token_realms`` lists
    it: a host entry allows any realm on that host, a URL entry that scheme, host,
    port and path only."""
    parts = urlsplit(realm)
    host, own = (parts.hostname or "").lower(), (urlsplit(upstream_url).hostname or "").lower()
    if not host:
        return False
    if host == own or registrable_domain(host) == registrable_domain(own):
        return True
    for entry in token_realms:
        if "://" not in entry:
            if entry.lower() == host:
                return True
            continue
        allowed = urlsplit(entry)
        listed = (allowed.scheme, (allowed.hostname or "").lower(), allowed.port,
                  allowed.path.rstrip("/"))
        if listed == (parts.scheme, host, parts.port, parts.path.rstrip("/")):
            return True
    return False


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class TokenCache:
    """Bearer tokens per scope (one per repository), least recently used first, at most
    ``limit`` of them; expired ones are dropped. One fetch per scope at a time however
    many requests want it, and no lock kept for a scope nobody is waiting on."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()  # -> (value, expires)
        self.locks: dict[str, _ScopeLock] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tokens)

    async def get(self, scope: str,
                  fetch: Callable[[], Awaitable[tuple[str, float]]]) -> str:
        """The cached token for ``scope``, else ``fetch()``'s (value, seconds valid)."""
        cached = self._cached(scope)
        if cached is not None:
            return cached
        lock = self.locks.get(scope)
        if lock is None:
            lock = self.locks[scope] = _ScopeLock()
        lock.users += 1
        try:
            async with lock.lock:
                cached = self._cached(scope)
                if cached is not None:
                    return cached
                value, ttl = await fetch()
                self._store(scope, value, time.monotonic() + ttl)
                return value
        finally:
            lock.users -= 1
            if not lock.users and self.locks.get(scope) is lock:
                del self.locks[scope]

    def refused(self, scope: str, value: str) -> None:
        """Upstream refused ``value``: forget it (unless a newer token replaced it)."""
        if self.tokens.get(scope, (None,))[0] == value:
            del self.tokens[scope]

    def _cached(self, scope: str) -> str | None:
        cached = self.tokens.get(scope)
        if cached is None:
            return None
        if cached[1] <= time.monotonic():
            del self.tokens[scope]
            return None
        self.tokens.move_to_end(scope)
        return cached[0]

    def _store(self, scope: str, value: str, expires: float) -> None:
        now = time.monotonic()
        for stale in [s for s, (_, until) in self.tokens.items() if until <= now]:
            del self.tokens[stale]
        self.tokens[scope] = (value, expires)
        self.tokens.move_to_end(scope)
        while len(self.tokens) > self.limit:
            self.tokens.popitem(last=False)


class _ScopeLock:
    """A token-fetch lock for one scope and how many requests hold or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
