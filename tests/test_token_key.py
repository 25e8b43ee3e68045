"""The token signing key is never weak: 32 random bytes written atomically (a full
disk during the first write leaves no key rather than a short one), mode 0600, and a
short key found at start-up stops the server with one line naming the file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.support.ports import free_port
from tests.test_auth import auth_config


def test_a_new_key_is_32_random_bytes_private_to_the_owner(make_mirror, upstream, tmp_path):
    # one machine, whatever MIRROR_TEST_INDEX says: a site's key is in PostgreSQL
    # (tests/test_cluster_keys.py)
    m = make_mirror({**auth_config(upstream, tmp_path, token=True), "index": {}})
    key = m.data_dir / "token.key"
    assert len(key.read_bytes()) == 32
    assert key.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in m.data_dir.iterdir() if "token" in p.name) == \
        ["local.token", "token.key"]          # the local token (local_access.py); no temp files


def test_a_full_disk_during_the_first_write_leaves_no_short_key(tmp_path):
    """A real short write: RLIMIT_FSIZE lets the process write 16 bytes, then EFBIG."""
    key = tmp_path / "token.key"
    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from mirror.tokens import load_key
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
        try:
            load_key(Path({str(key)!r}))
        except OSError as exc:
            print("failed:", exc.strerror)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("failed:"), out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []         # no key, no temporary file left over
    from mirror.tokens import load_key
    assert len(load_key(key)) == 32                # the next start makes a whole key


@pytest.mark.parametrize("size", [0, 16, 31])
def test_a_short_key_is_refused_at_start_up(size, upstream, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "token.key").write_bytes(b"k" * size)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({**auth_config(upstream, tmp_path, token=True),
                                      "listen": f"127.0.0.1:{free_port()}", "data_dir": str(data)}))
    try:
        out = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(config)],
                             capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:       # run() killed it
        pytest.fail(f"the mirror started with a {size}-byte signing key")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirror: "), lines
    assert str(data / "token.key") in lines[0] and f"{size} bytes" in lines[0]
    assert (data / "token.key").read_bytes() == b"k" * size       # left for the admin to see
