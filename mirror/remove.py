"""What `mirror rm` removes and what `mirror invalidate` expires: references and
patterns resolved to cached tags, and the removal plan for them.

A reference is written as clients write it (see ``parse``):

- ``NAME`` is ``NAME:latest``, as docker reads it;
- ``NAME:TAG``; ``NAME@DIGEST`` (that manifest, and the repository's tags on it);
- ``NAME:GLOB`` (``alpine:3.*``; ``alpine:*`` is every cached tag of alpine);
- a glob in the name (``library/*``, ``ghcr.io/org/*``, ``*``): every cached tag of
  every repository whose name matches, as ``mirror ls`` shows it, as
  ``upstream/repository``, or (Docker Hub's ``library/``) as the short name.

When every tag of a repository goes (``:*``, or a name glob without a tag), so do the
manifests cached for it by digest only. The plan (``plan``) removes the chosen tags,
the manifests they point at with their child manifests (an index's platforms), and
the blobs, except what something else still uses: a tag not being removed, a pinned
digest, or a cached manifest outside the plan that references it. A pinned tag or
digest is skipped (reported) unless ``force``, which drops the pin too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .cache import LocalCache
from .config import Config
from .errors import RegistryError
from .index import TagRow
from .models import HOSTED, is_digest, validate_digest, validate_tag
from .routing import Router

GLOB = frozenset("*?[")


class BadReference(ValueError):
    """A reference that cannot be read (exit status 2)."""


@dataclass(frozen=True)
class Spec:
    """One reference or pattern, parsed."""
    text: str
    upstream: str | None = None        # an exact repository...
    repository: str | None = None
    name_glob: str | None = None       # ...or a pattern over repository names
    tag: str | None = None             # an exact tag, or
    tag_glob: str | None = None        # a pattern over tags, or
    digest: str | None = None          # a manifest digest

    @property
    def every_tag(self) -> bool:
        return self.tag_glob == "*"


@dataclass(frozen=True)
class Target:
    """A cached image chosen for removal: a tag (and its digest) or a bare digest."""
    upstream: str
    repository: str
    tag: str | None
    digest: str


def _split_tag(text: str) -> tuple[str, str | None]:
    name, colon, tag = text.rpartition(":")
    if not colon or "/" in tag:        # no tag (a colon in a host:port is not one)
        return text, None
    return name, tag


def parse(router: Router, text: str, digests: bool = True) -> Spec:
    """``text`` as a Spec; BadReference (one line) if it is not one."""
    try:
        name, at, digest = text.partition("@")
        if at:
            if not digests:
                raise BadReference(f"{text!r}: expected a tag (NAME[:TAG]), not a digest")
            if GLOB & set(name):
                raise BadReference(f"{text!r}: a digest takes a repository name, not a pattern")
            route = router.resolve(name)
            return Spec(text, route.upstream, route.repository, digest=validate_digest(digest))
        name, tag = _split_tag(text)
        if not name:
            raise BadReference(f"{text!r}: expected NAME[:TAG] or NAME@DIGEST")
        if GLOB & set(name):
            return Spec(text, name_glob=name, tag_glob=tag or "*")
        route = router.resolve(name)
        tag = tag or "latest"
        if GLOB & set(tag):
            return Spec(text, route.upstream, route.repository, tag_glob=tag)
        return Spec(text, route.upstream, route.repository, tag=validate_tag(tag))
    except RegistryError as exc:
        raise BadReference(f"{text!r}: {exc.message}") from None


def names(config: Config, router: Router, upstream: str, repository: str) -> set[str]:
    """The names a client may write for a cached repository (what a name glob matches)."""
    found = {router.display_name(upstream, repository), f"{upstream}/{repository}"}
    short = repository.removeprefix("library/")
    if (upstream == config.default and config.upstreams[upstream].library_prefix
            and short != repository and "/" not in short):
        found.add(short)
    return found


def _repo_matches(spec: Spec, config: Config, router: Router, upstream: str,
                  repository: str) -> bool:
    if spec.name_glob is None:
        return (upstream, repository) == (spec.upstream, spec.repository)
    if upstream == HOSTED:          # a pattern names cached content only
        return False
    return any(fnmatchcase(n, spec.name_glob) for n in names(config, router, upstream, repository))


async def matching_tags(cache: LocalCache, config: Config, router: Router,
                        spec: Spec) -> list[TagRow]:
    """The cached tags ``spec`` names (for a digest: the repository's tags on it)."""
    found = []
    for row in await cache.index.load_tags():
        if not _repo_matches(spec, config, router, row.upstream, row.repository):
            continue
        if (row.tag == spec.tag if spec.tag is not None else
                row.digest == spec.digest if spec.digest is not None else
                fnmatchcase(row.tag, spec.tag_glob or "*")):
            found.append(row)
    return sorted(found, key=lambda r: (r.upstream, r.repository, r.tag))


async def targets(cache: LocalCache, config: Config, router: Router,
                  spec: Spec) -> list[Target]:
    """What ``mirror rm SPEC`` would remove, before pins and sharing are considered;
    empty if nothing cached matches."""
    found = [Target(r.upstream, r.repository, r.tag, r.digest)
             for r in await matching_tags(cache, config, router, spec)]
    if (spec.digest is not None and spec.upstream is not None and spec.repository is not None
            and cache.manifest_info(spec.digest) is not None):
        found.append(Target(spec.upstream, spec.repository, None, spec.digest))
    if spec.every_tag:       # and what was pulled by digest only
        found += [Target(u, r, None, d) for u, r, d in sorted(await cache.index.load_links())
                  if cache.manifest_info(d) is not None
                  and _repo_matches(spec, config, router, u, r)]
    return found


@dataclass
class Removal:
    tags: list[Target] = field(default_factory=list)           # tags that go
    manifests: dict[str, int] = field(default_factory=dict)     # digest -> size
    blobs: dict[str, int] = field(default_factory=dict)
    links: set[tuple[str, str, str]] = field(default_factory=set)
    pins: set[tuple[str, str, str]] = field(default_factory=set)   # dropped (force)
    skipped: list[tuple[Target, str]] = field(default_factory=list)   # pinned: (target, pin)
    kept: dict[str, str] = field(default_factory=dict)          # manifest -> why it stays

    @property
    def bytes(self) -> int:
        return sum(self.blobs.values()) + sum(self.manifests.values())


async def _closure(cache: LocalCache, roots: set[str]
                   ) -> tuple[dict[str, int], dict[str, int], dict[str, set[str]]]:
    """Cached manifests and blobs reachable from ``roots`` (digest -> size), and each
    manifest's children."""
    manifests = {d: info.size for d in roots if (info := cache.manifest_info(d)) is not None}
    blobs: dict[str, int] = {}
    children: dict[str, set[str]] = {}
    frontier = set(manifests)
    while frontier:
        found: set[str] = set()
        for parent, child, kind in await cache.index.children(frontier):
            children.setdefault(parent, set()).add(child)
            if kind == "manifest":
                info = cache.manifest_info(child)
                if info is not None and child not in manifests:
                    manifests[child] = info.size
                    found.add(child)
            elif (size := cache.blob_size(child)) is not None:
                blobs[child] = size
        frontier = found
    return manifests, blobs, children


async def plan(cache: LocalCache, chosen: list[Target], force: bool = False) -> Removal:
    result = Removal()
    pins = {(u, r, ref) for u, r, ref, _ in await cache.index.pins()}
    taken: list[Target] = []
    for t in dict.fromkeys(chosen):            # in order, once each
        held = [ref for ref in (t.tag, t.digest)
                if ref is not None and (t.upstream, t.repository, ref) in pins]
        if held and not force:
            result.skipped.append((t, held[0]))
            continue
        taken.append(t)
        result.pins.update((t.upstream, t.repository, ref) for ref in held)
    result.tags = [t for t in taken if t.tag is not None]
    gone_tags = {(t.upstream, t.repository, t.tag) for t in result.tags}
    manifests, blobs, children = await _closure(cache, {t.digest for t in taken})

    # What keeps a manifest of the closure: a tag that stays, a pinned digest, or a
    # cached manifest outside the closure that references it.
    tags = await cache.index.load_tags()
    for row in tags:
        if (row.upstream, row.repository, row.tag) not in gone_tags and row.digest in manifests:
            result.kept.setdefault(row.digest, f"tagged {row.upstream}/{row.repository}:{row.tag}")
    for u, r, ref in pins - result.pins:
        if ref in manifests:
            result.kept.setdefault(ref, f"pinned as {u}/{r}@{ref}")
    for parent, child in await cache.index.referrers(manifests):
        if parent not in manifests:
            result.kept.setdefault(child, f"referenced by {parent}")
    kept, frontier = set(result.kept), set(result.kept)
    while frontier:                            # and what a kept index references
        frontier = {c for d in frontier for c in children.get(d, ()) if c in manifests} - kept
        kept |= frontier
    for d in sorted(manifests.keys() - kept):
        result.manifests[d] = manifests[d]
    used = {child for parent, child in await cache.index.referrers(blobs)
            if parent not in result.manifests}
    for d in sorted(blobs.keys() - used):
        result.blobs[d] = blobs[d]

    # The repositories' links to what they no longer tag, so `mirror ls` forgets them.
    for u, r in {(t.upstream, t.repository) for t in taken}:
        staying = {row.digest for row in tags if (row.upstream, row.repository) == (u, r)
                   and (u, r, row.tag) not in gone_tags}
        staying |= {ref for pu, pr, ref in pins - result.pins
                    if (pu, pr) == (u, r) and is_digest(ref)}
        reach_m, reach_b, _ = await _closure(cache, staying)
        result.links |= {(u, r, d) for d in (manifests.keys() | blobs.keys())
                         - reach_m.keys() - reach_b.keys()}
    return result
