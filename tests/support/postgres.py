"""A throw-away PostgreSQL cluster for the tests, from Debian's ``postgresql`` package.

``PostgresCluster`` runs ``initdb`` into a fresh temp dir (as the ``postgres`` user
when the tests run as root: PostgreSQL refuses to run as root), starts the server
with ``pg_ctl`` on a free 127.0.0.1 port with its unix socket in the temp dir, and
makes a login role ``mirror`` (trust authentication, no password) and a database
``mirror`` it owns. ``pg_ctl stop -m immediate`` stops it; nothing is killed by name.

Fixtures (import them into a test module):
- ``postgres``: one cluster per test session (per xdist worker);
- ``pg_dsn``: a new, empty database on it for each test, owned by ``mirror``; its DSN.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from .ports import free_port

__all__ = ["PostgresCluster", "postgres", "pg_dsn", "pg_bin"]

USER = "mirror"
DATABASE = "mirror"


def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has ``pg_ctl``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """One initdb'd cluster in a temp dir, started on a free loopback port."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="mirror-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self.port = 0
        self.host = "127.0.0.1"
        self._as_postgres = os.geteuid() == 0
        self._started = False

    # -- running things as the cluster's owner ------------------------------------------

    def _run(self, *args: str, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict = {}
        if self._as_postgres:
            kwargs = {"user": "postgres", "group": "postgres", "extra_groups": []}
        return subprocess.run(list(args), check=check, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root, stdin=subprocess.DEVNULL,
                              env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}, **kwargs)

    def _chown(self, path: Path) -> None:
        if self._as_postgres:
            shutil.chown(path, "postgres", "postgres")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> PostgresCluster:
        self._chown(self.root)
        self.sockets.mkdir()
        self._chown(self.sockets)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C")
        last = ""
        for _ in range(5):            # the free port may be taken by someone else meanwhile
            self.port = free_port()
            options = (f"-c listen_addresses={self.host} -p {self.port} "
                       f"-k {self.sockets} -c fsync=off -c synchronous_commit=off "
                       f"-c full_page_writes=off -c max_connections=200")
            done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                             str(self.log), "-w", "-t", "60", "-o", options, "start",
                             check=False, timeout=90)
            if done.returncode == 0:
                self._started = True
                break
            last = done.stdout + done.stderr + self._log_tail()
        else:
            raise RuntimeError(f"PostgreSQL did not start: {last}")
        self.psql(f"CREATE ROLE {USER} LOGIN CREATEDB")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        return self

    def stop(self) -> None:
        if self._started:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                      "-w", "stop", check=False)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- using it --------------------------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the unix socket; its output."""
        return self._run(str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                         "-h", str(self.sockets), "-p", str(self.port), "-U", "postgres",
                         "-d", database, "-At", "-c", sql).stdout

    def dsn(self, database: str = DATABASE) -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database owned by ``mirror``; its name."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name} OWNER {USER}")
        return name

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def postgres() -> PostgresCluster:
    """A PostgreSQL cluster for the whole session (scripts/test installs the package)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    with PostgresCluster(bin_dir) as cluster:
        yield cluster


@pytest.fixture
def pg_dsn(postgres: PostgresCluster) -> str:
    """The DSN of a new, empty database for this test."""
    name = postgres.new_database()
    yield postgres.dsn(name)
    postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def fetch(dsn: str, query: str, *args) -> list:
    """Run one query on ``dsn`` from a test (its own connection, closed after): the rows."""
    import asyncio

    import asyncpg

    async def main():
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()
    return asyncio.run(main())
