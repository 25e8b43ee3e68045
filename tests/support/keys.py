"""The signing keys a mirror under test uses, wherever it keeps them (mirror/signing_keys.py):
``data_dir/ui.key`` and ``data_dir/token.key`` on one machine, the site's ``cluster_keys``
rows when its config has ``index.postgres`` (so also under ``MIRROR_TEST_INDEX=postgres``).

``on_site(mirror)``: which of the two; ``signing_key(mirror, "ui" | "token")``: the key.
"""

from __future__ import annotations

import asyncio


def on_site(mirror) -> bool:
    return bool((mirror.config.get("index") or {}).get("postgres"))


def signing_key(mirror, name: str) -> bytes:
    if not on_site(mirror):
        if name == "ui":
            from mirror.web.session import load_key
            return load_key(mirror.data_dir)
        return (mirror.data_dir / f"{name}.key").read_bytes()
    import asyncpg

    async def read() -> bytes:
        conn = await asyncpg.connect(mirror.config["index"]["postgres"]["dsn"])
        try:
            value = await conn.fetchval("SELECT value FROM cluster_keys WHERE name = $1", name)
        finally:
            await conn.close()
        assert value is not None, f"no {name} key in cluster_keys"
        return bytes(value)

    return asyncio.run(read())
