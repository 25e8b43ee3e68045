"""Online garbage collection of hosted content (`mirror gc` and ``hosted.gc_interval``).

What is garbage (``Index.sweep_hosted`` has the whole rule): a hosted repository's link
to a blob or manifest that none of the repository's tags and manifests reaches (with
``delete_untagged``: none of its tags, nor a manifest pushed within the grace), and
that was linked longer ago than ``hosted.gc_grace``. Every upload and mount stamps its
link at once, and a manifest PUT re-stamps the links of what it references before it
checks them (``Index.refresh_links``), so the grace covers a push in progress and a
sweep never removes what a manifest being pushed is about to reference. The content
itself goes only when no repository (hosted or cached), manifest or pin wants it.

The sweep holds the index's write lock; the server picks up the change through the
"content" generation, as after eviction, so it runs beside a serving mirror.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..cache import LocalCache
from ..index import HostedSweep

log = logging.getLogger("mirror.hosted")


async def collect(cache: LocalCache, grace: float, delete_untagged: bool = False,
                  dry_run: bool = False) -> HostedSweep:
    """Sweep what is garbage now; what went (or, ``dry_run``, would go)."""
    await cache.index.flush_usage()
    swept = await cache.index.sweep_hosted(time.time() - grace, delete_untagged,
                                           cache.delete_files, dry_run)
    if swept.links and not dry_run:
        await cache.index.bump_generation()     # a server beside us reloads its maps
        await cache.resync()
    return swept


async def schedule(cache: LocalCache, interval: float, grace: float, *,
                   leading: Callable[[], bool] | None = None) -> None:
    """The server's periodic collection (never ``delete_untagged``); with several
    replicas, only while ``leading()`` (this process leads the site, asked each time)."""
    while True:
        await asyncio.sleep(interval)
        if leading is not None and not leading():
            continue
        try:
            swept = await collect(cache, grace)
            if swept.links:
                log.info("hosted gc: unlinked %d, removed %d manifests and %d blobs "
                         "(%d bytes)", len(swept.links), len(swept.manifests),
                         len(swept.blobs),
                         sum(swept.blobs.values()) + sum(swept.manifests.values()))
        except Exception:          # gc must never take the server down
            log.exception("hosted gc failed")
