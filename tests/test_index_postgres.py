"""The index on PostgreSQL: its schema as versioned migrations (a fresh database, a
re-run that does nothing, two replicas migrating at once), `mirror migrate` on both
backends, the change log's numbers in commit order with no hole left by a rollback,
and a start-up that cannot reach the database is one line naming index.postgres.dsn
(its password masked).

The index's behaviour on PostgreSQL is tested where it is tested on SQLite (the
``index_config`` fixture of tests/support/index_backend.py: test_change_log,
test_cache_totals, test_hourly_counters, test_usage_flush, test_report_queries), and
the whole suite runs on it with ``MIRROR_TEST_INDEX=postgres``."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import yaml

from mirror.cluster import schema
from mirror.config_scale import IndexConfig, PostgresConfig
from mirror.index import open_index
from mirror.index.pg_schema import COMPONENT, MIGRATIONS
from mirror.index.postgres import PostgresDatabase
from mirror.models import HOSTED
from tests.support import postgres as _postgres
from tests.support.ports import free_port
from tests.test_pull_through import hub_config
from tests.test_startup_failures import mirror_cmd, one_line, serve

postgres, pg_dsn = _postgres.postgres, _postgres.pg_dsn     # the fixtures

BLOB = "sha256:" + "b" * 64


def test_a_fresh_database_gets_the_schema_and_a_second_run_does_nothing(pg_dsn):
    async def run() -> tuple[str, str, int, set[str]]:
        first = await PostgresDatabase.open(PostgresConfig(pg_dsn))
        await first.close()
        second = await PostgresDatabase.open(PostgresConfig(pg_dsn))
        await second.close()
        conn = await asyncpg.connect(pg_dsn)
        try:
            tables = {r[0] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            return first.migration, second.migration, await schema.version(conn, COMPONENT), \
                tables
        finally:
            await conn.close()
    first, second, version, tables = asyncio.run(run())
    assert first == f"applied 1 migration, now at schema version {len(MIGRATIONS)}"
    assert second == f"up to date (schema version {len(MIGRATIONS)})"
    assert version == len(MIGRATIONS)
    assert {"blobs", "manifests", "tags", "repo_links", "pins", "changes", "change_seq",
            "hourly", "counters", "referrers", "schema_versions"} <= tables


def test_two_replicas_migrating_at_once_take_turns(pg_dsn):
    async def run() -> list[str]:
        opened = await asyncio.gather(*(PostgresDatabase.open(PostgresConfig(pg_dsn))
                                        for _ in range(3)))
        for db in opened:
            await db.close()
        return sorted(db.migration for db in opened)
    found = asyncio.run(run())
    assert found[0].startswith("applied 1 migration")
    assert all(m.startswith("up to date") for m in found[1:]), found


def test_the_change_log_is_in_commit_order_and_a_rollback_leaves_no_hole(pg_dsn, tmp_path):
    """A writer that took its number first but commits last must not be skipped by a
    reader that read past it meanwhile: writers take turns from their first change
    (the writer lock), so the second waits; a rolled-back write (a dry-run sweep,
    which deletes rows and rolls back) leaves no hole in the numbers."""
    config = IndexConfig(postgres=PostgresConfig(pg_dsn))

    async def run() -> None:
        index = await open_index(tmp_path, config, flush=False)
        reader = await open_index(tmp_path, config, flush=False)
        try:
            async with index.db.writing() as tx:        # a slow writer, not committed yet
                await tx.execute("INSERT INTO blobs (digest, size, first_seen, last_access) "
                                 "VALUES (?, 1, 0, 0)", (BLOB,))
                late = asyncio.ensure_future(reader.add_blob("sha256:" + "c" * 64, 2))
                await asyncio.sleep(0.3)
                assert not late.done()                  # the second writer waits its turn
                assert await reader.changes_since(0) == []
            await late
            changes = await reader.changes_since(0)
            assert [(c.seq, c.a) for c in changes] == [(1, BLOB), (2, "sha256:" + "c" * 64)]
            await index.link(HOSTED, "team/app", [BLOB])

            async def nothing(_: list[str]) -> None:
                pass
            swept = await index.sweep_hosted(time.time() + 10, True, nothing, dry_run=True)
            assert swept.links == [("team/app", BLOB)] and BLOB in swept.blobs
            await index.add_blob("sha256:" + "d" * 64, 3)
            changes = await reader.changes_since(3)
            assert changes is not None, "a hole in the change log"
            assert [(c.seq, c.kind) for c in changes] == [(4, "blob")]
        finally:
            await reader.close()
            await index.close()
    asyncio.run(run())


def write_config(tmp_path, index: dict | None) -> str:
    path = tmp_path / "config.yml"
    config = {"data_dir": str(tmp_path / "data")}
    if index is not None:
        config["index"] = index
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_mirror_migrate_says_what_it_did_in_one_line(tmp_path, pg_dsn):
    lite = write_config(tmp_path, None)
    first = mirror_cmd("migrate", "-c", lite)
    again = mirror_cmd("migrate", "-c", lite)
    db = tmp_path / "data" / "index.db"
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == f"index {db}: created the schema (schema version 1)\n"
    assert again.stdout == f"index {db}: up to date (schema version 1)\n"

    (tmp_path / "pg").mkdir()
    pg = write_config(tmp_path / "pg", {"postgres": {"dsn": pg_dsn}})
    first = mirror_cmd("migrate", "--config", pg)
    again = mirror_cmd("migrate", "--config", pg)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    # (and a second line for the cluster's tables: tests/test_cluster_keys.py)
    assert first.stdout.splitlines()[0] == (f"index index.postgres.dsn ({pg_dsn}): applied 1 "
                                            f"migration, now at schema version {len(MIGRATIONS)}")
    assert again.stdout.splitlines()[0].endswith(": up to date (schema version 1)")
    assert not (tmp_path / "pg" / "data" / "index.db").exists()


def test_an_unreachable_database_is_one_line_naming_the_dsn_without_its_password(
        tmp_path, upstream, postgres):
    port = free_port()                                 # nothing listens there
    dsn = f"postgresql://mirror:hunter2@127.0.0.1:{port}/mirror"
    proc = serve(tmp_path, {**hub_config(upstream), "listen": f"127.0.0.1:{free_port()}",
                            "data_dir": str(tmp_path / "data"),
                            "index": {"postgres": {"dsn": dsn}}})
    assert proc.returncode == 1
    line = one_line(proc)
    # The server joins the site (mirror/cluster/peer_join.py) before it opens the index:
    # its line names the key and the masked DSN too.
    assert line.startswith("mirror: index.postgres.dsn"), line
    assert f"postgresql://mirror:***@127.0.0.1:{port}/mirror" in line, line
    assert "hunter2" not in proc.stdout + proc.stderr
    assert not (tmp_path / "data" / "index.db").exists()

    missing = postgres.dsn("no_such_database")
    proc = serve(tmp_path, {**hub_config(upstream), "listen": f"127.0.0.1:{free_port()}",
                            "data_dir": str(tmp_path / "data"),
                            "index": {"postgres": {"dsn": missing}}})
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith("mirror: index.postgres.dsn") and missing in line, line
    assert 'database "no_such_database" does not exist' in line, line

    proc = mirror_cmd("stats", "--config", str(tmp_path / "config.yml"))
    assert proc.returncode == 1
    assert one_line(proc).startswith(f"mirror: index.postgres.dsn ({missing}): ")
