"""Progress of ``warm``, ``export`` and ``import``: what the user sees while it runs.

``open_progress(mode, action, json_output)`` with ``mode`` one of:

- ``bar``: rich bars on stderr, one per blob in flight (short digest and what it is,
  bytes, speed, ETA; at most ``MAX_BARS`` shown, finished ones disappear) and an overall
  bar (bytes transferred of those still to transfer, speed, ETA; its total grows as
  ``plan()`` reports more). ``log()`` lines print above the bars. A summary table at the
  end (a rich Table on a terminal, the plain text table otherwise).
- ``plain``: one summary line every ``PLAIN_EVERY`` seconds (blobs, bytes, speed, ETA),
  from a timer, so a stalled transfer still shows, and the summary table at the end.
- ``auto``: ``bar`` when stderr is a terminal, else ``plain``.
- ``none``: nothing but errors (failed blobs, ``log(..., error=True)``), and the JSON
  object if ``--json`` asks for it. No summary table.

Everything goes to stderr; ``--json`` puts one JSON object on stdout at the end instead
of the summary table (bars / plain lines still go to stderr). Nothing else ever goes to
stdout, so ``export -o -`` can stream the bundle there.

The caller tells it what it learns as it goes:

    progress.plan(nbytes, blobs=1)      # more work found (totals grow as manifests are read)
    task = progress.task(label, size)   # one blob starting; size None if unknown
    task.advance(n); task.done() / task.failed(why)
    progress.skipped(label, size)       # already there: nothing to do
    progress.image(ref)                 # one image finished
    progress.log(message)               # a line for the user (warnings, per-image notes)
    summary = progress.close(ok, **extra)   # prints the summary table / JSON; returns it

or, so the terminal is restored even when the command raises:

    with from_args(args, "warm") as progress:
        ...
        progress.close(ok, **extra)     # optional: leaving the block closes (ok=False on
                                        # an exception) if the caller did not

Commands share the flags: ``add_arguments(parser)`` adds ``--progress`` and ``--json``,
``from_args(args, action)`` opens the Progress they ask for.

All calls come from the event loop's thread (the bar's refresh thread and the plain
timer only read counters and write to stderr under a lock).
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import ProgressColumn

MODES = ("auto", "bar", "plain", "none")
PLAIN_EVERY = 5.0          # seconds between plain summary lines
MAX_BARS = 8               # blob bars shown at once in bar mode; the rest wait hidden

_DIGEST = re.compile(r"\b(sha256:[0-9a-f]{12})[0-9a-f]{52}\b")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_time(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def short_label(label: str) -> str:
    """``sha256:<64 hex> layer`` -> ``sha256:<12 hex> layer`` (for bars; logs keep it whole)."""
    return _DIGEST.sub(r"\1", label)


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

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["seconds"] = round(self.seconds, 3)
        d["bytes_per_second"] = round(self.bytes_per_second)
        d.update(extra)
        return d

    def rows(self) -> list[tuple[str, str]]:
        """The summary table's rows, for the plain text and the rich table alike."""
        rows = [("images", str(self.images)),
                ("blobs", str(self.blobs)),
                ("bytes", f"{human_size(self.bytes)} ({self.bytes} B)"),
                ("skipped", f"{self.skipped} ({human_size(self.skipped_bytes)}) already there"),
                ("failed", str(self.failed)),
                ("time", f"{self.seconds:.1f} s"),
                ("speed", f"{human_size(self.bytes_per_second)}/s")]
        rows += [(k, str(v)) for k, v in self.extra.items()]
        return rows


