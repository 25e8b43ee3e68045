"""``workers: N``: one server in several processes over one data directory.

Real processes throughout: the mirror's supervisor and its workers (``workers: 2``)
in front of the real upstream registry, through the fault-injecting proxy where a
download has to last long enough to be caught in the middle. Whether a request
reached worker 0 or worker 1 is read from the access log (``[w0]``/``[w1]``).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import index_backend
from tests.support.client import RegistryClient, read_blob
from tests.support.images import make_layer, push_blob
from tests.support.ports import free_port

REPO = "workers/fresh"


def fresh_blob(tmp_path: Path, upstream, size: int, tag: str):
    """A blob no mirror has seen, pushed to the real upstream."""
    blob = make_layer(tmp_path / tag, size, seed=int.from_bytes(os.urandom(4), "big"))
    with RegistryClient(upstream.url) as client:
        push_blob(client, None, REPO, blob)
    return blob


def burst(mirror, blob, clients: int) -> list[tuple[int, str | None, object]]:
    """``clients`` GETs of the blob at once, each on its own connection."""
    results: list = [None] * clients
    start = threading.Barrier(clients)

    def one(i: int) -> None:
        start.wait()
        results[i] = read_blob(mirror, REPO, blob)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def workers_that_served(mirror, digest: str) -> set[str]:
    return set(re.findall(rf"\[(w\d+)\] mirror\.access: .*\"GET /v2/{REPO}/blobs/{digest}\" 200",
                          mirror.log_text()))


def index_rows(mirror, sql: str, *args) -> list[tuple]:
    """``sql`` on the mirror's index, whichever backend it has (index_backend.rows)."""
    return index_backend.rows(mirror.data_dir, mirror.config, sql, args)


def all_ready(mirror):
    """The mirror once the supervisor said every worker is ready (worker 0 answers
    before the others have started)."""
    deadline = time.monotonic() + 30
    while "ready on http" not in mirror.log_text():
        assert time.monotonic() < deadline, mirror.log_text()
        time.sleep(0.05)
    return mirror


@pytest.fixture
def two_workers(make_mirror, upstream):
    return all_ready(make_mirror({"workers": 2,
                                  "upstreams": {"docker.io": {"url": upstream.url}}}))


# -- the supervisor ---------------------------------------------------------------------------


def test_two_workers_say_ready_once_and_stop_cleanly(two_workers):
    log = two_workers.log_text()
    assert len(re.findall(r"ready on http://", log)) == 1, log
    assert re.search(r"ready on http://\S+ \(.*; 2 workers\)", log), log
    children = _children(two_workers.proc.pid)
    assert len(children) == 2, children
    two_workers.stop()
    assert two_workers.proc is None
    log = two_workers.log_text()
    assert "mirror stopped" in log
    assert (two_workers.data_dir / "lock").read_text() == ""      # a clean stop
    assert not [p for p in children if _alive(p)], "workers outlived the supervisor"


def test_a_killed_worker_is_replaced_and_the_server_keeps_serving(two_workers):
    victim = _children(two_workers.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = _children(two_workers.proc.pid)
        if victim not in children and len(children) == 2:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no replacement: {_children(two_workers.proc.pid)}")
    assert re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL; starting another",
                     two_workers.log_text())
    for _ in range(8):
        assert httpx.get(f"{two_workers.url}/v2/", timeout=10).status_code == 200


def test_workers_stop_when_the_supervisor_is_killed(two_workers, make_mirror, upstream):
    children = _children(two_workers.proc.pid)
    os.kill(two_workers.proc.pid, signal.SIGKILL)
    two_workers.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)]
    two_workers.proc = None
    # The lock went with the last of them: a new server starts on the directory.
    all_ready(two_workers.start())
    assert httpx.get(f"{two_workers.url}/v2/", timeout=10).status_code == 200


def test_a_second_server_is_refused_while_workers_hold_the_directory(two_workers, tmp_path):
    config = tmp_path / "second.yml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\ndata_dir: {two_workers.data_dir}\n"
                      "workers: 2\n")
    second = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"is in use by another mirror (pid {two_workers.proc.pid})" in second.stderr


# -- single flight across processes -----------------------------------------------------------


