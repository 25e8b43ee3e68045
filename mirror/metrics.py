"""What the mirror counts: Prometheus collectors, the per-request note that the
access log reads, and the counters `mirror stats` reads from the index.

This module sits at the bottom of the layering: anything may import it, it imports
nothing of the mirror's (but the version, for ``mirror_build_info``). Counters that
must outlive the process go through ``persist`` (the index's batched counter, wired up by app.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for api.py)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from . import __version__

# No `*_created` series: one more per counter and histogram, which nobody graphs.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

build_info = Info("mirror_build", "The running mirror's version", registry=REGISTRY)
build_info.info({"version": __version__})

http_requests = Counter("mirror_http_requests", "HTTP requests answered",
                        ["route", "method", "status"], registry=REGISTRY)
http_seconds = Histogram("mirror_http_request_duration_seconds",
                         "Time to answer a request (to the last byte)", ["route"],
                         registry=REGISTRY,
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                                  10, 30, 60))
cache_lookups = Counter("mirror_cache_lookups", "Manifest and blob lookups by outcome: hit, miss "
                        "(fetched upstream), stale (served while upstream failed), coalesced "
                        "(joined a fetch already running)", ["kind", "result"], registry=REGISTRY)
bytes_served = Counter("mirror_bytes_served", "Bytes of blobs and manifests sent to clients, by "
                       "where they came from", ["source"], registry=REGISTRY)
sendfile_bytes = Counter("mirror_sendfile_bytes", "Of mirror_bytes_served, those the kernel sent "
                         "straight from the cached file (zero copy, plain HTTP)",
                         registry=REGISTRY)
upstream_requests = Counter("mirror_upstream_requests", "Requests sent upstream",
                            ["upstream", "method", "status"], registry=REGISTRY)
upstream_seconds = Histogram("mirror_upstream_request_duration_seconds",
                             "Upstream time to response headers", ["upstream"], registry=REGISTRY)
upstream_bytes = Counter("mirror_upstream_bytes", "Blob bytes downloaded from upstream",
                         ["upstream"], registry=REGISTRY)
upstream_up = Gauge("mirror_upstream_up", "1 while the upstream can be reached through its url or "
                    "one of its mirrors, 0 from a transport failure (refused, unreachable, timed "
                    "out) of all of them until a probe gets an answer",
                    ["upstream"], registry=REGISTRY)
upstream_ratelimit_remaining = Gauge("mirror_upstream_ratelimit_remaining", "The last "
                                     "ratelimit-remaining an upstream sent (Docker Hub's pulls "
                                     "left in its window)", ["upstream"], registry=REGISTRY)
upstream_source_requests = Counter("mirror_upstream_source_requests", "Requests sent to each "
                                   "source of an upstream (its url or one of its mirrors), by "
                                   "kind: manifest, blob, tags, referrers, token, other",
                                   ["upstream", "source", "kind"], registry=REGISTRY)
upstream_source_errors = Counter("mirror_upstream_source_errors", "Failures of each source of an "
                                 "upstream, by reason: unavailable, rate_limited, bad_content, "
                                 "denied, slow", ["upstream", "source", "reason"],
                                 registry=REGISTRY)
upstream_source_up = Gauge("mirror_upstream_source_up", "1 while a source answers and sits out "
                           "no backoff after a failure", ["upstream", "source"], registry=REGISTRY)
upstream_source_speed = Gauge("mirror_upstream_source_speed_bytes_per_second", "Measured blob "
                              "download speed of each source (moving average; 0 until measured)",
                              ["upstream", "source"], registry=REGISTRY)
upstream_source_ratelimit_remaining = Gauge(
    "mirror_upstream_source_ratelimit_remaining", "The last ratelimit-remaining each source sent "
    "(per credential: each source logs in with its own)", ["upstream", "source"],
    registry=REGISTRY)
upstream_ratelimit_reserve_hit = Gauge(
    "mirror_upstream_ratelimit_reserve_hit", "1 while a source's ratelimit-remaining is at or "
    "below the upstream's ratelimit_reserve: no GETs of tags go to it", ["upstream", "source"],
    registry=REGISTRY)
fills_in_progress = Gauge("mirror_fills_in_progress", "Blob downloads running now",
                          registry=REGISTRY)
fills_queued = Gauge("mirror_fills_queued",
                     "Blob downloads waiting for one of their upstream's max_fills slots",
                     registry=REGISTRY)
stale_serves = Counter("mirror_stale_serves", "Cached copies served because upstream failed",
                       ["upstream"], registry=REGISTRY)
evictions = Counter("mirror_evictions", "Blobs and manifests evicted", registry=REGISTRY)
evicted_bytes = Counter("mirror_evicted_bytes", "Bytes evicted", registry=REGISTRY)
cache_size = Gauge("mirror_cache_size_bytes", "Bytes of blobs and manifests cached",
                   registry=REGISTRY)
hosted_size = Gauge("mirror_hosted_size_bytes", "Bytes of blobs and manifests hosted "
                    "repositories link (outside the cache budget)", registry=REGISTRY)
pushes = Counter("mirror_pushes", "Blobs and manifests pushed to hosted repositories",
                 ["kind"], registry=REGISTRY)
deletes = Counter("mirror_deletes", "DELETEs done in hosted repositories: manifest, tag, blob",
                  ["kind"], registry=REGISTRY)
cache_budget = Gauge("mirror_cache_budget_bytes", "max_size (0 when unbounded)",
                     registry=REGISTRY)

upstream_source_bytes = Counter("mirror_upstream_source_bytes", "Bytes of blobs and manifests "
                                "downloaded from each source of an upstream",
                                ["upstream", "source"], registry=REGISTRY)
SOURCE_BYTES = "source_bytes:"     # persistent counter prefix: source_bytes:<upstream>:<source>

# Set by app.py to the index's batched counter, so `mirror stats` sees the totals.
persist: Callable[[str, int], None] | None = None


def _persist(name: str, n: int = 1) -> None:
    if persist is not None:
        persist(name, n)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


# -- the per-request note ----------------------------------------------------------------


@dataclass
class RequestNote:
    """Filled in while a request is answered; the access log prints it."""

    cache: str = "-"
    source: str = "-"        # the upstream source (host[:port]) that answered a miss
    user: str = "-"          # who the request came from, once auth.py knows; - anonymous


_note: ContextVar[RequestNote | None] = ContextVar("mirror_request_note", default=None)


def begin_request() -> RequestNote:
    note = RequestNote()
    _note.set(note)
    return note


def identified(user: str) -> None:
    """The request's user, as the login checks found it ("" for anonymous)."""
    note = _note.get()
    if note is not None:
        note.user = user or "-"


