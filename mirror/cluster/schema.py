"""Schema migrations in PostgreSQL, per component, applied once however many replicas
start at the same time.

``schema_versions(component PRIMARY KEY, version, applied_at)`` holds the version each
component's tables are at. ``apply(conn, component, migrations)`` runs, in one
transaction under a transaction-scoped advisory lock (so concurrent replicas take turns
and the second finds nothing to do), each migration above the recorded version, in
order, and records the last. Running it again is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_LOCK_KEY = 0x6D6972726F72        # "mirror": the advisory lock that serialises migrations

_VERSIONS = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component  text PRIMARY KEY,
    version    integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

Migration = Sequence[str]          # the statements of one version


async def version(conn: Any, component: str) -> int:
    """The version ``component``'s tables are at; 0 before its first migration."""
    exists = await conn.fetchval("SELECT to_regclass('schema_versions') IS NOT NULL")
    if not exists:
        return 0
    found = await conn.fetchval(
        "SELECT version FROM schema_versions WHERE component = $1", component)
    return int(found or 0)


async def apply(conn: Any, component: str, migrations: Sequence[Migration]) -> int:
    """Bring ``component`` to ``len(migrations)`` (migration i makes version i + 1);
    the number of migrations run."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(_VERSIONS)
        current = await version(conn, component)
        if current > len(migrations):
            raise RuntimeError(f"the database's {component} schema is at version "
                               f"{current}, newer than this mirror's {len(migrations)}")
        for statements in migrations[current:]:
            for statement in statements:
                await conn.execute(statement)
        if current < len(migrations):
            await conn.execute(
                "INSERT INTO schema_versions (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, "
                "applied_at = now()", component, len(migrations))
        return len(migrations) - current