def test_sixteen_cold_clients_over_two_workers_cause_one_upstream_get(
        two_workers, upstream, tmp_path):
    """Fresh blobs until the 16 clients were served by both workers (the kernel hands
    connections to whichever worker accepts first)."""
    for attempt in range(4):
        blob = fresh_blob(tmp_path, upstream, 12 * 1024 * 1024, f"b{attempt}")
        mark = upstream.mark()
        results = burst(two_workers, blob, 16)
        for n, digest, error in results:
            assert error is None and digest == blob.digest and n == blob.size, (n, error)
        assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1
        if len(workers_that_served(two_workers, blob.digest)) == 2:
            break
    else:
        pytest.fail("16 clients never reached both workers in 4 tries")
    log = two_workers.log_text()
    assert re.search(rf"\[w\d\] mirror\.access: .*blobs/{blob.digest}\" 200 .* coalesced", log)
    cached = two_workers.cached_bytes(blob.digest)
    assert hashlib.sha256(cached).hexdigest() == blob.digest.split(":")[1]
    assert not list((two_workers.data_dir / "tmp").glob("*.fill"))


@pytest.fixture
def slow_two_workers(make_mirror, faulty_upstream):
    return all_ready(make_mirror({"workers": 2,
                                  "upstreams": {"docker.io": {"url": faulty_upstream.url}}}))


def test_killing_the_downloading_worker_leaves_nothing_partial_and_the_next_pull_works(
        slow_two_workers, faulty_upstream, upstream, tmp_path):
    mirror = slow_two_workers
    blob = fresh_blob(tmp_path, upstream, 4 * 1024 * 1024, "kill")
    faulty_upstream.arm("drip", f"/blobs/{blob.digest}", method="GET", times=1,
                        chunk=64 * 1024, delay=0.1)            # ~6 s for the whole blob
    results: list = []
    readers = [threading.Thread(target=lambda: results.append(read_blob(mirror, REPO, blob)))
               for _ in range(4)]
    for t in readers:
        t.start()
    claim = mirror.data_dir / "tmp" / f"sha256-{blob.digest.split(':')[1]}.fill"
    owner = _wait_for_owner(claim)
    time.sleep(1.0)                                         # some bytes in, some followers
    os.kill(owner, signal.SIGKILL)
    for t in readers:
        t.join(60)
    assert len(results) == 4
    for n, _, error in results:
        assert error is not None and n < blob.size, "a client got a complete-looking body"
    assert not mirror.is_cached(blob.digest)
    assert not index_rows(mirror, "SELECT 1 FROM blobs WHERE digest = ?", blob.digest)
    deadline = time.monotonic() + 20
    # replaced: the killed worker reaped (ps lists a zombie child too; the supervisor
    # removes its temp files as it reaps it) and another started
    while time.monotonic() < deadline:
        children = _children(mirror.proc.pid)
        if owner not in children and len(children) >= 2:
            break
        time.sleep(0.1)
    n, digest, error = read_blob(mirror, REPO, blob)
    assert error is None and digest == blob.digest and n == blob.size
    assert mirror.is_cached(blob.digest)
    assert not [p for p in (mirror.data_dir / "tmp").iterdir() if p.name.startswith(f"{owner}-")]


def _wait_for_owner(claim: Path) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            header = claim.read_bytes()
        except FileNotFoundError:
            header = b""
        # fill_shared's header: magic, generation, state, size, written, pid, ...
        if len(header) >= 36 and header[:4] == b"MFL2" and int.from_bytes(header[20:28],
                                                                          "little") > 0:
            return int.from_bytes(header[28:36], "little")
        time.sleep(0.05)
    raise AssertionError("no download started")


# -- the index, shared ------------------------------------------------------------------------


