"""CPU time and memory of a server's whole process tree, read from /proc.

A server may be one process (docker-registry) or a parent with worker processes
(the mirror with ``workers: N``), so every figure is taken over the tree rooted
at the pid the benchmark started:

``tree_cpu_seconds(pid)``
    utime + stime of every live process in the tree, plus cutime + cstime of each
    (the CPU of children that exited and were waited for). A worker that exits
    between two samples moves from the first sum to its parent's cutime, so the
    difference of two samples is the CPU the tree used in between. (Only an
    orphan re-parented out of the tree, then reaped by init, is lost: the mirror
    does not leave orphans.)
``PeakRss(pid)``
    with-block sampling VmRSS of each process in the tree every 20 ms: ``peak`` is
    the largest single process seen (the per-process figure the issue's target is
    about), ``peak_total`` the largest sum over the tree at one sample, ``processes``
    the most processes seen at once.

The parsers (``parse_stat``, ``tree_of``) take text and tables so they are testable
without a live tree.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


class Stat(NamedTuple):
    pid: int
    ppid: int
    utime: int      # clock ticks
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(text: str) -> Stat:
    """One /proc/PID/stat line. The command name (field 2) is in parentheses and may
    itself hold spaces and ')', so fields are counted from the last ')'."""
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    f = rest.split()    # f[0] is field 3 (state)
    return Stat(pid, int(f[1]), int(f[11]), int(f[12]), int(f[13]), int(f[14]))


def read_stats(proc: Path = PROC) -> dict[int, Stat]:
    """Every process's stat; processes gone while reading are skipped."""
    stats = {}
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                stats[int(entry)] = parse_stat((proc / entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    return stats


def tree_of(root: int, parents: dict[int, int]) -> list[int]:
    """``root`` and its descendants, given {pid: ppid}; [] if root is not there."""
    if root not in parents:
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int, stats: dict[int, Stat] | None = None) -> float:
    stats = read_stats() if stats is None else stats
    pids = tree_of(root, {pid: s.ppid for pid, s in stats.items()})
    return sum(stats[pid].ticks for pid in pids) / CLK_TCK


def rss_bytes(pid: int, proc: Path = PROC) -> int:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0     # gone, or a zombie (no VmRSS line)


class PeakRss:
    """Samples the RSS of every process in ``pid``'s tree every 20 ms while in the
    with-block; the tree itself is re-read every 0.5 s (a /proc scan costs ~2 ms)."""

    def __init__(self, pid: int, interval: float = 0.02, rescan: float = 0.5) -> None:
        self.pid, self.interval, self.every = pid, interval, max(1, int(rescan / interval))
        self.peak = self.peak_total = self.processes = 0
        self._stop = threading.Event()
        self._pids: list[int] = [pid]

    def _sample(self) -> None:
        sizes = [rss_bytes(p) for p in self._pids]
        self.peak = max(self.peak, *sizes)
        self.peak_total = max(self.peak_total, sum(sizes))
        self.processes = max(self.processes, sum(1 for s in sizes if s))

    def _rescan(self) -> None:
        stats = read_stats()
        self._pids = tree_of(self.pid, {p: s.ppid for p, s in stats.items()}) or [self.pid]

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            tick += 1
            if tick % self.every == 0:
                self._rescan()
            self._sample()

    def __enter__(self) -> PeakRss:
        self._rescan()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._rescan()
        self._sample()
