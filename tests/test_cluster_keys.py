"""Site-wide keys in PostgreSQL (mirror/cluster/keys.py): replicas starting at once all
end up with the one key the first of them made; names are checked before any SQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from mirror.cluster import keys
from tests.support import postgres as _postgres

postgres, pg_dsn = _postgres.postgres, _postgres.pg_dsn


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
