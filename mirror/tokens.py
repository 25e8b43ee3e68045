"""Bearer tokens the mirror issues: short-lived HS256 JWTs shaped like Docker Hub's
(``access`` claims of type/name/actions), signed with a key kept in the data
directory (``load_key``: 32 random bytes, written safely, a short one refused), or with
several replicas the site's key in PostgreSQL (signing_keys.py decides which)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEEWAY = 10.0                 # clock skew allowed on token times
KEY_BYTES = 32                # the token signing key: at least this many random bytes


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WeakKey(Exception):
    """The token signing key file exists but is too short to trust."""


def load_key(path: Path) -> bytes:
    """The token signing key, made on first use: 32 random bytes, 0600, written to a
    temporary file, synced and renamed into place, so a crash or a full disk never
    leaves a short key behind. A shorter key (left by an older version) is refused."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        pass
    else:
        if len(key) < KEY_BYTES:
            raise WeakKey(f"{path}: the token signing key is {len(key)} bytes, at least "
                          f"{KEY_BYTES} are needed; remove the file and a new key is made "
                          f"(tokens issued so far become invalid)")
        return key
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return key


@dataclass(frozen=True)
class Grant:
    kind: str          # "repository" or "registry"
    name: str
    actions: tuple[str, ...]


class Tokens:
    def __init__(self, key: bytes, issuer: str, service: str, ttl: float) -> None:
        self._key = key
        self.issuer = issuer
        self.service = service
        self.ttl = ttl

    def issue(self, account: str, grants: list[Grant]) -> str:
        now = int(time.time())
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"iss": self.issuer, "sub": account, "aud": self.service, "iat": now,
                  "nbf": now, "exp": now + int(self.ttl), "jti": secrets.token_hex(12),
                  "access": [{"type": g.kind, "name": g.name, "actions": list(g.actions)}
                             for g in grants]}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = hmac.new(self._key, signing.encode(), hashlib.sha256).digest()
        return f"{signing}.{_b64(sig)}"

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid, current token for this service; else None."""
        try:
            head, body, sig = token.split(".")
            expected = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(sig)):
                return None
            if json.loads(_unb64(head)).get("alg") != "HS256":
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, binascii.Error, UnicodeDecodeError, AttributeError):
            return None
        now = time.time()
        if not isinstance(claims, dict) or claims.get("iss") != self.issuer \
                or claims.get("aud") != self.service:
            return None
        try:
            if not (float(claims["nbf"]) - LEEWAY <= now < float(claims["exp"]) + LEEWAY):
                return None
        except (KeyError, TypeError, ValueError):
            return None
        return claims
