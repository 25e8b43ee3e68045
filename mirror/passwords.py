"""Users and their passwords: the htpasswd file and the checks against it.

- ``Htpasswd``: bcrypt entries as ``htpasswd -B`` writes them, re-read (off the event
  loop) when the file changes; a verified password is remembered briefly, so Basic
  auth on every request does not pay bcrypt every time. bcrypt runs on a small
  thread pool, never on the event loop, and an unknown user costs the same bcrypt
  as a known one (timing does not tell which users exist).
- ``Throttle``: failed logins counted per user and per client address; past
  ``auth.max_failures`` within ``auth.failure_window`` the key is refused (429).

Imports only config-free pieces below it: errors and fileio.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt

from .errors import TooManyRequests
from .fileio import run

VERIFIED_TTL = 300.0          # seconds a verified password is remembered
# bcrypt checks running at once (each holds a core), and waiting at most; past that a
# login is told to come back (429) instead of queueing without bound.
CHECKS_AT_ONCE = max(2, min(4, (os.cpu_count() or 2) // 2))
CHECKS_WAITING = 64
THROTTLE_KEYS = 10000         # user names and addresses with failures remembered


def hash_password(password: str, rounds: int = 10) -> str:
    """A bcrypt hash in the ``$2y$`` form Apache's ``htpasswd -B`` writes."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
    return "$2y$" + hashed[4:]


def read_htpasswd(path: Path) -> dict[str, str]:
    users = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            users[user] = hashed
    return users


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{u}:{h}\n" for u, h in sorted(users.items())))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Htpasswd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, str] = {}
        self._mtime: int | None = None
        self._verified: dict[tuple[str, bytes], float] = {}
        self._dummy: dict[bytes, bytes] = {}        # bcrypt setting -> a hash of nothing
        self._pool = ThreadPoolExecutor(CHECKS_AT_ONCE, thread_name_prefix="bcrypt")
        self._slots = asyncio.Semaphore(CHECKS_AT_ONCE)
        self._waiting = 0

    def _read(self, known: int | None) -> tuple[int | None, dict[str, str] | None]:
        """(mtime, users) of the file, users None when unchanged (worker thread)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None, {}
        return mtime, (read_htpasswd(self.path) if mtime != known else None)

    async def _load(self) -> None:
        mtime, users = await run(self._read, self._mtime)
        if users is not None:
            self._users, self._mtime = users, mtime
            self._verified.clear()

    async def reload(self) -> int:
        """Read the file again now, changed or not (SIGHUP); the number of users."""
        mtime, users = await run(self._read, None)
        self._users, self._mtime = users or {}, mtime
        self._verified.clear()
        return len(self._users)

    async def check(self, user: str, password: str) -> bool:
        await self._load()
        hashed = self._users.get(user)
        known = hashed is not None and hashed.startswith(("$2y$", "$2b$", "$2a$"))
        key = (user, hashlib.sha256(password.encode()).digest())
        if known and self._verified.get(key, 0) > time.monotonic():
            return True
        # An unknown user is checked against a hash of the same cost, so the answer
        # takes as long as for a real one: timing does not tell which users exist.
        target = hashed.encode() if known and hashed is not None else self._dummy_for(self._cost())
        ok = await self._checkpw(password.encode(), target) and known
        if ok:
            self._verified[key] = time.monotonic() + VERIFIED_TTL
        return ok

    def _cost(self) -> bytes:
        """The bcrypt setting ($2b$NN) most users have: what a real check costs."""
        costs = [h[4:6] for h in self._users.values() if h[:4] in ("$2y$", "$2b$", "$2a$")]
        cost = max(set(costs), key=costs.count) if costs else "10"
        return f"$2b${cost}$".encode()

    def _dummy_for(self, setting: bytes) -> bytes:
        if setting not in self._dummy:
            rounds = int(setting[4:6]) if setting[4:6].isdigit() else 10
            try:
                salt = bcrypt.gensalt(min(max(rounds, 4), 31))
            except ValueError:
                salt = bcrypt.gensalt(10)
            # A hash nobody's password matches: its password is random and forgotten.
            # The salt alone fixes the cost, so making it costs nothing.
            self._dummy[setting] = salt + b"." * 31
        return self._dummy[setting]

    async def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        if self._waiting >= CHECKS_WAITING:
            raise TooManyRequests("too many logins at once; try again shortly",
                                  headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            async with self._slots:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, _checkpw, password, hashed)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


class Throttle:
    """Failed logins per key (a user name, a client address). A key with ``limit``
    failures, or checks under way, within the last ``window`` seconds is refused
    until the oldest of them is ``window`` old. ``limit`` 0: never refuse."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def begin(self, keys: tuple[str, ...]) -> None:
        """Count a check starting for ``keys``, or raise TooManyRequests."""
        if not self.limit:
            return
        now = time.monotonic()
        for key in keys:
            times = self._recent(key, now)
            if len(times) + self._pending.get(key, 0) >= self.limit:
                wait = times[0] + self.window - now if times else 1.0
                raise TooManyRequests("too many failed logins; try again later",
                                      headers={"Retry-After": str(max(1, math.ceil(wait)))})
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1

    def end(self, keys: tuple[str, ...], ok: bool) -> None:
        if not self.limit:
            return
        now = time.monotonic()
        for key in keys:
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)
            if not ok:
                if key not in self._failures and len(self._failures) >= THROTTLE_KEYS:
                    self._forget(now)
                self._failures.setdefault(key, deque(maxlen=self.limit)).append(now)

    def _forget(self, now: float) -> None:
        """Make room: drop keys with no recent failure, else the oldest key."""
        for key in list(self._failures):
            self._recent(key, now)
        if len(self._failures) >= THROTTLE_KEYS:
            del self._failures[min(self._failures, key=lambda k: self._failures[k][-1])]
