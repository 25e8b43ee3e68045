"""The web page's upstream overview in a site of replicas (mirror/cluster/site_status.py):
each process's view of its upstreams reaches every replica's page through PostgreSQL.

Two real mirror processes share one real PostgreSQL and a bucket on the real moto
server (tests/support/replicas.py), in front of the real upstream registry through the
fault-injecting proxy; only replica A is asked while the upstream fails, and replica
B's page must say what A saw, until A stops. The merge rules (the live process that
looked last says up or down, a killed replica's say ends with its heartbeat, a stopped
one's at once, the leader prunes the long gone) against the real table, with no
server.
"""

from __future__ import annotations

import asyncio
import re
import time

import asyncpg
import httpx

from mirror.cluster import site_status
from mirror.cluster.site_status import SiteStatus
from mirror.upstream_status import KEPT, read_status
from tests.support import postgres as _postgres
from tests.support import s3 as _s3
from tests.support.postgres import fetch
from tests.support.replicas import Replicas
from tests.test_pull_through import get_manifest

# the fixtures this module uses (tests/support/postgres.py, s3.py)
postgres, pg_dsn, moto = _postgres.postgres, _postgres.pg_dsn, _s3.moto


def hub_row(mirror) -> str:
    """The docker.io row of the replica's overview page ("" while it has none)."""
    page = httpx.get(f"{mirror.url}/ui/", timeout=10)
    assert page.status_code == 200, page.text[:300]
    found = re.search(r'<tr data-upstream="docker.io">(.*?)</tr>', page.text, re.S)
    return found.group(1) if found else ""


def state(row: str) -> str | None:
    found = re.search(r'data-state="(\w+)"', row)
    return found.group(1) if found else None


