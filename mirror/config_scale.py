"""The config file's scale-out sections: ``storage`` (where blobs live: the data
directory, or an S3-compatible object store), ``index`` (SQLite in the data
directory, or PostgreSQL) and ``cluster`` (how replicas sharing one PostgreSQL
reach each other). All three are optional: without them a mirror is one machine
with its files and index.db under ``data_dir``, as always.

```yaml
storage: {s3: {endpoint: http://s3:8333, bucket: mirror, region: us-east-1,
               prefix: "", access_key: ..., secret_key: ..., redirect: false}}
index: {postgres: {dsn: postgresql://mirror:secret@db:5432/mirror}}
cluster: {advertise: http://replica-1:5000, lease_ttl: 10s}
```

Unset S3 credentials and region come from the usual AWS environment variables
(read by the storage backend, not here); PostgreSQL's password may also come from
``PGPASSWORD`` or ``~/.pgpass`` as libpq's do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .config_values import ConfigError, _bool, _field, _mapping, parse_duration, parse_url

_STORAGE_KEYS = {"s3"}
_S3_KEYS = {"endpoint", "bucket", "region", "prefix", "access_key", "secret_key", "redirect"}
_INDEX_KEYS = {"postgres"}
_POSTGRES_KEYS = {"dsn"}
_CLUSTER_KEYS = {"advertise", "lease_ttl"}

# S3's bucket naming rules (lower case, digits, dots and dashes, 3-63 characters).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Config:
    """``storage: {s3: {...}}``. Unset credentials and region come from the usual AWS
    environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)."""

    bucket: str
    endpoint: str | None = None        # http(s)://host:port of a non-AWS store
    region: str | None = None
    prefix: str = ""                   # key prefix inside the bucket, e.g. "mirror/"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    redirect: bool = False             # blob GETs answered with a 307 to a presigned URL


@dataclass(frozen=True)
class StorageConfig:
    s3: S3Config | None = None         # None: blobs are files under data_dir/blobs


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str = field(repr=False)       # may carry a password

    @property
    def safe_dsn(self) -> str:
        """The DSN with any password replaced by ***, for logs and errors."""
        return mask_dsn(self.dsn)


@dataclass(frozen=True)
class IndexConfig:
    postgres: PostgresConfig | None = None   # None: SQLite, data_dir/index.db


@dataclass(frozen=True)
class ClusterConfig:
    """How replicas sharing one PostgreSQL index find each other (mirror/cluster/)."""

    advertise: str | None = None       # this replica's URL for its peers; None: derived
    lease_ttl: float = 10.0            # seconds a fill lease lives without a heartbeat


def mask_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string")
    return value.strip()


def _storage(raw: Any) -> StorageConfig:
    section = _mapping("storage", raw, _STORAGE_KEYS)
    if section.get("s3") is None:
        return StorageConfig()
    s3 = _mapping("storage.s3", section["s3"], _S3_KEYS)
    if "bucket" not in s3:
        raise ConfigError("storage.s3.bucket: required (the bucket the blobs go in)")
    bucket = _text("storage.s3.bucket", s3["bucket"])
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(f"storage.s3.bucket: {bucket[:70]!r} is not a valid bucket name "
                          f"(3-63 lower-case letters, digits, dots and dashes)")
    prefix = "" if s3.get("prefix") is None else str(s3["prefix"]).strip("/")
    if prefix and (".." in prefix.split("/") or not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}",
                                                                  prefix)):
        raise ConfigError(f"storage.s3.prefix: {prefix[:70]!r}: expected letters, digits, "
                          f"'.', '_', '-' and '/' (no '..')")
    return StorageConfig(s3=S3Config(
        bucket=bucket,
        endpoint=None if s3.get("endpoint") is None
        else _field("storage.s3.endpoint", parse_url, s3["endpoint"]),
        region=None if s3.get("region") is None else _text("storage.s3.region", s3["region"]),
        prefix=f"{prefix}/" if prefix else "",
        access_key=None if s3.get("access_key") is None
        else _text("storage.s3.access_key", s3["access_key"]),
        secret_key=None if s3.get("secret_key") is None
        else _text("storage.s3.secret_key", s3["secret_key"]),
        redirect=_bool("storage.s3.redirect", s3["redirect"]) if "redirect" in s3 else False))


def _index(raw: Any) -> IndexConfig:
    section = _mapping("index", raw, _INDEX_KEYS)
    if section.get("postgres") is None:
        return IndexConfig()
    pg = _mapping("index.postgres", section["postgres"], _POSTGRES_KEYS)
    if "dsn" not in pg:
        raise ConfigError("index.postgres.dsn: required, e.g. "
                          "postgresql://mirror:secret@db:5432/mirror")
    dsn = _text("index.postgres.dsn", pg["dsn"])
    if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"index.postgres.dsn: expected a postgresql:// URL, got "
                          f"{mask_dsn(dsn)[:70]!r}")
    return IndexConfig(postgres=PostgresConfig(dsn))


def _cluster(raw: Any) -> ClusterConfig:
    section = _mapping("cluster", raw, _CLUSTER_KEYS)
    kwargs: dict[str, Any] = {}
    if section.get("advertise") is not None:
        kwargs["advertise"] = _field("cluster.advertise", parse_url, section["advertise"])
    if section.get("lease_ttl") is not None:
        ttl = _field("cluster.lease_ttl", parse_duration, section["lease_ttl"])
        if not 1 <= ttl <= 600:
            raise ConfigError("cluster.lease_ttl: expected between 1s and 10m")
        kwargs["lease_ttl"] = ttl
    return ClusterConfig(**kwargs)
