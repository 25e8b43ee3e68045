"""`mirror healthcheck`: GET /healthz where the config says the mirror listens, over
TLS when it is configured, exit 0 or one line and exit 1 (the Dockerfile's
HEALTHCHECK and other probes run it)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import yaml
from starlette.responses import PlainTextResponse

from tests.support.scripted import Scripted
from tests.test_pull_through import hub_config


def healthcheck(config: dict, tmp_path, name="check.yml") -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "unused"), **config}))
    return subprocess.run([sys.executable, "-m", "mirror", "healthcheck", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)


def healthy(result, url: str) -> None:
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == f"healthy: {url} answered 200\n"


def unhealthy(result, says: str) -> None:
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mirror: healthcheck: ")
    assert says in result.stderr, result.stderr


def test_healthcheck_asks_the_configured_address(make_mirror, upstream, tmp_path):
    mirror = make_mirror(hub_config(upstream))
    result = subprocess.run([sys.executable, "-m", "mirror", "healthcheck", "--config",
                             str(mirror.config_path)], capture_output=True, text=True, timeout=30)
    healthy(result, f"http://{mirror.host}/healthz")
    # A wildcard address is asked on the loopback of its family.
    healthy(healthcheck({"listen": f"0.0.0.0:{mirror.port}"}, tmp_path),
            f"http://{mirror.host}/healthz")
    unhealthy(healthcheck({"listen": f"[::]:{mirror.port}"}, tmp_path),
              f"http://[::1]:{mirror.port}/healthz: ")    # the mirror listens on IPv4 only
    mirror.stop()
    start = time.monotonic()
    unhealthy(healthcheck({"listen": mirror.host}, tmp_path), "connection refused")
    assert time.monotonic() - start < 3


def test_healthcheck_speaks_tls_when_the_config_has_it(make_mirror, upstream, tmp_path):
    certs = tmp_path / "certs"
    # The certificate names the public host only: the check does not verify it.
    made = subprocess.run([sys.executable, "-m", "mirror", "certs", "mirror.example",
                           "--out", str(certs)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    tls = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    mirror = make_mirror({**hub_config(upstream), "tls": tls})
    healthy(healthcheck({"listen": f"0.0.0.0:{mirror.port}", "tls": tls}, tmp_path),
            f"https://{mirror.host}/healthz")
    # Plain HTTP to the TLS port, and TLS to a plain port, both fail in one line.
    unhealthy(healthcheck({"listen": mirror.host}, tmp_path), f"http://{mirror.host}/healthz")
    plain = make_mirror(hub_config(upstream))
    unhealthy(healthcheck({"listen": plain.host, "tls": tls}, tmp_path), "TLS")


def test_healthcheck_fails_on_a_bad_answer_or_none_within_3_s(tmp_path):
    with Scripted(lambda r: PlainTextResponse("no\n", status_code=503)) as sick:
        unhealthy(healthcheck({"listen": sick.host}, tmp_path), "answered 503 Service Unavailable")
        assert [s.path for s in sick.requests] == ["/healthz"]
    with socket.socket() as silent:          # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        unhealthy(healthcheck({"listen": f"127.0.0.1:{silent.getsockname()[1]}"}, tmp_path),
                  "no answer within 3 s")
        assert 2.9 < time.monotonic() - start < 10
