"""Which upstream a /v2/<name>/... request is for, and under which repository name.

1. ``?ns=<host>`` naming a configured upstream (containerd's hosts.toml mirrors);
2. else a first path component equal to a configured upstream's name
   (``/v2/ghcr.io/org/app/...`` -> ghcr.io, ``org/app``);
3. else, with ``hosted`` configured, a name matching one of ``hosted.repositories``
   (fnmatchcase on the whole name) is hosted here: upstream ``HOSTED`` (""), which no
   configured upstream can be named, and the name as pushed, with no ``library/``;
4. else the default upstream.
For an upstream with ``library_prefix`` (Docker Hub) a one-component name gets
``library/``. A name that routes nowhere is NAME_UNKNOWN.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .config import Config
from .errors import NameInvalid, NameUnknown
from .models import HOSTED, NAME_MAX, validate_name

__all__ = ["HOSTED", "Route", "Router"]

@dataclass(frozen=True)
class Route:
    upstream: str
    repository: str
    namespace: str | None = None     # the ns= value that chose it, echoed as OCI-Namespace

    @property
    def hosted(self) -> bool:
        return self.upstream == HOSTED


class Router:
    def __init__(self, config: Config) -> None:
        self._upstreams = config.upstreams
        self._default = config.default
        self._hosted = config.hosted.repositories if config.hosted else ()

    def resolve(self, name: str, ns: str | None = None) -> Route:
        validate_name(name)
        if ns is not None and ns in self._upstreams:
            return Route(ns, self._repository(ns, name), ns)
        if ns is not None:
            # containerd asked for a registry we do not mirror: say so rather than
            # answering with another registry's content under that name.
            raise NameUnknown(f"upstream {ns[:100]!r} is not configured on this mirror",
                              detail={"ns": ns[:100]})
        first, _, rest = name.partition("/")
        if rest and first in self._upstreams:
            return Route(first, self._repository(first, rest))
        if any(fnmatch.fnmatchcase(name, glob) for glob in self._hosted):
            return Route(HOSTED, name)
        if self._default is None:
            raise NameUnknown(f"repository {name[:200]!r} is not hosted here and no upstream "
                              "is configured", detail={"name": name[:200]})
        return Route(self._default, self._repository(self._default, name))

    def _repository(self, upstream: str, name: str) -> str:
        if "/" not in name and self._upstreams[upstream].library_prefix:
            name = f"library/{name}"
        if len(name) > NAME_MAX:       # "library/" can push a valid name over the limit
            raise NameInvalid(f"repository name longer than {NAME_MAX} characters")
        return name

    def display_name(self, upstream: str, repository: str) -> str:
        """The name a client uses to pull it again (catalog entries)."""
        if upstream == HOSTED or upstream == self._default:
            return repository
        return f"{upstream}/{repository}"
