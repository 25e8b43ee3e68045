"""/metrics across worker processes: each worker is a real Python process importing
mirror.metrics with PROMETHEUS_MULTIPROC_DIR set (as the supervisor starts them), and the
exposition one process produces covers them all: counters and histograms summed (a worker
that ended keeps its counts), live gauges dropping a worker once ``worker_exited(pid)``,
function gauges written by each worker, the answering worker's own cache size and
build info once. Without the variable a process exposes its own values, as always."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror import metrics
from tests.support.client import read_blob
from tests.test_pull_through import check_manifest, get_manifest, hub_config
from tests.test_upstream_outage import outage_config
from tests.test_workers import REPO, _children, _wait_for_owner, all_ready, fresh_blob

ROOT = Path(__file__).resolve().parent.parent

SCRAPE = """
import asyncio, sys
from mirror import metrics as m
m.cache_size.set_function(lambda: 4242)
sys.stdout.buffer.write(asyncio.run(m.scrape()))
"""

# A worker that stays up, its event loop running: upstream_up is what the control file says.
LIVE_WORKER = """
import asyncio, pathlib, sys
from mirror import metrics as m
control = pathlib.Path(sys.argv[1])

async def main():
    m.upstream_up.labels("hub").set_function(lambda: float(control.read_text()))
    m.fills_in_progress.inc()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def env(shared: Path | None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")}
    out["PYTHONPATH"] = str(ROOT)
    if shared is not None:
        out["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    return out


def run_worker(shared: Path | None, code: str) -> int:
    """A worker process that counts what ``code`` says (``m`` is mirror.metrics) and
    ends; its pid."""
    done = subprocess.run([sys.executable, "-c", "from mirror import metrics as m\n" + code],
                          env=env(shared), capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return int(done.stdout.split()[-1])


def scrape(shared: Path | None) -> list[tuple[str, tuple, float]]:
    """What a fresh process (another worker) answers /metrics with."""
    done = subprocess.run([sys.executable, "-c", SCRAPE], env=env(shared),
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return [(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(done.stdout.decode())
            for s in family.samples]


def families(shared: Path | None) -> set[str]:
    done = subprocess.run([sys.executable, "-c", SCRAPE], env=env(shared),
                          capture_output=True, timeout=30, check=True)
    return {f.name for f in text_string_to_metric_families(done.stdout.decode())}


def value_of(values: dict[tuple, float], name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def value(samples, name, **labels) -> float | None:
    found = [v for n, ls, v in samples if n == name and ls == tuple(sorted(labels.items()))]
    assert len(found) <= 1, f"{name}{labels} appears {len(found)} times"
    return found[0] if found else None


WORKER_A = """
import os
for _ in range(3):
    m.lookup("blob", "hit")
m.served("cache", 100)
m.http_seconds.labels("blob").observe(0.3)
m.fills_in_progress.inc()
m.fills_queued.inc(2)
m.cache_budget.set(1000)
m.upstream_up.labels("hub").set_function(lambda: 0.0)         # A finds hub down
m.upstream_source_speed.labels("hub", "a.example").set_function(lambda: 5.0)
m.upstream_ratelimit_remaining.labels("hub").set(90)
print(os.getpid())
"""

WORKER_B = """
import os
for _ in range(5):
    m.lookup("blob", "hit")
m.served("cache", 50)
m.http_seconds.labels("blob").observe(2.0)
m.fills_in_progress.inc()
m.cache_budget.set(1000)
m.upstream_up.labels("hub").set_function(lambda: 1.0)
m.upstream_source_speed.labels("hub", "a.example").set_function(lambda: 9.0)
m.upstream_ratelimit_remaining.labels("hub").set(80)          # the later answer
print(os.getpid())
"""


def test_a_scrape_sums_the_workers_and_a_dead_worker_keeps_its_counts(tmp_path):
    shared = tmp_path / "metrics"
    shared.mkdir()
    a = run_worker(shared, WORKER_A)
    run_worker(shared, WORKER_B)
    samples = scrape(shared)
    assert value(samples, "mirror_cache_lookups_total", kind="blob", result="hit") == 8
    assert value(samples, "mirror_bytes_served_total", source="cache") == 150
    assert value(samples, "mirror_http_request_duration_seconds_count", route="blob") == 2
    assert value(samples, "mirror_http_request_duration_seconds_bucket", route="blob",
                 le="0.5") == 1
    assert value(samples, "mirror_http_request_duration_seconds_sum", route="blob") == 2.3
    assert value(samples, "mirror_fills_in_progress") == 2            # livesum
    assert value(samples, "mirror_fills_queued") == 2
    assert value(samples, "mirror_cache_budget_bytes") == 1000        # the same in all
    assert value(samples, "mirror_upstream_up", upstream="hub") == 0  # down in one: down
    assert value(samples, "mirror_upstream_source_speed_bytes_per_second", upstream="hub",
                 source="a.example") == 9
    assert value(samples, "mirror_upstream_ratelimit_remaining", upstream="hub") == 80
    # What the answering process says itself, once, and no per-process series.
    assert value(samples, "mirror_cache_size_bytes") == 4242
    assert value(samples, "mirror_hosted_size_bytes") == 0
    assert [n for n, _, _ in samples].count("mirror_build_info") == 1
    assert not [s for s in samples if "pid" in dict(s[1])]
    assert not [n for n, _, _ in samples if n.endswith("_created")]
    assert not [k for k, n in Counter((n, ls) for n, ls, _ in samples).items() if n > 1]
    # Families no worker used yet are described, as in one process.
    assert {"mirror_http_requests", "mirror_upstream_source_errors", "mirror_pushes"} <= families(
        shared)

    # A ended (the supervisor says so): its live gauges drop out, its counts stay.
    metrics.worker_exited(a, shared)
    samples = scrape(shared)
    assert value(samples, "mirror_fills_in_progress") == 1
    assert value(samples, "mirror_fills_queued") == 0
    assert value(samples, "mirror_upstream_up", upstream="hub") == 1
    assert value(samples, "mirror_cache_lookups_total", kind="blob", result="hit") == 8
    assert value(samples, "mirror_http_request_duration_seconds_count", route="blob") == 2
    assert value(samples, "mirror_cache_budget_bytes") == 1000

    # Its replacement counts on from there: nothing goes backwards.
    run_worker(shared, 'import os\nm.lookup("blob", "hit")\nprint(os.getpid())')
    samples = scrape(shared)
    assert value(samples, "mirror_cache_lookups_total", kind="blob", result="hit") == 9


def test_a_running_worker_keeps_writing_its_function_gauges(tmp_path):
    shared = tmp_path / "metrics"
    shared.mkdir()
    control = tmp_path / "up"
    control.write_text("1")
    worker = subprocess.Popen([sys.executable, "-c", LIVE_WORKER, str(control)],
                              env=env(shared), stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == b"ready\n"
        assert value(scrape(shared), "mirror_upstream_up", upstream="hub") == 1
        control.write_text("0")            # the worker finds hub down: others see it
        deadline = time.monotonic() + 10
        while (seen := value(scrape(shared), "mirror_upstream_up", upstream="hub")) != 0:
            assert time.monotonic() < deadline, f"still {seen}"
        assert value(scrape(shared), "mirror_fills_in_progress") == 1
    finally:
        worker.kill()
        worker.wait(timeout=10)
    metrics.worker_exited(worker.pid, shared)
    samples = scrape(shared)
    assert value(samples, "mirror_upstream_up", upstream="hub") is None
    assert value(samples, "mirror_fills_in_progress") == 0


def test_worker_exited_takes_the_directory_from_the_variable_too(tmp_path, monkeypatch):
    shared = tmp_path / "metrics"
    shared.mkdir()
    pid = run_worker(shared, "import os\nm.fills_in_progress.inc()\nprint(os.getpid())")
    assert value(scrape(shared), "mirror_fills_in_progress") == 1
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    metrics.worker_exited(pid)
    assert value(scrape(shared), "mirror_fills_in_progress") == 0


def test_without_the_variable_a_process_exposes_its_own_values(monkeypatch):
    run_worker(None, 'import os\nm.lookup("blob", "hit")\nprint(os.getpid())')
    samples = scrape(None)
    # Nothing of the other process, everything of this one.
    assert value(samples, "mirror_cache_lookups_total", kind="blob", result="hit") is None
    assert value(samples, "mirror_cache_size_bytes") == 4242
    assert value(samples, "mirror_fills_in_progress") == 0
    assert [n for n, _, _ in samples].count("mirror_build_info") == 1
    # Every family described, used or not.
    assert {"mirror_http_requests", "mirror_upstream_source_errors", "mirror_pushes"} <= families(
        None)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics.worker_exited(os.getpid())     # one process, no directory: nothing to do


# -- a real mirror with workers: 2 --------------------------------------------------------------


def scrape_mirror(mirror) -> dict[tuple, float]:
    """One /metrics answer, on a connection of its own (so from either worker)."""
    resp = httpx.get(f"{mirror.url}/metrics", timeout=10)
    assert resp.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def served_by(mirror, request: str) -> set[str]:
    """The workers ([w0], [w1]) the access log says answered ``request`` with a 200."""
    return set(re.findall(rf"\[(w\d+)\] mirror\.access: .*\"{re.escape(request)}\" 200",
                          mirror.log_text()))


def manifest_burst(mirror, image, clients: int) -> None:
    """``clients`` GETs of the image's tag at once, each on its own connection."""
    start = threading.Barrier(clients)
    statuses: list[int] = []

    def one() -> None:
        start.wait()
        with httpx.Client(base_url=mirror.url, timeout=30) as client:
            statuses.append(get_manifest(client, image.repo, image.tags[0]).status_code)
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * clients


def test_every_scrape_of_a_two_worker_mirror_counts_every_pull(make_mirror, upstream,
                                                                image_set):
    image = image_set.docker
    mirror = all_ready(make_mirror(hub_config(upstream, workers=2)))
    manifest_burst(mirror, image, 1)                  # the miss: cached from here on
    before = scrape_mirror(mirror)
    pulls = 0
    request = f"GET /v2/{image.repo}/manifests/{image.tags[0]}"
    for _ in range(4):               # until both workers answered some (the kernel decides)
        manifest_burst(mirror, image, 16)
        pulls += 16
        if served_by(mirror, request) == {"w0", "w1"}:
            break
    else:
        pytest.fail("16 clients never reached both workers in 4 tries")

    def counted(values) -> tuple[float, float]:
        return (value_of(values, "mirror_http_requests_total", route="manifest",
                         method="GET", status="200")
                - value_of(before, "mirror_http_requests_total", route="manifest",
                           method="GET", status="200"),
                sum(value_of(values, "mirror_cache_lookups_total", kind="manifest", result=r)
                    - value_of(before, "mirror_cache_lookups_total", kind="manifest", result=r)
                    for r in ("hit", "miss", "stale", "coalesced")))

    # A request is counted once answered: the last of the burst's may still be finishing.
    deadline = time.monotonic() + 10
    while counted(scrape_mirror(mirror)) != (pulls, pulls):
        assert time.monotonic() < deadline, counted(scrape_mirror(mirror))
        time.sleep(0.05)
    for _ in range(40):              # until both workers answered a scrape, each one counts all
        assert counted(scrape_mirror(mirror)) == (pulls, pulls)
        if served_by(mirror, "GET /metrics") == {"w0", "w1"}:
            break
    else:
        pytest.fail("40 scrapes never reached both workers")

    # A worker killed and replaced: its counts stay in every answer.
    victim = _children(mirror.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while victim in (children := _children(mirror.proc.pid)) or len(children) < 2:
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.1)
    for _ in range(6):
        values = scrape_mirror(mirror)
        assert counted(values) == (pulls, pulls)
        assert value_of(values, "mirror_fills_in_progress") == 0


def test_a_worker_killed_mid_download_drops_out_of_fills_in_progress(
        make_mirror, faulty_upstream, upstream, tmp_path):
    mirror = all_ready(make_mirror(hub_config(faulty_upstream, workers=2)))
    blob = fresh_blob(tmp_path, upstream, 4 * 1024 * 1024, "metrics")
    faulty_upstream.arm("drip", f"/blobs/{blob.digest}", method="GET", times=1,
                        chunk=64 * 1024, delay=0.1)            # ~6 s for the whole blob
    reader = threading.Thread(target=read_blob, args=(mirror, REPO, blob))
    reader.start()
    try:
        claim = mirror.data_dir / "tmp" / f"sha256-{blob.digest.split(':')[1]}.fill"
        owner = _wait_for_owner(claim)
        for _ in range(6):           # whichever worker answers
            assert value_of(scrape_mirror(mirror), "mirror_fills_in_progress") == 1
        os.kill(owner, signal.SIGKILL)
    finally:
        reader.join(60)
    deadline = time.monotonic() + 20
    while owner in (children := _children(mirror.proc.pid)) or len(children) < 2:
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.1)
    for _ in range(6):
        assert value_of(scrape_mirror(mirror), "mirror_fills_in_progress") == 0


def test_an_upstream_one_worker_found_down_is_down_in_every_scrape(make_mirror, faulty_upstream,
                                                                   image_set):
    """The worker that served the stale copy writes what it learnt before it answers, so
    a scrape right after, from either worker, already says down."""
    image = image_set.docker
    mirror = all_ready(make_mirror({**outage_config(faulty_upstream, retries=0), "workers": 2}))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, "v1"), image)
        time.sleep(1.1)                                  # tag_ttl: the next one revalidates
        faulty_upstream.server.stop()
        check_manifest(get_manifest(client, image.repo, "v1"), image)           # stale
    for _ in range(40):
        assert value_of(scrape_mirror(mirror), "mirror_upstream_up", upstream="docker.io") == 0
        if served_by(mirror, "GET /metrics") == {"w0", "w1"}:
            break
    else:
        pytest.fail("40 scrapes never reached both workers")
