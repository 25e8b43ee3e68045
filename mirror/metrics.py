"""What the mirror counts: Prometheus collectors, the per-request note that the
access log reads, and the counters `mirror stats` reads from the index.

This module sits at the bottom of the layering: anything may import it, it imports
nothing of the mirror's (but the version, for ``mirror_build_info``). Counters that
must outlive the process go through ``persist`` (the index's batched counter, wired up by app.py).

Several worker processes (``workers: N``): the supervisor starts each worker with
``PROMETHEUS_MULTIPROC_DIR`` set to an emptied directory (``data_dir/run/metrics``), so
prometheus_client writes every worker's values to that worker's own files there, and a
scrape, answered by whichever worker, merges all of them: counters and histograms summed
over every worker that ever ran (a replaced worker's counts stay: nothing goes backwards),
each gauge by its ``multiprocess_mode``: in-progress counts summed over the live workers,
the budget the same in all, the last ratelimit-remaining any worker saw. Gauges a function
gives (``set_function``) have no file of their own: those about upstreams (up, source up,
speed, reserve hit), which each worker learns from its own requests, are written to the
worker's file when they change, checked as each response starts and each second
(``_PublishedGauge``), merged with ``livemin``/``livemax``; those every worker knows
alike from the shared index (cache and hosted size) and ``mirror_build_info`` are given
by the worker that answers. The supervisor calls ``worker_exited(pid)`` when a worker
ends, so its live gauges drop out.
Without the variable (one process) everything is as it always was: one registry.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for api.py)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from . import __version__

# No `*_created` series: one more per counter and histogram, which nobody graphs.
disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set (by the supervisor, before this import) in each worker of a server with workers > 1.
SHARED_DIR: str | None = os.environ.get(MULTIPROC_ENV) or None

# What the answering process exposes. With workers it holds only what that worker says
# itself; the collectors below write to the worker's files, which ``_WORKERS`` merges.
REGISTRY = CollectorRegistry(auto_describe=True)
_OWN = REGISTRY if SHARED_DIR is None else CollectorRegistry(auto_describe=True)
_WORKERS = CollectorRegistry(auto_describe=False)
_functions: dict[Gauge, tuple[Callable[[], float], float]] = {}    # the last value written
_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
PUBLISH_EVERY = 1.0      # seconds between a worker's writes of its function gauges


class _PublishedGauge(Gauge):
    """With workers: a gauge a function gives. The function's value is written to this
    worker's file when it changed, checked as this worker starts each response (so what a
    request taught it is there before the client can ask another worker), each
    ``PUBLISH_EVERY`` seconds (a backoff runs out without a request: on the event loop it
    was set on, where its state lives) and when it answers a scrape, so every worker's
    scrape sees it, merged by the gauge's multiprocess_mode."""

    def set_function(self, f: Callable[[], float]) -> None:
        self._raise_if_not_observable()
        value = float(f())
        _functions[self] = (f, value)
        self.set(value)
        _keep_publishing()


def _publish() -> None:
    for gauge, (f, last) in list(_functions.items()):
        try:
            value = float(f())
        except Exception:       # noqa: BLE001 (a closed owner: keep its last value)
            continue
        if value != last:
            _functions[gauge] = (f, value)
            gauge.set(value)


def answering() -> None:
    """A response is about to start (the access log calls this): with workers, write
    what changed in this worker's function gauges. Nothing to do in one process."""
    if _functions:
        _publish()


def _keep_publishing() -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:        # no loop: written when this process answers a scrape
        return
    if loop in _loops:
        return
    _loops.add(loop)

    def tick() -> None:
        _publish()
        loop.call_later(PUBLISH_EVERY, tick)

    loop.call_later(PUBLISH_EVERY, tick)


_FnGauge: type[Gauge] = Gauge if SHARED_DIR is None else _PublishedGauge

build_info = Info("mirror_build", "The running mirror's version", registry=REGISTRY)
build_info.info({"version": __version__})

http_requests = Counter("mirror_http_requests", "HTTP requests answered",
                        ["route", "method", "status"], registry=_OWN)
