"""The scale-out sections of config.yml: storage.s3, index.postgres, cluster."""

from __future__ import annotations

import pytest
import yaml

from mirror.config import ConfigError, describe, load_config


def load(tmp_path, text: str, environ=None):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def test_defaults_are_one_machine(tmp_path):
    config = load(tmp_path, "listen: 127.0.0.1:5000\n")
    assert config.storage.s3 is None and config.index.postgres is None
    assert config.cluster.advertise is None and config.cluster.lease_ttl == 10


def test_full_sections_round_trip_through_describe(tmp_path):
    config = load(tmp_path, """
storage: {s3: {endpoint: "http://127.0.0.1:9000/", bucket: mirror-blobs, region: eu-west-1,
               prefix: /site-a/, access_key: AK, secret_key: "${SECRET}", redirect: true}}
index: {postgres: {dsn: "postgresql://mirror:pw@db:5432/mirror"}}
cluster: {advertise: "http://replica-1:5000", lease_ttl: 30s}
""", environ={"SECRET": "s3cret"})
    s3 = config.storage.s3
    assert s3 is not None and s3.bucket == "mirror-blobs" and s3.prefix == "site-a/"
    assert s3.endpoint == "http://127.0.0.1:9000" and s3.redirect and s3.secret_key == "s3cret"
    assert config.index.postgres is not None
    assert config.index.postgres.safe_dsn == "postgresql://mirror:***@db:5432/mirror"
    assert config.cluster.lease_ttl == 30
    masked = describe(config)
    assert masked["storage"]["s3"]["secret_key"] == "***"
    assert "pw" not in masked["index"]["postgres"]["dsn"]
    again = load(tmp_path, yaml.safe_dump(describe(config, mask=False)))
    assert again.storage == config.storage and again.index == config.index
    assert again.cluster == config.cluster


@pytest.mark.parametrize(("text", "key"), [
    ("storage: {s3: {endpoint: http://x:1}}", "storage.s3.bucket"),
    ("storage: {s3: {bucket: Not_A_Bucket}}", "storage.s3.bucket"),
    ("storage: {s3: {bucket: ok-bucket, prefix: ../up}}", "storage.s3.prefix"),
    ("storage: {s3: {bucket: ok-bucket, endpoint: ftp://x}}", "storage.s3.endpoint"),
    ("storage: {s3: {bucket: ok-bucket, redirect: maybe}}", "storage.s3.redirect"),
    ("storage: {gcs: {}}", "storage.gcs"),
    ("index: {postgres: {}}", "index.postgres.dsn"),
    ("index: {postgres: {dsn: 'mysql://u:hidden@h/db'}}", "index.postgres.dsn"),
    ("cluster: {lease_ttl: 0s}", "cluster.lease_ttl"),
    ("cluster: {advertise: replica-1}", "cluster.advertise"),
])
def test_bad_values_name_their_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text + "\n")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.yml'}: {key}:") and "\n" not in message
    assert "hidden" not in message
