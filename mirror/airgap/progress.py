"""Progress of ``warm``, ``export`` and ``import``: what the user sees while it runs.

``open_progress(mode, action, json_output)`` with ``mode`` one of ``auto`` (``bar`` when
stderr is a terminal, else ``plain``), ``bar`` (per-blob and overall bars with bytes,
speed and ETA), ``plain`` (one summary line every few seconds), ``none``. Everything
goes to stderr; ``--json`` puts one JSON object on stdout at the end instead of the
summary table.

The caller tells it what it learns as it goes:

    progress.plan(nbytes, blobs=1)      # more work found (totals grow as manifests are read)
    task = progress.task(label, size)   # one blob starting; size None if unknown
    task.advance(n); task.done() / task.failed(why)
    progress.skipped(label, size)       # already there: nothing to do
    progress.image(ref)                 # one image finished
    progress.log(message)               # a line for the user (warnings, per-image notes)
    summary = progress.close(ok, **extra)   # prints the summary table / JSON; returns it

All calls come from the event loop's thread.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any

MODES = ("auto", "bar", "plain", "none")
PLAIN_EVERY = 5.0          # seconds between plain summary lines


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class Summary:
    action: str
    ok: bool = True
    images: int = 0
    blobs: int = 0             # blobs transferred
    bytes: int = 0             # bytes transferred
    skipped: int = 0           # blobs already there
    skipped_bytes: int = 0
    failed: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        d["seconds"] = round(self.seconds, 3)
        return d


class Task:
    def __init__(self, progress: Progress, label: str, size: int | None) -> None:
        self.progress = progress
        self.label = label
        self.size = size
        self.transferred = 0
        self.finished = False

    def advance(self, n: int) -> None:
        self.transferred += n
        self.progress._advanced(self, n)

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            self.progress._done(self, ok=True)

    def failed(self, why: str) -> None:
        if not self.finished:
            self.finished = True
            self.progress._done(self, ok=False, why=why)


class Progress:
    """Counts everything; shows nothing (mode ``none``). Subclasses draw."""

    def __init__(self, action: str, json_output: bool = False, stream: IO[str] | None = None,
                 out: IO[str] | None = None) -> None:
        self.action = action
        self.json_output = json_output
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        self.started = time.monotonic()
        self.summary = Summary(action)
        self.total_bytes = 0           # planned, grows as work is found
        self.total_blobs = 0
        self.done_bytes = 0            # transferred + skipped
        self.done_blobs = 0

    # -- what the caller reports

    def plan(self, nbytes: int, blobs: int = 1) -> None:
        self.total_bytes += nbytes
        self.total_blobs += blobs

    def task(self, label: str, size: int | None) -> Task:
        return Task(self, label, size)

    def skipped(self, label: str, size: int) -> None:
        self.summary.skipped += 1
        self.summary.skipped_bytes += size
        self.done_bytes += size
        self.done_blobs += 1

    def image(self, ref: str) -> None:
        self.summary.images += 1

    def log(self, message: str) -> None:
        if not self.json_output:
            print(message, file=self.stream, flush=True)

    def close(self, ok: bool = True, **extra: Any) -> Summary:
        self.summary.ok = ok and self.summary.failed == 0
        self.summary.seconds = time.monotonic() - self.started
        self.summary.extra.update(extra)
        if self.json_output:
            print(json.dumps(self.summary.as_dict()), file=self.out, flush=True)
        else:
            self._print_summary()
        return self.summary

    # -- hooks for the drawing subclasses

    def _advanced(self, task: Task, n: int) -> None:
        self.summary.bytes += n
        self.done_bytes += n

    def _done(self, task: Task, ok: bool, why: str = "") -> None:
        if ok:
            self.summary.blobs += 1
            self.done_blobs += 1
        else:
            self.summary.failed += 1
            self.log(f"{task.label}: {why}")

    def _print_summary(self) -> None:
        s = self.summary
        rate = s.bytes / s.seconds if s.seconds > 0 else 0.0
        rows = [("images", str(s.images)),
                ("blobs", f"{s.blobs} ({human_size(s.bytes)})"),
                ("skipped", f"{s.skipped} ({human_size(s.skipped_bytes)}) already there"),
                ("failed", str(s.failed)),
                ("time", f"{s.seconds:.1f} s ({human_size(rate)}/s)")]
        rows += [(k, str(v)) for k, v in s.extra.items()]
        width = max(len(k) for k, _ in rows)
        print(f"{self.action}: {'done' if s.ok else 'FAILED'}", file=self.stream)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}", file=self.stream)
        self.stream.flush()


class PlainProgress(Progress):
    """One line every PLAIN_EVERY seconds: for logs and CI, where bars would be noise."""

    def __init__(self, *args: Any, every: float = PLAIN_EVERY, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every = every
        self._last = time.monotonic()

    def _tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.summary.bytes / elapsed
        total = f"/{human_size(self.total_bytes)}" if self.total_bytes else ""
        left = max(self.total_bytes - self.done_bytes, 0)
        eta = f", ETA {left / rate:.0f} s" if rate > 0 and self.total_bytes else ""
        print(f"{self.action}: {self.done_blobs}/{self.total_blobs} blobs, "
              f"{human_size(self.done_bytes)}{total}, {human_size(rate)}/s{eta}",
              file=self.stream, flush=True)

    def _advanced(self, task: Task, n: int) -> None:
        super()._advanced(task, n)
        self._tick()

    def _done(self, task: Task, ok: bool, why: str = "") -> None:
        super()._done(task, ok, why)
        self._tick()

    def close(self, ok: bool = True, **extra: Any) -> Summary:
        if not self.json_output:
            self._tick(force=True)
        return super().close(ok, **extra)


def open_progress(mode: str, action: str, json_output: bool = False) -> Progress:
    if mode not in MODES:
        raise ValueError(f"--progress: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "plain"
    if mode == "none":
        return Progress(action, json_output)
    if mode == "bar":
        return PlainProgress(action, json_output)     # TODO(progress helper): rich bars
    return PlainProgress(action, json_output)
