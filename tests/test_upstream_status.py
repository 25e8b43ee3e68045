"""upstream_status: each upstream source's state as the server's processes see it, written
to ``data_dir/status`` by the process that saw it and read, merged, by any other (the
web page's worker). A real server in front of the real upstream through the
fault-injecting proxy (a rate-limit header, then dropped connections, then back); the
test process reads what the server's process wrote."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx

from mirror import upstream_status
from mirror.upstream_status import Recorder, SourceStatus, read_status
from tests.test_pull_through import get_manifest, hub_config


def _wait_for(data_dir, check, timeout: float = 15.0) -> list[SourceStatus]:
    deadline = time.monotonic() + timeout
    while True:
        found = asyncio.run(read_status(data_dir))
        if check(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _hub(found: list[SourceStatus]) -> SourceStatus | None:
    return next((s for s in found if s.upstream == "docker.io"), None)


def test_a_server_s_view_of_its_upstream_is_read_by_another_process(
        make_mirror, faulty_upstream, image_set):
    faulty_upstream.arm("add_headers", path_contains="/manifests/",
                        headers={"ratelimit-remaining": "42;w=21600"})
    mirror = make_mirror({**hub_config(faulty_upstream), "workers": 2})
    began = time.time()
    image = image_set.docker
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        assert get_manifest(client, image.repo, image.tags[0]).status_code == 200
        found = _wait_for(mirror.data_dir, lambda f: _hub(f) is not None
                          and _hub(f).ratelimit_remaining is not None)
        hub = _hub(found)
        assert hub is not None, found
        assert hub.source == faulty_upstream.host.lower()
        assert hub.up and hub.last_error is None
        assert hub.ratelimit_remaining == 42 and began <= hub.ratelimit_at <= time.time()
        assert hub.last_success_at is not None and began <= hub.last_success_at
        assert [s.upstream for s in found] == ["docker.io"]     # local.test was never asked

        faulty_upstream.clear()
        faulty_upstream.arm("drop", times=None)      # the upstream's connections fail
        down_at = time.time()
        assert get_manifest(client, image.repo, "no-such-tag").status_code >= 500
        hub = _hub(_wait_for(mirror.data_dir, lambda f: not _hub(f).up, timeout=3))
        assert not hub.up, hub                       # written at once, not 5 s later
        assert hub.since is not None and down_at <= hub.since <= time.time()
        assert hub.last_error and hub.last_error_at >= down_at

        faulty_upstream.clear()                      # back: the probe finds it
        hub = _hub(_wait_for(mirror.data_dir, lambda f: _hub(f).up, timeout=10))
        assert hub.up and hub.since is not None and hub.since > down_at
        assert hub.last_error_at >= down_at          # the last error stays
    mirror.stop()
    after = _hub(asyncio.run(read_status(mirror.data_dir)))
    assert after is not None and after.up          # its processes are gone: no say on up
    assert after.last_error_at == hub.last_error_at and after.ratelimit_remaining == 42


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True)
    return int(done.stdout)


def _file(data_dir, upstream: str, pid: int, **state) -> None:
    (data_dir / "status").mkdir(exist_ok=True)
    base = {"up": True, "since": None, "seen_at": None, "last_error": None,
            "last_error_at": None, "last_success_at": None, "ratelimit_remaining": None,
            "ratelimit_at": None}
    (data_dir / "status" / f"{upstream}.{pid}.{len(state)}.json").write_text(json.dumps(
        {"upstream": upstream, "pid": pid, "started": None, "written_at": time.time(),
         "sources": {"hub.test": {**base, **state}}}))


def test_files_merge_latest_wins_and_the_dead_have_no_say_on_up(tmp_path):
    dead = _dead_pid()
    _file(tmp_path, "hub", os.getpid(), up=False, since=100.0, seen_at=150.0,
          last_error="refused", last_error_at=150.0, ratelimit_remaining=9, ratelimit_at=140.0)
    _file(tmp_path, "hub", dead, up=True, since=50.0, seen_at=300.0,        # later, but gone
          last_error="503", last_error_at=290.0, last_success_at=300.0)
    (tmp_path / "status" / "junk.json").write_text("{not json")
    [hub] = asyncio.run(read_status(tmp_path))
    assert hub == SourceStatus("hub", "hub.test", up=False, since=100.0, last_error="503",
                               last_error_at=290.0, last_success_at=300.0,
                               ratelimit_remaining=9, ratelimit_at=140.0)
    _file(tmp_path, "hub", os.getppid(), up=True, since=10.0, seen_at=200.0)  # live, later
    [hub] = asyncio.run(read_status(tmp_path))
    assert hub.up and hub.since == 10.0 and hub.last_error == "503"


def test_writes_wait_five_seconds_unless_up_or_down_changes(tmp_path):
    path = tmp_path / "status" / f"hub.{os.getpid()}.json"

    async def run() -> tuple[dict, dict, dict]:
        recorder = Recorder(tmp_path)
        await recorder.open(leader=True)
        upstream_status.recorder = recorder
        try:
            upstream_status.success("hub", "hub.test")
            await asyncio.sleep(0.3)
            first = json.loads(path.read_text())
            upstream_status.error("hub", "hub.test", "HTTP 503")
            await asyncio.sleep(0.3)
            throttled = json.loads(path.read_text())
            upstream_status.down("hub", "hub.test", "connection refused")
            await asyncio.sleep(0.3)
            urgent = json.loads(path.read_text())
            return first, throttled, urgent
        finally:
            upstream_status.recorder = None
            await recorder.close()
    first, throttled, urgent = asyncio.run(run())
    assert first["sources"]["hub.test"]["last_success_at"] is not None
    assert throttled == first                       # within 5 s of the last write
    assert urgent["sources"]["hub.test"]["up"] is False
    assert urgent["sources"]["hub.test"]["last_error"] == "connection refused"
