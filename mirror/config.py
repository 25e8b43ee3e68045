"""config.yml -> frozen, validated settings.

Every key has a default, so no file at all gives the embedded default: a mirror
of Docker Hub on 0.0.0.0:5000 caching under ./data. A bad file raises
``ConfigError`` whose message is one line naming the key and the problem.

Here: ``Config``, ``load_config`` (the file, then ``MIRROR_*`` variables, then the
command line) and ``describe`` (what `mirror config check` prints). The sections
(upstreams, tls, auth, limits) are in config_sections.py, the value parsers in
config_values.py; import them all from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .config_notify import EndpointConfig, NotificationsConfig, _notifications
from .config_scale import (
    ClusterConfig,
    IndexConfig,
    PostgresConfig,
    S3Config,
    StorageConfig,
    _cluster,
    _index,
    _storage,
)
from .config_sections import (
    _AUTH_KEYS,
    _HOSTED_KEYS,
    _LIMITS_KEYS,
    _TLS_KEYS,
    _TOKEN_KEYS,
    _UI_KEYS,
    _UPSTREAM_KEYS,
    DOCKER_HUB,
    DOCKER_HUB_URL,
    AclRule,
    AuthConfig,
    HostedConfig,
    LimitsConfig,
    TlsConfig,
    UiConfig,
    UpstreamConfig,
    _auth,
    _hosted,
    _limits,
    _tls,
    _ui,
    _upstream,
)
from .config_values import (
    ConfigError,
    _bool,
    _field,
    _whole,
    expand_env,
    format_duration,
    format_size,
    parse_duration,
    parse_fraction,
    parse_listen,
    parse_public_url,
    parse_size,
    parse_url,
)

__all__ = ["DOCKER_HUB", "DOCKER_HUB_URL", "AclRule", "AuthConfig", "ClusterConfig", "Config",
           "ConfigError", "EndpointConfig", "HostedConfig", "IndexConfig", "PostgresConfig",
           "S3Config", "StorageConfig", "LimitsConfig", "NotificationsConfig",
           "TlsConfig", "UiConfig", "UpstreamConfig", "describe", "env_name",
           "env_settings", "format_duration", "format_size", "load_config", "parse_duration",
           "parse_fraction", "parse_listen", "parse_public_url", "parse_size", "parse_url"]


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 5000
    data_dir: Path = Path("data")
    max_size: int | None = None       # cache budget in bytes; None: unbounded
    high_watermark: float = 0.90      # evict when the cache passes this share of max_size
    low_watermark: float = 0.80       # ... down to this share
    expire_unused: float | None = None  # seconds without access after which content goes
    default: str | None = DOCKER_HUB  # None: only with upstreams {} and hosted set
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=lambda: MappingProxyType(
        {DOCKER_HUB: UpstreamConfig(DOCKER_HUB, DOCKER_HUB_URL, library_prefix=True)}))
    log_level: str = "info"
    log_format: str = "text"          # text | json (one object per line)
    access_log: bool = True           # one line per request on the log
    shutdown_grace: float = 30.0      # seconds running responses get to finish at SIGTERM
    workers: int = field(default_factory=lambda: default_workers())   # server processes
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    public_url: str | None = None     # how clients reach the mirror (challenges name it)
    limits: LimitsConfig = LimitsConfig()
    hosted: HostedConfig | None = None  # None: no push, every write answers 405
    ui: UiConfig = UiConfig()         # the web page's actions (web/session.py)
    notifications: NotificationsConfig = NotificationsConfig()   # webhooks (mirror/notify/)
    storage: StorageConfig = StorageConfig()   # blobs: data_dir/blobs, or S3 (config_scale.py)
    index: IndexConfig = IndexConfig()         # SQLite in data_dir, or PostgreSQL
    cluster: ClusterConfig = ClusterConfig()   # replicas sharing one PostgreSQL index

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


MAX_WORKERS = 64


def default_workers() -> int:
    """One server process per CPU this process may run on."""
    try:
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


# -- loading --------------------------------------------------------------------------------

_TOP_KEYS = {"listen", "data_dir", "max_size", "default", "upstreams", "log_level", "offline",
             "high_watermark", "low_watermark", "expire_unused", "access_log", "tls", "auth",
             "public_url", "limits", "log_format", "shutdown_grace", "hosted", "workers",
             "ui", "notifications", "storage", "index", "cluster"}


_LOG_LEVELS = {"critical", "error", "warning", "info", "debug"}
_LOG_FORMATS = ("text", "json")


def load_config(path: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Read ``path`` (or nothing: the embedded default), apply ``MIRROR_*`` settings from
    ``environ`` (default: ``os.environ``; ``{}`` for none), then CLI overrides.

    Relative paths in the file (``data_dir``, ``tls.cert``, ``tls.key``,
    ``auth.htpasswd``) are taken from the file's folder, as nginx and registry:2 users
    expect; relative paths given on the command line are taken from the current
    directory."""
    raw: dict = {}
    where = "config"
    base: Path | None = None
    if path is not None:
        base = Path(os.path.abspath(path)).parent
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{where}: not valid YAML{at}: "
                              f"{getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of keys at the top level")
    environ = os.environ if environ is None else environ
    try:
        raw = expand_env(raw, "", environ)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    origins = from_environment(raw, environ)
    given = {k: v for k, v in overrides.items() if v is not None}
    raw.update(given)

    def resolve(key: str, value: str) -> Path:
        """A path from the file is relative to the file's folder; any other, to the cwd."""
        if base is None or key in given or key in origins:
            return Path(value)
        return base / value

    try:
        return _build(raw, resolve)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        for setting, variable in origins.items():
            if key == setting or key.startswith((f"{setting}.", f"{setting}[")):
                if setting not in given:
                    raise ConfigError(f"{variable}: {exc}") from None
        raise ConfigError(f"{where}: {exc}") from None


