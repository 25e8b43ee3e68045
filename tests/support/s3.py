"""moto's S3 server (``moto[server]``) on a free 127.0.0.1 port, and a bucket per test.

``MotoServer`` runs ``python -m moto.server`` as a subprocess (stopped by its PID at
teardown); ``inspect`` is a plain boto3 client on it that tests use to look behind
``S3Store``'s back (objects, multipart uploads left over). The ``moto`` fixture is one
server per module; ``s3_bucket`` makes a fresh bucket per test, so tests do not see
each other's objects.

``MIRROR_TEST_STORAGE=s3`` runs the whole suite's mirrors on S3: ``with_test_storage``
(called by ``MirrorProcess``) adds ``storage: {s3: ...}`` with a fresh bucket on one
moto server for the session, started on first use and stopped at exit.
``is_stored``, ``stored_bytes``, ``stored_keys``, ``stored_sizes`` and ``stored_total``
read what a mirror stored, from its bucket or its data directory, whichever its config
says; ``replace_stored`` and ``drop_stored`` damage it there, behind the mirror's back.
"""

from __future__ import annotations

import atexit
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .ports import free_port, stop_process, wait_http

ACCESS_KEY = "mirror-test"
SECRET_KEY = "mirror-test-secret"
REGION = "us-east-1"
_buckets = itertools.count()


class MotoServer:
    def __init__(self, tmpdir: Path) -> None:
        self.log_path = Path(tmpdir) / "moto.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> MotoServer:
        for attempt in range(attempts):   # retry: the free port may be taken
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                     "-p", str(self.port)],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            try:
                wait_http(self.url + "/moto-api/", alive=lambda: self.proc.poll() is None,
                          timeout=30)
                return self
            except (RuntimeError, TimeoutError) as exc:
                self.stop()
                if attempt == attempts - 1:
                    raise RuntimeError("moto server failed to start; log:\n"
                                       + self.log_path.read_text()[-3000:]) from exc
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def inspect(self):
        """A boto3 client on this server (synchronous; for assertions only)."""
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY)

    def make_bucket(self) -> str:
        name = f"mirror-test-{next(_buckets)}"
        self.inspect().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> MotoServer:
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_bucket(moto) -> str:
    return moto.make_bucket()


def s3_storage(server: MotoServer, bucket: str | None = None, **extra) -> dict:
    """The ``storage`` section of a mirror's config for a bucket on ``server``."""
    return {"s3": {"endpoint": server.url, "bucket": bucket or server.make_bucket(),
                   "region": REGION, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY,
                   **extra}}


_session: MotoServer | None = None


def session_moto() -> MotoServer:
    """One moto server for the whole test session, started on first use."""
    global _session
    if _session is None:
        server = MotoServer(Path(tempfile.mkdtemp(prefix="mirror-moto-")))
        server.start()
        atexit.register(server.stop)
        _session = server
    return _session


def with_test_storage(config: dict) -> dict:
    """``config`` with S3 storage on a fresh bucket when ``MIRROR_TEST_STORAGE=s3`` (and
    the test did not choose its own storage)."""
    if not using_s3() or config.get("storage"):
        return config
    return {**config, "storage": s3_storage(session_moto())}


def _key(s3: dict, digest: str) -> str:
    algorithm, hexpart = digest.split(":", 1)
    prefix = (s3.get("prefix") or "").strip("/")
    return f"{prefix + '/' if prefix else ''}blobs/{algorithm}/{hexpart[:2]}/{hexpart}"


def stored_key(s3: dict, digest: str) -> str:
    """The object key of blob ``digest`` in the bucket of the ``storage.s3`` section ``s3``."""
    return _key(s3, digest)


def _client(s3: dict):
    import boto3
    return boto3.client("s3", endpoint_url=s3["endpoint"], region_name=REGION,
                        aws_access_key_id=s3.get("access_key", ACCESS_KEY),
                        aws_secret_access_key=s3.get("secret_key", SECRET_KEY))


