"""`mirror htpasswd list`: the users of the file the mirror checks logins against, and
whether each can log in (bcrypt entries only)."""

from __future__ import annotations

import subprocess
import sys

import yaml


def mirror_cli(*args, input=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, input=input, timeout=60, cwd=cwd)


def test_htpasswd_list_names_the_users_and_their_hashes(tmp_path):
    users = tmp_path / "htpasswd"
    for user in ("zoe", "alice"):
        proc = mirror_cli("htpasswd", "add", user, "--file", str(users), input="pw\n")
        assert proc.returncode == 0, proc.stderr
    # Apache's tool: a bcrypt entry of cost 5, and an MD5 one the mirror cannot check.
    subprocess.run(["htpasswd", "-bB", "-C", "5", str(users), "bob", "pw"], check=True,
                   capture_output=True)
    subprocess.run(["htpasswd", "-bm", str(users), "carol", "pw"], check=True,
                   capture_output=True)

    proc = mirror_cli("htpasswd", "list", "--file", str(users))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [
        "alice  bcrypt, cost 10",
        "bob    bcrypt, cost 05",
        "carol  not bcrypt: cannot log in (add the user again)",
        "zoe    bcrypt, cost 10",
    ]
    # The file of the config, as the server reads it.
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"auth": {"htpasswd": str(users)}}))
    proc = mirror_cli("htpasswd", "list", "--config", str(config))
    assert proc.returncode == 0 and proc.stdout.split()[0] == "alice"

    mirror_cli("htpasswd", "remove", "carol", "--file", str(users))
    assert "carol" not in mirror_cli("htpasswd", "list", "--file", str(users)).stdout
    empty = tmp_path / "empty"
    empty.write_text("")
    assert mirror_cli("htpasswd", "list", "--file", str(empty)).stdout == f"no users in {empty}\n"


def test_htpasswd_list_and_add_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope"
    proc = mirror_cli("htpasswd", "list", "--file", str(missing))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"mirror: htpasswd: {missing}: No such file or directory\n"
    proc = mirror_cli("htpasswd", "add", "--file", str(missing), input="pw\n")
    assert (proc.returncode, proc.stderr) == (2, "mirror: htpasswd: add needs a USER\n")
    assert not missing.exists()
    proc = mirror_cli("htpasswd", "list", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--file" in proc.stderr
