"""The log: one format with timestamps for every line (uvicorn's too), text or JSON;
the access line names the user and the user agent; a TLS handshake on the plain-HTTP
port is explained once at debug level, not warned about on every pull. And
/metrics: mirror_build_info, no ``*_created`` series."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time

import httpx
import pytest

from mirror import __version__
from tests.test_auth import USERS, auth_config
from tests.test_pull_through import hub_config

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def stopped_log(mirror) -> str:
    mirror.stop()
    return mirror.log_text()


def test_every_text_line_has_a_timestamp_uvicorns_included(make_mirror, upstream):
    mirror = make_mirror(hub_config(upstream))
    httpx.get(f"{mirror.url}/v2/")
    lines = stopped_log(mirror).splitlines()
    assert any(" uvicorn: Started server process" in line for line in lines)
    assert any(" mirror.access: " in line for line in lines)
    assert [line for line in lines if not STAMP.match(line)] == []


def test_json_log_is_one_object_per_line_with_fields_for_access(make_mirror, upstream):
    mirror = make_mirror({**hub_config(upstream), "log_format": "json"})
    httpx.get(f"{mirror.url}/v2/", headers={"User-Agent": 'tester/1.0 "quoted"'})
    entries = [json.loads(line) for line in stopped_log(mirror).splitlines()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys()
    assert any(e["logger"] == "uvicorn" and "Started server process" in e["message"]
               for e in entries)
    access = [e for e in entries if e["logger"] == "mirror.access"
              and e["user_agent"].startswith("tester")]        # not start()'s polling
    assert len(access) == 1
    assert {k: access[0][k] for k in ("method", "path", "status", "user", "user_agent",
                                      "cache")} == {
        "method": "GET", "path": "/v2/", "status": 200, "user": "-",
        "user_agent": 'tester/1.0 "quoted"', "cache": "-"}


def test_access_line_names_the_user_and_the_user_agent(make_mirror, upstream, tmp_path):
    mirror = make_mirror(auth_config(upstream, tmp_path, token=False, acl=None,
                                     anonymous="pull"))
    agent = {"User-Agent": "containerd/1.7.2"}
    assert httpx.get(f"{mirror.url}/v2/", headers=agent,
                     auth=("alice", USERS["alice"])).status_code == 200
    assert httpx.get(f"{mirror.url}/v2/_catalog", headers=agent).status_code in (200, 401, 404)
    time.sleep(0.2)
    lines = [line for line in mirror.log_text().splitlines()
             if " mirror.access: " in line and "containerd" in line]    # not start()'s polling
    assert len(lines) == 2
    assert ' alice "GET /v2/" 200 ' in lines[0] and lines[0].endswith(' - "containerd/1.7.2"')
    assert ' - "GET /v2/_catalog" ' in lines[1] and lines[1].endswith('"containerd/1.7.2"')


def test_a_tls_handshake_on_the_plain_port_is_explained_once_at_debug(make_mirror, upstream):
    mirror = make_mirror({**hub_config(upstream), "log_level": "debug"})
    host, port = mirror.host.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    for _ in range(3):                    # what skopeo --tls-verify=false does on each pull
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            try:
                context.wrap_socket(raw).close()
                raise AssertionError("a TLS handshake succeeded on the plain-HTTP port")
            except ssl.SSLError:
                pass
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05hello")
        assert raw.recv(1024).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert httpx.get(f"{mirror.url}/v2/").status_code == 200        # plain HTTP as before
    log = stopped_log(mirror)
    assert "Invalid HTTP request" not in log
    explained = [line for line in log.splitlines()
                 if "TLS handshake came to this plain-HTTP" in line]
    assert len(explained) == 1 and " DEBUG mirror: " in explained[0]


def test_metrics_have_build_info_and_no_created_series(make_mirror, upstream):
    mirror = make_mirror(hub_config(upstream))
    httpx.get(f"{mirror.url}/v2/")
    text = httpx.get(f"{mirror.url}/metrics").text
    assert f'mirror_build_info{{version="{__version__}"}} 1.0' in text.splitlines()
    assert "mirror_http_requests_total{" in text
    assert [line for line in text.splitlines() if "_created" in line] == []


def test_log_format_and_shutdown_grace_are_checked(tmp_path):
    from mirror.config import ConfigError, load_config
    path = tmp_path / "config.yml"
    path.write_text("log_format: xml\n")
    with pytest.raises(ConfigError, match=r"log_format: expected text or json, got 'xml'"):
        load_config(path)
    path.write_text("shutdown_grace: soon\n")
    with pytest.raises(ConfigError, match=r"shutdown_grace: expected a duration"):
        load_config(path)
    path.write_text("log_format: JSON\nshutdown_grace: 5s\n")
    config = load_config(path)
    assert (config.log_format, config.shutdown_grace) == ("json", 5.0)
