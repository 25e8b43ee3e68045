"""Several mirror replicas of one site, as real processes, and a round-robin client.

``Replicas(tmpdir, n, dsn, config, s3=moto)`` makes ``n`` ``MirrorProcess``es sharing
one PostgreSQL (``index: {postgres: {dsn}}``) and one S3 bucket (``storage: {s3:
...}``, a fresh bucket on ``s3``, the moto server: ``tests/support/s3.py``; the
session's moto server when none is given), each advertising its own loopback URL to
the others (``cluster: {advertise, lease_ttl}``, 2 s by default so that taking over a
dead replica's lease is quick). That is the one valid site: the index rows every
replica reads name objects every replica can read. (A ``storage`` section in
``config`` is used as it is.) ``.bucket`` names the bucket; tests look at what is
stored with ``MirrorProcess.is_cached`` / ``cached_bytes`` and ``.objects()``.
``start()`` starts them all, ``stop()`` stops what still runs. ``.round_robin()``
hands out the replicas in turn (skipping those stopped), as a load balancer would.
``pull_blob(rr, repo, blob)`` reads a blob through it as a resuming client does: a
broken response is resumed with ``Range`` from the next replica.

``services(prefix)`` is what a benchmark of a site needs around its replicas (a
throw-away PostgreSQL, moto and the real upstream registry): ``with services("x") as
s: with s.replicas(3, config) as site: ...``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from .mirror import MirrorProcess
from .postgres import PostgresCluster, pg_bin
from .registry import RegistryProcess
from .s3 import MotoServer, s3_storage, session_moto, stored_key, stored_keys


class Replicas:
    def __init__(self, tmpdir, n: int, dsn: str, config: dict,
                 lease_ttl: str = "2s", s3: MotoServer | None = None) -> None:
        self.dir = Path(tmpdir)
        self.dsn = dsn
        if not config.get("storage"):
            self.moto: MotoServer | None = s3 or session_moto()
            config = {**config, "storage": s3_storage(self.moto)}
        else:
            self.moto = s3
        self.storage = config["storage"]
        self.mirrors: list[MirrorProcess] = []
        for i in range(n):
            mirror = MirrorProcess(self.dir / f"replica-{i}",
                                   {**config, "index": {"postgres": {"dsn": dsn}}})
            mirror.reconfigure(cluster={"advertise": mirror.url, "lease_ttl": lease_ttl})
            self.mirrors.append(mirror)

    @property
    def bucket(self) -> str | None:
        s3 = self.storage.get("s3")
        return s3["bucket"] if s3 else None

    def objects(self) -> list[str]:
        """Every object key in the site's bucket."""
        return stored_keys({"storage": self.storage})

    def keep_versions(self) -> None:
        """Turn on the bucket's versioning: from now on each write of an object (a
        PUT, a completed multipart upload) leaves a version that ``writes`` counts."""
        assert self.moto is not None and self.bucket
        self.moto.inspect().put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})

    def writes(self, digest: str) -> int:
        """How many times the blob ``digest`` was written to the bucket since
        ``keep_versions`` (versions of its object, delete markers apart)."""
        assert self.moto is not None and self.bucket
        key = stored_key(self.storage["s3"], digest)
        found = self.moto.inspect().list_object_versions(Bucket=self.bucket, Prefix=key)
        return sum(v["Key"] == key for v in found.get("Versions", []))

    def start(self) -> Replicas:
        # the first creates the cluster tables; the others start at once after it
        self.mirrors[0].start()
        errors: list[BaseException] = []

        def start(mirror: MirrorProcess) -> None:
            try:
                mirror.start()
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=start, args=(m,)) for m in self.mirrors[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        return self

    def stop(self) -> None:
        for mirror in self.mirrors:
            mirror.stop()

    def __enter__(self) -> Replicas:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __getitem__(self, i: int) -> MirrorProcess:
        return self.mirrors[i]

    def __len__(self) -> int:
        return len(self.mirrors)

    def by_pid(self, pid: int) -> MirrorProcess:
        return next(m for m in self.mirrors if m.proc is not None and m.proc.pid == pid)

    def round_robin(self) -> RoundRobin:
        return RoundRobin(self.mirrors)

    def log_text(self) -> str:
        return "\n".join(f"--- replica {i} ---\n{m.log_text()[-4000:]}"
                         for i, m in enumerate(self.mirrors))


class RoundRobin:
    """The replicas in turn, thread-safe; stopped (or killed) ones are skipped."""

    def __init__(self, mirrors: list[MirrorProcess]) -> None:
        self.mirrors = mirrors
        self._turn = itertools.cycle(range(len(mirrors)))
        self._lock = threading.Lock()

    def next(self) -> MirrorProcess:
        with self._lock:
            for _ in range(len(self.mirrors)):
                mirror = self.mirrors[next(self._turn)]
                if mirror.proc is not None and mirror.proc.poll() is None:
                    return mirror
        raise RuntimeError("no replica is running")


def pull_blob(rr: RoundRobin, repo: str, blob, tries: int = 6,
              first: MirrorProcess | None = None) -> tuple[int, str, list, list]:
    """(bytes, sha256 digest of them, errors met, replicas' URLs used) of reading
    ``blob`` through the replicas, each broken response resumed with ``Range`` on the
    next replica. Raises nothing: the caller checks the digest and the errors."""
    h = hashlib.sha256()
    n = 0
    errors: list = []
    used: list[str] = []
    mirror = first or rr.next()
    for _ in range(tries):
        used.append(mirror.url)
        headers = {"Range": f"bytes={n}-"} if n else {}
        try:
            with httpx.stream("GET", f"{mirror.url}/v2/{repo}/blobs/{blob.digest}",
                              headers=headers, timeout=60) as resp:
                if resp.status_code not in (200, 206) or (n and resp.status_code != 206):
                    errors.append(f"{mirror.url}: HTTP {resp.status_code} "
                                  f"{resp.read()[:200]!r}")
                else:
                    for chunk in resp.iter_raw():
                        h.update(chunk)
                        n += len(chunk)
                    return n, f"sha256:{h.hexdigest()}", errors, used
        except httpx.HTTPError as exc:
            errors.append(f"{mirror.url}: {type(exc).__name__}: {exc}")
        mirror = rr.next()
    return n, f"sha256:{h.hexdigest()}", errors, used


@dataclass
class Services:
    """A throw-away PostgreSQL, moto server and upstream registry (``services``)."""

    tmp: Path
    pg: PostgresCluster
    moto: MotoServer
    upstream: RegistryProcess

    def replicas(self, n: int, config: dict, name: str | None = None) -> Replicas:
        """``n`` replicas on a fresh database and bucket (not started)."""
        return Replicas(self.tmp / (name or f"site-{n}"), n,
                        self.pg.dsn(self.pg.new_database()), config, s3=self.moto)


@contextlib.contextmanager
def services(prefix: str) -> Iterator[Services]:
    """For benchmarks: PostgreSQL, moto and the real upstream registry in a temporary
    directory, stopped on the way out (SystemExit if PostgreSQL is not installed)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed")
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    with PostgresCluster(bin_dir) as pg, MotoServer(tmp) as moto, \
            RegistryProcess(tmp / "upstream") as upstream:
        yield Services(tmp, pg, moto, upstream)


def burst(rr: RoundRobin, repo: str, blob, clients: int) -> list:
    """``clients`` threads, each given its first replica in turn, pull ``blob`` through
    ``rr`` at once (a barrier): ``pull_blob``'s results, in thread order."""
    results: list = [None] * clients
    start = threading.Barrier(clients)

    def one(i: int) -> None:
        first = rr.next()
        start.wait()
        results[i] = pull_blob(rr, repo, blob, first=first)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results
