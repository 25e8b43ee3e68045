"""The server's local token: how commands on this machine (``mirror warm``) pull
through the server running on the same data directory, logins or not.

At each start the server writes a new random secret to ``data_dir/local.token``
(mode 0600, written to a temp file and renamed into place, so a reader sees the old
secret or the new one, never half of one). A request with
``Authorization: Bearer <that secret>`` is the local identity, which every ACL check
passes (auth.py). Whoever can read the data directory owns the cache anyway.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

NAME = "local.token"


def issue(data_dir: Path) -> str:
    """A new secret, written to ``data_dir/local.token``; blocks (file I/O)."""
    secret = secrets.token_urlsafe(32)
    path = Path(data_dir) / NAME
    temp = path.with_name(f".{NAME}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{secret}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    return secret


def read(data_dir: Path) -> str | None:
    """The running server's secret, or None if there is none (or it cannot be read)."""
    try:
        return (Path(data_dir) / NAME).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
