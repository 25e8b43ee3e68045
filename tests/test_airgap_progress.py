"""Progress of warm, export and import (mirror/airgap/progress.py): the modes driven
through the API, the bars on a fake terminal and on a real pty, auto's choice, --json."""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from rich.console import Console

from mirror.airgap import progress as pg

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
MiB = 1024 * 1024

# Drives the API the way a command does; argv: mode [raise] [json].
DRIVER = r"""
import sys, time
from mirror.airgap.progress import open_progress
mode = sys.argv[1]
if "bare" in sys.argv:          # a caller that neither closes nor uses `with`
    p = open_progress(mode, "warm")
    p.task("sha256:" + "b" * 64 + " layer", 100).advance(10)
    time.sleep(0.3)
    raise RuntimeError("bare")
with open_progress(mode, "warm", json_output="json" in sys.argv) as p:
    p.plan(2 * 1048576, blobs=3)
    p.skipped("sha256:" + "a" * 64 + " config", 1024)
    tasks = [p.task("sha256:" + c * 64 + " layer", 1048576) for c in "bc"]
    for i in range(8):
        for t in tasks:
            t.advance(131072)
        time.sleep(0.05)
        if i == 3:
            p.log("a note from the middle")
            p.log("an error from the middle", error=True)
    if "raise" in sys.argv:
        raise RuntimeError("boom")
    for t in tasks:
        t.done()
    p.image("docker.io/library/alpine:3.19")
    p.close(True, bundle="x.tar")
print("after close", file=sys.stderr)
"""

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean_env() -> dict[str, str]:
    env = dict(os.environ, TERM="xterm")
    for k in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS",
              "LINES"):
        env.pop(k, None)
    return env


