"""The benchmark's own parts (bench/proctree.py, bench/table.py): the CPU and memory
accounting over a server's process tree, and the table's targets and formatting.
No speed is asserted: CPU figures are compared with what the processes report
having used themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.proctree import CLK_TCK, PeakRss, parse_stat, read_stats, tree_cpu_seconds, tree_of
from bench.table import Line, Target, format_table, missed

ROOT = Path(__file__).resolve().parent.parent

# A parent with three descendants, each burning 0.2 s of CPU and printing what it used
# (os.times of itself only): one child exits and is reaped (its CPU is now in the
# parent's cutime), one child stays alive with a live grandchild. All wait for stdin
# to close. The grandchild also holds 40 MB.
TREE = textwrap.dedent("""
    import os, sys, time

    def burn(seconds=0.2):
        start = time.process_time()
        while time.process_time() - start < seconds:
            pass
        t = os.times()
        return t.user + t.system

    def fork(fn):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                fn()
            finally:
                os._exit(0)
        return pid

    def reaped():
        print("cpu", burn(), flush=True)

    def grandchild():
        held = b"x" * (40 << 20)
        print("cpu", burn(), flush=True)
        sys.stdin.read()
        del held

    def live():
        fork(grandchild)
        print("cpu", burn(), flush=True)
        sys.stdin.read()

    os.waitpid(fork(reaped), 0)
    fork(live)
    sys.stdin.read()
""")


@pytest.fixture
def tree():
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        used = [float(proc.stdout.readline().split()[1]) for _ in range(3)]
        yield proc, used
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_tree_cpu_counts_live_descendants_and_reaped_children(tree):
    proc, used = tree
    stats = read_stats()
    pids = tree_of(proc.pid, {pid: s.ppid for pid, s in stats.items()})
    assert len(pids) == 3                       # parent, live child, grandchild
    own = (stats[proc.pid].utime + stats[proc.pid].stime) / CLK_TCK
    total = tree_cpu_seconds(proc.pid, stats)
    # /proc rounds to clock ticks, os.times too: allow a tick per process each way.
    assert total - own >= sum(used) - 6 / CLK_TCK
    assert stats[proc.pid].cutime + stats[proc.pid].cstime > 0     # the reaped child


def test_peak_rss_is_the_largest_process_of_the_tree(tree):
    proc, _ = tree
    with PeakRss(proc.pid) as rss:
        pass
    assert rss.processes == 3
    assert rss.peak >= 40 << 20                  # the grandchild's 40 MB
    assert rss.peak_total > rss.peak


def test_parse_stat_counts_fields_after_the_last_parenthesis():
    fields = ["S", "7"] + ["0"] * 9 + ["11", "12", "13", "14"] + ["0"] * 30
    stat = parse_stat("4242 (odd) name )) " + " ".join(fields))
    assert (stat.pid, stat.ppid, stat.utime, stat.stime, stat.cutime, stat.cstime) == (
        4242, 7, 11, 12, 13, 14)
    assert stat.ticks == 50


def test_tree_of_follows_descendants_only():
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
    assert sorted(tree_of(10, parents)) == [10, 11, 12, 13]
    assert tree_of(99, parents) == []


def test_targets_judge_ratios_and_own_figures():
    assert Target(">=x", 1.2).met(130, 100) is True
    assert Target(">=x", 1.2).met(110, 100) is False
    assert Target("<=x", 0.5).met(2.0, 5.0) is True       # a wall time: lower is better
    assert Target("<=x", 0.5).met(3.0, 5.0) is False
    assert Target("<=", 100).met(101, None) is False
    assert Target("==", 1).met(1, 17) is True
    assert Target("==", 1).met(2, 17) is False
    assert Target(">=x", 1.2).met(130, None) is None       # no baseline: not judged
    with pytest.raises(ValueError):
        Target(">", 1)


def test_table_prints_ratio_target_and_result_per_row():
    lines = [
        Line("warm1", "warm blob, 1 client", "MB/s", 684.0, 929.0, Target(">=x", 1.2),
             cpu_mirror=0.35, cpu_registry2=0.2),
        Line("cold1_direct", "cold blob, 1 client, of upstream direct", "MB/s", 176.0, 355.0,
             Target(">=x", 0.6), base=200.0, base_name="direct"),
        Line("cold16_gets", "upstream GETs", "GETs", 1, 17, Target("==", 1)),
        Line("manifest", "manifest by tag", "req/s", None, 132.0, Target(">=x", 40)),
    ]
    text = format_table(lines).splitlines()
    assert text[0].split()[:3] == ["row", "mirror", "registry:2"]
    warm, direct, gets, manifest = text[1:]
    assert "0.74x" in warm and ">= 1.2x" in warm and "MISSED" in warm and "0.35" in warm
    assert "0.88x of direct" in direct and "met" in direct
    assert gets.split()[-5:] == ["==", "1", "met", "-", "-"]     # no CPU column here
    assert manifest.split()[-4:] == ["40x", "-", "-", "-"]      # not measured: not judged
    assert len({len(line) for line in text[:2]}) == 1      # columns line up
    assert missed(lines) == ["warm blob, 1 client"]
    row = json.loads(json.dumps([line.as_json() for line in lines]))[1]
    assert (row["base"], row["base_name"], row["met"]) == (200.0, "direct", True)
    assert row["target"] == {"kind": ">=x", "value": 0.6, "text": ">= 0.6x"}


def test_compare_offers_workers_and_json():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--help"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "--workers" in out and "--json" in out
