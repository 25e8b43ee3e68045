"""One upstream download per blob for a site of replicas (mirror/cluster/peer_*.py).

Three real mirror processes share one real PostgreSQL and one bucket on a real moto
S3 server (tests/support/replicas.py) in front of the real upstream registry (through
the fault-injecting proxy where a download must last long enough to be caught in the
middle).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import threading
import time

import asyncpg
import httpx
import pytest

from mirror.cluster.peer_auth import HEADER, PeerAuth
from tests.support import postgres as _postgres
from tests.support import s3 as _s3
from tests.support.client import RegistryClient
from tests.support.fixtures import big_layer_size
from tests.support.images import make_layer, push_blob
from tests.support.ports import free_port
from tests.support.postgres import fetch
from tests.support.replicas import Replicas, burst, pull_blob

# the fixtures this module uses (tests/support/postgres.py, s3.py)
postgres, pg_dsn, moto = _postgres.postgres, _postgres.pg_dsn, _s3.moto

REPO = "cluster/fresh"


def fresh_blob(tmp_path, upstream, size: int, tag: str):
    """A blob no mirror has seen, pushed to the real upstream."""
    blob = make_layer(tmp_path / tag, size, seed=int.from_bytes(os.urandom(4), "big"))
    with RegistryClient(upstream.url) as client:
        push_blob(client, None, REPO, blob)
    return blob


def _upstream_bytes(mirror) -> float:
    text = httpx.get(f"{mirror.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mirror_upstream_bytes_total{"))


@pytest.fixture
def replicas(tmp_path, pg_dsn, moto, upstream):
    with Replicas(tmp_path, 3, pg_dsn,
                  {"upstreams": {"docker.io": {"url": upstream.url}}}, s3=moto) as site:
        yield site


@pytest.fixture
def slow_replicas(tmp_path, pg_dsn, moto, faulty_upstream):
    with Replicas(tmp_path, 3, pg_dsn,
                  {"upstreams": {"docker.io": {"url": faulty_upstream.url}}}, s3=moto) as site:
        yield site


def test_sixteen_cold_clients_over_three_replicas_cause_one_upstream_get(
        replicas, upstream, tmp_path):
    blob = fresh_blob(tmp_path, upstream, big_layer_size(), "big")
    replicas.keep_versions()                  # each write of an object leaves a version
    mark = upstream.mark()
    began = time.monotonic()
    results = burst(replicas.round_robin(), REPO, blob, 16)
    took = time.monotonic() - began
    for n, digest, errors, _used in results:
        assert digest == blob.digest and n == blob.size, (n, errors, replicas.log_text())
    assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1, \
        replicas.log_text()
    # ...and one write of its object to the site's bucket: the replicas that streamed
    # the owner's bytes verified them and adopted the owner's object.
    assert replicas.writes(blob.digest) == 1, replicas.log_text()
    assert replicas.log_text().count("this one stored no copy of its own") == 2
    # Every replica served some of the 16, and the two that lost the lease streamed
    # the bytes from the one that won.
    log = replicas.log_text()
    assert log.count(f"blob {blob.digest}: streaming it from") == 2, log
    for mirror in replicas:
        assert f"GET /v2/{REPO}/blobs/{blob.digest}" in mirror.log_text()
    print(f"16 clients, 3 replicas, {blob.size} bytes: "
          f"{upstream.count('GET', f'/blobs/{blob.digest}', since=mark)} upstream GET, "
          f"{took:.2f} s")
    # The site fetched the blob's bytes from upstream once: the replicas that streamed
    # them from a peer do not count them as upstream's.
    fetched = [_upstream_bytes(m) for m in replicas]
    assert sum(fetched) == blob.size and sorted(fetched)[:2] == [0, 0], fetched
    owner = next(m for m, n in zip(replicas, fetched, strict=True) if n)
    assert 'route="peer"' in httpx.get(f"{owner.url}/metrics", timeout=10).text
    # Nothing left behind: no lease, no claim file.
    assert not fetch(replicas.dsn, "SELECT * FROM fill_leases")
    for mirror in replicas:
        assert not list((mirror.data_dir / "tmp").glob("*.fill"))


class BucketWatch:
    """Lists the site's bucket every few milliseconds in a thread; the first time the
    blob's object is listed, reads it whole: ``.seen`` holds the digest of what was
    there (None: never listed)."""

    def __init__(self, site, digest: str) -> None:
        self.site, self.digest = site, digest
        self.key = _s3.stored_key(site.storage["s3"], digest)
        self.seen: str | None = None
        self.looks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.seen is None:
            self.looks += 1
            if self.key in self.site.objects():
                data = self.site[0].cached_bytes(self.digest) or b""
                self.seen = f"sha256:{hashlib.sha256(data).hexdigest()}"
            time.sleep(0.02)

    def __enter__(self) -> BucketWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_killing_the_owner_mid_fill_the_others_finish_with_one_more_get(
        slow_replicas, faulty_upstream, upstream, tmp_path):
    """The owner is killed with more than one multipart part of the object uploaded:
    the bucket never lists an object for the digest before its bytes are the blob."""
    site = slow_replicas
    blob = fresh_blob(tmp_path, upstream, 12 * 1024 * 1024, "kill")
    faulty_upstream.arm("drip", f"/blobs/{blob.digest}", method="GET", times=1,
                        chunk=256 * 1024, delay=0.1)            # ~5 s for the whole blob
    watch = BucketWatch(site, blob.digest).__enter__()
    mark = upstream.mark()
    rr = site.round_robin()
    results: list = []
    clients = [threading.Thread(target=lambda m=m: results.append(
        pull_blob(rr, REPO, blob, first=m))) for m in [*site.mirrors, *site.mirrors]]
    for t in clients:
        t.start()
    # The owner is named in its lease (its URL and pid); let some bytes in first.
    deadline = time.monotonic() + 20
    while True:
        rows = fetch(site.dsn, "SELECT owner, done FROM fill_leases WHERE digest = $1",
                   blob.digest)
        if rows and rows[0]["done"] > 9 * 1024 * 1024:      # past the first 8 MiB part
            break
        assert time.monotonic() < deadline, site.log_text()
        time.sleep(0.1)
    owner = site.by_pid(int(rows[0]["owner"].rsplit(" pid ", 1)[1]))
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.proc.wait(10)
    for t in clients:
        t.join(120)
    watch.__exit__()
    assert watch.looks > 10 and watch.seen == blob.digest, (watch.looks, watch.seen)
    # what is left of the dead owner's upload is no object: at most its multipart upload
    # (an S3 lifecycle rule aborts those), none of the survivors'
    assert len(_s3.open_uploads({"storage": site.storage})) <= 1
    assert len(results) == 6
    cut = 0
    for n, digest, errors, _used in results:
        assert digest == blob.digest and n == blob.size, (n, errors, site.log_text())
        cut += bool(errors)
    assert cut >= 2, results             # the owner's own two clients were cut, resumed
    # The dead owner's GET, and the one of the replica that took its lease over.
    assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 2, site.log_text()
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 2
    # Nothing partial anywhere: the survivors serve the verified blob from the site's
    # bucket (no new upstream GET), which holds it under its digest.
    for mirror in site.mirrors:
        if mirror is not owner:
            n, digest, errors, _ = pull_blob(rr, REPO, blob, first=mirror)
            assert digest == blob.digest and not errors
    stored = owner.cached_bytes(blob.digest)
    assert stored is not None and f"sha256:{hashlib.sha256(stored).hexdigest()}" == blob.digest
    assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 2


def test_a_replica_that_wakes_to_find_the_blob_committed_adopts_it(
        slow_replicas, faulty_upstream, upstream, tmp_path):
    """The owner is killed; one survivor (frozen with SIGSTOP meanwhile) sleeps through
    the other's takeover and commit. Awake, it wins the free lease, finds the blob in
    the site's index and bucket, and adopts it: no third upstream GET, no second write
    (what the site's shared store says replaced the peer_recent_fills table)."""
    site = slow_replicas
    site.keep_versions()
    blob = fresh_blob(tmp_path, upstream, 4 * 1024 * 1024, "asleep")
    faulty_upstream.arm("drip", f"/blobs/{blob.digest}", method="GET", times=1,
                        chunk=64 * 1024, delay=0.1)            # ~6 s for the whole blob
    rr = site.round_robin()
    results: list = []
    clients = [threading.Thread(target=lambda m=m: results.append(
        pull_blob(rr, REPO, blob, first=m, tries=10))) for m in site.mirrors]
    clients[0].start()
    deadline = time.monotonic() + 20
    while not fetch(site.dsn, "SELECT 1 FROM fill_leases WHERE digest = $1", blob.digest):
        assert time.monotonic() < deadline, site.log_text()
        time.sleep(0.05)
    for t in clients[1:]:
        t.start()
    streaming = f"blob {blob.digest}: streaming it from"
    while not all(streaming in site[i].log_text() for i in (1, 2)):
        assert time.monotonic() < deadline, site.log_text()
        time.sleep(0.05)
    time.sleep(0.5)
    owner, taker, sleeper = site[0], site[1], site[2]
    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.proc.wait(10)
    broke = f"blob {blob.digest}: the stream from"
    while broke not in sleeper.log_text():
        assert time.monotonic() < deadline, site.log_text()
        time.sleep(0.01)
    os.kill(sleeper.proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while f"cached blob {blob.digest}" not in taker.log_text():
            assert time.monotonic() < deadline, site.log_text()
            time.sleep(0.05)
    finally:
        os.kill(sleeper.proc.pid, signal.SIGCONT)
    for t in clients:
        t.join(120)
    for n, digest, errors, _used in results:
        assert digest == blob.digest and n == blob.size, (n, errors, site.log_text())
    assert "committed by another replica of the site; this one stored no copy" \
        in sleeper.log_text(), sleeper.log_text()[-3000:]
    assert upstream.count("GET", f"/blobs/{blob.digest}") == 2, site.log_text()
    assert site.writes(blob.digest) == 1


def _peer_get(mirror, path: str, headers: dict | None = None) -> httpx.Response:
    return httpx.get(f"{mirror.url}{path}", headers=headers or {}, timeout=10)


def test_the_peer_endpoint_wants_the_site_signature(replicas, upstream, tmp_path):
    mirror = replicas[1]
    digest = "sha256:" + "ab" * 32
    path = f"/_mirror/peer/blobs/{digest}"
    assert _peer_get(mirror, path).status_code == 401
    wrong = PeerAuth(os.urandom(32)).sign("GET", path)
    assert _peer_get(mirror, path, wrong).status_code == 401
    # The site's secret is in PostgreSQL (made by the first replica; one row).
    rows = fetch(replicas.dsn, "SELECT secret FROM cluster_secret")
    assert len(rows) == 1
    auth = PeerAuth(bytes(rows[0]["secret"]))
    assert _peer_get(mirror, path, auth.sign("GET", path)).status_code == 404
    # signed for another path, or expired: refused
    other = f"/_mirror/peer/blobs/sha256:{'cd' * 32}"
    assert _peer_get(mirror, path, auth.sign("GET", other)).status_code == 401
    assert _peer_get(mirror, path, auth.sign("GET", path, now=time.time() - 600)
                     ).status_code == 401
    assert _peer_get(mirror, path, {HEADER: "garbage"}).status_code == 401
    # bad digests: 400 once signed, 401 before
    for bad in ("sha256:xyz", "sha256:" + "AB" * 32, "md5:" + "ab" * 16, "..%2F..%2Fetc"):
        bad_path = f"/_mirror/peer/blobs/{bad}"
        assert _peer_get(mirror, bad_path).status_code == 401
        signed = auth.sign("GET", httpx.URL(f"{mirror.url}{bad_path}").path)
        response = _peer_get(mirror, bad_path, signed)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"
    # and a cached blob is served, with Range
    blob = fresh_blob(tmp_path, upstream, 300_000, "small")
    n, digest, errors, _ = pull_blob(replicas.round_robin(), REPO, blob, first=mirror)
    assert digest == blob.digest, errors
    path = f"/_mirror/peer/blobs/{blob.digest}"
    full = _peer_get(mirror, path, auth.sign("GET", path))
    assert full.status_code == 200 and full.content == blob.path.read_bytes()
    part = _peer_get(mirror, path, {**auth.sign("GET", path), "Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == blob.path.read_bytes()[1000:]
    assert part.headers["Mirror-Blob-Size"] == str(blob.size)
    # the secret is in no log
    for m in replicas:
        assert bytes(rows[0]["secret"]).hex() not in m.log_text()


def test_a_replica_that_cannot_reach_postgresql_says_so_in_one_line(tmp_path):
    from tests.test_startup_failures import one_line, serve

    port = free_port()          # nothing listens there
    proc = serve(tmp_path, {"listen": f"127.0.0.1:{free_port()}",
                            "data_dir": str(tmp_path / "data"),
                            "index": {"postgres": {
                                "dsn": f"postgresql://mirror:hunter2@127.0.0.1:{port}/x"}}},
                 timeout=60)
    assert proc.returncode != 0
    line = one_line(proc)
    assert "index.postgres.dsn" in line and f"127.0.0.1:{port}" in line, line
    assert "hunter2" not in proc.stdout + proc.stderr


def test_any_worker_of_the_owner_serves_its_download_to_peers(
        tmp_path, pg_dsn, moto, faulty_upstream, upstream):
    """``workers: 2`` in the owner replica: a peer's request may reach the worker that
    downloads the blob or the other one, which follows its claim file."""
    config = {"upstreams": {"docker.io": {"url": faulty_upstream.url}}, "workers": 2}
    with Replicas(tmp_path, 1, pg_dsn, config, s3=moto) as site:
        owner = site[0]
        deadline = time.monotonic() + 30
        while "ready on http" not in owner.log_text():       # both workers up
            assert time.monotonic() < deadline, owner.log_text()
            time.sleep(0.05)
        blob = fresh_blob(tmp_path, upstream, 4 * 1024 * 1024, "workers")
        data = blob.path.read_bytes()
        faulty_upstream.arm("drip", f"/blobs/{blob.digest}", method="GET", times=1,
                            chunk=64 * 1024, delay=0.08)            # ~5 s
        client: list = []
        t = threading.Thread(target=lambda: client.append(
            pull_blob(site.round_robin(), REPO, blob)))
        t.start()
        deadline = time.monotonic() + 20
        while not fetch(site.dsn, "SELECT 1 FROM fill_leases WHERE digest = $1", blob.digest):
            assert time.monotonic() < deadline, owner.log_text()
            time.sleep(0.05)
        auth = PeerAuth(bytes(fetch(site.dsn, "SELECT secret FROM cluster_secret")[0][0]))
        path = f"/_mirror/peer/blobs/{blob.digest}"
        got: dict[int, bytes] = {}

        def peer(i: int) -> None:
            headers = {**auth.sign("GET", path), "Connection": "close"}
            if i % 2:
                headers["Range"] = f"bytes={i * 1000}-"
            r = httpx.get(f"{owner.url}{path}", headers=headers, timeout=60)
            got[i] = r.content if r.status_code in (200, 206) else b"HTTP %d" % r.status_code
        peers = [threading.Thread(target=peer, args=(i,)) for i in range(12)]
        for p in peers:
            p.start()
        for p in peers:
            p.join(60)
        t.join(60)
        assert client[0][1] == blob.digest, client
        for i, content in got.items():
            assert content == data[(i * 1000 if i % 2 else 0):], (i, len(content))
        assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 1
        served = set(re.findall(rf"\[(w\d)\] mirror\.access: .*\"GET {path}\" 20[06]",
                                owner.log_text()))
        assert served == {"w0", "w1"}, owner.log_text()[-3000:]


def test_a_live_owner_that_peers_cannot_reach_costs_a_second_get_not_a_failure(
        tmp_path, pg_dsn, moto, faulty_upstream, upstream):
    site = Replicas(tmp_path, 2, pg_dsn,
                    {"upstreams": {"docker.io": {"url": faulty_upstream.url}}}, s3=moto)
    # replica 0 advertises an address where nothing listens
    site[0].reconfigure(cluster={"advertise": f"http://127.0.0.1:{free_port()}",
                                 "lease_ttl": "2s"})
    with site:
        blob = fresh_blob(tmp_path, upstream, 4 * 1024 * 1024, "unreachable")
        faulty_upstream.arm("drip", f"/blobs/{blob.digest}", method="GET", times=1,
                            chunk=32 * 1024, delay=0.1)            # ~13 s
        rr = site.round_robin()
        results: list = []
        first = threading.Thread(target=lambda: results.append(
            pull_blob(rr, REPO, blob, first=site[0])))
        first.start()
        deadline = time.monotonic() + 20
        while not fetch(site.dsn, "SELECT 1 FROM fill_leases WHERE digest = $1", blob.digest):
            assert time.monotonic() < deadline, site.log_text()
            time.sleep(0.05)
        n, digest, errors, _ = pull_blob(rr, REPO, blob, first=site[1])
        assert digest == blob.digest and not errors, (errors, site.log_text())
        assert "downloading it from upstream too" in site[1].log_text()
        first.join(60)
        assert results[0][1] == blob.digest
        assert upstream.count("GET", f"/blobs/{blob.digest}") == 2


def test_the_cluster_migrations_apply_once(pg_dsn):
    from mirror.cluster import peer_join

    async def main():
        conn = await asyncpg.connect(pg_dsn)
        try:
            first = await peer_join.migrate(conn)
            again = await peer_join.migrate(conn)
            tables = {r[0] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            return first, again, tables
        finally:
            await conn.close()
    first, again, tables = asyncio.run(main())
    assert first == 5 and again == 0
    assert {"fill_leases", "cluster_secret", "peer_uploads"} <= tables
    # the site's shared store and index say who finished a blob: no table of its own
    assert "peer_recent_fills" not in tables


def test_a_site_whose_database_has_the_recent_fills_table_loses_it(pg_dsn):
    from mirror.cluster import peer_join, schema
    from mirror.cluster.peer_site import RECENT_MIGRATIONS

    async def main():
        conn = await asyncpg.connect(pg_dsn)
        try:
            await schema.apply(conn, "peer_recent_fills", RECENT_MIGRATIONS[:1])
            await conn.execute("INSERT INTO peer_recent_fills (digest, peer_url) "
                               "VALUES ('sha256:00', 'http://x')")
            await peer_join.migrate(conn)
            return (await conn.fetchval("SELECT to_regclass('peer_recent_fills')"),
                    await schema.version(conn, "peer_recent_fills"))
        finally:
            await conn.close()
    assert asyncio.run(main()) == (None, 2)


def test_an_owner_that_hangs_loses_its_lease_and_the_others_take_over(
        slow_replicas, faulty_upstream, upstream, tmp_path):
    """SIGSTOP breaks no connection: the others see the owner's lease expire."""
    site = slow_replicas
    blob = fresh_blob(tmp_path, upstream, 4 * 1024 * 1024, "hang")
    faulty_upstream.arm("drip", f"/blobs/{blob.digest}", method="GET", times=1,
                        chunk=64 * 1024, delay=0.1)            # ~6 s for the whole blob
    rr = site.round_robin()
    results: dict[int, tuple] = {}

    def pull(i: int) -> None:
        results[i] = pull_blob(rr, REPO, blob, first=site[i])
    first = threading.Thread(target=pull, args=(0,))
    first.start()
    deadline = time.monotonic() + 20
    while not fetch(site.dsn, "SELECT 1 FROM fill_leases WHERE digest = $1", blob.digest):
        assert time.monotonic() < deadline, site.log_text()
        time.sleep(0.05)
    others = [threading.Thread(target=pull, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    while not all(f"blob {blob.digest}: streaming it from" in site[i].log_text()
                  for i in (1, 2)):
        assert time.monotonic() < deadline, site.log_text()
        time.sleep(0.05)
    owner = site[0].proc.pid
    os.kill(owner, signal.SIGSTOP)
    try:
        for t in others:
            t.join(50)
        for i in (1, 2):
            n, digest, errors, _ = results[i]
            assert digest == blob.digest and n == blob.size and not errors, \
                (errors, site.log_text())
        log = site[1].log_text() + site[2].log_text()
        assert "its fill lease expired or passed to another replica" in log, log
    finally:
        os.kill(owner, signal.SIGCONT)
    first.join(60)
    assert results[0][1] == blob.digest, results[0]
    assert upstream.count("GET", f"/blobs/{blob.digest}") == 2, site.log_text()


def test_replicas_with_two_workers_each_still_cost_one_upstream_get(
        tmp_path, pg_dsn, moto, upstream):
    """A replica's workers settle who downloads with the claim file first (the others
    follow it); only that worker asks the site for the lease."""
    config = {"upstreams": {"docker.io": {"url": upstream.url}}, "workers": 2}
    with Replicas(tmp_path, 2, pg_dsn, config, s3=moto) as site:
        deadline = time.monotonic() + 30
        while not all("ready on http" in m.log_text() for m in site):
            assert time.monotonic() < deadline, site.log_text()
            time.sleep(0.05)
        for attempt in range(3):
            blob = fresh_blob(tmp_path, upstream, 12 * 1024 * 1024, f"w{attempt}")
            mark = upstream.mark()
            for n, digest, errors, _ in burst(site.round_robin(), REPO, blob, 16):
                assert digest == blob.digest and n == blob.size, (errors, site.log_text())
            assert upstream.count("GET", f"/blobs/{blob.digest}", since=mark) == 1
            served = set(re.findall(rf"\[(w\d)\] mirror\.access: .*\"GET /v2/{REPO}/blobs/"
                                    rf"{blob.digest}\" 200", site.log_text()))
            if served == {"w0", "w1"}:
                break
        else:
            pytest.fail("the clients never reached both workers")
