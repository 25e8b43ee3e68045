"""moto's S3 server (``moto[server]``) on a free 127.0.0.1 port, and a bucket per test.

``MotoServer`` runs ``python -m moto.server`` as a subprocess (stopped by its PID at
teardown); ``inspect`` is a plain boto3 client on it that tests use to look behind
``S3Store``'s back (objects, multipart uploads left over). The ``moto`` fixture is one
server per module; ``s3_bucket`` makes a fresh bucket per test, so tests do not see
each other's objects.

``MIRROR_TEST_STORAGE=s3`` runs the whole suite's mirrors on S3: ``with_test_storage``
(called by ``MirrorProcess``) adds ``storage: {s3: ...}`` with a fresh bucket on one
moto server for the session, started on first use and stopped at exit.
``stored_bytes`` / ``stored_keys`` read what a mirror stored, from its bucket or its
data directory, whichever its config says.
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
    if os.environ.get("MIRROR_TEST_STORAGE", "") != "s3" or config.get("storage"):
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
        algorithm, hexpart = digest.split(":", 1)
        path = Path(config["data_dir"]) / "blobs" / algorithm / hexpart[:2] / hexpart
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
    client = _client(s3)
    try:
        return client.get_object(Bucket=s3["bucket"], Key=_key(s3, digest))["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


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