# -- the environment: MIRROR_<KEY PATH> -----------------------------------------------------
#
# Every key that takes a single value can be set as MIRROR_ followed by its path in the
# file, components joined by "_", upper case, and any character other than a letter or
# digit (the "." and "-" of upstream names) turned into "_": MIRROR_LISTEN,
# MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL, MIRROR_AUTH_TOKEN_EXPIRY. It overrides the file.
# Upstreams are matched by that same spelling of the names in the file (or docker.io, the
# embedded default); a variable cannot add an upstream, since GHCR_IO could be ghcr.io or
# ghcr-io. Values are read as YAML scalars (true, 5m, 8), except strings such as URLs,
# paths and passwords, which are taken as written. MIRROR_CONFIG names the file and
# MIRROR_TEST_* belong to the test suite and tools; any other MIRROR_* that is not a
# setting is an error, so a misspelt one does not go unnoticed.

ENV_PREFIX = "MIRROR_"


NOT_SETTINGS = ("MIRROR_CONFIG",)


RESERVED_PREFIX = "MIRROR_TEST_"


_SECTIONS = {"upstreams", "tls", "auth", "limits", "hosted", "ui", "notifications"}


_TEXT_KEYS = {"listen", "data_dir", "default", "public_url", "log_level", "log_format", "cert",
              "key", "htpasswd", "realm", "service", "issuer", "url", "username", "password"}


def env_name(*path: str) -> str:
    """``("upstreams", "docker.io", "tag_ttl")`` -> ``MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL``."""
    return ENV_PREFIX + "_".join(re.sub(r"[^A-Za-z0-9]", "_", p).upper() for p in path)


def _settings(raw: dict) -> dict[str, list[tuple[str, ...]]]:
    """Variable name -> the key path(s) it sets, for every single-value key."""
    ups = raw.get("upstreams")
    names = [str(n) for n in ups] if isinstance(ups, dict) and ups else [DOCKER_HUB]
    paths: list[tuple[str, ...]] = [(k,) for k in _TOP_KEYS - _SECTIONS]
    paths += [("tls", k) for k in _TLS_KEYS] + [("limits", k) for k in _LIMITS_KEYS]
    paths += [("auth", k) for k in _AUTH_KEYS - {"acl"}]
    paths += [("hosted", k) for k in _HOSTED_KEYS - {"repositories"}]
    paths += [("ui", k) for k in _UI_KEYS]
    paths += [("auth", "token", k) for k in _TOKEN_KEYS]
    paths += [("upstreams", n, k) for n in names for k in _UPSTREAM_KEYS]
    table: dict[str, list[tuple[str, ...]]] = {}
    for path in paths:
        table.setdefault(env_name(*path), []).append(path)
    return table