http_seconds = Histogram("mirror_http_request_duration_seconds",
                         "Time to answer a request (to the last byte)", ["route"],
                         registry=_OWN,
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                                  10, 30, 60))
cache_lookups = Counter("mirror_cache_lookups", "Manifest and blob lookups by outcome: hit, miss "
                        "(fetched upstream), stale (served while upstream failed), coalesced "
                        "(joined a fetch already running)", ["kind", "result"], registry=_OWN)
bytes_served = Counter("mirror_bytes_served", "Bytes of blobs and manifests sent to clients, by "
                       "where they came from", ["source"], registry=_OWN)
sendfile_bytes = Counter("mirror_sendfile_bytes", "Of mirror_bytes_served, those the kernel sent "
                         "straight from the cached file (zero copy, plain HTTP)",
                         registry=_OWN)
upstream_requests = Counter("mirror_upstream_requests", "Requests sent upstream",
                            ["upstream", "method", "status"], registry=_OWN)
upstream_seconds = Histogram("mirror_upstream_request_duration_seconds",
                             "Upstream time to response headers", ["upstream"], registry=_OWN)
upstream_bytes = Counter("mirror_upstream_bytes", "Blob bytes downloaded from upstream",
                         ["upstream"], registry=_OWN)
# With workers: down while any live worker finds it down (each learns from its own requests).
upstream_up = _FnGauge("mirror_upstream_up", "1 while the upstream can be reached through its "
                       "url or one of its mirrors, 0 from a transport failure (refused, "
                       "unreachable, timed out) of all of them until a probe gets an answer",
                       ["upstream"], registry=_OWN, multiprocess_mode="livemin")
upstream_ratelimit_remaining = Gauge("mirror_upstream_ratelimit_remaining", "The last "
                                     "ratelimit-remaining an upstream sent (Docker Hub's pulls "
                                     "left in its window)", ["upstream"], registry=_OWN,
                                     multiprocess_mode="mostrecent")
upstream_source_requests = Counter("mirror_upstream_source_requests", "Requests sent to each "
                                   "source of an upstream (its url or one of its mirrors), by "
                                   "kind: manifest, blob, tags, referrers, token, other",
                                   ["upstream", "source", "kind"], registry=_OWN)
upstream_source_errors = Counter("mirror_upstream_source_errors", "Failures of each source of an "
                                 "upstream, by reason: unavailable, rate_limited, bad_content, "
                                 "denied, slow", ["upstream", "source", "reason"],
                                 registry=_OWN)
upstream_source_up = _FnGauge("mirror_upstream_source_up", "1 while a source answers and sits "
                              "out no backoff after a failure", ["upstream", "source"],
                              registry=_OWN, multiprocess_mode="livemin")
# With workers: the fastest moving average any live worker measured.
upstream_source_speed = _FnGauge("mirror_upstream_source_speed_bytes_per_second", "Measured "
                                 "blob download speed of each source (moving average; 0 until "
                                 "measured)", ["upstream", "source"], registry=_OWN,
                                 multiprocess_mode="livemax")
upstream_source_ratelimit_remaining = Gauge(
    "mirror_upstream_source_ratelimit_remaining", "The last ratelimit-remaining each source sent "
    "(per credential: each source logs in with its own)", ["upstream", "source"],
    registry=_OWN, multiprocess_mode="mostrecent")
upstream_ratelimit_reserve_hit = _FnGauge(
    "mirror_upstream_ratelimit_reserve_hit", "1 while a source's ratelimit-remaining is at or "
    "below the upstream's ratelimit_reserve: no GETs of tags go to it", ["upstream", "source"],
    registry=_OWN, multiprocess_mode="livemax")
fills_in_progress = Gauge("mirror_fills_in_progress", "Blob downloads running now",
                          registry=_OWN, multiprocess_mode="livesum")
fills_queued = Gauge("mirror_fills_queued",
                     "Blob downloads waiting for one of their upstream's max_fills slots",
                     registry=_OWN, multiprocess_mode="livesum")
stale_serves = Counter("mirror_stale_serves", "Cached copies served because upstream failed",
                       ["upstream"], registry=_OWN)
evictions = Counter("mirror_evictions", "Blobs and manifests evicted", registry=_OWN)
evicted_bytes = Counter("mirror_evicted_bytes", "Bytes evicted", registry=_OWN)
# Given by the answering process (every worker's view of the shared index agrees).
cache_size = Gauge("mirror_cache_size_bytes", "Bytes of blobs and manifests cached",
                   registry=REGISTRY)
