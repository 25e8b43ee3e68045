"""Maintenance commands: ``mirror stats``, ``ls``, ``pin``, ``unpin``, ``gc``, ``verify``,
``rm`` and ``invalidate`` (which references and patterns they take: remove.py).

Each opens the index and files the server uses with ``LocalCache.open(server=False)``
(no temp clean-up, no reconciliation, no background flusher), so it is safe while
the server runs: SQLite in WAL mode lets both work at once. A command that changes
the cache bumps the index generation, so the server reloads its in-memory view
(pins have a generation of their own: they change nothing the server holds in memory).
Files are removed as eviction removes them (row first, then the file): a response
already reading one keeps its open file.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from . import cache_admin, evict, fileio, metrics, remove
from .cache import CannotOpen, LocalCache, existing
from .config import Config
from .errors import BlobUnknown, RegistryError
from .hosted import gc as hosted_gc
from .hosted.uploads import Uploads
from .index import IndexUnavailable, open_database, where
from .models import HASHES, HOSTED, validate_digest, validate_tag
from .routing import Route, Router

COUNTERS = ("manifest_hits", "manifest_misses", "blob_hits", "blob_misses", "bytes_from_cache",
            "bytes_from_upstream", "stale_serves", "evictions", "evicted_bytes")
TOP = 10
SHORT_TYPES = {
    "application/vnd.oci.image.index.v1+json": "oci index",
    "application/vnd.oci.image.manifest.v1+json": "oci manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "docker list",
    "application/vnd.docker.distribution.manifest.v2+json": "docker v2",
}


class AdminError(Exception):
    """One line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def run(args, config: Config) -> int:
    command = {"stats": stats, "ls": ls, "pin": pin, "unpin": unpin, "gc": gc,
               "verify": verify, "rm": rm, "invalidate": invalidate,
               "migrate": migrate}[args.command]
    try:
        return asyncio.run(command(args, config, Router(config)))
    except AdminError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return exc.status
    except IndexUnavailable as exc:
        print(f"mirror: {where(config.data_dir, config.index)}: {exc}", file=sys.stderr)
        return 1


async def migrate(args, config: Config, router: Router) -> int:
    """``mirror migrate``: the index's schema created or brought up to date (what the
    server does at start-up), in one line; with ``index.postgres``, a second line for
    the cluster's tables."""
    if config.index.postgres is None:
        try:
            await fileio.run(lambda: Path(config.data_dir).mkdir(parents=True, exist_ok=True))
        except OSError as exc:
            raise AdminError(f"{config.data_dir}: {exc.strerror or exc}") from None
    try:
        db = await open_database(config.data_dir, config.index)
    except IndexUnavailable as exc:
        raise AdminError(f"{where(config.data_dir, config.index)}: {exc}") from None
    try:
        print(f"index {where(config.data_dir, config.index)}: {db.migration}")
    finally:
        await db.close()
    if config.index.postgres is not None:     # a site of replicas: the cluster's tables too
        print(f"cluster {where(config.data_dir, config.index)}: {await _migrate_site(config)}")
    return 0


async def _migrate_site(config: Config) -> str:
    """The cluster components' migrations (the fill lease, the peer channel, the site's
    keys, the upstream status: what each replica applies as it joins), and the version
    each is now at."""
    import asyncpg  # type: ignore[import-untyped]

    from .cluster import keys, peer_join, site_status
    from .index.pg_schema import COMPONENT as INDEX

    postgres = config.index.postgres
    assert postgres is not None
    try:
        conn = await asyncpg.connect(postgres.dsn, timeout=10)
        try:
            ran = (await peer_join.migrate(conn) + await keys.migrate(conn)
                   + await site_status.migrate(conn))
            rows = await conn.fetch("SELECT component, version FROM schema_versions "
                                    "WHERE component <> $1 ORDER BY component", INDEX)
        finally:
            await conn.close()
    except (OSError, RuntimeError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise AdminError(f"{where(config.data_dir, config.index)}: cannot set up the "
                         f"cluster tables: {why}") from None
    versions = ", ".join(f"{r['component']} {r['version']}" for r in rows)
    done = f"applied {ran} migration{'s' * (ran != 1)}" if ran else "up to date"
    return f"{done} ({versions})"


@asynccontextmanager
async def opened(config: Config):
    try:
        async with existing(config.data_dir, storage=config.storage,
                            index=config.index) as cache:
            yield cache
    except CannotOpen as exc:
        raise AdminError(str(exc)) from None


# -- formatting ---------------------------------------------------------------------------

def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    s = max(0.0, now - ts)
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h"),
                             (30 * 86400, 86400, "d")):
        if s < limit:
            return f"{int(s // div)}{unit} ago"
    return iso(ts) or "never"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")[:-6] + "Z"


