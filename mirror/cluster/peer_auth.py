"""How replicas of one site prove to each other that a request is a peer's.

The site's **cluster secret** is 32 random bytes in PostgreSQL (``cluster_secret``, one
row, made by this component's migration): the first replica to start inserts one
(``INSERT ... ON CONFLICT DO NOTHING``) and every replica reads back the row that won,
so replicas sharing the database share the secret with nothing to configure.

An internal request carries ``Mirror-Peer-Auth: <expiry>.<hmac>``: the expiry in Unix
seconds and the hex HMAC-SHA256, under the secret, of ``METHOD\\npath\\nexpiry``. A
receiver accepts it while the expiry has not passed and is no more than ``MAX_AHEAD``
seconds ahead (replicas' clocks must agree to within ``SKEW``); anything else is
refused before the request is looked at. The secret never leaves this module's
objects: no ``repr``, no log line.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any

from . import schema

COMPONENT = "peer_auth"
HEADER = "Mirror-Peer-Auth"
LIFETIME = 60.0          # seconds a signature is good for
SKEW = 30.0              # seconds replicas' clocks may disagree by
MAX_AHEAD = LIFETIME + SKEW

MIGRATIONS: list[list[str]] = [
    [   # 1: the site's one secret
        """CREATE TABLE cluster_secret (
            id         integer PRIMARY KEY CHECK (id = 1),
            secret     bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
    ],
]

_VALUE = re.compile(r"([0-9]{1,12})\.([0-9a-f]{64})")


async def migrate(conn: Any) -> int:
    return await schema.apply(conn, COMPONENT, MIGRATIONS)


async def load_secret(conn: Any) -> bytes:
    """The site's secret, made by whichever replica asks first."""
    await conn.execute("INSERT INTO cluster_secret (id, secret) VALUES (1, $1) "
                       "ON CONFLICT (id) DO NOTHING", secrets.token_bytes(32))
    secret = await conn.fetchval("SELECT secret FROM cluster_secret WHERE id = 1")
    return bytes(secret)


class PeerAuth:
    """Signs this replica's requests and checks its peers'."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the cluster secret is too short")
        self._secret = secret

    def __repr__(self) -> str:
        return "PeerAuth(<secret>)"

    def _mac(self, method: str, path: str, expiry: int) -> str:
        message = f"{method.upper()}\n{path}\n{expiry}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, now: float | None = None) -> dict[str, str]:
        """The header that makes ``method path`` a peer's request for ``LIFETIME`` s."""
        expiry = int((time.time() if now is None else now) + LIFETIME)
        return {HEADER: f"{expiry}.{self._mac(method, path, expiry)}"}

    def check(self, method: str, path: str, value: str | None,
              now: float | None = None) -> bool:
        """Whether ``value`` (the header, or None) signs ``method path`` now."""
        if not value:
            return False
        m = _VALUE.fullmatch(value.strip())
        if m is None:
            return False
        expiry = int(m.group(1))
        now = time.time() if now is None else now
        if not (now - SKEW <= expiry <= now + MAX_AHEAD):
            return False
        return hmac.compare_digest(m.group(2), self._mac(method, path, expiry))