def test_usage_counted_by_every_worker_is_all_in_the_index(two_workers, upstream, tmp_path):
    blobs = [fresh_blob(tmp_path, upstream, 64 * 1024, f"u{i}") for i in range(6)]
    for blob in blobs:
        assert read_blob(two_workers, REPO, blob)[2] is None
    gets = 0

    def pull_all() -> None:
        nonlocal gets
        for _ in range(5):
            for blob in blobs:
                n, digest, error = read_blob(two_workers, REPO, blob)
                assert error is None and digest == blob.digest
                gets += 1
    threads = [threading.Thread(target=pull_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert gets == 4 * 5 * len(blobs)
    served_by = set(re.findall(r"\[(w\d)\] mirror\.access: .*/blobs/", two_workers.log_text()))
    two_workers.stop()                      # each worker flushes its counts as it stops
    hits = index_rows(two_workers, "SELECT sum(hits) FROM blobs WHERE digest IN "
                      f"({','.join('?' * len(blobs))})", *(b.digest for b in blobs))[0][0]
    # every cache hit counted once, whichever worker answered it (misses count none)
    assert hits == gets, (hits, served_by)
    assert served_by == {"w0", "w1"}


def test_removal_from_the_cli_is_seen_by_every_worker(two_workers, upstream, image_set):
    image = image_set.docker
    with httpx.Client(base_url=two_workers.url, timeout=30) as client:
        for _ in range(6):       # both workers have it in memory
            r = client.get(f"/v2/{image.repo}/manifests/{image.digest}",
                           headers={"Connection": "close"})
            assert r.status_code == 200
    rm = subprocess.run([sys.executable, "-m", "mirror", "rm", "--config",
                         str(two_workers.config_path), f"{image.repo}@{image.digest}"],
                        capture_output=True, text=True, timeout=60)
    assert rm.returncode == 0, rm.stderr
    time.sleep(2.5)                       # the workers look for out-of-process changes each second
    seen = len(two_workers.log_text())
    answers: list[tuple[str, str]] = []   # (worker, cache outcome), in the order logged
    for _ in range(30):
        r = httpx.get(f"{two_workers.url}/v2/{image.repo}/manifests/{image.digest}",
                      headers={"Connection": "close"}, timeout=30)
        assert r.status_code == 200 and r.content == image.manifest
        answers = re.findall(
            rf"\[(w\d)\] mirror\.access: .*manifests/{image.digest}\" 200 \S+ \S+ (\S+)",
            two_workers.log_text()[seen:])
        if {w for w, _ in answers} == {"w0", "w1"}:
            break
    # Neither worker answered from what it held before the rm: the first answer after it
    # fetched the manifest again, and a worker's first answer is a hit only once another
    # worker had fetched it again (the cache holds it again then, verified).
    assert answers and answers[0][1] == "miss", answers
    assert {w for w, _ in answers} == {"w0", "w1"}, answers
    refetched, first = False, set()
    for worker, outcome in answers:
        if worker not in first:
            first.add(worker)
            assert outcome == "miss" or refetched, answers
        refetched = refetched or outcome == "miss"


# -- helpers ----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return sorted(int(p) for p in out.split())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False



def test_the_budget_holds_whichever_worker_cached_the_content(make_mirror, upstream, tmp_path):
    """Eviction runs in worker 0 only; it learns what worker 1 cached from the index's
    change log, so the data directory stays inside max_size whoever cached what."""
    mirror = all_ready(make_mirror({"workers": 2, "max_size": "4MiB",
                                    "upstreams": {"docker.io": {"url": upstream.url}}}))
    blobs = [fresh_blob(tmp_path, upstream, 1024 * 1024, f"e{i}") for i in range(10)]
    for blob in blobs:
        for _ in range(2):                # new connections: both workers cache some
            n, digest, error = read_blob(mirror, REPO, blob)
            assert error is None and digest == blob.digest
    served = set(re.findall(r"\[(w\d)\] mirror\.access: .*/blobs/\S+\" 200 \S+ \S+ miss",
                            mirror.log_text()))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        on_disk = sum(p.stat().st_size for p in (mirror.data_dir / "blobs").rglob("*")
                      if p.is_file())
        if on_disk <= 4 * 1024 * 1024 * 0.9:
            break
        time.sleep(0.2)
    assert on_disk <= 4 * 1024 * 1024 * 0.9, (on_disk, served)
    assert served == {"w0", "w1"}, "one worker cached everything: nothing shown"


def test_sighup_reaches_every_worker(two_workers):
    os.kill(two_workers.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    said: set[str] = set()
    while time.monotonic() < deadline and len(said) < 2:
        said = set(re.findall(r"\[(w\d)\] mirror: SIGHUP: nothing to reload",
                              two_workers.log_text()))
        time.sleep(0.1)
    assert said == {"w0", "w1"}
    assert httpx.get(f"{two_workers.url}/v2/", timeout=10).status_code == 200


def test_after_an_unclean_stop_worker_0_reconciles_the_files(two_workers):
    """The supervisor killed: the lock file still names it, so the next start (worker 0,
    told by the new supervisor) walks the files and drops a stray one."""
    if two_workers.on_s3:
        pytest.skip("the walk of files does not apply to blobs in S3 (test_s3_storage.py "
                    "checks that it is skipped, and said so)")
    old = two_workers.proc.pid
    children = _children(old)
    os.kill(old, signal.SIGKILL)
    two_workers.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    two_workers.proc = None
    stray = two_workers.data_dir / "blobs" / "sha256" / "ab" / ("ab" * 32)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"not indexed")
    all_ready(two_workers.start())
    log = two_workers.log_text()
    assert re.search(rf"\[w0\] mirror\.cache: the previous mirror on .* \(pid {old}\) did not "
                     "stop cleanly", log), log[-2000:]
    assert not stray.exists()