hosted_size = Gauge("mirror_hosted_size_bytes", "Bytes of blobs and manifests hosted "
                    "repositories link (outside the cache budget)", registry=REGISTRY)
pushes = Counter("mirror_pushes", "Blobs and manifests pushed to hosted repositories",
                 ["kind"], registry=_OWN)
deletes = Counter("mirror_deletes", "DELETEs done in hosted repositories: manifest, tag, blob",
                  ["kind"], registry=_OWN)
cache_budget = Gauge("mirror_cache_budget_bytes", "max_size (0 when unbounded)",
                     registry=_OWN, multiprocess_mode="livemax")   # the same in every worker
# Set by mirror/cluster/leader.py: 1 in the process that runs the site's chores.
cluster_leader = Gauge("mirror_cluster_leader", "1 while this replica leads the site's chores "
                       "(eviction, hosted gc, pruning), else 0", registry=_OWN,
                       multiprocess_mode="livemax")

notification_events_sent = Counter("mirror_notification_events_sent", "Events a notification "
                                   "endpoint took (answered 2xx or 3xx)", ["endpoint"],
                                   registry=_OWN)
notification_deliveries_failed = Counter("mirror_notification_deliveries_failed", "POSTs to a "
                                         "notification endpoint that failed (their events stay "
                                         "queued and are sent again)", ["endpoint"],
                                         registry=_OWN)
notification_events_dropped = Counter("mirror_notification_events_dropped", "Events not queued "
                                      "for an endpoint because its queue was at queue_limit",
                                      ["endpoint"], registry=_OWN)
# Set by the process that delivers (the leader).
notification_queue_length = Gauge("mirror_notification_queue_length", "Events waiting on disk "
                                  "for an endpoint", ["endpoint"], registry=_OWN,
                                  multiprocess_mode="livemax")

upstream_source_bytes = Counter("mirror_upstream_source_bytes", "Bytes of blobs and manifests "
                                "downloaded from each source of an upstream",
                                ["upstream", "source"], registry=_OWN)
SOURCE_BYTES = "source_bytes:"     # persistent counter prefix: source_bytes:<upstream>:<source>

# Set by app.py to the index's batched counter, so `mirror stats` sees the totals.
persist: Callable[[str, int], None] | None = None


def _persist(name: str, n: int = 1) -> None:
    if persist is not None:
        persist(name, n)


class _Files:
    """Every worker's files merged, less what the answering worker says itself; a family
    no worker has used yet is described without samples, as in one process."""

    def __init__(self, path: str, own: Iterable[str]) -> None:
        self._merged = multiprocess.MultiProcessCollector(None, path)
        self._own = set(own)

    def collect(self) -> Iterable[Metric]:
        found = {m.name: m for m in self._merged.collect() if m.name not in self._own}
        for m in _OWN.collect():
            found.setdefault(m.name, Metric(m.name, m.documentation, m.type))
        return sorted(found.values(), key=lambda m: m.name)


if SHARED_DIR is not None:
    _WORKERS.register(_Files(SHARED_DIR, [cache_size._name, hosted_size._name]))


def exposition() -> bytes:
    if SHARED_DIR is None:
        return generate_latest(REGISTRY)
    _publish()
    return generate_latest(REGISTRY) + generate_latest(_WORKERS)


async def scrape() -> bytes:
    """``exposition()``, for the /metrics endpoint: with workers, the other workers' files
    are read off the event loop (what lives in this worker's memory is read on it)."""
    if SHARED_DIR is None:
        return generate_latest(REGISTRY)
    _publish()
    own = generate_latest(REGISTRY)
    return own + await asyncio.to_thread(generate_latest, _WORKERS)


def worker_exited(pid: int, directory: str | Path | None = None) -> None:
    """A worker process ended (the supervisor calls this, with the workers' directory: it
    need not have the variable set itself): its live gauges (fills in progress, upstream
    health, ...) drop out of the merge; its counters and histograms stay. No directory
    given nor in the variable: nothing to do (one process)."""
    path = directory or os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, str(path))


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

