"""The mirror's two signing keys, and the one place that decides where they live: the
web page's session key (web/session.py signs its cookies and CSRF tokens with it) and
the bearer-token key (tokens.py signs what ``/token`` issues; only with ``auth.token``).

- One machine (no ``index.postgres``): files in the data directory, ``ui.key`` and
  ``token.key``, made at first use, as ever (every worker reads the one the first made).
- A site of replicas (``index.postgres`` set, ``on_site``): the site's keys in its
  PostgreSQL (cluster/keys.py, the rows ``ui`` and ``token``), made by the first replica
  that asks, so a web login made on one replica holds on the others and a token issued
  by one is good at all of them. No key file is read or written then.

``load(config, data_dir, pool)`` (``pool``: the site's asyncpg pool, cluster/peer_site.py)
gives ``Keys``, or ``CannotLoad`` with one line naming the file, or the key and the masked
DSN. Keys never reach a log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fileio, tokens
from .config import Config
from .web import session as web_session

TOKEN_FILE = "token.key"


class CannotLoad(Exception):
    """A key the mirror cannot read or make: one line, no key and no password in it."""


@dataclass(frozen=True)
class Keys:
    ui: bytes = field(repr=False)                   # the web page's sessions
    token: bytes | None = field(repr=False)         # bearer tokens; None: auth.token is off


def on_site(config: Config) -> bool:
    """Whether the keys are the site's (in PostgreSQL) rather than the data directory's."""
    return config.index.postgres is not None


def issues_tokens(config: Config) -> bool:
    return config.auth is not None and config.auth.token


async def load(config: Config, data_dir: Path, pool: Any = None) -> Keys:
    if on_site(config):
        if pool is None:
            raise ValueError("a site's keys are read through the site's pool")
        return await _from_site(config, pool)
    return await _from_files(config, Path(data_dir))


async def _from_files(config: Config, data_dir: Path) -> Keys:
    try:
        ui = await fileio.run(web_session.load_key, data_dir)
    except OSError as exc:
        raise CannotLoad(f"{data_dir / web_session.KEY_FILE}: cannot make the web page's "
                         f"session key: {exc.strerror or exc}") from None
    token = None
    if issues_tokens(config):
        path = data_dir / TOKEN_FILE
        try:
            token = await fileio.run(tokens.load_key, path)
        except tokens.WeakKey as exc:
            raise CannotLoad(str(exc)) from None
        except OSError as exc:
            raise CannotLoad(f"{path}: cannot make the token signing key: "
                             f"{exc.strerror or exc}") from None
    return Keys(ui, token)


async def _from_site(config: Config, pool: Any) -> Keys:
    import asyncpg  # type: ignore[import-untyped]    # a site has the "postgres" extra

    from .cluster import keys

    postgres = config.index.postgres
    assert postgres is not None
    try:
        async with pool.acquire() as conn:
            await keys.migrate(conn)
            ui = await keys.shared(conn, "ui")
            token = await keys.shared(conn, "token") if issues_tokens(config) else None
    except (OSError, RuntimeError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        why = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
        raise CannotLoad(f"index.postgres.dsn: cannot read the site's keys (cluster_keys) "
                         f"in {postgres.safe_dsn}: {why}") from None
    return Keys(ui, token)
