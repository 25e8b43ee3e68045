"""A start-up that cannot succeed is one line on stderr and a non-zero exit, never a
traceback or a hang: a port in use, a data directory the mirror cannot write, an
index.db it cannot write (which once hung `mirror serve` and `mirror stats` for ever:
aiosqlite's connection thread outlived the failed open). "ready" is logged only once
the socket is bound, and says whether TLS, logins and offline mode are on.

The tests run as root in CI, where file modes do not bite: the mirror is then run
without the capabilities that override them (setpriv), so it meets a read-only file
as any other user would."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys

import pytest
import yaml

from tests.support.ports import free_port
from tests.test_pull_through import hub_config

NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def mirror_cmd(*args: str, unprivileged: bool = False, cwd=None,
               timeout: float = 20) -> subprocess.CompletedProcess:
    """``python -m mirror ARGS``; ``unprivileged``: without root's power to write
    read-only files."""
    prefix = NO_OVERRIDE if unprivileged and os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def can_drop_privileges():
    if os.geteuid() != 0:
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): modes do not bite")
    probe = subprocess.run([*NO_OVERRIDE, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop capabilities here: {probe.stderr.strip()}")


def serve(tmp_path, config: dict, **kwargs) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return mirror_cmd("serve", "--config", str(path), cwd=tmp_path, **kwargs)


def one_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, out
    return lines[0]


def test_a_port_in_use_is_one_line_and_exit_1_before_anything_else(tmp_path, upstream):
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        proc = serve(tmp_path, {**hub_config(upstream), "listen": f"127.0.0.1:{port}",
                                "data_dir": str(tmp_path / "data")})
    assert proc.returncode == 1
    assert one_line(proc) == (f"mirror: cannot listen on 127.0.0.1:{port}: address already in "
                              "use (another mirror or registry? choose another --listen)")
    assert " ready on " not in proc.stdout + proc.stderr
    assert not (tmp_path / "data" / "index.db").exists()       # the cache was never opened


def test_a_data_dir_under_a_file_is_one_line(tmp_path, upstream):
    (tmp_path / "afile").write_text("")
    data_dir = tmp_path / "afile" / "data"
    proc = serve(tmp_path, {**hub_config(upstream), "listen": f"127.0.0.1:{free_port()}",
                            "data_dir": str(data_dir)})
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith(f"mirror: {data_dir}: Not a directory: ")
    assert "choose another data_dir" in line


def test_a_data_dir_the_mirror_cannot_write_is_one_line(tmp_path, upstream,
                                                        can_drop_privileges):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o555)
    try:
        proc = serve(tmp_path, {**hub_config(upstream), "listen": f"127.0.0.1:{free_port()}",
                                "data_dir": str(data_dir)}, unprivileged=True)
    finally:
        data_dir.chmod(0o755)
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith(f"mirror: {data_dir}/lock: Permission denied: the mirror (uid "), line
    assert "fix the owner or mode, or choose another data_dir" in line


@pytest.fixture
def read_only_index(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "blobs").mkdir(parents=True)
    (data_dir / "tmp").mkdir()
    db = sqlite3.connect(data_dir / "index.db")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.commit()
    db.close()
    (data_dir / "index.db").chmod(0o444)
    return data_dir


def test_an_index_the_mirror_cannot_write_fails_serve_at_once(tmp_path, upstream, read_only_index,
                                                              can_drop_privileges):
    proc = serve(tmp_path, {**hub_config(upstream), "listen": f"127.0.0.1:{free_port()}",
                            "data_dir": str(read_only_index)}, unprivileged=True)
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith(f"mirror: {read_only_index}/index.db: attempt to write a readonly "
                           "database: "), line
    assert "fix their owner or mode" in line


def test_an_index_the_mirror_cannot_write_fails_stats_at_once(tmp_path, read_only_index,
                                                              can_drop_privileges):
    proc = mirror_cmd("stats", "--data-dir", str(read_only_index), unprivileged=True)
    assert proc.returncode == 1
    assert one_line(proc).startswith(f"mirror: {read_only_index}/index.db: attempt to write a "
                                     "readonly database")


def test_the_ready_line_says_tls_logins_and_offline(make_mirror, upstream):
    mirror = make_mirror(hub_config(upstream, offline=True))
    ready = [line for line in mirror.log_text().splitlines() if " ready on " in line]
    assert len(ready) == 1
    assert f"ready on http://{mirror.host} (TLS off, logins off, offline on; " in ready[0]
