"""The bounded on-disk queue of one endpoint: ``data_dir/notifications/<name>.db``.

A SQLite file in WAL mode, one row per event (its JSON), in the order appended. Every
worker process appends to it (``BEGIN IMMEDIATE`` serialises them, and the count and
the insert happen under that one lock, so the bound holds across processes); the leader
reads from its head, sends, and deletes what the endpoint took. It survives a restart,
and a crash loses at most the events not yet flushed from memory (a fraction of a
second's). Why SQLite rather than append files: appends from several processes, removal
from the head and the count for the bound are each one statement with SQLite's locking,
where files would need a lock, an offset file and compaction of their own.

Every method blocks (disk I/O): the Notifier calls them through ``fileio.run``.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

DIR = "notifications"


class Queue:
    def __init__(self, data_dir: Path, name: str, limit: int) -> None:
        self.path = data_dir / DIR / f"{name}.db"
        self.limit = limit
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()      # one statement at a time on this connection

    def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS events "
                       "(id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)")
        except BaseException:
            db.close()
            raise
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{self.path} is not open")
        return self._db

    def append(self, bodies: list[str]) -> tuple[int, int]:
        """Append what fits under the bound, oldest first; (dropped, length after)."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                (count,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
                room = max(0, self.limit - count)
                kept = bodies[:room]
                db.executemany("INSERT INTO events (body) VALUES (?)", [(b,) for b in kept])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return len(bodies) - len(kept), count + len(kept)

    def head(self, n: int) -> list[tuple[int, str]]:
        """The ``n`` oldest events: (id, body)."""
        with self._lock:
            return self._conn().execute(
                "SELECT id, body FROM events ORDER BY id LIMIT ?", (n,)).fetchall()

    def remove_through(self, last_id: int) -> int:
        """Remove the events up to ``last_id`` (sent); the length after."""
        with self._lock:
            db = self._conn()
            db.execute("DELETE FROM events WHERE id <= ?", (last_id,))
            (count,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
            return count

    def length(self) -> int:
        with self._lock:
            (count,) = self._conn().execute("SELECT COUNT(*) FROM events").fetchone()
            return count
