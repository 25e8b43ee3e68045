"""The site's chores run on its leader only, and move when the leader dies: two real
mirror processes sharing one real PostgreSQL (``index: {postgres: {dsn}}``) and one
bucket on a real moto S3 server (``storage: {s3: ...}``), a real upstream registry,
SIGKILL.

The tests look at who says it leads (the log line, the ``mirror_cluster_leader``
gauge), and whose log shows an eviction run after content was pulled through it past
the site's budget.
"""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest

from tests.support import postgres as _postgres
from tests.support import s3 as _s3
from tests.support.client import RegistryClient, read_blob
from tests.support.images import make_layer, push_blob
from tests.support.s3 import s3_storage

# the fixtures this module uses (tests/support/postgres.py, s3.py)
postgres, pg_dsn, moto, s3_bucket = _postgres.postgres, _postgres.pg_dsn, _s3.moto, _s3.s3_bucket

REPO = "cluster/chores"
MiB = 1024 * 1024


def fresh_blobs(tmp_path, upstream, n: int, tag: str) -> list:
    """``n`` blobs of 1 MiB no mirror has seen, pushed to the real upstream."""
    blobs = []
    with RegistryClient(upstream.url) as client:
        for i in range(n):
            blob = make_layer(tmp_path / f"{tag}{i}", MiB,
                              seed=int.from_bytes(os.urandom(4), "big"))
            push_blob(client, None, REPO, blob)
            blobs.append(blob)
    return blobs


def pull(mirror, blobs) -> None:
    for blob in blobs:
        n, digest, error = read_blob(mirror, REPO, blob)
        assert error is None and digest == blob.digest, error


def leads(mirror) -> float | None:
    """The replica's ``mirror_cluster_leader`` (None: no answer)."""
    try:
        text = httpx.get(f"{mirror.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = re.search(r"^mirror_cluster_leader(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.05)
    return time.monotonic() - start


def evictions(mirror) -> int:
    return len(re.findall(r"evicted \d+ items", mirror.log_text()))


@pytest.fixture
def site(pg_dsn, moto, s3_bucket) -> dict:
    """What every replica of the test's site has in its config: the database, the bucket."""
    return {"index": {"postgres": {"dsn": pg_dsn}}, "storage": s3_storage(moto, s3_bucket)}


@pytest.fixture
def replica(make_mirror, upstream, site):
    def make():
        return make_mirror({"max_size": "4MiB",
                            "upstreams": {"docker.io": {"url": upstream.url}}, **site})
    return make


def test_only_the_leader_evicts_and_a_killed_leader_is_replaced(replica, upstream, tmp_path):
    a = replica()
    b = replica()
    assert "leader: this replica" in a.log_text()
    assert (leads(a), leads(b)) == (1.0, 0.0)
    # Past its budget through the follower: it does not evict...
    pull(b, fresh_blobs(tmp_path, upstream, 6, "b"))
    # ...the leader does, once content comes through it.
    pull(a, fresh_blobs(tmp_path, upstream, 6, "a"))
    wait_for(lambda: evictions(a) > 0, 15, a.log_text()[-3000:])
    time.sleep(1.5)                  # the follower's evictor looks each second: give it time
    assert evictions(b) == 0, b.log_text()[-3000:]
    assert "leader: this replica" not in b.log_text()
    assert (leads(a), leads(b)) == (1.0, 0.0)

    a.proc.kill()                    # SIGKILL: no goodbye to PostgreSQL
    a.proc.wait()
    took = wait_for(lambda: leads(b) == 1.0, 15, b.log_text()[-3000:])
    print(f"replica takeover after SIGKILL of the leader: {took:.2f}s")
    assert "leader: this replica" in b.log_text()
    pull(b, fresh_blobs(tmp_path, upstream, 6, "c"))
    wait_for(lambda: evictions(b) > 0, 15, b.log_text()[-3000:])
    # The index is the site's (PostgreSQL): the budget holds for what it records.
    text = httpx.get(f"{b.url}/metrics", timeout=5).text
    size = float(re.search(r"^mirror_cache_size_bytes (\S+)$", text, re.M).group(1))
    assert size <= 4 * MiB * 0.9 + MiB, size


def test_a_follower_delivers_its_own_notifications(make_mirror, upstream, site, tmp_path):
    """Each replica's queue is in its own data directory: its worker 0 sends it whoever
    leads the site, so an event seen by a follower is not lost (delivery is per replica,
    in order per replica)."""
    from tests.test_notifications import Receiver, endpoint

    receiver = Receiver().up()
    try:
        config = {"upstreams": {"docker.io": {"url": upstream.url}}, **site,
                  "notifications": {"endpoints": [endpoint(receiver)]}}
        a = make_mirror(config)
        b = make_mirror(config)
        assert (leads(a), leads(b)) == (1.0, 0.0)
        blobs = fresh_blobs(tmp_path, upstream, 2, "n")
        pull(b, blobs)
        deadline = time.monotonic() + 20
        while True:
            fetched = [e["target"]["digest"] for e in receiver.events()
                       if e["action"] == "mirror.fetch"
                       and e["source"]["addr"].endswith(f":{b.port}")]
            if fetched == [blob.digest for blob in blobs]:
                break
            assert time.monotonic() < deadline, receiver.events()
            time.sleep(0.05)
    finally:
        receiver.down()


def test_only_worker_0_of_each_replica_competes_and_its_replacement_competes_again(
        make_mirror, upstream, pg_dsn, site):
    """``workers: 2``: one leadership connection per replica (worker 0's); SIGKILL of the
    leading worker 0 (its supervisor replaces it): the site has one leader again soon,
    and the replacement competes again."""
    import asyncio

    import asyncpg

    from tests.test_workers import all_ready

    def connections() -> int:
        async def count() -> int:
            conn = await asyncpg.connect(pg_dsn)
            try:
                return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE "
                                           "application_name = 'mirror leadership'")
            finally:
                await conn.close()
        return asyncio.run(count())

    config = {"workers": 2, "upstreams": {"docker.io": {"url": upstream.url}}, **site}
    a = all_ready(make_mirror(config))
    b = all_ready(make_mirror(config))
    assert connections() == 2
    for _ in range(4):               # whichever worker answers /metrics: the same answer
        assert (leads(a), leads(b)) == (1.0, 0.0)
    found = re.findall(r"leader: this replica \(pid (\d+)\)", a.log_text())
    assert len(found) == 1, a.log_text()[-3000:]
    os.kill(int(found[0]), signal.SIGKILL)
    wait_for(lambda: re.search(r"worker 0 \(pid \d+\) was killed by SIGKILL", a.log_text()),
             15, a.log_text()[-3000:])
    wait_for(lambda: sorted([leads(a), leads(b)]) == [0.0, 1.0] and connections() == 2, 20,
             (a.log_text()[-2000:], b.log_text()[-2000:]))
