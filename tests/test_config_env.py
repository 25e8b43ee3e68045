"""Settings from the environment, as registry:2 users set REGISTRY_*: every key that takes
a single value is MIRROR_<KEY PATH>, overriding the file; `mirror config check` prints
the configuration in effect with passwords masked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from mirror.config import ConfigError, describe, env_name, load_config
from tests.support.mirror import MirrorProcess
from tests.support.ports import free_port

FILE = """
upstreams:
  docker.io:
    tag_ttl: 5m
  ghcr.io:
    url: https://ghcr.io
    username: me
    password: ${GHCR_TOKEN}
  my-registry.example:
    url: https://my-registry.example
"""


def write(tmp_path, text=FILE, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path, env, text=FILE):
    return load_config(write(tmp_path, text), environ={"GHCR_TOKEN": "from-file", **env})


def test_the_variable_names_follow_the_key_paths():
    assert env_name("listen") == "MIRROR_LISTEN"
    assert env_name("data_dir") == "MIRROR_DATA_DIR"
    assert env_name("upstreams", "docker.io", "tag_ttl") == "MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL"
    assert env_name("upstreams", "my-registry.example", "url") == \
        "MIRROR_UPSTREAMS_MY_REGISTRY_EXAMPLE_URL"
    assert env_name("auth", "token", "expiry") == "MIRROR_AUTH_TOKEN_EXPIRY"


@pytest.mark.parametrize("variable, value, read", [
    ("MIRROR_LISTEN", "127.0.0.1:7000", lambda c: c.listen == "127.0.0.1:7000"),
    ("MIRROR_DATA_DIR", "/var/cache/mirror", lambda c: c.data_dir == Path("/var/cache/mirror")),
    ("MIRROR_MAX_SIZE", "50Gi", lambda c: c.max_size == 50 * 1024**3),
    ("MIRROR_HIGH_WATERMARK", "95%", lambda c: c.high_watermark == 0.95),
    ("MIRROR_LOW_WATERMARK", "0.5", lambda c: c.low_watermark == 0.5),
    ("MIRROR_EXPIRE_UNUSED", "30d", lambda c: c.expire_unused == 30 * 86400),
    ("MIRROR_LOG_LEVEL", "debug", lambda c: c.log_level == "debug"),
    ("MIRROR_ACCESS_LOG", "false", lambda c: c.access_log is False),
    ("MIRROR_OFFLINE", "true", lambda c: all(u.offline for u in c.upstreams.values())),
    ("MIRROR_DEFAULT", "ghcr.io", lambda c: c.default == "ghcr.io"),
    ("MIRROR_PUBLIC_URL", "https://mirror.example", lambda c: c.public_url == "https://mirror.example"),
    ("MIRROR_LIMITS_MAX_CONNECTIONS", "50", lambda c: c.limits.max_connections == 50),
    ("MIRROR_LIMITS_HEADER_TIMEOUT", "1m", lambda c: c.limits.header_timeout == 60),
    ("MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL", "90s", lambda c: c.upstreams["docker.io"].tag_ttl == 90),
    ("MIRROR_UPSTREAMS_DOCKER_IO_URL", "https://docker.m.daocloud.io",
     lambda c: c.upstreams["docker.io"].url == "https://docker.m.daocloud.io"),
    ("MIRROR_UPSTREAMS_GHCR_IO_PASSWORD", "from-env",
     lambda c: c.upstreams["ghcr.io"].password == "from-env"),
    ("MIRROR_UPSTREAMS_GHCR_IO_MAX_FILLS", "8", lambda c: c.upstreams["ghcr.io"].max_fills == 8),
    ("MIRROR_UPSTREAMS_GHCR_IO_OFFLINE", "true", lambda c: c.upstreams["ghcr.io"].offline),
    ("MIRROR_UPSTREAMS_GHCR_IO_RETRIES", "0", lambda c: c.upstreams["ghcr.io"].retries == 0),
    ("MIRROR_UPSTREAMS_GHCR_IO_TOKEN_REALMS", "[auth.example.net]",
     lambda c: c.upstreams["ghcr.io"].token_realms == ("auth.example.net",)),
    ("MIRROR_UPSTREAMS_MY_REGISTRY_EXAMPLE_TIMEOUT", "1m30s",
     lambda c: c.upstreams["my-registry.example"].timeout == 90),
])
def test_a_variable_overrides_the_file(tmp_path, variable, value, read):
    before = load(tmp_path, {})
    config = load(tmp_path, {variable: value})
    assert read(config) and not read(before)


def test_auth_and_tls_from_the_environment_alone(tmp_path):
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    config = load_config(None, environ={
        "MIRROR_AUTH_HTPASSWD": "/etc/mirror/htpasswd", "MIRROR_AUTH_ANONYMOUS": "pull",
        "MIRROR_AUTH_TOKEN": "true", "MIRROR_AUTH_TOKEN_EXPIRY": "10m",
        "MIRROR_AUTH_MAX_FAILURES": "3", "MIRROR_AUTH_FAILURE_WINDOW": "5m",
        "MIRROR_TLS_CERT": str(tmp_path / "c.pem"), "MIRROR_TLS_KEY": str(tmp_path / "k.pem")})
    auth = config.auth
    assert auth.htpasswd == Path("/etc/mirror/htpasswd") and auth.anonymous and auth.token
    assert (auth.token_ttl, auth.max_failures, auth.failure_window) == (600, 3, 300)
    assert config.tls.cert == tmp_path / "c.pem"
    # a key of auth.token turns tokens on, as `token: {expiry: 10m}` in the file does
    config = load_config(None, environ={"MIRROR_AUTH_HTPASSWD": "/h",
                                        "MIRROR_AUTH_TOKEN_ISSUER": "me"})
    assert config.auth.token and config.auth.issuer == "me"


def test_text_values_are_taken_as_written(tmp_path):
    for password in ("${HOME}", "0x1F", "true", "0755", "1:30", "- a"):
        config = load(tmp_path, {"MIRROR_UPSTREAMS_GHCR_IO_PASSWORD": password})
        assert config.upstreams["ghcr.io"].password == password


def test_relative_paths_from_the_environment_are_from_the_cwd(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    config = load_config(write(folder, "data_dir: data\n"), environ={"MIRROR_DATA_DIR": "here"})
    assert config.data_dir == Path("here")
    assert load_config(write(folder, "data_dir: data\n"), environ={}).data_dir == folder / "data"


def test_the_command_line_wins_over_the_environment(tmp_path):
    config = load_config(None, environ={"MIRROR_LISTEN": "127.0.0.1:7000"}, listen="127.0.0.1:7001")
    assert config.listen == "127.0.0.1:7001"


@pytest.mark.parametrize("env, says", [
    ({"MIRROR_LISTN": "1"}, "MIRROR_LISTN: not a setting"),
    ({"MIRROR_LISTN": "1"}, "did you mean MIRROR_LISTEN?"),
    ({"MIRROR_UPSTREAMS_QUAY_IO_URL": "https://quay.io"},
     "MIRROR_UPSTREAMS_QUAY_IO_URL: no upstream of that name in the config (upstreams: "
     "docker.io, ghcr.io, my-registry.example)"),
    ({"MIRROR_UPSTREAMS_GHCR_IO_COLOUR": "1"}, "MIRROR_UPSTREAMS_GHCR_IO_COLOUR: not a setting"),
    ({"MIRROR_AUTH_ACL": "[]"}, "MIRROR_AUTH_ACL: auth.acl is not a single value"),
    ({"MIRROR_UPSTREAMS": "x"}, "MIRROR_UPSTREAMS: upstreams is not a single value"),
    ({"MIRROR_LISTEN": "nowhere"}, "MIRROR_LISTEN: listen: expected HOST:PORT"),
    ({"MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL": "soon"},
     "MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL: upstreams.docker.io.tag_ttl: expected a duration"),
    ({"MIRROR_LOW_WATERMARK": "95%"},
     "MIRROR_LOW_WATERMARK: low_watermark: 95% must be below the default high_watermark 90%"),
    ({"MIRROR_UPSTREAMS_GHCR_IO_TOKEN_REALMS": "[ftp://x]"},
     "MIRROR_UPSTREAMS_GHCR_IO_TOKEN_REALMS: upstreams.ghcr.io.token_realms[0]"),
])
def test_a_bad_variable_is_one_line_naming_it(tmp_path, env, says):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env)
    assert "\n" not in str(info.value) and says in str(info.value)


def test_two_upstreams_spelt_alike_make_their_variables_an_error(tmp_path):
    text = "upstreams:\n  a.io: {url: 'https://a.io'}\n  a-io: {url: 'https://a-io'}\n"
    assert load_config(write(tmp_path, text), environ={}).default == "a.io"
    with pytest.raises(ConfigError, match="MIRROR_UPSTREAMS_A_IO_URL: names upstreams.a"):
        load_config(write(tmp_path, text), environ={"MIRROR_UPSTREAMS_A_IO_URL": "https://b"})


def test_the_config_variable_and_the_test_suites_own_are_not_settings(tmp_path):
    config = load(tmp_path, {"MIRROR_CONFIG": "/nowhere.yml", "MIRROR_TEST_BIG_LAYER_MB": "8",
                             "MIRROR_TEST_FUZZ_SCALE": "2", "OTHER_LISTEN": "x"})
    assert config == load(tmp_path, {})


def test_check_output_loads_back_as_the_same_configuration(tmp_path):
    (tmp_path / "auth").mkdir()
    text = FILE + """