def env_settings(environ: Mapping[str, str]) -> list[str]:
    """The names in ``environ`` that are read as settings."""
    return sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in NOT_SETTINGS
                  and not n.startswith(RESERVED_PREFIX))


def from_environment(raw: dict, environ: Mapping[str, str]) -> dict[str, str]:
    """Set ``MIRROR_*`` settings into ``raw``; returns ``{"a.b": "MIRROR_A_B"}``."""
    table = _settings(raw)
    found = []
    for name in env_settings(environ):
        paths = table.get(name)
        if not paths:
            raise ConfigError(_not_a_setting(name, raw, table))
        if len(paths) > 1:
            raise ConfigError(f"{name}: names {' and '.join('.'.join(p) for p in paths)}; "
                              "rename one of the upstreams")
        found.append((paths[0], name))
    origins = {}
    for path, name in sorted(found, key=lambda f: len(f[0])):     # auth.token before its keys
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None or (child is True and part == "token"):
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:i + 1])} is not a mapping "
                                  f"(it is {child!r} in the config file)")
            node = child
        node[path[-1]] = _env_value(path[-1], environ[name])
        origins[".".join(path)] = name
    return origins


def _env_value(key: str, text: str) -> Any:
    """Text keys (URLs, paths, passwords) as written; others as a YAML scalar."""
    if key in _TEXT_KEYS:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _not_a_setting(name: str, raw: dict, table: dict) -> str:
    rest = name[len(ENV_PREFIX):]
    lists = [("auth", "acl"), ("hosted", "repositories"), ("notifications",)]
    sections = {env_name(*p): ".".join(p) for p in [(s,) for s in _SECTIONS] + lists}
    if name in sections:
        return (f"{name}: {sections[name]} is not a single value; set it in the config file"
                + ("" if name in (env_name(*p) for p in lists) else
                   f" or its keys one by one ({name}_<KEY>)"))
    names = sorted({p[1] for ps in table.values() for p in ps if p[0] == "upstreams"})
    if rest.startswith("UPSTREAMS_") and not any(
            name.startswith(env_name("upstreams", n) + "_") for n in names):
        return (f"{name}: no upstream of that name in the config (upstreams: "
                f"{', '.join(names)}); a variable sets keys of an upstream the config file "
                "has, it cannot add one")
    import difflib
    close = difflib.get_close_matches(name, table, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return (f"{name}: not a setting (MIRROR_ and a key's path in upper case with _ between "
            f"the parts, e.g. MIRROR_LISTEN or MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL){hint}")


def _build(raw: dict, resolve: Callable[[str, str], Path]) -> Config:
    unknown = set(map(str, raw)) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key "
                          f"(known: {', '.join(sorted(_TOP_KEYS))})")
    kwargs: dict[str, Any] = {}
    if "listen" in raw:
        kwargs["host"], kwargs["port"] = _field("listen", parse_listen, raw["listen"])
    if "data_dir" in raw:
        value = raw["data_dir"]
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError("data_dir: expected a directory path")
        kwargs["data_dir"] = resolve("data_dir", str(value))
    if raw.get("max_size") is not None:
        kwargs["max_size"] = _field("max_size", parse_size, raw["max_size"])
    for key in ("high_watermark", "low_watermark"):
        if key in raw:
            kwargs[key] = _field(key, parse_fraction, raw[key])
    _check_watermarks(raw, kwargs)
    if raw.get("expire_unused") is not None:
        kwargs["expire_unused"] = _field("expire_unused", parse_duration, raw["expire_unused"])
    if raw.get("tls") is not None:
        kwargs["tls"] = _tls(raw["tls"], resolve)
    if raw.get("auth") is not None:
        kwargs["auth"] = _auth(raw["auth"], resolve)
    if raw.get("public_url") is not None:
        kwargs["public_url"] = _field("public_url", parse_public_url, raw["public_url"])
    if raw.get("limits") is not None:
        kwargs["limits"] = _limits(raw["limits"])
    if raw.get("hosted") is not None:
        kwargs["hosted"] = _hosted(raw["hosted"])
    if raw.get("ui") is not None:
        kwargs["ui"] = _ui(raw["ui"])
    if raw.get("notifications") is not None:
        kwargs["notifications"] = _notifications(raw["notifications"])
    if raw.get("storage") is not None:
        kwargs["storage"] = _storage(raw["storage"])
    if raw.get("index") is not None:
        kwargs["index"] = _index(raw["index"])
    if raw.get("cluster") is not None:
        kwargs["cluster"] = _cluster(raw["cluster"])
    if "access_log" in raw:
        kwargs["access_log"] = _bool("access_log", raw["access_log"])
    if "log_level" in raw:
        level = str(raw["log_level"]).lower()
        if level not in _LOG_LEVELS:
            raise ConfigError(f"log_level: expected one of {', '.join(sorted(_LOG_LEVELS))}")
        kwargs["log_level"] = level
    if "log_format" in raw:
        log_format = str(raw["log_format"]).lower()
        if log_format not in _LOG_FORMATS:
            raise ConfigError(f"log_format: expected text or json, got {log_format[:40]!r}")
        kwargs["log_format"] = log_format
    if raw.get("shutdown_grace") is not None:
        kwargs["shutdown_grace"] = _field("shutdown_grace", parse_duration, raw["shutdown_grace"])
    if raw.get("workers") is not None:
        kwargs["workers"] = _whole("workers", raw["workers"], 1, MAX_WORKERS)
    offline = _bool("offline", raw["offline"]) if "offline" in raw else False
    if "upstreams" in raw:
        ups = raw["upstreams"]
        if ups is None and "hosted" in kwargs:
            ups = {}
        if not isinstance(ups, dict) or (not ups and "hosted" not in kwargs):
            raise ConfigError("upstreams: expected a mapping of upstream name to settings"
                              + ("; {} only with hosted set (a plain private registry)"
                                 if isinstance(ups, dict) else ""))
        kwargs["upstreams"] = MappingProxyType(
            {str(n): _upstream(str(n), v, offline) for n, v in ups.items()})
    elif offline:
        kwargs["upstreams"] = MappingProxyType(
            {n: replace(u, offline=True) for n, u in Config().upstreams.items()})
    upstreams = kwargs.get("upstreams", Config().upstreams)
    if not upstreams:              # a plain private registry: nothing to default to
        if raw.get("default") is not None:
            raise ConfigError("default: no upstreams are configured (upstreams: {})")
        kwargs["default"] = None
        return Config(**kwargs)
    first = DOCKER_HUB if DOCKER_HUB in upstreams else next(iter(upstreams))
    default = str(raw.get("default", first))
    if default not in upstreams:
        raise ConfigError(f"default: {default!r} is not one of the configured upstreams "
                          f"({', '.join(upstreams)})")
    kwargs["default"] = default
    return Config(**kwargs)


