"""A real ``/usr/bin/docker-registry`` (distribution 2.8) on 127.0.0.1.

The process writes everything (gorilla's combined access log on stdout,
logrus on stderr) to ``<tmpdir>/registry.log``; ``requests()`` parses the
access-log lines out of it.  The access-log line is written when the
handler returns, i.e. *before* net/http flushes the tail of the response,
so a client that has received a full response can already find its line.
A request whose client hung up mid-body is logged (with its status, e.g.
200) only when the registry notices; use ``wait_count`` for those.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import yaml

from .ports import free_port, stop_process, wait_http

REGISTRY_BIN = "/usr/bin/docker-registry"

# 127.0.0.1 - - [23/Nov/2024:05:18:00 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "ua"
_ACCESS_RE = re.compile(
    r'^\S+ \S+ (?P<user>\S+) \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
)


class Request(NamedTuple):
    method: str
    path: str  # path with query string, as sent
    status: int


class RegistryProcess:
    """A throw-away registry with its own storage under ``tmpdir``.

    ``auth``: None (open), ``"htpasswd"`` (bcrypt entries for ``users``,
    realm ``test-registry``) or ``"token"`` (needs a started-or-not
    ``TokenServer``; its certificate becomes the rootcertbundle).
    """

    def __init__(self, tmpdir, auth: str | None = None,
                 users: dict[str, str] | None = None, token_server=None,
                 extra_config: dict | None = None):
        if auth not in (None, "htpasswd", "token"):
            raise ValueError(f"unknown auth {auth!r}")
        if auth == "token" and token_server is None:
            raise ValueError("auth='token' needs token_server")
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.users = dict(users if users is not None else {"alice": "secret"})
        self.token_server = token_server
        self.extra_config = dict(extra_config or {})   # e.g. {"proxy": {"remoteurl": ...}}
        self.storage_dir = self.dir / "storage"
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._start_mark = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- lifecycle ---------------------------------------------------------
    def start(self, attempts: int = 3) -> RegistryProcess:
        for attempt in range(attempts):  # retry: the free port may be taken
            self.port = free_port()
            self._write_config()
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(self.config_path)],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                )
            try:
                wait_http(self.url + "/", alive=lambda: self.proc.poll() is None)
                self._start_mark = len(self._all_requests())
                return self
            except (RuntimeError, TimeoutError) as exc:
                self.stop()
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"docker-registry failed to start; log:\n{self.log_text()[-3000:]}"
                    ) from exc
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- access log --------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _all_requests(self) -> list[Request]:
        """Parse the log once its size has stopped changing (max ~1 s)."""
        size, deadline = -1, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            new_size = self.log_path.stat().st_size
            if new_size == size:
                break
            size = new_size
            time.sleep(0.02)
        text = self.log_path.read_bytes().decode(errors="replace")
        complete = text[: text.rfind("\n") + 1]  # ignore a half-written line
        out = []
        for line in complete.splitlines():
            m = _ACCESS_RE.match(line)
            if m:
                out.append(Request(m["method"], m["path"], int(m["status"])))
        return out

    def mark(self) -> int:
        """A position in the access log; pass it to ``requests(since=...)``."""
        return len(self._all_requests())

    def requests(self, since: int | None = None) -> list[Request]:
        """(method, path_with_query, status) served since ``since`` (default:
        since ``start()`` finished; the readiness probe is excluded)."""
        return self._all_requests()[self._start_mark if since is None else since:]

    def count(self, method: str | None = None, path_substring: str = "",
              since: int | None = None, status: int | None = None) -> int:
        """How many requests match method (None = any), path substring and status."""
        return sum(
            1 for r in self.requests(since)
            if (method is None or r.method == method.upper())
            and path_substring in r.path
            and (status is None or r.status == status)
        )

    def wait_count(self, method: str | None, path_substring: str, n: int,
                   since: int | None = None, status: int | None = None,
                   timeout: float = 5) -> int:
        """Poll until ``count(...) >= n`` (e.g. for requests whose client hung
        up early: their line appears only once the registry notices)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.count(method, path_substring, since=since, status=status)
            if got >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    # -- config ------------------------------------------------------------
    def _write_config(self) -> None:
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text",
                    "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.auth == "htpasswd":
            htpasswd = self.dir / "htpasswd"
            htpasswd.write_text("".join(_bcrypt_line(u, p) for u, p in self.users.items()))
            config["auth"] = {"htpasswd": {"realm": "test-registry", "path": str(htpasswd)}}
        elif self.auth == "token":
            bundle = self.dir / "token-root.pem"
            bundle.write_bytes(self.token_server.cert_pem)
            config["auth"] = {"token": {
                "realm": self.token_server.realm,
                "service": self.token_server.service,
                "issuer": self.token_server.issuer,
                "rootcertbundle": str(bundle),
            }}
        config.update(self.extra_config)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def _bcrypt_line(user: str, password: str) -> str:
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                         capture_output=True, text=True).stdout
    return out.strip() + "\n"