def wait_row(mirror, check, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        row = hub_row(mirror)
        if check(row):
            return row
        assert time.monotonic() < deadline, f"{what}: {row}"
        time.sleep(0.2)


def test_what_one_replica_sees_of_an_upstream_shows_on_the_other_s_page(
        tmp_path, pg_dsn, moto, faulty_upstream, image_set):
    image = image_set.docker
    config = {"upstreams": {"docker.io": {"url": faulty_upstream.url}}}
    with Replicas(tmp_path, 2, pg_dsn, config, s3=moto) as site:
        a, b = site[0], site[1]
        with httpx.Client(base_url=b.url, timeout=60) as client:     # B sees it up
            assert get_manifest(client, image.repo, image.tags[0]).status_code == 200
        row = wait_row(b, lambda r: state(r) == "up", 10, "B's own view")
        assert f'data-seen-by="{b.url}"' in row

        faulty_upstream.arm("drop", times=None)          # then only A is asked: down
        with httpx.Client(base_url=a.url, timeout=60) as client:
            assert get_manifest(client, image.repo, "no-such-tag").status_code >= 500
        row = wait_row(b, lambda r: state(r) == "down", 5, "B's page shows A's down")
        assert f'data-seen-by="{a.url}"' in row and f'data-error-by="{a.url}"' in row

        faulty_upstream.clear()                          # back: A's probe finds it
        row = wait_row(b, lambda r: state(r) == "up", 20, "B's page shows A's up")
        assert f'data-seen-by="{a.url}"' in row
        assert f'data-error-by="{a.url}"' in row         # the last error stays

        faulty_upstream.arm("drop", times=None)          # down again for A, which stops:
        with httpx.Client(base_url=a.url, timeout=60) as client:
            assert get_manifest(client, image.repo, "no-such-tag-2").status_code >= 500
        wait_row(b, lambda r: state(r) == "down", 5, "B's page shows A's down again")
        a.stop()                                         # a stopped replica has no say
        row = wait_row(b, lambda r: state(r) == "up", 5, "A's say ends with its stop")
        assert f'data-seen-by="{b.url}"' in row and f'data-error-by="{a.url}"' in row


def _state(up: bool, at: float, **more) -> dict:
    return {"up": up, "since": at, "seen_at": at, "last_error": None, "last_error_at": None,
            "last_success_at": None, "ratelimit_remaining": None, "ratelimit_at": None,
            **more}


def test_the_site_s_rows_merge_by_the_rules_of_the_files(tmp_path, pg_dsn):
    async def main():
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
        try:
            a = SiteStatus(pool, "http://a.test", heartbeat=3600)
            b = SiteStatus(pool, "http://b.test", heartbeat=3600, leading=lambda: True)
            await a.start()
            await b.start()
            await a.write("hub", {"hub.test": _state(False, 200.0, last_error="refused",
                                                     last_error_at=200.0)})
            await b.write("hub", {"hub.test": _state(True, 100.0, last_success_at=150.0,
                                                     ratelimit_remaining=7,
                                                     ratelimit_at=150.0)})
            first = await read_status(tmp_path, shared=b)
            # A is killed: its heartbeat ages past ALIVE, its say on up or down ends
            async with pool.acquire() as conn:
                await conn.execute("UPDATE upstream_status SET heartbeat_at = now() - "
                                   "make_interval(secs => $1) WHERE replica = $2",
                                   site_status.ALIVE + 1, "http://a.test")
            killed = await read_status(tmp_path, shared=b)
            await a.write("hub", {"hub.test": _state(False, 200.0)})   # A beats again
            back = await read_status(tmp_path, shared=b)
            await a.stop()                                 # a stop ends its say at once
            stopped = await read_status(tmp_path, shared=b)
            async with pool.acquire() as conn:             # gone for longer than KEPT
                await conn.execute("UPDATE upstream_status SET heartbeat_at = now() - "
                                   "make_interval(secs => $1) WHERE replica = $2",
                                   KEPT + 60, "http://a.test")
            pruned = await b.prune()
            await b.stop()
            return first, killed, back, stopped, pruned
        finally:
            await pool.close()

    first, killed, back, stopped, pruned = asyncio.run(main())
    [hub] = first
    assert (hub.up, hub.since, hub.seen_by) == (False, 200.0, "http://a.test")
    assert (hub.last_error, hub.error_by, hub.last_success_at) == \
        ("refused", "http://a.test", 150.0)
    assert (hub.ratelimit_remaining, hub.ratelimit_at) == (7, 150.0)
    [hub] = killed
    assert (hub.up, hub.seen_by, hub.last_error) == (True, "http://b.test", "refused")
    assert not back[0].up and back[0].seen_by == "http://a.test"
    assert stopped[0].up and stopped[0].seen_by == "http://b.test"
    assert pruned == 1
    assert [r["replica"] for r in fetch(pg_dsn, "SELECT replica FROM upstream_status")] == \
        ["http://b.test"]


def test_a_site_whose_table_cannot_be_read_shows_this_replica_s_files(tmp_path, pg_dsn):
    async def main():
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
        shared = SiteStatus(pool, "http://a.test", heartbeat=3600)
        await shared.start()
        await shared.write("hub", {"hub.test": _state(False, 200.0)})
        await pool.close()                                 # PostgreSQL gone: no raise
        await shared.write("hub", {"hub.test": _state(True, 300.0)})
        return await read_status(tmp_path, shared=shared)
    assert asyncio.run(main()) == []                       # the (empty) files' view


def test_a_restarted_replica_with_the_same_pid_has_no_say_by_its_predecessor_s_rows(
        tmp_path, pg_dsn):
    async def main():
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
        try:
            before = SiteStatus(pool, "http://c.test", heartbeat=3600)
            await before.start()
            await before.write("hub", {"hub.test": _state(False, 500.0)})
            seen = await read_status(tmp_path, shared=before)
            # killed, restarted in its container: the same URL, the same pid
            after = SiteStatus(pool, "http://c.test", heartbeat=0.05)
            await after.start()
            await asyncio.sleep(0.3)                        # a few heartbeats
            later = await read_status(tmp_path, shared=after)
            await after.stop()
            return seen, later
        finally:
            await pool.close()
    seen, later = asyncio.run(main())
    assert not seen[0].up
    assert later[0].up and later[0].seen_by is None and later[0].since is None
