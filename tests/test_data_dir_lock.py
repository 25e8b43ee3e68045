"""One server per data directory: a second `mirror serve` on the same data_dir exits
with one line naming the first one's PID, before it touches the first one's files."""

from __future__ import annotations

import subprocess
import sys

import httpx
import yaml

from tests.support.mirror import MirrorProcess
from tests.support.ports import free_port
from tests.test_pull_through import hub_config, pull


def test_a_second_server_on_the_same_data_dir_exits_naming_the_first(make_mirror, upstream,
                                                                      image_set, tmp_path):
    first = make_mirror(hub_config(upstream))
    in_progress = first.data_dir / "tmp" / "a-download-in-progress"
    in_progress.write_bytes(b"partial")
    config = tmp_path / "second.yml"
    config.write_text(yaml.safe_dump({**first.config, "listen": f"127.0.0.1:{free_port()}"}))

    second = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=20, cwd=tmp_path)

    assert second.returncode != 0
    assert second.stderr.splitlines() == [
        f"mirror: data directory {first.data_dir.resolve()} is in use by another mirror "
        f"(pid {first.proc.pid})"]
    assert in_progress.read_bytes() == b"partial"        # its start-up clean-up never ran
    with httpx.Client(base_url=first.url, timeout=30) as client:
        pull(client, image_set.docker)                   # the first serves on, undisturbed

    # Once the first has stopped (cleanly: the lock file is emptied), a server starts there.
    first.stop()
    assert (first.data_dir / "lock").read_text() == ""
    again = MirrorProcess(tmp_path / "again", {**first.config, "listen": None})
    again.config["listen"] = again.host
    again.config_path.write_text(yaml.safe_dump(again.config))
    with again, httpx.Client(base_url=again.url, timeout=30) as client:
        pull(client, image_set.docker)
        assert (first.data_dir / "lock").read_text().strip() == str(again.proc.pid)
    assert "did not stop cleanly" not in again.log_text()


def test_a_server_killed_outright_is_noticed_at_the_next_start(make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream))
    killed = mirror.proc.pid
    mirror.stop(kill=True)
    mirror.start()
    assert f"(pid {killed}) did not stop cleanly" in mirror.log_text()
    assert "mirror verify" in mirror.log_text()
