"""Changes an operator makes to the cache, shared by the command line (admin.py: ``mirror
pin``, ``unpin``, ``invalidate``, ``rm``) and the web page's actions (web/actions.py):
pin and unpin a reference, make tags stale, and carry out a removal plan (remove.py).

Each works on a LocalCache (the CLI's own, or the server's) through the index, then
bumps the index generation it changed, so every process of a running server (every
worker) picks the change up within a second; ``settle`` applies it in this process
at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import evict
from .cache import LocalCache
from .remove import Removal


@dataclass(frozen=True)
class Pinned:
    already: bool            # it was pinned before: nothing changed
    digest: str              # what the reference names now (itself for a digest)
    cached: bool             # that manifest is cached
    size: int                # bytes it keeps cached (its closure); 0 if not cached


async def pin(cache: LocalCache, upstream: str, repository: str, reference: str) -> Pinned:
    """Pin a tag or digest of a cached (not hosted) repository."""
    known = {p[2] for p in await cache.index.pins(upstream, repository)}
    already = reference in known
    if not already:
        await cache.index.pin(upstream, repository, reference)
        await cache.index.bump_generation("pins")
    row = None if ":" in reference else cache.tag(upstream, repository, reference)
    digest = row.digest if row else reference
    cached = cache.manifest_info(digest) is not None
    size = await cache.index.closure_size(digest) if cached else 0
    return Pinned(already, digest, cached, size)


async def unpin(cache: LocalCache, upstream: str, repository: str, reference: str) -> bool:
    """Drop a pin; False if there was none."""
    if not await cache.index.unpin(upstream, repository, reference):
        return False
    await cache.index.bump_generation("pins")
    return True


async def expire(cache: LocalCache, tags: Iterable[tuple[str, str, str]]) -> None:
    """Make tags stale now: the next pull of each asks upstream (HEAD) first."""
    await cache.index.expire_tags(list(tags))
    await cache.index.bump_generation()      # the server reloads its tags


def changes(removal: Removal) -> bool:
    return bool(removal.tags or removal.manifests or removal.blobs or removal.links
                or removal.pins)


async def apply_removal(cache: LocalCache, removal: Removal) -> None:
    """Carry out ``remove.plan``'s removal. Tags, links and pins first, so nothing names
    content that is going; then the content as gc removes it (rows first, then the
    files); then the generation, so a running server reloads its view within a second."""
    if not changes(removal):
        return
    await cache.index.untag([(t.upstream, t.repository, t.tag) for t in removal.tags
                             if t.tag is not None], removal.links, removal.pins)
    await evict.apply(cache, evict.Plan(dict(removal.blobs), dict(removal.manifests)))
    await cache.index.bump_generation()
    if removal.pins:
        await cache.index.bump_generation("pins")


async def settle(cache: LocalCache) -> None:
    """In a server process: apply what was just changed through the index to this
    process's maps now, rather than at the next periodic look."""
    await cache.resync_if_changed()