def run_on_pty(*argv: str) -> tuple[int, str, str]:
    """Runs DRIVER with stderr on a fresh 80x24 pty and stdout on a pipe: (rc, the
    terminal's bytes as text, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], stdin=slave,
                            stdout=subprocess.PIPE, stderr=slave, env=clean_env())
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:             # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        rc = proc.wait(10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, out.decode(errors="replace"), stdout


def run_on_pipes(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DRIVER, *argv], capture_output=True,
                          text=True, env=clean_env(), timeout=30, stdin=subprocess.DEVNULL)


# -- plain


def test_plain_prints_a_line_at_each_interval_with_bytes_speed_and_eta() -> None:
    err, out = io.StringIO(), io.StringIO()
    p = pg.PlainProgress("warm", stream=err, out=out, every=0.1)
    p.plan(4 * MiB, blobs=2)
    t = p.task(DIGEST_B + " layer", 4 * MiB)
    for _ in range(5):
        t.advance(256 * 1024)
        time.sleep(0.1)
    lines_while_running = err.getvalue().splitlines()
    t.done()
    p.close()
    # a line about every 0.1 s: 0.5 s gives a few (generous bounds, loaded machine)
    assert 2 <= len(lines_while_running) <= 8, lines_while_running
    line = re.compile(r"^warm: 0/2 blobs, [\d.]+ (KiB|MiB)/4\.0 MiB, [\d.]+ (KiB|MiB)/s, "
                      r"ETA \d+ s$")
    for text in lines_while_running:
        assert line.match(text), text
    final = err.getvalue().splitlines()
    assert re.match(r"^warm: 1/2 blobs, 1\.2 MiB/4\.0 MiB, ", final[len(lines_while_running)])
    assert "warm: done" in final
    assert out.getvalue() == ""


def test_plain_keeps_printing_while_a_transfer_stalls() -> None:
    err = io.StringIO()
    p = pg.PlainProgress("export", stream=err, out=io.StringIO(), every=0.05)
    p.plan(MiB)
    p.task(DIGEST_B, MiB)        # never advances
    time.sleep(0.4)
    p.close(ok=False)
    stalled = [x for x in err.getvalue().splitlines()
               if x.startswith("export: 0/1 blobs, 0 B/1.0 MiB")]
    assert len(stalled) >= 3, err.getvalue()


def test_plain_close_stops_its_timer() -> None:
    err = io.StringIO()
    p = pg.PlainProgress("warm", stream=err, out=io.StringIO(), every=0.02)
    p.close()
    assert not p._timer.is_alive()
    after = err.getvalue()
    time.sleep(0.1)
    assert err.getvalue() == after


# -- summary, json, failures, none


def drive(p: pg.Progress) -> None:
    p.plan(3 * MiB, blobs=3)
    p.skipped(DIGEST_A + " config", 1000)
    good = p.task(DIGEST_B + " layer", 2 * MiB)
    good.advance(2 * MiB)
    good.done()
    bad = p.task("sha256:" + "c" * 64 + " layer", MiB)
    bad.advance(10)
    bad.failed("digest mismatch")
    bad.failed("again")           # a second call changes nothing
    p.image("docker.io/library/alpine:3.19")


def test_summary_counts_and_table() -> None:
    err, out = io.StringIO(), io.StringIO()
    p = pg.Progress("import", stream=err, out=out)
    drive(p)
    s = p.close(True, bundle="site.tar")
    assert (s.images, s.blobs, s.bytes, s.skipped, s.skipped_bytes, s.failed) == (
        1, 1, 2 * MiB + 10, 1, 1000, 1)
    assert s.ok is False          # a failed blob fails the command
    text = err.getvalue()
    assert "import: FAILED" in text
    for row in (r"images\s+1$", r"blobs\s+1$", r"bytes\s+2\.0 MiB \(2097162 B\)$",
                r"skipped\s+1 \(1000 B\) already there$", r"failed\s+1$", r"time\s+[\d.]+ s$",
                r"speed\s+[\d.]+ \w+/s$", r"bundle\s+site\.tar$"):
        assert re.search(row, text, re.M), (row, text)
    assert out.getvalue() == ""
    assert p.close() is s and err.getvalue() == text   # a second close prints nothing


def test_failed_blob_is_counted_and_logged_with_its_full_digest() -> None:
    err = io.StringIO()
    p = pg.PlainProgress("warm", stream=err, out=io.StringIO(), every=60)
    drive(p)
    assert p.summary.failed == 1
    assert f"sha256:{'c' * 64} layer: digest mismatch" in err.getvalue().splitlines()
    assert "again" not in err.getvalue()
    p.close()


def test_json_is_one_object_on_stdout_and_no_table() -> None:
    err, out = io.StringIO(), io.StringIO()
    p = pg.PlainProgress("export", json_output=True, stream=err, out=out, every=60)
    drive(p)
    p.close(True, bundle="b.tar", since="2026-01-01")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["action"] == "export" and obj["ok"] is False
    assert (obj["images"], obj["blobs"], obj["bytes"], obj["skipped"], obj["skipped_bytes"],
            obj["failed"]) == (1, 1, 2 * MiB + 10, 1, 1000, 1)
    assert obj["bundle"] == "b.tar" and obj["since"] == "2026-01-01"
    assert isinstance(obj["seconds"], float) and isinstance(obj["bytes_per_second"], int)
    assert "FAILED" not in err.getvalue() and "images" not in err.getvalue()
    assert "digest mismatch" in err.getvalue()      # errors still reach stderr


def test_none_prints_only_errors_and_the_json() -> None:
    err, out = io.StringIO(), io.StringIO()
    p = pg.open_progress("none", "warm")
    assert isinstance(p, pg.QuietProgress)
    p.stream, p.out = err, out
    drive(p)
    p.log("a note")
    p.log("a warning that matters", error=True)
    p.close()
    assert err.getvalue().splitlines() == [f"sha256:{'c' * 64} layer: digest mismatch",
                                           "a warning that matters"]
    assert out.getvalue() == ""
    q = pg.QuietProgress("warm", json_output=True, stream=err, out=out)
    q.close(True, n=1)
    assert json.loads(out.getvalue())["n"] == 1


def test_context_manager_closes_as_failed_on_an_exception() -> None:
    err = io.StringIO()
    with pytest.raises(RuntimeError):
        with pg.PlainProgress("warm", stream=err, out=io.StringIO(), every=0.02) as p:
            p.plan(10)
            raise RuntimeError("boom")
    assert p.closed and not p.summary.ok
    assert not p._timer.is_alive()
    assert "warm: FAILED" in err.getvalue()
    with pg.PlainProgress("warm", stream=err, out=io.StringIO(), every=0.02) as q:
        q.close(True, x=1)        # closed inside: leaving prints nothing more
    assert q.summary.ok and err.getvalue().count("warm: done") == 1


# -- bar, on a rich Console that says it is a terminal


def bar_progress(max_bars: int = pg.MAX_BARS) -> tuple[pg.BarProgress, io.StringIO]:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100, color_system=None)
    return pg.BarProgress("warm", stream=buf, out=io.StringIO(), console=console,
                          max_bars=max_bars), buf


def test_bar_draws_blob_and_overall_bars_logs_above_and_a_table() -> None:
    p, buf = bar_progress()
    try:
        p.plan(2 * MiB, blobs=2)
        t = p.task(DIGEST_B + " layer", 2 * MiB)
        t.advance(MiB)
        p.log("a note")
        p.bars.refresh()
        shown = ANSI.sub("", buf.getvalue())
        assert "sha256:bbbbbbbbbbbb layer" in shown and DIGEST_B not in shown
        assert "━" in shown
        assert re.search(r"warm 0/2 blobs .*1\.0/2\.0 MiB", shown)
        assert "a note" in shown
        t.advance(MiB)
        t.done()
        p.image("alpine")
    finally:
        p.close(True, bundle="x.tar")
    assert not p.bars.live.is_started
    end = ANSI.sub("", buf.getvalue())
    assert "warm: done" in end
    for row in (r"images\s+1", r"blobs\s+1", r"bytes\s+2\.0 MiB", r"skipped\s+0",
                r"failed\s+0", r"time\s+[\d.]+ s", r"speed\s+", r"bundle\s+x\.tar"):
        assert re.search(row, end), row


def test_bar_totals_grow_as_plan_reports_more() -> None:
    p, _ = bar_progress()
    try:
        overall = p.bars.tasks[0]
        assert overall.total is None
        p.plan(MiB)
        assert overall.total == MiB
        p.plan(3 * MiB, blobs=2)
        assert overall.total == 4 * MiB
        p.skipped(DIGEST_A, MiB)     # the overall bar counts what is left to transfer
        assert overall.total == 3 * MiB
        assert "1/3 blobs 1 skipped" in overall.description
    finally:
        p.close()


def test_bar_shows_at_most_max_bars_and_finished_ones_disappear() -> None:
    p, _ = bar_progress(max_bars=3)
    try:
        tasks = [p.task(f"sha256:{i}{'f' * 63} layer", 100) for i in range(5)]

        def visible() -> list[str]:
            return [t.description for t in p.bars.tasks if t.visible][1:]  # less overall

        assert visible() == [f"sha256:{i}{'f' * 11} layer" for i in range(3)]
        tasks[1].done()
        assert visible() == [f"sha256:{i}{'f' * 11} layer" for i in (0, 2, 3)]
        tasks[4].failed("gone")      # one still waiting can finish too
        tasks[0].done()
        assert visible() == [f"sha256:{i}{'f' * 11} layer" for i in (2, 3)]
        tasks[2].done()
        tasks[3].done()
        assert visible() == [] and len(p.bars.tasks) == 1
    finally:
        p.close()


def test_bar_on_a_console_that_is_not_a_terminal_prints_the_plain_table() -> None:
    buf = io.StringIO()
    p = pg.BarProgress("import", stream=buf, out=io.StringIO(),
                       console=Console(file=buf, force_terminal=False))
    drive(p)
    p.close()
    text = buf.getvalue()
    assert "\x1b" not in text and "━" not in text
    assert "import: FAILED" in text and re.search(r"^  images\s+1$", text, re.M)


# -- real terminals and pipes


def test_bar_on_a_real_pty() -> None:
    rc, term, stdout = run_on_pty("bar")
    assert rc == 0
    assert stdout == ""
    assert "━" in term                       # the bars
    assert "sha256:bbbbbbbbbbbb layer" in term
    text = ANSI.sub("", term)
    assert "a note from the middle" in text and "an error from the middle" in text
    assert "warm: done" in text and re.search(r"bundle\s+x\.tar", text)
    assert "\x1b[?25h" in term               # the cursor is shown again
    assert text.rstrip().endswith("after close")


def test_bar_leaves_the_terminal_clean_when_the_command_raises() -> None:
    rc, term, stdout = run_on_pty("bar", "raise")
    assert rc == 1 and stdout == ""
    assert "\x1b[?25h" in term
    text = ANSI.sub("", term)
    assert "warm: FAILED" in text and "RuntimeError: boom" in text
    # the traceback comes after the bars are gone, not under a live display
    assert text.index("RuntimeError: boom") > text.rindex("━")


def test_bar_restores_the_cursor_at_exit_even_without_close() -> None:
    rc, term, _ = run_on_pty("bar", "bare")
    assert rc == 1 and "━" in term and "RuntimeError: bare" in term
    assert "\x1b[?25h" in term[term.index("RuntimeError: bare"):]


def test_bar_json_on_a_pty_puts_only_the_object_on_stdout() -> None:
    rc, term, stdout = run_on_pty("bar", "json")
    assert rc == 0
    assert json.loads(stdout)["bundle"] == "x.tar" and stdout.count("\n") == 1
    assert "━" in term and "warm: done" not in ANSI.sub("", term)


def test_auto_is_bar_on_a_terminal() -> None:
    rc, term, _ = run_on_pty("auto")
    assert rc == 0 and "━" in term


def test_auto_is_plain_when_stderr_is_a_pipe() -> None:
    r = run_on_pipes("auto")
    assert r.returncode == 0 and r.stdout == ""
    assert "━" not in r.stderr and "\x1b" not in r.stderr
    assert re.search(r"^warm: 3/3 blobs \(1 skipped\), 2\.0 MiB/2\.0 MiB, ", r.stderr, re.M)
    assert "warm: done" in r.stderr


@pytest.mark.parametrize("mode", pg.MODES)
def test_nothing_but_the_json_goes_to_stdout(mode: str) -> None:
    r = run_on_pipes(mode)
    assert r.returncode == 0 and r.stdout == ""
    r = run_on_pipes(mode, "json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["blobs"] == 2 and r.stdout.count("\n") == 1


# -- the shared flags


def test_add_arguments_and_from_args() -> None:
    parser = argparse.ArgumentParser()
    pg.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.progress, args.json) == ("auto", False)
    args = parser.parse_args(["--progress", "none", "--json"])
    p = pg.from_args(args, "import")
    assert isinstance(p, pg.QuietProgress) and p.json_output and p.action == "import"
    p = pg.from_args(parser.parse_args(["--progress", "plain"]), "warm")
    try:
        assert isinstance(p, pg.PlainProgress) and not p.json_output
    finally:
        p.stream = io.StringIO()
        p.close()
    with pytest.raises(SystemExit):
        parser.parse_args(["--progress", "fancy"])
    with pytest.raises(ValueError, match="--progress"):
        pg.open_progress("fancy", "warm")


def test_no_thread_left_behind() -> None:
    before = threading.active_count()
    for mode in ("plain", "bar"):
        p = pg.open_progress(mode, "warm")
        p.stream = io.StringIO()
        if isinstance(p, pg.BarProgress):
            p.console.file = p.stream
        p.close()
    assert threading.active_count() == before


def test_rich_is_loaded_only_for_bars() -> None:
    # every `mirror` command (serve, healthcheck) imports this module through cli.py
    code = ("import sys, io, mirror.airgap.progress as pg; assert 'rich' not in sys.modules; "
            "pg.open_progress('plain', 'w').close(); assert 'rich' not in sys.modules; "
            "pg.open_progress('bar', 'w').close(); assert 'rich' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=clean_env(), timeout=30)
    assert r.returncode == 0, r.stderr
