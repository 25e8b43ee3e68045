"""The mirror under test, as a real process: ``python -m mirror serve`` on 127.0.0.1.

``MirrorProcess(tmpdir, config)`` writes ``config`` (a dict, as config.yml would
hold it; ``listen`` and ``data_dir`` are filled in) and starts the server with its
log in ``<tmpdir>/mirror.log``. ``.url``, ``.host``, ``.data_dir``, ``.log_text()``,
``.restart()``. What it cached is read (``is_cached``, ``cached_bytes``,
``stored_total``) and damaged (``replace_cached``, ``drop_cached``) wherever its
blobs are, the data directory or the bucket (``on_s3``, MIRROR_TEST_STORAGE=s3).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from .index_backend import mirror_index
from .ports import free_port, stop_process, wait_http
from .s3 import (
    drop_stored,
    is_stored,
    replace_stored,
    stored_bytes,
    stored_sizes,
    stored_total,
    with_test_storage,
)


class MirrorProcess:
    def __init__(self, tmpdir, config: dict, env: dict | None = None) -> None:
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if config.get('tls') else 'http'}://{self.host}"
        self.data_dir = self.dir / "data"
        # One process unless a test asks for more (the default is one per CPU): most
        # tests read one process's log and metrics.
        self.config = {"listen": self.host, "data_dir": str(self.data_dir), "workers": 1,
                       **config}
        self.config = with_test_storage(self.config)       # MIRROR_TEST_STORAGE=s3
        self.config.update(mirror_index(self.config))   # MIRROR_TEST_INDEX=postgres
        self.config_path = self.dir / "config.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.dir / "mirror.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> MirrorProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirror", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir)
        log.close()
        try:
            wait_http(f"{self.url}/v2/", timeout=20, alive=lambda: self.proc.poll() is None,
                      verify=False)
        except Exception:
            self.stop()
            raise RuntimeError(f"mirror did not start:\n{self.log_text()[-3000:]}") from None
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            stop_process(self.proc, kill=kill)
        self.proc = None

    def cached_path(self, digest: str) -> Path:
        """Where the mirror keeps a verified blob (or manifest) named ``digest``."""
        algorithm, hexpart = digest.split(":", 1)
        return self.data_dir / "blobs" / algorithm / hexpart[:2] / hexpart

    def cached_bytes(self, digest: str) -> bytes | None:
        """The verified blob (or manifest) committed under ``digest``, from the data
        directory or the bucket (None: not there)."""
        return stored_bytes(self.config, digest)

    def is_cached(self, digest: str) -> bool:
        return is_stored(self.config, digest)

    def stored_sizes(self) -> list[int]:
        """The size of each committed blob (or manifest), as files or as objects."""
        return stored_sizes(self.config)

    def stored_total(self) -> int:
        """Bytes of content held: files under blobs/ and tmp/, or objects in the bucket."""
        return stored_total(self.config)

    def replace_cached(self, digest: str, data: bytes) -> None:
        """Overwrite what is committed under ``digest`` (a test damaging the cache)."""
        replace_stored(self.config, digest, data)

    def drop_cached(self, digest: str) -> None:
        """Remove what is committed under ``digest``, leaving the index naming it."""
        drop_stored(self.config, digest)

    @property
    def on_s3(self) -> bool:
        return bool((self.config.get("storage") or {}).get("s3"))

    def reconfigure(self, **changes) -> None:
        """Rewrite the config file (takes effect at the next start)."""
        self.config.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def restart(self) -> MirrorProcess:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MirrorProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