def _check_watermarks(raw: dict, kwargs: dict) -> None:
    """low_watermark < high_watermark, named as the user wrote them: the key(s) from the
    file, and the default where one side was left out."""
    low = kwargs.get("low_watermark", Config.low_watermark)
    high = kwargs.get("high_watermark", Config.high_watermark)
    if low < high:
        return

    def side(key: str, share: float) -> str:
        return f"{key} {raw[key]}" if key in raw else f"the default {key} {share:.0%}"
    if "low_watermark" in raw:
        raise ConfigError(f"low_watermark: {raw['low_watermark']} must be below "
                          f"{side('high_watermark', high)}")
    raise ConfigError(f"high_watermark: {raw['high_watermark']} must be above "
                      f"{side('low_watermark', low)}")


# -- the effective configuration, as `mirror config check` prints it ------------------------

SECRET = "***"


def describe(config: Config, mask: bool = True) -> dict:
    """``config`` as a config.yml would hold it (loading that gives ``config`` back),
    with absolute paths and, if ``mask``, passwords as ``***``."""
    def path(p: Path) -> str:
        return os.path.abspath(p)

    def upstream(u: UpstreamConfig) -> dict:
        return {"url": u.url, "username": u.username,
                "password": SECRET if mask and u.password is not None else u.password,
                "tag_ttl": format_duration(u.tag_ttl), "library_prefix": u.library_prefix,
                "timeout": format_duration(u.timeout), "retries": u.retries,
                "offline": u.offline, "max_fills": u.max_fills,
                "revalidate_timeout": format_duration(u.revalidate_timeout),
                "token_realms": list(u.token_realms),
                "mirrors": [{"url": m.url, "capabilities": sorted(m.capabilities),
                             "username": m.username,
                             "password": SECRET if mask and m.password is not None
                             else m.password, "token_realms": list(m.token_realms)}
                            for m in u.mirrors],
                "prefer": u.prefer, "min_speed": format_size(u.min_speed) if u.min_speed else None,
                "ratelimit_reserve": u.ratelimit_reserve}

    out: dict[str, Any] = {
        "listen": config.listen, "data_dir": path(config.data_dir),
        "max_size": format_size(config.max_size) if config.max_size else None,
        "high_watermark": f"{config.high_watermark * 100:g}%",
        "low_watermark": f"{config.low_watermark * 100:g}%",
        "expire_unused": None if config.expire_unused is None
        else format_duration(config.expire_unused),
        "log_level": config.log_level, "access_log": config.access_log,
        "public_url": config.public_url,
        "tls": {"cert": path(config.tls.cert), "key": path(config.tls.key)}
        if config.tls else None,
        "auth": None, "limits": {
            "max_connections": config.limits.max_connections,
            "header_timeout": format_duration(config.limits.header_timeout),
            "keepalive_timeout": format_duration(config.limits.keepalive_timeout)},
        "default": config.default,
        "upstreams": {name: upstream(u) for name, u in config.upstreams.items()},
        "hosted": None if config.hosted is None else {
            "repositories": list(config.hosted.repositories), "delete": config.hosted.delete,
            "upload_ttl": format_duration(config.hosted.upload_ttl),
            "max_blob_size": format_size(config.hosted.max_blob_size)},
        "ui": {"admin": config.ui.admin},
        "notifications": {"endpoints": [{
            "name": e.name, "url": e.url,
            "headers": {k: [SECRET if mask else v for v in vs] for k, vs in e.headers},
            "timeout": format_duration(e.timeout), "threshold": e.threshold,
            "backoff": format_duration(e.backoff),
            "ignore": {"mediatypes": sorted(e.ignored_media_types),
                       "actions": sorted(e.ignored_actions)},
            "disabled": e.disabled, "queue_limit": e.queue_limit}
            for e in config.notifications.endpoints]},
        "storage": {"s3": None if (s3 := config.storage.s3) is None else {
            "endpoint": s3.endpoint, "bucket": s3.bucket, "region": s3.region,
            "prefix": s3.prefix, "access_key": s3.access_key,
            "secret_key": SECRET if mask and s3.secret_key is not None else s3.secret_key,
            "redirect": s3.redirect}},
        "index": {"postgres": None if (pg := config.index.postgres) is None else {
            "dsn": pg.safe_dsn if mask else pg.dsn}},
        "cluster": {"advertise": config.cluster.advertise,
                    "lease_ttl": format_duration(config.cluster.lease_ttl)},
    }
    if config.auth is not None:
        a = config.auth
        token: dict[str, str] | bool = {"service": a.service, "issuer": a.issuer,
                                        "expiry": format_duration(a.token_ttl)} \
            if a.token else False
        if isinstance(token, dict) and a.realm is not None:
            token = {"realm": a.realm, **token}
        acl = None if a.acl is None else [
            {"match": {"account": r.account, "name": r.name}, "actions": sorted(r.actions)}
            for r in a.acl]
        out["auth"] = {"htpasswd": path(a.htpasswd), "token": token,
                       "anonymous": "pull" if a.anonymous else "none", "acl": acl,
                       "max_failures": a.max_failures,
                       "failure_window": format_duration(a.failure_window)}
    for f in fields(config):          # keys this function does not know yet, as they are
        if f.name not in out and f.name not in ("host", "port"):
            value = getattr(config, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
    return out