def stored_bytes(config: dict, digest: str) -> bytes | None:
    """The bytes a mirror with ``config`` committed under ``digest`` (None: none)."""
    s3 = (config.get("storage") or {}).get("s3")
    if s3 is None:
        try:
            return _fs_path(config, digest).read_bytes()
        except FileNotFoundError:
            return None
    client = _client(s3)
    try:
        return client.get_object(Bucket=s3["bucket"], Key=_key(s3, digest))["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def is_stored(config: dict, digest: str) -> bool:
    """Whether a mirror with ``config`` committed ``digest`` (a HEAD on S3: no body)."""
    s3 = (config.get("storage") or {}).get("s3")
    if s3 is None:
        return _fs_path(config, digest).is_file()
    import botocore.exceptions
    try:
        _client(s3).head_object(Bucket=s3["bucket"], Key=_key(s3, digest))
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def _fs_path(config: dict, digest: str) -> Path:
    algorithm, hexpart = digest.split(":", 1)
    return Path(config["data_dir"]) / "blobs" / algorithm / hexpart[:2] / hexpart


def replace_stored(config: dict, digest: str, data: bytes) -> None:
    """Put ``data`` under ``digest`` behind the mirror's back (a test damaging its cache:
    the file rewritten in place, or the object overwritten)."""
    s3 = (config.get("storage") or {}).get("s3")
    if s3 is None:
        with open(_fs_path(config, digest), "r+b") as f:
            f.write(data)
            f.truncate()
        return
    _client(s3).put_object(Bucket=s3["bucket"], Key=_key(s3, digest), Body=data)


def drop_stored(config: dict, digest: str) -> None:
    """Remove what is stored under ``digest`` behind the mirror's back."""
    s3 = (config.get("storage") or {}).get("s3")
    if s3 is None:
        _fs_path(config, digest).unlink()
        return
    _client(s3).delete_object(Bucket=s3["bucket"], Key=_key(s3, digest))


def stored_sizes(config: dict) -> list[int]:
    """The size of each blob (or manifest) a mirror committed: its files under
    ``blobs/``, or the objects under ``blobs/`` in its bucket."""
    s3 = (config.get("storage") or {}).get("s3")
    if s3 is None:
        return [p.stat().st_size for p in (Path(config["data_dir"]) / "blobs").glob("*/*/*")
                if p.is_file()]
    prefix = (s3.get("prefix") or "").strip("/")
    pages = _client(s3).get_paginator("list_objects_v2").paginate(
        Bucket=s3["bucket"], Prefix=f"{prefix + '/' if prefix else ''}blobs/")
    return [o["Size"] for page in pages for o in page.get("Contents", [])]


def stored_total(config: dict) -> int:
    """Bytes of content a mirror holds: what it committed, and on the filesystem its
    fills in progress under ``tmp/`` as well (the index is not counted)."""
    total = sum(stored_sizes(config))
    if not (config.get("storage") or {}).get("s3"):
        total += sum(p.stat().st_size for p in (Path(config["data_dir"]) / "tmp").rglob("*")
                     if p.is_file())
    return total


def using_s3() -> bool:
    """Whether the suite's mirrors keep their blobs on S3 (``MIRROR_TEST_STORAGE=s3``)."""
    return os.environ.get("MIRROR_TEST_STORAGE", "") == "s3"


def stored_keys(config: dict) -> list[str]:
    """Every object key in a mirror's bucket."""
    s3 = config["storage"]["s3"]
    found = _client(s3).list_objects_v2(Bucket=s3["bucket"]).get("Contents", [])
    return sorted(o["Key"] for o in found)


def open_uploads(config: dict) -> list[str]:
    """Multipart uploads left in a mirror's bucket."""
    s3 = config["storage"]["s3"]
    return [u["Key"] for u in
            _client(s3).list_multipart_uploads(Bucket=s3["bucket"]).get("Uploads", [])]