def lookup(kind: str, result: str) -> None:
    """A manifest or blob lookup's outcome: hit, miss, stale or coalesced."""
    cache_lookups.labels(kind, result).inc()
    note = _note.get()
    if note is not None:
        note.cache = result
    _persist(f"{kind}_{'hits' if result == 'hit' else 'misses' if result == 'miss' else result}")


def sourced(source: str) -> None:
    """The source (an upstream's url or mirror, host[:port]) a miss was fetched from, for
    the access log. Call it in the request's context (a task started from it counts)."""
    note = _note.get()
    if note is not None:
        note.source = source


def source_error(upstream: str, source: str, reason: str) -> None:
    """A source failed (reason: unavailable, rate_limited, bad_content, denied, slow)."""
    upstream_source_errors.labels(upstream, source, reason).inc()


def source_bytes(upstream: str, source: str, n: int) -> None:
    """Bytes (blobs, manifests) downloaded from one source of an upstream (its url or a
    mirror): for /metrics and `mirror stats`."""
    upstream_source_bytes.labels(upstream, source).inc(n)
    _persist(f"{SOURCE_BYTES}{upstream}:{source}", n)


def served(source: str, n: int) -> None:
    """Blob bytes sent to a client: from a cached file, or following a download."""
    bytes_served.labels(source).inc(n)
    if source == "cache":
        _persist("bytes_from_cache", n)


def fetched(upstream: str, n: int) -> None:
    """Blob bytes downloaded from an upstream (once, however many clients follow)."""
    upstream_bytes.labels(upstream).inc(n)
    _persist("bytes_from_upstream", n)


def stale(upstream: str) -> None:
    stale_serves.labels(upstream).inc()
    _persist("stale_serves")


def evicted(items: int, nbytes: int) -> None:
    evictions.inc(items)
    evicted_bytes.inc(nbytes)
    _persist("evictions", items)
    _persist("evicted_bytes", nbytes)


def pushed(kind: str) -> None:
    """A blob upload finished or a manifest was pushed (kind: blob, manifest)."""
    pushes.labels(kind).inc()
    _persist(f"pushed_{kind}s")


def deleted(kind: str) -> None:
    """A hosted manifest, tag or blob was deleted (kind: manifest, tag, blob)."""
    deletes.labels(kind).inc()
    _persist(f"deleted_{kind}s")

