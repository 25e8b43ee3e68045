"""Relative paths in a config file are taken from the file's folder, not from the
directory the mirror was started in; the admin commands find the data directory the
way the server does (--config, then $MIRROR_CONFIG, then the embedded default)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from mirror.config import load_config
from tests.support.ports import free_port, stop_process, wait_http


def mirror_cli(*args, cwd, env=None, input=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MIRROR_CONFIG"} | (env or {})
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, input=input, timeout=60, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """/srv/mirror-like folder with a config using relative paths for everything,
    served by a mirror started from an unrelated directory."""
    root = tmp_path_factory.mktemp("relative")
    srv, elsewhere = root / "srv" / "mirror", root / "elsewhere"
    srv.mkdir(parents=True)
    elsewhere.mkdir()
    made = mirror_cli("certs", "127.0.0.1", "--out", str(srv / "certs"), cwd=elsewhere)
    assert made.returncode == 0, made.stderr
    added = mirror_cli("htpasswd", "add", "alice", "--file", str(srv / "auth" / "htpasswd"),
                       cwd=elsewhere, input="wonderland\n")
    assert added.returncode == 0, added.stderr
    port = free_port()
    (srv / "config.yml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "data_dir": "data",
        "tls": {"cert": "certs/server.crt", "key": "./certs/server.key"},
        "auth": {"htpasswd": "auth/htpasswd"}}))
    env = {k: v for k, v in os.environ.items() if k != "MIRROR_CONFIG"}
    with open(root / "mirror.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config",
                                 str(srv / "config.yml")], cwd=elsewhere, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        ca = ssl.create_default_context(cafile=srv / "certs" / "ca.crt")
        wait_http(f"https://127.0.0.1:{port}/v2/", timeout=20,
                  alive=lambda: proc.poll() is None, verify=ca)
    except Exception:
        stop_process(proc)
        pytest.fail((root / "mirror.log").read_text()[-2000:])
    yield srv, elsewhere, port
    stop_process(proc)


def test_serve_takes_tls_htpasswd_and_data_dir_from_the_config_files_folder(served):
    srv, elsewhere, port = served
    ca = ssl.create_default_context(cafile=srv / "certs" / "ca.crt")
    url = f"https://127.0.0.1:{port}/v2/"
    assert httpx.get(url, verify=ca).status_code == 401
    assert httpx.get(url, verify=ca, auth=("alice", "wonderland")).status_code == 200
    assert (srv / "data" / "index.db").is_file()
    assert not (elsewhere / "data").exists()


@pytest.mark.parametrize("how", ["--config", "$MIRROR_CONFIG"])
def test_admin_commands_find_the_data_directory_as_the_server_does(served, how):
    srv, elsewhere, _ = served
    config = str(srv / "config.yml")
    if how == "--config":
        args, env = ["--config", config], None
    else:
        args, env = [], {"MIRROR_CONFIG": config}
    stats = mirror_cli("stats", "--json", *args, cwd=elsewhere, env=env)
    assert stats.returncode == 0, stats.stderr
    assert Path(json.loads(stats.stdout)["data_dir"]) == srv / "data"
    for command in (["ls"], ["gc", "--dry-run"], ["verify"], ["unpin", "alpine:3"]):
        result = mirror_cli(*command, *args, cwd=elsewhere, env=env)
        assert "no cache in" not in result.stderr, (command, result.stderr)
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr
    assert not (elsewhere / "data").exists()


def test_relative_paths_in_a_file_resolve_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "mirror"
    (folder / "certs").mkdir(parents=True)
    (folder / "certs" / "server.crt").write_text("x")
    (folder / "certs" / "server.key").write_text("x")
    path = folder / "config.yml"
    path.write_text("data_dir: ../../var/cache\ntls: {cert: certs/server.crt, key: "
                    "certs/server.key}\nauth: {htpasswd: htpasswd}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/mirror/config.yml"))    # a relative --config works too
    assert config.data_dir.resolve() == tmp_path / "var" / "cache"
    assert config.tls.cert == folder / "certs" / "server.crt"
    assert config.tls.key == folder / "certs" / "server.key"
    assert config.auth.htpasswd == folder / "htpasswd"


def test_absolute_paths_stay_and_command_line_paths_are_from_the_cwd(tmp_path, monkeypatch):
    path = tmp_path / "config.yml"
    path.write_text(f"data_dir: {tmp_path / 'abs'}\n")
    monkeypatch.chdir("/")
    assert load_config(path).data_dir == tmp_path / "abs"
    assert load_config(path, data_dir="here").data_dir == Path("here")
    assert load_config(None).data_dir == Path("data")
