"""Each upstream source's state, as every worker process of the server sees it (for the
web page's overview): up or down and since when, the last error, the last success, the
last Docker Hub ``ratelimit-remaining`` seen. A source is an upstream's ``url`` or one
of its ``mirrors``, named host[:port] as in the logs and metrics.

Each process records what its own requests see in a ``Recorder`` (app.py sets
``recorder``; the upstream modules call ``down``, ``up``, ``error``, ``success`` and
``ratelimit``, which do nothing without one) and writes it to
``data_dir/status/<upstream>.<pid>.json``: atomically (a temp file, then a rename),
off the event loop, at most once per ``WRITE_EVERY`` seconds per upstream unless a
source went up or down, and once more when the process stops.

``read_status`` merges every process's files: the last error, the last success and
the last rate limit are the latest any process saw; up or down is what the process
that looked last says, among the processes still running (a file whose process is
gone keeps its times, not its say on up or down; with no running process's word a
source counts as up, as a starting server presumes). The leader drops files of
processes gone for ``KEPT`` seconds.

In a site of replicas (``index.postgres``) each replica has its own data directory, so
the files say only what that replica's processes saw. There app.py gives the recorder
a ``Shared`` (mirror/cluster/site_status.py: a PostgreSQL table): every write of a file
is also written there, and ``read_status(data_dir, shared=...)`` merges the rows of
every process of every replica by the same rules (alive is judged by a heartbeat
instead of a pid). If the table cannot be read, the files are (logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from . import fileio

log = logging.getLogger("mirror.upstream")

DIR = "status"
WRITE_EVERY = 5.0            # seconds between writes of one upstream's file (not up/down)
KEPT = 8 * 24 * 3600.0       # seconds a file of a process that ended is kept
ERROR_MAX = 300              # characters of an error message kept


@dataclass(frozen=True)
class SourceStatus:
    upstream: str
    source: str                          # host[:port] of the url or mirror
    up: bool
    since: float | None                  # epoch seconds: when it went up or down
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None
    ratelimit_remaining: int | None      # the last ratelimit-remaining header seen
    ratelimit_at: float | None
    seen_by: str | None = None           # in a site: the replica whose say on up/down this is
    error_by: str | None = None          # in a site: the replica that saw the last error


# What one process saw of one source: (its say counts on up/down, upstream, source, its
# state as the Recorder keeps it, the replica it ran on or None).
View = tuple[bool, str, str, dict[str, Any], str | None]


class Shared(Protocol):
    """Where a process's view goes besides its files (a site of replicas)."""

    async def write(self, upstream: str, sources: dict[str, dict[str, Any]]) -> None:
        """Record this process's state of ``upstream``'s sources; never raises."""

    async def stop(self) -> None:
        """This process stops: its rows lose their say on up or down."""

    async def views(self) -> list[View]:
        """What every process of the site saw (raises when it cannot say)."""


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), to tell it from a later
    process given the same number; None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: Any, started: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return started is None or _start_ticks(pid) in (None, started)