def table(headers: list[str], rows: Sequence[Sequence[object]],
          right: Collection[int] = frozenset(),
          indent: str = "") -> str:
    """Aligned columns; the columns in ``right`` (numbers, sizes) right-aligned."""
    cells = [headers, *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [indent + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=False))).rstrip()
             for r in cells]
    return "\n".join(lines)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def percent(r: float | None) -> str:
    return "-" if r is None else f"{r * 100:.1f}%"


def image_name(router: Router, row: dict) -> str:
    return f"{router.display_name(row['upstream'], row['repository'])}:{row['tag']}"


# -- stats --------------------------------------------------------------------------------

async def stats(args, config: Config, router: Router) -> int:
    now = time.time()
    async with opened(config) as cache:
        totals = await cache.index.totals()
        counters = {name: 0 for name in COUNTERS} | await cache.index.counters()
        tags = await cache.index.tag_report()
        repos = await repository_rows(cache, tags)
        size, hosted = cache.cached_size, cache.hosted_size

    def entry(row: dict) -> dict:
        return {"image": image_name(router, row), "upstream": row["upstream"],
                "repository": row["repository"], "tag": row["tag"], "digest": row["digest"],
                "size": row["size"], "pulls": row["pulls"], "last_pull": iso(row["last_pull"])}

    c = counters
    by_pulls = sorted((r for r in tags if r["pulls"]), key=lambda r: -r["pulls"])[:TOP]
    by_size = sorted(tags, key=lambda r: -r["size"])[:TOP]
    report = {
        "data_dir": str(config.data_dir), "size": size, "hosted_size": hosted,
        "max_size": config.max_size,
        "high_watermark": config.high_watermark, "low_watermark": config.low_watermark,
        **totals, "repositories": len(repos), "counters": counters,
        "hit_ratio": {
            "manifests": ratio(c["manifest_hits"], c["manifest_hits"] + c["manifest_misses"]),
            "blobs": ratio(c["blob_hits"], c["blob_hits"] + c["blob_misses"]),
            "bytes": ratio(c["bytes_from_cache"], c["bytes_from_cache"] + c["bytes_from_upstream"]),
        },
        "bytes_by_source": by_source(counters),
        "top_by_pulls": [entry(r) for r in by_pulls],
        "top_by_size": [entry(r) for r in by_size],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    if config.max_size:
        budget = (f"{human_size(size)} of {human_size(config.max_size)} "
                  f"({percent(size / config.max_size)}; evicts above "
                  f"{config.high_watermark:.0%}, down to {config.low_watermark:.0%})")
    else:
        budget = f"{human_size(size)} (no max_size: unbounded)"
    hr = report["hit_ratio"]
    lines = [
        ("cache", budget),
        ("hosted", f"{human_size(hosted)} (pushed content: never evicted, outside max_size)"),
        ("content", f"{plural(totals['blobs'], 'blob')}, {plural(totals['manifests'], 'manifest')}"
                    f" in {len(repos)} repositories; {plural(totals['tags'], 'tag')}, "
                    f"{plural(totals['pins'], 'pin')}"),
        ("hits", f"manifests {percent(hr['manifests'])} ({c['manifest_hits']} of "
                 f"{c['manifest_hits'] + c['manifest_misses']}), blobs {percent(hr['blobs'])} "
                 f"({c['blob_hits']} of {c['blob_hits'] + c['blob_misses']})"),
        ("served", f"{human_size(c['bytes_from_cache'])} from cache, "
                   f"{human_size(c['bytes_from_upstream'])} from upstream "
                   f"({percent(hr['bytes'])} from cache)"),
        *((f"from {up}", ", ".join(f"{human_size(n)} from {src}" for src, n in sources))
          for up, sources in by_source(counters).items()),
        ("events", f"{plural(c['stale_serves'], 'stale serve')}, "
                  f"{plural(c['evictions'], 'eviction')} "
                  f"({human_size(c['evicted_bytes'])})"),
    ]
    print("\n".join(f"{k:<9}{v}" for k, v in lines))
    print("\ntop images by pulls")
    print(table(["IMAGE", "PULLS", "LAST PULLED"],
                [[image_name(router, r), r["pulls"], ago(r["last_pull"], now)] for r in by_pulls],
                right={1}, indent="  ") if by_pulls else "  (no pulls counted yet)")
    print("\ntop images by size")
    print(table(["IMAGE", "SIZE"],
                [[image_name(router, r), human_size(r["size"])] for r in by_size],
                right={1}, indent="  ") if by_size else "  (no tags cached)")
    return 0


def by_source(counters: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Blob bytes downloaded per upstream and source (its url or a mirror), most first."""
    found: dict[str, list[tuple[str, int]]] = {}
    for name, n in counters.items():
        if name.startswith(metrics.SOURCE_BYTES):
            upstream, _, source = name.removeprefix(metrics.SOURCE_BYTES).partition(":")
            found.setdefault(upstream, []).append((source, n))
    return {up: sorted(rows, key=lambda r: -r[1]) for up, rows in sorted(found.items())}


async def repository_rows(cache: LocalCache, tags: list[dict]) -> list[dict]:
    """Every repository with a cached manifest: tags, bytes linked to it, last pull."""
    sizes = await cache.index.linked_sizes()
    keys = {*await cache.index.repositories(), *((t["upstream"], t["repository"]) for t in tags)}
    repos = {(u, r): {"upstream": u, "repository": r, "tags": 0, "size": sizes.get((u, r), 0),
                      "last_pull": None} for u, r in keys}
    for t in tags:
        r = repos[(t["upstream"], t["repository"])]
        r["tags"] += 1
        if t["last_pull"] is not None:
            r["last_pull"] = max(r["last_pull"] or 0, t["last_pull"])
    return [repos[k] for k in sorted(repos)]


# -- ls -----------------------------------------------------------------------------------

def resolve(router: Router, name: str) -> Route:
    try:
        return router.resolve(name)
    except RegistryError as exc:
        raise AdminError(exc.message, 2) from None


async def ls(args, config: Config, router: Router) -> int:
    now = time.time()
    route = resolve(router, args.repository) if args.repository else None
    async with opened(config) as cache:
        if route is None:
            repos = await repository_rows(cache, await cache.index.tag_report())
            for r in repos:
                r["name"] = router.display_name(r["upstream"], r["repository"])
                r["hosted"] = r["upstream"] == HOSTED
            if args.json:
                print(json.dumps([r | {"last_pull": iso(r["last_pull"])} for r in repos],
                                 indent=2))
            elif repos:
                # Pulls of hosted repositories are not counted: "-" rather than "never".
                print(table(["REPOSITORY", "TAGS", "SIZE", "LAST PULLED"],
                            [[f"{r['name']} (hosted)" if r["hosted"] else r["name"], r["tags"],
                              human_size(r["size"]),
                              "-" if r["hosted"] else ago(r["last_pull"], now)]
                             for r in repos], right={1, 2}))
            else:
                print("the cache is empty")
            return 0
        tags = await cache.index.tag_report(route.upstream, route.repository)
        pins = await cache.index.pins(route.upstream, route.repository)
        linked = (await cache.index.linked_sizes()).get((route.upstream, route.repository))
    if route.upstream == HOSTED:
        return _ls_hosted(args, route.repository, tags, linked)
    where = f"{route.upstream}/{route.repository}"
    if not tags and not pins and not linked:
        raise AdminError(f"nothing cached for {where}")
    for t in tags:
        t["ttl"] = "fresh" if t["expires_at"] > now else "expired"
        t["pinned"] = bool(t["pinned"])
    if args.json:
        print(json.dumps({"upstream": route.upstream, "repository": route.repository,
                          "tags": [t | {k: iso(t[k]) for k in ("fetched_at", "expires_at",
                                                               "last_pull")} for t in tags],
                          "pins": [p[2] for p in pins]}, indent=2))
        return 0
    print(f"{where}: {plural(len(tags), 'tag')}, {human_size(linked or 0)} cached")
    if tags:
        print(table(["TAG", "TYPE", "SIZE", "PULLS", "LAST PULLED", "TTL", "PINNED", "DIGEST"],
                    [[t["tag"], SHORT_TYPES.get(t["media_type"], t["media_type"] or "-"),
                      human_size(t["size"]), t["pulls"], ago(t["last_pull"], now), t["ttl"],
                      "yes" if t["pinned"] else "no", t["digest"]] for t in tags],
                    right={2, 3}))
    if pins:
        print("pins: " + ", ".join(p[2] for p in pins))
    return 0


def _ls_hosted(args, repository: str, tags: list[dict], linked: int | None) -> int:
    """A hosted repository's tags: pushed, never expiring, never evicted, not pinned."""
    if not tags and not linked:
        raise AdminError(f"nothing pushed to {repository} (hosted)")
    rows = [{"tag": t["tag"], "digest": t["digest"], "media_type": t["media_type"],
             "size": t["size"], "pushed_at": iso(t["fetched_at"])} for t in tags]
    if args.json:
        print(json.dumps({"upstream": HOSTED, "repository": repository, "hosted": True,
                          "size": linked or 0, "tags": rows}, indent=2))
        return 0
    print(f"{repository} (hosted): {plural(len(tags), 'tag')}, {human_size(linked or 0)} "
          "pushed (never evicted)")
    if rows:
        print(table(["TAG", "TYPE", "SIZE", "PUSHED", "DIGEST"],
                    [[t["tag"], SHORT_TYPES.get(t["media_type"], t["media_type"] or "-"),
                      human_size(t["size"]), t["pushed_at"] or "-", t["digest"]] for t in rows],
                    right={2}))
    return 0


# -- pin / unpin ----------------------------------------------------------------------------

def parse_ref(router: Router, ref: str) -> tuple[Route, str, str]:
    """``NAME:TAG``, ``NAME@DIGEST`` or ``NAME`` (``NAME:latest``, as docker reads it)
    -> (route, reference, canonical text)."""
    name, at, digest = ref.partition("@")
    try:
        if at:
            reference, sep = validate_digest(digest), "@"
        else:
            name, colon, tag = ref.rpartition(":")
            if not colon or "/" in tag:          # no tag (a host:port's colon is not one)
                name, tag = ref, "latest"
            if not name:
                raise AdminError(f"{ref!r}: expected NAME[:TAG] or NAME@DIGEST "
                                 "(e.g. alpine:3.19)", 2)
            reference, sep = validate_tag(tag), ":"
        route = router.resolve(name)
    except RegistryError as exc:
        raise AdminError(f"{ref!r}: {exc.message}", 2) from None
    return route, reference, f"{route.upstream}/{route.repository}{sep}{reference}"


async def pin(args, config: Config, router: Router) -> int:
    route, reference, text = parse_ref(router, args.ref)
    if route.upstream == HOSTED:
        raise AdminError(f"{args.ref} is hosted: hosted content is never evicted; "
                         "nothing to pin")
    async with opened(config) as cache:
        pinned = await cache_admin.pin(cache, route.upstream, route.repository, reference)
    if pinned.already:
        print(f"{text} was already pinned")
        return 0
    digest, size = pinned.digest, pinned.size
    if pinned.cached:
        now_at = "" if digest == reference else f"{digest}, "
        print(f"pinned {text} ({now_at}{human_size(size)} cached)")
    else:
        print(f"pinned {text} (not cached yet: it will be kept once it is pulled)")
    return 0


async def unpin(args, config: Config, router: Router) -> int:
    route, reference, text = parse_ref(router, args.ref)
    async with opened(config) as cache:
        if not await cache_admin.unpin(cache, route.upstream, route.repository, reference):
            raise AdminError(f"{text} is not pinned")
    print(f"unpinned {text}")
    return 0


# -- gc -------------------------------------------------------------------------------------

async def gc(args, config: Config, router: Router) -> int:
    """Hosted garbage collection first (hosted/gc.py; it may hand blobs a cached
    repository still links to eviction), then eviction down to the budget."""
    async with opened(config) as cache:
        hosted = None
        if config.hosted is not None:
            hosted = await hosted_gc.collect(cache, config.hosted.gc_grace,
                                             args.delete_untagged, args.dry_run)
            expired = await Uploads(cache, config.hosted).sweep(args.dry_run)
            swept = {**{d: ("blob", s) for d, s in hosted.blobs.items()},
                     **{d: ("manifest", s) for d, s in hosted.manifests.items()}}
            if args.dry_run and swept:
                print(table(["SIZE", "REASON", "KIND", "DIGEST"],
                            [[human_size(s), "hosted, unreferenced", k, d]
                             for d, (k, s) in sorted(swept.items(), key=lambda i: -i[1][1])],
                            right={0}))
            hosted_bytes = sum(s for _, s in swept.values())
            print(f"hosted: {'would remove' if args.dry_run else 'removed'} "
                  f"{plural(len(hosted.manifests), 'manifest')} and "
                  f"{plural(len(hosted.blobs), 'blob')}, {human_size(hosted_bytes)}; "
                  f"{plural(len(hosted.links), 'repository link')} "
                  f"{'would go' if args.dry_run else 'dropped'} "
                  f"(grace {config.hosted.gc_grace:g}s"
                  f"{', untagged manifests too' if args.delete_untagged else ''}); "
                  f"{plural(expired, 'expired upload session')} "
                  f"{'would go' if args.dry_run else 'dropped'} "
                  f"(upload_ttl {config.hosted.upload_ttl:g}s)")
        elif args.delete_untagged:
            raise AdminError("--delete-untagged: no hosted repositories configured (hosted:)",
                             2)
        before = cache.size
        removal = await evict.plan(cache, evict.Budget.of(config), force=True, orphans=True)
        if args.dry_run:
            kinds = {**{d: "blob" for d in removal.blobs},
                     **{d: "manifest" for d in removal.manifests}}
            sizes = {**removal.blobs, **removal.manifests}
            if kinds:
                print(table(["SIZE", "REASON", "KIND", "DIGEST"],
                            [[human_size(sizes[d]), removal.reason.get(d, "-"), kinds[d], d]
                             for d in sorted(kinds, key=lambda d: -sizes[d])], right={0}))
        elif removal:
            await evict.apply(cache, removal)
            cache.index.count("evictions", len(removal))
            cache.index.count("evicted_bytes", removal.bytes)
            await cache.index.bump_generation()
        after = cache.size if not args.dry_run else before - removal.bytes
    budget = f" (budget {human_size(config.max_size)})" if config.max_size else ""
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {plural(len(removal.manifests), 'manifest')} and "
          f"{plural(len(removal.blobs), 'blob')}, "
          f"{human_size(removal.bytes)}; cache {human_size(before)} -> {human_size(after)}"
          f"{budget}{' (dry run: nothing changed)' if args.dry_run else ''}")
    low = int(config.low_watermark * config.max_size) if config.max_size else None
    if low is not None and after > low:
        print(f"still above the low watermark ({human_size(low)}): the rest is protected by "
              "fresh tags and pins")
    return 0


# -- rm / invalidate ---------------------------------------------------------------------------

async def _select(args, config: Config, router: Router, cache: LocalCache, what):
    """``what(spec)`` for each of args.refs parsed; AdminError if one matches nothing."""
    found = []
    for spec in args.specs:
        matched = await what(spec)
        if not matched:
            raise AdminError(f"nothing cached matches {spec.text!r}"
                             + (f" (read as {spec.upstream}/{spec.repository}:{spec.tag})"
                                if spec.tag is not None else ""))
        found += matched
    return found


def _specs(args, router: Router, digests: bool) -> None:
    try:
        args.specs = [remove.parse(router, ref, digests) for ref in args.refs]
    except remove.BadReference as exc:
        raise AdminError(str(exc), 2) from None


def _refuse_hosted(args, what_instead: str) -> None:
    """A hosted name is not cache content (a pattern skips hosted repositories: see
    remove.py)."""
    for spec in args.specs:
        if spec.name_glob is None and spec.upstream == HOSTED:
            raise AdminError(f"{spec.text} is hosted: {what_instead}")


async def rm(args, config: Config, router: Router) -> int:
    _specs(args, router, digests=True)
    _refuse_hosted(args, "remove it with DELETE (hosted.delete) and mirror gc")
    async with opened(config) as cache:
        chosen = await _select(args, config, router, cache,
                               lambda spec: remove.targets(cache, config, router, spec))
        removal = await remove.plan(cache, chosen, force=args.force)
        before = cache.size
        if not args.dry_run:
            await cache_admin.apply_removal(cache, removal)
        after = before - removal.bytes if args.dry_run else cache.size
    rows = [["-", "tag", f"{t.upstream}/{t.repository}:{t.tag}"] for t in removal.tags]
    rows += [[human_size(size), "manifest", d] for d, size in removal.manifests.items()]
    rows += [[human_size(size), "blob", d]
             for d, size in sorted(removal.blobs.items(), key=lambda item: -item[1])]
    if rows:
        print(table(["SIZE", "KIND", "WHAT"], rows, right={0}))
    for digest, why in sorted(removal.kept.items()):
        print(f"kept manifest {digest}: {why}")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {plural(len(removal.tags), 'tag')}, "
          f"{plural(len(removal.manifests), 'manifest')} and "
          f"{plural(len(removal.blobs), 'blob')}, {human_size(removal.bytes)}; "
          f"cache {human_size(before)} -> {human_size(after)}"
          f"{' (dry run: nothing changed)' if args.dry_run else ''}")
    for t, pin in removal.skipped:
        what = f"{t.upstream}/{t.repository}" + (f":{t.tag}" if t.tag else f"@{t.digest}")
        sep = "@" if ":" in pin else ":"
        print(f"mirror: {what} is pinned ({t.upstream}/{t.repository}{sep}{pin}): kept; "
              "unpin it, or rm --force", file=sys.stderr)
    return 1 if removal.skipped else 0


