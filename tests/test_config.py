"""config.yml: defaults, units, environment references and one-line errors."""

import pytest

from mirror.config import ConfigError, load_config, parse_duration, parse_size
from mirror.errors import NameInvalid, NameUnknown
from mirror.routing import Router


def write(tmp_path, text):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def test_embedded_default_is_a_docker_hub_mirror():
    config = load_config(None)
    assert config.listen == "0.0.0.0:5000"
    assert str(config.data_dir) == "data"
    assert config.default == "docker.io"
    hub = config.upstreams["docker.io"]
    assert hub.url == "https://registry-1.docker.io" and hub.library_prefix and hub.tag_ttl == 300


def test_units():
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300
    assert parse_duration("1h") == 3600 and parse_duration("2d") == 172800
    assert parse_duration(7) == 7
    assert parse_size("50GiB") == 50 * 1024**3 and parse_size("512MiB") == 512 * 1024**2
    assert parse_size("10KiB") == 10240 and parse_size(100) == 100


def test_full_config_with_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GHCR_TOKEN", "s3cret")
    path = write(tmp_path, """
listen: 127.0.0.1:5001
data_dir: /tmp/x
max_size: 50GiB
upstreams:
  docker.io:
    url: https://docker.m.daocloud.io
    tag_ttl: 90s
    max_fills: 8
  ghcr.io:
    url: https://ghcr.io
    username: me
    password: ${GHCR_TOKEN}
default: docker.io
""")
    config = load_config(path)
    assert (config.host, config.port, config.max_size) == ("127.0.0.1", 5001, 50 * 1024**3)
    assert config.upstreams["docker.io"].library_prefix
    assert config.upstreams["docker.io"].tag_ttl == 90
    assert config.upstreams["docker.io"].max_fills == 8
    assert config.upstreams["ghcr.io"].max_fills == 32
    assert config.upstreams["ghcr.io"].password == "s3cret"
    assert not config.upstreams["ghcr.io"].library_prefix
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize("text, key", [
    ("listen: nowhere", "listen"),
    ("max_size: lots", "max_size"),
    ("colour: blue", "colour"),
    ("upstreams:\n  ghcr.io: {}", "upstreams.ghcr.io.url"),
    ("upstreams:\n  ghcr.io: {url: ftp://x}", "upstreams.ghcr.io.url"),
    ("upstreams:\n  ghcr.io: {url: 'https://ghcr.io', tag_ttl: soon}", "upstreams.ghcr.io.tag_ttl"),
    ("upstreams:\n  ghcr.io: {url: 'https://ghcr.io', password: '${NOPE_UNSET_VAR}'}",
     "upstreams.ghcr.io.password"),
    ("upstreams:\n  ghcr.io: {url: 'https://ghcr.io', colour: 1}", "upstreams.ghcr.io.colour"),
    ("upstreams:\n  ghcr.io: {url: 'https://ghcr.io', max_fills: 0}",
     "upstreams.ghcr.io.max_fills"),
    ("upstreams:\n  ghcr.io: {url: 'https://ghcr.io', max_fills: many}",
     "upstreams.ghcr.io.max_fills"),
    ("default: quay.io", "default"),
    ("listen: [1, 2", "line"),
    ("workers: 0", "workers"),
    ("workers: two", "workers"),
    ("workers: 65", "workers"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message and key in message and str(tmp_path) in message


def test_routing(tmp_path):
    config = load_config(write(tmp_path, """
upstreams:
  docker.io: {}
  ghcr.io: {url: https://ghcr.io}
"""))
    router = Router(config)
    assert router.resolve("alpine").repository == "library/alpine"
    assert router.resolve("alpine").upstream == "docker.io"
    assert router.resolve("org/app").repository == "org/app"
    r = router.resolve("ghcr.io/org/app")
    assert (r.upstream, r.repository, r.namespace) == ("ghcr.io", "org/app", None)
    r = router.resolve("org/app", ns="ghcr.io")
    assert (r.upstream, r.repository, r.namespace) == ("ghcr.io", "org/app", "ghcr.io")
    assert router.resolve("docker.io/alpine").repository == "library/alpine"
    assert router.resolve("alpine", ns="docker.io").repository == "library/alpine"
    with pytest.raises(NameUnknown):
        router.resolve("org/app", ns="quay.io")
    with pytest.raises(NameInvalid):
        router.resolve("../x")
    assert router.display_name("docker.io", "library/alpine") == "library/alpine"
    assert router.display_name("ghcr.io", "org/app") == "ghcr.io/org/app"


def test_example_config_in_the_repository_loads():
    from pathlib import Path
    config = load_config(Path(__file__).resolve().parent.parent / "config.yml")
    assert config.default == "docker.io"
    assert {"docker.io", "ghcr.io", "quay.io"} <= set(config.upstreams)


def test_serve_with_a_bad_config_exits_with_one_line(tmp_path):
    import subprocess
    import sys
    path = write(tmp_path, "upstreams:\n  ghcr.io: {url: 'https://ghcr.io', tag_ttl: soon}\n")
    proc = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "upstreams.ghcr.io.tag_ttl" in proc.stderr and "soon" in proc.stderr


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("5m", 300), ("1h30m", 5400), ("1h 30m", 5400), ("2h45m30s", 9930),
    ("1.5h", 5400), ("7d", 7 * 86400), ("2w", 14 * 86400), ("500ms", 0.5), ("1m500ms", 60.5),
    ("300", 300), (300, 300), (0.25, 0.25),
])
def test_durations_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [
    ("50Gi", 50 * 1024**3), ("50GiB", 50 * 1024**3), ("50gib", 50 * 1024**3),
    ("512Mi", 512 * 1024**2), ("500MB", 500 * 1000**2), ("500M", 500 * 1000**2),
    ("2T", 2 * 1000**4), ("1.5Gi", 3 * 1024**3 // 2), ("4096", 4096), (4096, 4096),
])
def test_sizes_as_people_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["soon", "1x", "h", "1h-30m", "", "m5"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration like"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["lots", "50Gx", "GiB", "-5Gi"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_units_in_a_config_file(tmp_path):
    config = load_config(write(tmp_path, """
max_size: 50Gi
expire_unused: 1h30m
upstreams:
  docker.io: {tag_ttl: 1m30s}
"""))
    assert config.max_size == 50 * 1024**3 and config.expire_unused == 5400
    assert config.upstreams["docker.io"].tag_ttl == 90


@pytest.mark.parametrize("text, says", [
    ("low_watermark: 95%", "low_watermark: 95% must be below the default high_watermark 90%"),
    ("high_watermark: 70%", "high_watermark: 70% must be above the default low_watermark 80%"),
    ("high_watermark: 70%\nlow_watermark: 75%",
     "low_watermark: 75% must be below high_watermark 70%"),
    ("high_watermark: 0.6\nlow_watermark: 0.6",
     "low_watermark: 0.6 must be below high_watermark 0.6"),
])
def test_watermark_error_names_the_keys_written_and_the_default(tmp_path, text, says):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value) == f"{tmp_path / 'config.yml'}: {says}"


def test_upstream_mirrors_parse_with_their_own_credentials_and_capabilities(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("""
upstreams:
  docker.io:
    url: https://registry-1.docker.io
    username: hub
    password: hubpw
    prefer: fastest
    min_speed: 1MiB
    mirrors:
      - url: https://docker.m.daocloud.io
        capabilities: [pull]
      - url: https://mirror.example.internal
        capabilities: [pull, resolve]
        username: m
        password: mpw
      - https://plain.example
""")
    up = load_config(path, environ={}).upstreams["docker.io"]
    assert up.prefer == "fastest" and up.min_speed == 1024 * 1024
    assert [m.url for m in up.mirrors] == ["https://docker.m.daocloud.io",
                                           "https://mirror.example.internal",
                                           "https://plain.example"]
    assert [sorted(m.capabilities) for m in up.mirrors] == [["pull"], ["pull", "resolve"],
                                                            ["pull"]]
    second = up.endpoint(up.mirrors[1])
    assert (second.url, second.username, second.password) == (
        "https://mirror.example.internal", "m", "mpw")
    first = up.endpoint(up.mirrors[0])
    assert first.username is None and first.name == "docker.io" and first.mirrors == ()


@pytest.mark.parametrize("mirrors, message", [
    ("[{capabilities: [pull]}]", "upstreams.docker.io.mirrors[0].url: missing"),
    ("[{url: 'ftp://x'}]", "upstreams.docker.io.mirrors[0].url"),
    ("[{url: 'https://x', capabilities: [resolve]}]", "mirrors[0].capabilities"),
    ("[{url: 'https://x', capabilities: [push]}]", "mirrors[0].capabilities"),
    ("[{url: 'https://x', username: a}]", "username and password go together"),
    ("[{url: 'https://x', speed: 1}]", "mirrors[0]"),
    ("{url: 'https://x'}", "upstreams.docker.io.mirrors: expected a list"),
])
def test_bad_upstream_mirrors_are_one_line_naming_the_key(tmp_path, mirrors, message):
    path = tmp_path / "config.yml"
    path.write_text(f"upstreams:\n  docker.io:\n    mirrors: {mirrors}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_workers_default_to_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    import os
    assert load_config(None).workers == len(os.sched_getaffinity(0))
    assert load_config(write(tmp_path, "workers: 3")).workers == 3
    monkeypatch.setenv("MIRROR_WORKERS", "1")
    assert load_config(write(tmp_path, "workers: 3")).workers == 1
