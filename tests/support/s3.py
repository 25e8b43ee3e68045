"""moto's S3 server (``moto[server]``) on a free 127.0.0.1 port, and a bucket per test.

``MotoServer`` runs ``python -m moto.server`` as a subprocess (stopped by its PID at
teardown); ``inspect`` is a plain boto3 client on it that tests use to look behind
``S3Store``'s back (objects, multipart uploads left over). The ``moto`` fixture is one
server per module; ``s3_bucket`` makes a fresh bucket per test, so tests do not see
each other's objects.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
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