class Task:
    def __init__(self, progress: Progress, label: str, size: int | None) -> None:
        self.progress = progress
        self.label = label
        self.size = size
        self.transferred = 0
        self.finished = False
        self.handle: Any = None        # the drawing subclass's own (rich's task id)

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
    """Counts everything; draws nothing while it runs, prints log lines and the summary
    table (or the JSON object) at the end. The modes are subclasses."""

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
        self.closed = False
        self._lock = threading.Lock()  # one writer to the stream at a time

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

    def log(self, message: str, error: bool = False) -> None:
        """A line on stderr (above the bars in bar mode). ``error`` lines show in every
        mode, ``none`` included; the others in all modes but ``none``."""
        self._write(message)

    def close(self, ok: bool = True, **extra: Any) -> Summary:
        """Stops any drawing, prints the summary table (or the JSON object on stdout) and
        returns the summary. A second call returns it again and prints nothing."""
        if self.closed:
            return self.summary
        self.closed = True
        self.summary.ok = ok and self.summary.failed == 0
        self.summary.seconds = time.monotonic() - self.started
        self.summary.extra.update(extra)
        self._stop()
        if self.json_output:
            print(json.dumps(self.summary.as_dict()), file=self.out, flush=True)
        else:
            self._print_summary()
        return self.summary

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.closed:
            try:
                self.close(ok=exc_type is None)
            finally:
                self._stop()

    # -- hooks for the drawing subclasses

    def _write(self, line: str) -> None:
        with self._lock:
            print(line, file=self.stream, flush=True)

    def _stop(self) -> None:
        """Stops a refresh thread or timer and leaves the terminal clean (idempotent)."""

    def _advanced(self, task: Task, n: int) -> None:
        self.summary.bytes += n
        self.done_bytes += n

    def _done(self, task: Task, ok: bool, why: str = "") -> None:
        if ok:
            self.summary.blobs += 1
            self.done_blobs += 1
        else:
            self.summary.failed += 1
            self.log(f"{task.label}: {why}", error=True)

    def _print_summary(self) -> None:
        s = self.summary
        rows = s.rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"{self.action}: {'done' if s.ok else 'FAILED'}"]
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        self._write("\n".join(lines))


class QuietProgress(Progress):
    """Mode ``none``: only errors, and the JSON object if asked for."""

    def log(self, message: str, error: bool = False) -> None:
        if error:
            self._write(message)

    def _print_summary(self) -> None:
        pass


class PlainProgress(Progress):
    """One line every ``every`` seconds: for logs and CI, where bars would be noise. A
    timer thread prints it, so a transfer that stalls (or waits on the server's fill of
    the same blob) still shows it is alive."""

    def __init__(self, *args: Any, every: float = PLAIN_EVERY, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.every = every
        self._stopping = threading.Event()
        self._timer = threading.Thread(target=self._run, name="progress-plain", daemon=True)
        self._timer.start()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.summary.bytes / elapsed
        total = f"/{human_size(self.total_bytes)}" if self.total_bytes else ""
        blobs = f"{self.done_blobs}/{self.total_blobs}" if self.total_blobs else str(
            self.done_blobs)
        skipped = f" ({self.summary.skipped} skipped)" if self.summary.skipped else ""
        failed = f", {self.summary.failed} failed" if self.summary.failed else ""
        left = max(self.total_bytes - self.done_bytes, 0)
        eta = f", ETA {human_time(left / rate)}" if rate > 0 and self.total_bytes else ""
        return (f"{self.action}: {blobs} blobs{skipped}{failed}, "
                f"{human_size(self.done_bytes)}{total}, {human_size(rate)}/s{eta}")

    def _run(self) -> None:
        while not self._stopping.wait(self.every):
            self._write(self.line())

    def _stop(self) -> None:
        self._stopping.set()
        if self._timer.is_alive() and self._timer is not threading.current_thread():
            self._timer.join()

    def close(self, ok: bool = True, **extra: Any) -> Summary:
        if not self.closed and not self.json_output:
            self._stop()
            self._write(self.line())
        return super().close(ok, **extra)


def _speed_column(**kwargs: Any) -> ProgressColumn:
    """rich's TransferSpeedColumn in the units of the rest (KiB, MiB)."""
    from rich.progress import ProgressColumn
    from rich.progress import Task as BarTask
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: BarTask) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{human_size(speed)}/s",
                        style="progress.data.speed")

    return Speed(**kwargs)