data_dir: cache
max_size: 500MB
expire_unused: 1h30m
low_watermark: 75%
auth:
  htpasswd: auth/htpasswd
  token: {expiry: 10m}
  anonymous: pull
  acl:
    - {match: {account: alice}, actions: [pull]}
"""
    config = load(tmp_path, {"MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL": "90s"}, text)
    again = write(tmp_path / "auth", yaml.safe_dump(describe(config, mask=False)), "again.yml")
    assert load_config(again, environ={}) == config


def mirror_cli(*args, cwd, env):
    env = {k: v for k, v in os.environ.items() if k != "MIRROR_CONFIG"} | env
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


def test_config_check_prints_the_effective_configuration_with_passwords_masked(tmp_path):
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", FILE + "data_dir: cache\n")
    result = mirror_cli("config", "check", "--config", str(path), cwd=tmp_path, env={
        "GHCR_TOKEN": "file-secret-1", "MIRROR_UPSTREAMS_DOCKER_IO_USERNAME": "bob",
        "MIRROR_UPSTREAMS_DOCKER_IO_PASSWORD": "env-secret-2", "MIRROR_LISTEN": "127.0.0.1:7000"})
    assert result.returncode == 0, result.stderr
    assert "secret" not in result.stdout and result.stderr == ""
    shown = yaml.safe_load(result.stdout)
    assert shown["listen"] == "127.0.0.1:7000"
    assert shown["data_dir"] == str(tmp_path / "etc" / "cache")
    assert shown["upstreams"]["ghcr.io"]["password"] == "***"
    assert shown["upstreams"]["docker.io"] | {} == {**shown["upstreams"]["docker.io"],
                                                    "username": "bob", "password": "***"}
    assert shown["upstreams"]["my-registry.example"]["password"] is None
    assert "MIRROR_LISTEN" in result.stdout.splitlines()[0]     # the comment says what came in


@pytest.mark.parametrize("env, says", [
    ({"MIRROR_LISTEN": "nowhere"}, "MIRROR_LISTEN: listen: expected HOST:PORT"),
    ({"MIRROR_LOG_LEVL": "debug"}, "MIRROR_LOG_LEVL: not a setting"),
])
def test_config_check_refuses_a_bad_setting_in_one_line(tmp_path, env, says):
    result = mirror_cli("config", "check", cwd=tmp_path, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr


def test_serve_listens_where_the_environment_says(tmp_path, upstream):
    port = free_port()
    mirror = MirrorProcess(tmp_path, {"upstreams": {"docker.io": {"url": upstream.url}}},
                           env={"MIRROR_LISTEN": f"127.0.0.1:{port}"})
    mirror.url = f"http://127.0.0.1:{port}"          # not the port of its config file
    with mirror:
        assert httpx.get(f"{mirror.url}/v2/").status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{mirror.host}/v2/")
