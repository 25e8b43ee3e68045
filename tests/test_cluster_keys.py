"""Site-wide keys in PostgreSQL (mirror/cluster/keys.py): replicas starting at once all
end up with the one key the first of them made; names are checked before any SQL. And
wired (mirror/signing_keys.py): two real replicas sharing one real PostgreSQL accept
each other's bearer tokens and web sessions; `mirror migrate` makes the cluster's tables."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import httpx
import pytest
import yaml

from mirror.cluster import keys
from tests.support import postgres as _postgres
from tests.support.ports import free_port
from tests.support.replicas import Replicas
from tests.test_auth import USERS, auth_config, bearer, manifest, token
from tests.test_startup_failures import mirror_cmd, serve
from tests.test_web_actions import hidden, login, page_client, target

postgres, pg_dsn = _postgres.postgres, _postgres.pg_dsn

# what `mirror migrate` makes besides the index: the site's keys, the peer channel's, the
# upstream status every replica's page reads
TABLES = ["cluster_keys", "fill_leases", "cluster_secret", "peer_uploads", "upstream_status"]
GONE = ["peer_recent_fills"]        # dropped by a later migration (the store says it now)


def test_replicas_starting_at_once_share_one_key(pg_dsn):
    async def replica() -> tuple[bytes, bytes]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await keys.migrate(conn)
            return await keys.shared(conn, "ui"), await keys.shared(conn, "token")
        finally:
            await conn.close()

    async def main():
        return await asyncio.gather(*(replica() for _ in range(6)))

    found = asyncio.run(main())
    assert len(set(found)) == 1
    ui, token = found[0]
    assert len(ui) == keys.KEY_BYTES and len(token) == keys.KEY_BYTES and ui != token
    assert asyncio.run(replica()) == found[0]      # a later start reads the same keys


def test_bad_key_names_are_refused_before_sql(pg_dsn):
    async def main():
        conn = await asyncpg.connect(pg_dsn)
        try:
            await keys.migrate(conn)
            for name in ("", "UI", "x'; DROP TABLE cluster_keys; --", "a" * 40):
                with pytest.raises(ValueError):
                    await keys.shared(conn, name)
            assert await conn.fetchval("SELECT count(*) FROM cluster_keys") == 0
        finally:
            await conn.close()

    asyncio.run(main())


# -- wired: two real replicas sharing one real PostgreSQL ----------------------------------


def no_key_files(site: Replicas) -> None:
    """A site's keys are in PostgreSQL only: no replica writes ui.key or token.key."""
    for mirror in site.mirrors:
        assert not [p.name for p in mirror.data_dir.iterdir() if p.name.endswith(".key")]


def test_a_token_issued_by_one_replica_is_accepted_by_the_other(tmp_path, pg_dsn, upstream,
                                                                image_set):
    image = image_set.docker
    with Replicas(tmp_path, 2, pg_dsn, auth_config(upstream, tmp_path, token=True)) as site:
        a, b = site[0], site[1]
        got = bearer(token(a, f"repository:{image.repo}:pull", "alice", USERS["alice"]))
        for mirror in (b, a):
            assert httpx.get(f"{mirror.url}/v2/", headers=got, timeout=30).status_code == 200
            resp = manifest(mirror, image.repo, image.tags[0], got)
            assert resp.status_code == 200, (mirror.url, resp.text)
        # and the key is the site's, not anyone's: a forged token is refused by both
        forged = {"Authorization": got["Authorization"][:-4] + "AAAA"}
        for mirror in (a, b):
            resp = httpx.get(f"{mirror.url}/v2/", headers=forged, timeout=30)
            assert resp.status_code == 401 and "invalid_token" in resp.headers["www-authenticate"]
        no_key_files(site)


def test_a_web_login_on_one_replica_holds_on_the_other(tmp_path, pg_dsn, upstream, image_set):
    image = image_set.docker
    with Replicas(tmp_path, 2, pg_dsn, auth_config(upstream, tmp_path, token=False)) as site:
        a, b = site[0], site[1]
        with page_client(a) as alice:
            assert login(alice, "alice", USERS["alice"]).status_code == 303
            cookies = dict(alice.cookies)
        forms = []
        for mirror in (b, a):
            with page_client(mirror, cookies=cookies) as client:
                resp = client.get("/ui/actions/pin", params=target(image))
                assert resp.status_code == 200, (mirror.url, resp.text[-500:])
                forms.append(hidden(resp.text))
        assert forms[0]["csrf"] and forms[0] == forms[1]     # one session, one CSRF token
        with page_client(b) as anonymous:                     # and without the cookie: not
            assert anonymous.get("/ui/actions/pin", params=target(image)).status_code == 403
        no_key_files(site)


def test_mirror_migrate_creates_the_cluster_tables_once(tmp_path, pg_dsn):
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                      "index": {"postgres": {"dsn": pg_dsn}}}))
    first = mirror_cmd("migrate", "-c", str(config))
    again = mirror_cmd("migrate", "-c", str(config))
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    where = f"index.postgres.dsn ({pg_dsn})"
    index, cluster = first.stdout.splitlines()
    assert index.startswith(f"index {where}: applied "), first.stdout
    applied = re.fullmatch(rf"cluster {re.escape(where)}: applied (\d+) migrations \((.*)\)",
                           cluster)
    assert applied, first.stdout
    components = applied.group(2)
    assert int(applied.group(1)) >= 6 and "keys 1" in components.split(", ")
    assert "upstream_status 1" in components.split(", ")
    assert {"fill_lease", "peer_auth", "peer_uploads"} <= \
        {c.split()[0] for c in components.split(", ")}
    assert again.stdout.splitlines()[1] == f"cluster {where}: up to date ({components})"

    async def tables() -> list[str]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return [t for t in TABLES + GONE
                    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", t)]
        finally:
            await conn.close()

    assert asyncio.run(tables()) == TABLES
    assert not (tmp_path / "data" / "index.db").exists()


def test_a_short_site_key_stops_the_start_in_one_line(tmp_path, pg_dsn, upstream):
    """A ``cluster_keys`` row too short to trust (written by hand, say): the replica does
    not start, and says which key in which database, without the password or the key."""
    async def plant() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await keys.migrate(conn)
            await conn.execute("INSERT INTO cluster_keys (name, value) VALUES ('ui', $1)",
                               b"k" * 8)
        finally:
            await conn.close()

    asyncio.run(plant())
    proc = serve(tmp_path, {**auth_config(upstream, tmp_path, token=False),
                            "listen": f"127.0.0.1:{free_port()}",
                            "data_dir": str(tmp_path / "data"),
                            "index": {"postgres": {"dsn": pg_dsn}}})
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    # after the log lines of joining the site, one line saying why it stops
    errors = [line for line in proc.stderr.splitlines() if not re.match(r"\d{4}-", line)]
    assert len(errors) == 1, out
    line = errors[0]
    assert line.startswith("mirror: index.postgres.dsn: cannot read the site's keys"), line
    assert "cluster_keys" in line and "ui key" in line and "kkkkkkkk" not in line, line
