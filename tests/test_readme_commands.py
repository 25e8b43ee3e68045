"""The README's first command, run as written on the system's own Python: on Debian 12
and Ubuntu 24.04 that Python refuses `pip install` (PEP 668), so the command installs
into a virtual environment and starts the mirror from there.

It runs in a copy of the repository, with `python3` on PATH being /usr/bin/python3 and
MIRROR_LISTEN moving the mirror off port 5000 (the command itself has no options). It
installs the mirror's dependencies into a fresh virtual environment: some 15 s with a
local package index or wheel cache, longer from PyPI."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.ports import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


def readme_commands() -> list[str]:
    """The two ```sh blocks after "On a fresh machine"."""
    text = (ROOT / "README.md").read_text()
    start = text.index("On a fresh machine")
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text[start:], re.S)[:2]]


def test_the_readme_opens_with_two_one_line_commands():
    first, second = readme_commands()
    assert "\n" not in first and "\n" not in second
    assert "mirror serve" in first and second.startswith("scripts/test")
    assert "pip install" not in first.replace(".venv/bin/pip", "")   # never the system's pip


def _system_python_can_make_a_venv() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import ensurepip, venv; "
                            "ensurepip.version()"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _system_python_can_make_a_venv(),
                    reason="/usr/bin/python3 cannot make a virtual environment with pip "
                           "(apt-get install python3-venv); scripts/install would use sudo apt")
def test_the_first_command_installs_into_a_venv_and_serves(tmp_path):
    first, _ = readme_commands()
    repo = tmp_path / "mirror"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "build", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", ".ruff_cache"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(SYSTEM_PYTHON)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MIRROR_CONFIG", "PYTHONHOME")}
    env |= {"PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
            "MIRROR_LISTEN": f"127.0.0.1:{port}"}
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", first], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/v2/", timeout=300,
                      alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError):
            pytest.fail(f"the README's first command did not start the mirror:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        assert (repo / "data" / "index.db").is_file()         # caching under ./data
        where = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c",
                                "import sys, mirror; print(sys.base_prefix, mirror.__file__)"],
                               capture_output=True, text=True, cwd=tmp_path, env=env)
        base, module = where.stdout.split()
        assert base == "/usr"                                  # the system's Python ...
        assert Path(module).is_relative_to(repo / ".venv")    # ... with the mirror in .venv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