class BarProgress(Progress):
    """rich bars on stderr: one per blob in flight (at most ``MAX_BARS`` visible, the
    others wait hidden), an overall bar, log lines above them, a table at the end."""

    def __init__(self, *args: Any, console: Console | None = None, max_bars: int = MAX_BARS,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # rich is imported here, not at the top: every `mirror` command (serve,
        # healthcheck) imports this module through cli.py, and only bars need rich.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars
        from rich.table import Column

        self.console: Console = console if console is not None else Console(file=self.stream)
        self.max_bars = max_bars
        # Sized to fit 80 columns: a longer label is cut with an ellipsis.
        self.bars = Bars(
            TextColumn("{task.description}", markup=False, table_column=Column(
                max_width=30, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=12),
            DownloadColumn(binary_units=True, table_column=Column(no_wrap=True)),
            _speed_column(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(compact=True, table_column=Column(no_wrap=True)),
            console=self.console, transient=True, refresh_per_second=8,
            redirect_stdout=False)   # stdout is the JSON's (or export -o -'s) alone
        self._shown: list[Task] = []          # tasks with a visible bar
        self._waiting: deque[Task] = deque()  # tasks in flight beyond max_bars
        self.overall = self.bars.add_task(self._overall_text(), total=None)
        self.bars.start()
        # A caller that neither closes nor uses `with` still gets its cursor back.
        atexit.register(self._stop)

    # -- what the caller reports

    def plan(self, nbytes: int, blobs: int = 1) -> None:
        super().plan(nbytes, blobs)
        self._update_overall()

    def task(self, label: str, size: int | None) -> Task:
        task = super().task(label, size)
        visible = len(self._shown) < self.max_bars
        task.handle = self.bars.add_task(short_label(label), total=size, visible=visible)
        if visible:
            self._shown.append(task)
        else:
            self._waiting.append(task)
        self._update_overall()
        return task

    def skipped(self, label: str, size: int) -> None:
        super().skipped(label, size)
        self._update_overall()

    def image(self, ref: str) -> None:
        super().image(ref)
        self._update_overall()

    def _write(self, line: str) -> None:
        if self.bars.live.is_started:
            self.console.print(line, markup=False, highlight=False, emoji=False,
                               soft_wrap=True)
        else:
            super()._write(line)

    # -- drawing

    def _overall_text(self) -> str:
        s = self.summary
        blobs = f"{self.done_blobs}/{self.total_blobs}" if self.total_blobs else str(
            self.done_blobs)
        skipped = f" {s.skipped} skipped" if s.skipped else ""
        failed = f" {s.failed} failed" if s.failed else ""
        return f"{self.action} {blobs} blobs{skipped}{failed}"

    def _update_overall(self) -> None:
        # Bytes to transfer: what was planned less what turned out to be there already,
        # so the speed and the ETA are those of the transfer.
        total = self.total_bytes - self.summary.skipped_bytes
        self.bars.update(self.overall, description=self._overall_text(),
                         completed=self.summary.bytes,
                         total=total if total > 0 else None)

    def _advanced(self, task: Task, n: int) -> None:
        super()._advanced(task, n)
        if task.size is not None and task.transferred > task.size:
            self.bars.update(task.handle, total=task.transferred)
        self.bars.advance(task.handle, n)
        self._update_overall()

    def _done(self, task: Task, ok: bool, why: str = "") -> None:
        super()._done(task, ok, why)
        self.bars.remove_task(task.handle)
        if task in self._shown:
            self._shown.remove(task)
            if self._waiting:
                nxt = self._waiting.popleft()
                self._shown.append(nxt)
                self.bars.update(nxt.handle, visible=True)
        elif task in self._waiting:
            self._waiting.remove(task)
        self._update_overall()

    def _stop(self) -> None:
        # rich's stop() only signals its refresh thread; wait for it, so nothing draws
        # after close() and no thread outlives the command.
        atexit.unregister(self._stop)
        refresher = getattr(self.bars.live, "_refresh_thread", None)
        self.bars.stop()
        if isinstance(refresher, threading.Thread) and refresher.is_alive():
            refresher.join(timeout=5)

    def _print_summary(self) -> None:
        if not self.console.is_terminal:
            super()._print_summary()
            return
        from rich.table import Table

        s = self.summary
        table = Table(title=f"{self.action}: {'done' if s.ok else 'FAILED'}",
                      title_justify="left", show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(justify="right")
        for k, v in s.rows():
            table.add_row(k, v)
        with self._lock:
            self.console.print(table)


def open_progress(mode: str, action: str, json_output: bool = False) -> Progress:
    if mode not in MODES:
        raise ValueError(f"--progress: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "bar" if _stderr_is_terminal() else "plain"
    if mode == "none":
        return QuietProgress(action, json_output)
    if mode == "bar":
        return BarProgress(action, json_output)
    return PlainProgress(action, json_output)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (ValueError, OSError):       # closed or detached
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--progress`` and ``--json``, the same for warm, export and import."""
    parser.add_argument(
        "--progress", choices=MODES, default="auto",
        help="bar: per-blob and overall bars; plain: a line every few seconds; none: only "
             "errors; auto (default): bar when stderr is a terminal, else plain")
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object (the summary) on stdout at the end")


def from_args(args: argparse.Namespace, action: str) -> Progress:
    return open_progress(getattr(args, "progress", "auto"), action,
                         bool(getattr(args, "json", False)))