async def invalidate(args, config: Config, router: Router) -> int:
    _specs(args, router, digests=False)
    _refuse_hosted(args, "hosted tags never expire; nothing to invalidate")
    async with opened(config) as cache:
        rows = await _select(args, config, router, cache,
                             lambda spec: remove.matching_tags(cache, config, router, spec))
        rows = list({(r.upstream, r.repository, r.tag): r for r in rows}.values())
        await cache_admin.expire(cache, [(r.upstream, r.repository, r.tag) for r in rows])
    for r in rows:
        print(f"invalidated {r.upstream}/{r.repository}:{r.tag} (was {r.digest})")
    print(f"{plural(len(rows), 'tag')} stale now: the next pull of each asks upstream")
    return 0


# -- verify -----------------------------------------------------------------------------------

GiB = 1024 ** 3


class Progress:
    """Bytes checked so far, on stderr: a bar redrawn in place on a terminal, a plain
    line every 10% otherwise. Called from the hashing thread only."""

    def __init__(self, total: int, stream=None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._shown = -1
        self._drawn = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        fraction = min(1.0, self.done / self.total)
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= 0.1 or fraction >= 1:
                self._drawn = now
                bar = "#" * int(30 * fraction)
                self.stream.write(f"\rverifying [{bar:<30}] {fraction:4.0%} "
                                  f"{human_size(self.done)} of {human_size(self.total)}")
                self.stream.flush()
        elif int(fraction * 10) > self._shown:
            self._shown = int(fraction * 10)
            print(f"verifying: {self._shown * 10}% ({human_size(self.done)} of "
                  f"{human_size(self.total)})", file=self.stream, flush=True)

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def check_file(path: Path, digest: str, size: int, progress: Progress):
    """Re-hash one cached file (blocks: worker thread). ("ok" | "corrupt" | "missing",
    the file's (st_dev, st_ino) or None, bytes read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        progress.advance(size)
        return "missing", None, 0
    try:
        st = os.fstat(fd)
        algorithm = digest.split(":", 1)[0]
        hasher = HASHES[algorithm]()
        read = 0
        while chunk := os.read(fd, fileio.CHUNK):
            hasher.update(chunk)
            read += len(chunk)
            progress.advance(len(chunk))
    finally:
        os.close(fd)
    if read < size:
        progress.advance(size - read)
    ok = read == size and f"{algorithm}:{hasher.hexdigest()}" == digest
    return ("ok" if ok else "corrupt"), (st.st_dev, st.st_ino), read


def same_file(path: Path, identity) -> bool:
    """Whether ``path`` is still the file that was checked (``identity``; None: none was
    there): the server may have fetched it again meanwhile, and that copy is not ours."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return identity is None
    return (st.st_dev, st.st_ino) == identity


def set_aside(path: Path, quarantine: Path | None, digest: str) -> None:
    if quarantine is None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return
    quarantine.mkdir(exist_ok=True)
    target = quarantine / digest.replace(":", "-")
    n = 1
    while target.exists():
        target = quarantine / f"{digest.replace(':', '-')}.{n}"
        n += 1
    try:
        os.replace(path, target)
    except FileNotFoundError:
        pass


async def check_stored(cache: LocalCache, digest: str, size: int, progress: Progress):
    """Re-hash one blob streamed from a store that is not files (S3), never whole in
    memory. ("ok" | "corrupt" | "missing", None, bytes read)."""
    algorithm = digest.split(":", 1)[0]
    hasher = HASHES[algorithm]()
    read = 0
    try:
        async for chunk in cache.store.read(digest, 0, None):
            await fileio.run(hasher.update, chunk)
            read += len(chunk)
            progress.advance(len(chunk))
    except (BlobUnknown, FileNotFoundError):
        progress.advance(size - read)
        return "missing", None, 0
    if read < size:
        progress.advance(size - read)
    ok = read == size and f"{algorithm}:{hasher.hexdigest()}" == digest
    return ("ok" if ok else "corrupt"), None, read


async def verify(args, config: Config, router: Router) -> int:
    if args.quarantine and config.storage.s3 is not None:
        raise AdminError(f"--quarantine moves files, and blobs are objects in "
                         f"storage.s3.bucket {config.storage.s3.bucket}: run `mirror verify` "
                         "without it (corrupt objects are then deleted)")
    async with opened(config) as cache:
        if not cache.store.local_files:
            return await _verify_stored(cache)
        items = sorted(cache.contents())
        progress = Progress(sum(size for _, size, _ in items))

        def check_all():
            found = [(digest, size, manifest, *check_file(cache.path_for(digest), digest,
                                                          size, progress))
                     for digest, size, manifest in items]
            progress.end()
            return found
        results = await fileio.run(check_all)
        hashed = sum(r[-1] for r in results)
        bad = [r for r in results if r[3] != "ok"]
        quarantine = Path(cache.data_dir) / "quarantine" if args.quarantine else None
        # Still the file we hashed (or still missing)? Else the server replaced it since.
        bad = [r for r in bad if await fileio.run(same_file, cache.path_for(r[0]), r[4])]
        if bad:
            await cache.index.forget([r[0] for r in bad if not r[2]],
                                     [r[0] for r in bad if r[2]])
            for digest, _, _, state, _, _ in bad:
                if state == "corrupt":
                    await fileio.run(set_aside, cache.path_for(digest), quarantine, digest)
            await cache.index.bump_generation()      # a running server reloads its view
    removed = "moved to " + str(quarantine) if quarantine else "removed"
    return _verified(results, bad, hashed, "files", removed)


def _verified(results: list, bad: list, hashed: int, what: str, removed: str) -> int:
    """``mirror verify``'s report, of files or objects: a line per bad one (what was
    done with it: ``removed`` if corrupt, forgotten if missing), then the totals."""
    for digest, size, manifest, state, _, _ in bad:
        done = removed if state == "corrupt" else "forgotten"
        print(f"{state} {'manifest' if manifest else 'blob'} {digest} ({human_size(size)}): "
              f"{done}")
    corrupt = sum(1 for r in bad if r[3] == "corrupt")
    print(f"verified {len(results)} {what} ({hashed / GiB:.2f} GiB): {corrupt} corrupt, "
          f"{len(bad) - corrupt} missing")
    return 1 if bad else 0


async def _verify_stored(cache: LocalCache) -> int:
    """``mirror verify`` of blobs in an object store: each streamed and re-hashed; a
    corrupt one is forgotten and deleted, a missing one forgotten."""
    items = sorted(cache.contents())
    progress = Progress(sum(size for _, size, _ in items))
    results = [(digest, size, manifest, *await check_stored(cache, digest, size, progress))
               for digest, size, manifest in items]
    progress.end()
    hashed = sum(r[-1] for r in results)
    bad = [r for r in results if r[3] != "ok"]
    if bad:
        await cache.index.forget([r[0] for r in bad if not r[2]], [r[0] for r in bad if r[2]])
        await cache.store.delete([r[0] for r in bad if r[3] == "corrupt"])
        await cache.index.bump_generation()      # a running server reloads its view
    return _verified(results, bad, hashed, "objects", "deleted")
