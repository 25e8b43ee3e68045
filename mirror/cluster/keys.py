"""Keys every replica of a site must share, kept in PostgreSQL: the web page's session
key (a login on one replica holds on the others), the bearer-token signing key (a token
from one replica is good at all of them). On one machine these are files in the data
directory (web/session.py, tokens.py); in a site the first replica to start makes each
key and the others read it, so nothing is configured by hand (mirror/signing_keys.py
decides which, and is the one caller).

``cluster_keys(name PRIMARY KEY, value bytea)``: ``shared(conn, name)`` inserts 32 random
bytes unless the row is there (``ON CONFLICT DO NOTHING``, so of replicas starting at
once one wins) and returns what the table holds. Keys never reach a log.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from . import schema

COMPONENT = "keys"
KEY_BYTES = 32
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")

MIGRATIONS: list[list[str]] = [
    [   # 1: the keys table
        """CREATE TABLE cluster_keys (
            name       text PRIMARY KEY,
            value      bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
    ],
]


async def migrate(conn: Any) -> int:
    return await schema.apply(conn, COMPONENT, MIGRATIONS)


async def shared(conn: Any, name: str) -> bytes:
    """The site's key called ``name``, made now by whichever replica asks first."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a key name: {name[:40]!r}")
    await conn.execute("INSERT INTO cluster_keys (name, value) VALUES ($1, $2) "
                       "ON CONFLICT (name) DO NOTHING", name, secrets.token_bytes(KEY_BYTES))
    value = await conn.fetchval("SELECT value FROM cluster_keys WHERE name = $1", name)
    if value is None or len(value) < KEY_BYTES:
        raise RuntimeError(f"the site's {name} key in cluster_keys is missing or short")
    return bytes(value)