class Recorder:
    """This process's view of the upstream sources, written to its files."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / DIR
        self.pid = os.getpid()
        self._ticks = _start_ticks(self.pid)
        self._started = time.time()
        self._sources: dict[str, dict[str, dict[str, Any]]] = {}   # upstream -> source -> state
        self._dirty: set[str] = set()
        self._urgent: set[str] = set()
        self._written: dict[str, float] = {}                       # upstream -> loop time
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._failed_logged = False
        self.shared: Shared | None = None

    async def open(self, leader: bool) -> None:
        """Make the directory; the leader drops the files of processes long gone."""
        await fileio.run(self._prepare, leader)

    def _prepare(self, leader: bool) -> None:
        self.dir.mkdir(exist_ok=True)
        if not leader:
            return
        now = time.time()
        for path, data in _files(self.dir):
            if (now - float(data.get("written_at") or 0) > KEPT
                    and not _alive(data.get("pid"), data.get("started"))):
                path.unlink(missing_ok=True)

    async def close(self) -> None:
        """Write what is not written yet."""
        await self._flush()
        await self.unshare()

    async def unshare(self) -> None:
        """Write what is not written yet, to the ``shared`` table too, and leave it (before
        the site's pool closes)."""
        shared = self.shared
        if shared is None:
            return
        await self._flush()
        self.shared = None
        await shared.stop()

    async def _flush(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        for upstream in list(self._dirty):
            self._dirty.discard(upstream)
            await self._write(upstream)

    # -- what the upstream modules see ----------------------------------------------------

    def _state(self, upstream: str, source: str) -> dict[str, Any]:
        sources = self._sources.setdefault(upstream, {})
        state = sources.get(source)
        if state is None:
            state = sources[source] = {
                "up": True, "since": self._started, "seen_at": None, "last_error": None,
                "last_error_at": None, "last_success_at": None,
                "ratelimit_remaining": None, "ratelimit_at": None}
        return state

    def went_down(self, upstream: str, source: str, reason: str) -> None:
        now = time.time()
        state = self._state(upstream, source)
        changed = state["up"]
        state.update(up=False, seen_at=now, last_error=reason[:ERROR_MAX], last_error_at=now)
        if changed:
            state["since"] = now
        self._changed(upstream, urgent=changed)

    def came_up(self, upstream: str, source: str) -> None:
        now = time.time()
        state = self._state(upstream, source)
        changed = not state["up"]
        state.update(up=True, seen_at=now)
        if changed:
            state["since"] = now
        self._changed(upstream, urgent=changed)

    def failed(self, upstream: str, source: str, message: str) -> None:
        now = time.time()
        state = self._state(upstream, source)
        state.update(last_error=message[:ERROR_MAX], last_error_at=now)
        if not state["up"]:
            state["seen_at"] = now
        self._changed(upstream)

    def answered(self, upstream: str, source: str) -> None:
        now = time.time()
        state = self._state(upstream, source)
        state["last_success_at"] = now
        if state["up"]:
            state["seen_at"] = now
        self._changed(upstream)

    def rate_limit(self, upstream: str, source: str, remaining: int) -> None:
        state = self._state(upstream, source)
        state.update(ratelimit_remaining=remaining, ratelimit_at=time.time())
        self._changed(upstream)

    # -- writing ----------------------------------------------------------------------------

    def _changed(self, upstream: str, urgent: bool = False) -> None:
        self._dirty.add(upstream)
        if urgent:
            self._urgent.add(upstream)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                        # not on the event loop: the next write takes it
        wake = self._wake.setdefault(upstream, asyncio.Event())
        task = self._tasks.get(upstream)
        if task is None or task.done():
            self._tasks[upstream] = loop.create_task(self._writer(upstream))
        elif urgent:
            wake.set()

    async def _writer(self, upstream: str) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake[upstream]
        while upstream in self._dirty:
            wait = self._written.get(upstream, -math.inf) + WRITE_EVERY - loop.time()
            if wait > 0 and upstream not in self._urgent:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                except TimeoutError:
                    pass
            self._dirty.discard(upstream)
            self._urgent.discard(upstream)
            self._written[upstream] = loop.time()
            try:
                await self._write(upstream)
            except asyncio.CancelledError:
                self._dirty.add(upstream)     # stopping: the flush writes it again
                raise

    async def _write(self, upstream: str) -> None:
        sources = {s: dict(v) for s, v in self._sources.get(upstream, {}).items()}
        data = {"upstream": upstream, "pid": self.pid, "started": self._ticks,
                "written_at": time.time(), "sources": sources}
        path = self.dir / f"{quote(upstream, safe='')}.{self.pid}.json"
        try:
            await fileio.run_to_end(_write_atomic, path, json.dumps(data).encode())
        except OSError as exc:
            if not self._failed_logged:
                self._failed_logged = True
                log.warning("cannot write the upstream status to %s: %s", path,
                            exc.strerror or exc)
        if self.shared is not None:
            await self.shared.write(upstream, sources)


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(exist_ok=True)
    temp.write_bytes(data)
    os.replace(temp, path)


# -- module-level hooks: what the upstream modules call ----------------------------------------

recorder: Recorder | None = None     # this process's, while a server runs (app.py)


def site_wide() -> Shared | None:
    """The site's table this process writes to (a site of replicas), for ``read_status``."""
    return recorder.shared if recorder is not None else None


def _safely(note: Any, into: Recorder) -> None:
    """Record, never failing the request that saw it: the status is for the page only."""
    try:
        note(into)
    except Exception:
        log.exception("recording the upstream status failed")


def down(upstream: str, source: str, reason: str) -> None:
    """``source`` cannot be reached (a transport failure): down from now."""
    if recorder is not None:
        _safely(lambda r: r.went_down(upstream, source, reason), recorder)


def up(upstream: str, source: str) -> None:
    """``source`` answered again (or still does)."""
    if recorder is not None:
        _safely(lambda r: r.came_up(upstream, source), recorder)


def error(upstream: str, source: str, message: str) -> None:
    """A request to ``source`` failed (a 5xx, 429, wrong bytes, too slow, ...)."""
    if recorder is not None:
        _safely(lambda r: r.failed(upstream, source, message), recorder)


def success(upstream: str, source: str) -> None:
    """``source`` answered a request (not with a server error or a rate limit)."""
    if recorder is not None:
        _safely(lambda r: r.answered(upstream, source), recorder)


def ratelimit(upstream: str, source: str, remaining: int) -> None:
    if recorder is not None:
        _safely(lambda r: r.rate_limit(upstream, source, remaining), recorder)


# -- reading, merged ---------------------------------------------------------------------------


def _files(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    try:
        paths = [p for p in directory.iterdir()
                 if p.name.endswith(".json") and not p.name.startswith(".")]
    except OSError:
        return []
    for path in paths:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("sources"), dict):
            found.append((path, data))
    return found


async def read_status(data_dir: Path, shared: Shared | None = None) -> list[SourceStatus]:
    """Every upstream source any process of the server (with ``shared``: of the site)
    has seen, merged (see the module doc), sorted by upstream and source."""
    if shared is not None:
        try:
            return merge(await shared.views())
        except Exception as exc:  # noqa: BLE001 (the page shows this replica's view instead)
            log.warning("cannot read the site's upstream status (showing this replica's): "
                        "%s", f"{type(exc).__name__}: {exc}"[:300])
    return await fileio.run(_read_status, data_dir)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _read_status(data_dir: Path) -> list[SourceStatus]:
    views: list[View] = []
    for _, data in _files(data_dir / DIR):
        alive = _alive(data.get("pid"), data.get("started"))
        upstream = str(data.get("upstream", ""))
        views.extend((alive, upstream, str(source), state, None)
                     for source, state in data["sources"].items() if isinstance(state, dict))
    return merge(views)


def merge(views: list[View]) -> list[SourceStatus]:
    """The processes' views merged: the latest error, success and rate limit any saw; up
    or down as the live one that looked last says (up when none alive has a say)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for alive, upstream, source, state, by in views:
        into = merged.setdefault((upstream, source), {"seen_at": None})
        for field, at in (("last_error", "last_error_at"),
                          ("ratelimit_remaining", "ratelimit_at"),
                          ("last_success_at", "last_success_at")):
            when = _num(state.get(at))
            if when is not None and when > (into.get(at) or -math.inf):
                into[at], into[field] = when, state.get(field)
                if field == "last_error":
                    into["error_by"] = by
        seen = _num(state.get("seen_at")) or _num(state.get("since"))
        if alive and seen is not None and seen > (into["seen_at"] or -math.inf):
            into.update(seen_at=seen, up=bool(state.get("up")),
                        since=_num(state.get("since")), seen_by=by)
    found = []
    for (upstream, source), m in sorted(merged.items()):
        error, remaining = m.get("last_error"), m.get("ratelimit_remaining")
        found.append(SourceStatus(
            upstream, source, up=m.get("up", True), since=m.get("since"),
            last_error=str(error) if error is not None else None,
            last_error_at=m.get("last_error_at"), last_success_at=m.get("last_success_at"),
            ratelimit_remaining=remaining if isinstance(remaining, int) else None,
            ratelimit_at=m.get("ratelimit_at") if isinstance(remaining, int) else None,
            seen_by=m.get("seen_by"), error_by=m.get("error_by")))
    return found
