"""The config file's sections: ``upstreams.<name>``, ``tls``, ``auth`` (with its
``acl``), ``limits``, ``hosted`` and ``ui``: their settings, their keys, and the
builders that turn a section of the file into them (config.py calls these)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config_values import (
    ConfigError,
    _bool,
    _field,
    _list,
    _mapping,
    _whole,
    parse_duration,
    parse_size,
    parse_url,
)
from .models import NAME_RE

DOCKER_HUB = "docker.io"


DOCKER_HUB_URL = "https://registry-1.docker.io"


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tag_ttl: float = 300.0
    library_prefix: bool = False      # one-component names get "library/" (Docker Hub)
    timeout: float = 30.0             # connect and read timeout, seconds
    retries: int = 2                  # extra tries on connect errors and 5xx (GET/HEAD)
    offline: bool = False             # never contact this upstream; serve what is cached
    max_fills: int = 32               # blob downloads from it at once; more wait for a slot
    revalidate_timeout: float = 5.0   # whole-request deadline when a cached copy can answer
    token_realms: tuple[str, ...] = ()  # extra token realms (hosts or URLs) given credentials
    mirrors: tuple[MirrorConfig, ...] = ()   # other copies of it (accelerators), tried first
    prefer: str = "order"             # how mirrors are ranked among the healthy: order|fastest
    min_speed: int = 0                # bytes/s under which a download moves on (0: never)
    ratelimit_reserve: int = 0        # no tag GETs to a source with this few pulls left (0: off)

    def endpoint(self, mirror: MirrorConfig) -> UpstreamConfig:
        """This upstream as fetched from ``mirror``: its URL, its own credentials and token
        realms; everything else (name, timeouts, retries, max_fills) as the upstream's."""
        return replace(self, url=mirror.url, username=mirror.username,
                       password=mirror.password, token_realms=mirror.token_realms, mirrors=())


CAPABILITIES = ("pull", "resolve")


@dataclass(frozen=True)
class MirrorConfig:
    """One entry of ``upstreams.<name>.mirrors``: another registry serving the same
    content. ``pull``: content by digest may come from it (always verified); ``resolve``:
    it may also answer tags."""
    url: str
    capabilities: frozenset[str] = frozenset({"pull"})
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token_realms: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path


@dataclass(frozen=True)
class AclRule:
    """docker_auth style: the first rule whose account and name globs match decides.
    ``account`` "" matches anonymous requests only; names are ``<upstream>/<repo>``."""

    account: str
    name: str
    actions: frozenset[str]


@dataclass(frozen=True)
class AuthConfig:
    htpasswd: Path
    token: bool = False               # Bearer tokens from /token instead of Basic on each request
    realm: str | None = None          # token realm URL; default: this server's /token
    service: str = "mirror"
    issuer: str = "mirror"
    token_ttl: float = 300.0
    anonymous: bool = False           # anonymous pulls allowed (when no ACL says otherwise)
    acl: tuple[AclRule, ...] | None = None
    max_failures: int = 10            # failed logins per user or address in failure_window
    failure_window: float = 60.0      # ... after which that user or address gets 429 a while


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may hold of the server."""

    max_connections: int = 1000       # open connections; past it requests get 503
    header_timeout: float = 10.0      # seconds a request's headers may take to arrive
    keepalive_timeout: float = 5.0    # seconds an idle keep-alive connection stays open


@dataclass(frozen=True)
class HostedConfig:
    """Repositories the mirror hosts itself (pushed to it) rather than mirrors."""

    repositories: tuple[str, ...] = ()            # fnmatch globs on the whole name
    delete: bool = False                          # DELETE of manifests, tags and blobs
    upload_ttl: float = 24 * 3600.0               # seconds an abandoned upload session lives
    max_blob_size: int = 10 * 1024 ** 3           # bytes one pushed blob may have
    gc_grace: float = 3600.0                      # gc spares links younger than this
    gc_interval: float | None = 3600.0            # the server's hosted gc; None: off


UI_ADMIN = ("acl", "open")


@dataclass(frozen=True)
class UiConfig:
    """The web page (web/session.py). ``admin``: ``acl`` (the default): its actions
    follow the ACL (read-only without logins); ``open``: whoever may see a repository
    may act on it (without logins: everyone)."""

    admin: str = "acl"


_UPSTREAM_KEYS = {"url", "username", "password", "tag_ttl", "library_prefix", "timeout",
                  "retries", "offline", "max_fills", "revalidate_timeout", "token_realms",
                  "mirrors", "prefer", "min_speed", "ratelimit_reserve"}

_MIRROR_KEYS = {"url", "capabilities", "username", "password", "token_realms"}


_TLS_KEYS = {"cert", "key"}


_AUTH_KEYS = {"htpasswd", "token", "anonymous", "acl", "max_failures", "failure_window"}


_TOKEN_KEYS = {"realm", "service", "issuer", "expiry"}


_LIMITS_KEYS = {"max_connections", "header_timeout", "keepalive_timeout"}


_HOSTED_KEYS = {"repositories", "delete", "upload_ttl", "max_blob_size", "gc_grace",
                "gc_interval"}


_UI_KEYS = {"admin"}


def _upstream(name: str, raw: Any, offline: bool = False) -> UpstreamConfig:
    key = f"upstreams.{name}"
    if not NAME_RE.fullmatch(name) or "/" in name:
        raise ConfigError(f"{key}: upstream names are one path component like docker.io or ghcr.io")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping with at least url")
    values = _mapping(key, raw, _UPSTREAM_KEYS)
    if "url" not in values:
        if name != DOCKER_HUB:
            raise ConfigError(f"{key}.url: missing (the upstream registry's URL, e.g. https://{name})")
        values["url"] = DOCKER_HUB_URL
    kwargs: dict[str, Any] = {"name": name, "url": _field(f"{key}.url", parse_url, values["url"]),
                              "library_prefix": name == DOCKER_HUB, "offline": offline}
    kwargs.update(_credentials(key, values))
    if "tag_ttl" in values:
        kwargs["tag_ttl"] = _field(f"{key}.tag_ttl", parse_duration, values["tag_ttl"])
    for k in ("timeout", "revalidate_timeout"):
        if k in values:
            kwargs[k] = _field(f"{key}.{k}", parse_duration, values[k])
            if kwargs[k] <= 0:
                raise ConfigError(f"{key}.{k}: must be positive")
    if values.get("token_realms") is not None:
        kwargs["token_realms"] = _token_realms(f"{key}.token_realms", values["token_realms"])
    if values.get("mirrors") is not None:
        kwargs["mirrors"] = tuple(_mirror(f"{key}.mirrors[{i}]", v) for i, v in
                                  enumerate(_list(f"{key}.mirrors", values["mirrors"])))
    if "prefer" in values:
        if values["prefer"] not in ("order", "fastest"):
            raise ConfigError(f"{key}.prefer: expected order or fastest")
        kwargs["prefer"] = values["prefer"]
    if values.get("min_speed") is not None:           # none: off
        kwargs["min_speed"] = _field(f"{key}.min_speed", parse_size, values["min_speed"])
    if "ratelimit_reserve" in values:
        reserve = values["ratelimit_reserve"]
        if isinstance(reserve, str) and reserve.isdigit():
            reserve = int(reserve)            # from ${ENV}
        if isinstance(reserve, bool) or not isinstance(reserve, int) or not 0 <= reserve <= 10**6:
            raise ConfigError(f"{key}.ratelimit_reserve: expected a whole number from 0 to "
                              "1000000 (pulls left under which tag GETs stop; 0: off)")
        kwargs["ratelimit_reserve"] = reserve
    for flag in ("library_prefix", "offline"):
        if flag in values:
            kwargs[flag] = _bool(f"{key}.{flag}", values[flag])
    if "retries" in values:
        retries = values["retries"]
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ConfigError(f"{key}.retries: expected a whole number from 0 to 10")
        kwargs["retries"] = retries
    if "max_fills" in values:
        max_fills = values["max_fills"]
        if isinstance(max_fills, str) and max_fills.isdigit():
            max_fills = int(max_fills)        # from ${ENV}
        if (isinstance(max_fills, bool) or not isinstance(max_fills, int)
                or not 1 <= max_fills <= 1000):
            raise ConfigError(f"{key}.max_fills: expected a whole number from 1 to 1000")
        kwargs["max_fills"] = max_fills
    return UpstreamConfig(**kwargs)


def _credentials(key: str, values: dict[str, Any]) -> dict[str, str]:
    found = {}
    for k in ("username", "password"):
        if values.get(k) is not None:
            if not isinstance(values[k], (str, int)):
                raise ConfigError(f"{key}.{k}: expected a string")
            found[k] = str(values[k])
    if ("username" in found) != ("password" in found):
        raise ConfigError(f"{key}: username and password go together")
    return found


def _token_realms(key: str, value: Any) -> tuple[str, ...]:
    return tuple(_token_realm(f"{key}[{i}]", v) for i, v in enumerate(_list(key, value)))


def _mirror(key: str, raw: Any) -> MirrorConfig:
    if isinstance(raw, str):
        raw = {"url": raw}
    values = _mapping(key, raw, _MIRROR_KEYS)
    if "url" not in values:
        raise ConfigError(f"{key}.url: missing (the mirror's URL, e.g. https://docker.m.daocloud.io)")
    kwargs: dict[str, Any] = {"url": _field(f"{key}.url", parse_url, values["url"])}
    kwargs.update(_credentials(key, values))
    if values.get("capabilities") is not None:
        caps = _list(f"{key}.capabilities", values["capabilities"])
        if not caps or any(c not in CAPABILITIES for c in caps) or "pull" not in caps:
            raise ConfigError(f"{key}.capabilities: expected [pull] or [pull, resolve]")
        kwargs["capabilities"] = frozenset(caps)
    if values.get("token_realms") is not None:
        kwargs["token_realms"] = _token_realms(f"{key}.token_realms", values["token_realms"])
    return MirrorConfig(**kwargs)


def _token_realm(key: str, value: Any) -> str:
    """A host (``auth.example.com``: any realm on it) or a realm URL
    (``https://auth.example.com/token``: that URL only, query aside)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a host like auth.example.com or a realm URL")
    value = value.strip()
    if "://" in value:
        return _field(key, parse_url, value)
    if not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", value):
        raise ConfigError(f"{key}: expected a host like auth.example.com or a realm URL, "
                          f"got {value!r}")
    return value.strip("[]").lower()


def _path(key: str, value: Any, resolve: Callable[[str, str], Path]) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a file path")
    return resolve(key, value)


def _tls(raw: Any, resolve: Callable[[str, str], Path]) -> TlsConfig:
    values = _mapping("tls", raw, _TLS_KEYS)
    for k in ("cert", "key"):
        if k not in values:
            raise ConfigError(f"tls.{k}: missing (PEM file; `mirror certs HOST` makes one)")
    cert = _path("tls.cert", values["cert"], resolve)
    key = _path("tls.key", values["key"], resolve)
    for name, path in (("cert", cert), ("key", key)):
        if not path.is_file():
            raise ConfigError(f"tls.{name}: {path} does not exist")
    return TlsConfig(cert, key)


_ACTIONS = {"pull", "push", "delete", "*"}


def _auth(raw: Any, resolve: Callable[[str, str], Path]) -> AuthConfig:
    values = _mapping("auth", raw, _AUTH_KEYS)
    if "htpasswd" not in values:
        raise ConfigError("auth.htpasswd: missing (the users file; `mirror htpasswd add USER` "
                          "creates it)")
    kwargs: dict[str, Any] = {"htpasswd": _path("auth.htpasswd", values["htpasswd"], resolve)}
    if "anonymous" in values:
        anon = values["anonymous"]
        if anon not in ("pull", "none", False, None):
            raise ConfigError("auth.anonymous: expected pull or none")
        kwargs["anonymous"] = anon == "pull"
    token = values.get("token")
    if token is True or isinstance(token, dict):
        kwargs["token"] = True
        tok = _mapping("auth.token", token if isinstance(token, dict) else {}, _TOKEN_KEYS)
        if "realm" in tok:
            kwargs["realm"] = _field("auth.token.realm", parse_url, tok["realm"])
        for k in ("service", "issuer"):
            if k in tok:
                if not isinstance(tok[k], str) or not tok[k] or not tok[k].isprintable():
                    raise ConfigError(f"auth.token.{k}: expected a name")
                kwargs[k] = tok[k]
        if "expiry" in tok:
            kwargs["token_ttl"] = _field("auth.token.expiry", parse_duration, tok["expiry"])
            if not 60 <= kwargs["token_ttl"] <= 86400:
                raise ConfigError("auth.token.expiry: expected between 1m and 1d")
    elif token not in (None, False):
        raise ConfigError("auth.token: expected true, false or a mapping")
    if values.get("acl") is not None:
        rules = _list("auth.acl", values["acl"])
        kwargs["acl"] = tuple(_acl_rule(i, r) for i, r in enumerate(rules))
    if "max_failures" in values:
        kwargs["max_failures"] = _whole("auth.max_failures", values["max_failures"], 0, 1000000)
    if "failure_window" in values:
        kwargs["failure_window"] = _field("auth.failure_window", parse_duration,
                                          values["failure_window"])
        if not 1 <= kwargs["failure_window"] <= 86400:
            raise ConfigError("auth.failure_window: expected between 1s and 1d")
    return AuthConfig(**kwargs)


def _limits(raw: Any) -> LimitsConfig:
    values = _mapping("limits", raw, _LIMITS_KEYS)
    kwargs: dict[str, Any] = {}
    if "max_connections" in values:
        kwargs["max_connections"] = _whole("limits.max_connections", values["max_connections"],
                                           1, 1000000)
    for k in ("header_timeout", "keepalive_timeout"):
        if k in values:
            kwargs[k] = _field(f"limits.{k}", parse_duration, values[k])
            if not 0 < kwargs[k] <= 3600:
                raise ConfigError(f"limits.{k}: expected more than 0s and at most 1h")
    return LimitsConfig(**kwargs)


def _hosted(raw: Any) -> HostedConfig:
    values = _mapping("hosted", raw, _HOSTED_KEYS)
    kwargs: dict[str, Any] = {}
    if "repositories" in values:
        globs = _list("hosted.repositories", values["repositories"])
        for g in globs:
            if not isinstance(g, str) or not g or not g.isprintable() or len(g) > 256:
                raise ConfigError("hosted.repositories: expected globs like \"myorg/*\" "
                                  "or \"*\"")
        kwargs["repositories"] = tuple(globs)
    if "delete" in values:
        kwargs["delete"] = _bool("hosted.delete", values["delete"])
    if values.get("upload_ttl") is not None:
        kwargs["upload_ttl"] = _field("hosted.upload_ttl", parse_duration, values["upload_ttl"])
        if kwargs["upload_ttl"] <= 0:
            raise ConfigError("hosted.upload_ttl: expected more than 0s, e.g. 24h")
    if values.get("max_blob_size") is not None:
        kwargs["max_blob_size"] = _field("hosted.max_blob_size", parse_size,
                                         values["max_blob_size"])
        if kwargs["max_blob_size"] <= 0:
            raise ConfigError("hosted.max_blob_size: expected a size above 0, e.g. 10GiB")
    if values.get("gc_grace") is not None:
        kwargs["gc_grace"] = _field("hosted.gc_grace", parse_duration, values["gc_grace"])
        if kwargs["gc_grace"] < 0:
            raise ConfigError("hosted.gc_grace: expected 0s or more, e.g. 1h")
    if "gc_interval" in values:
        raw_interval = values["gc_interval"]
        if raw_interval in (None, False, "off", 0, "0"):
            kwargs["gc_interval"] = None
        else:
            kwargs["gc_interval"] = _field("hosted.gc_interval", parse_duration,
                                           raw_interval) or None     # 0s: off
            if kwargs["gc_interval"] is not None and kwargs["gc_interval"] < 60:
                raise ConfigError("hosted.gc_interval: expected off or 1m or more, e.g. 1h")
    return HostedConfig(**kwargs)


def _ui(raw: Any) -> UiConfig:
    values = _mapping("ui", raw, _UI_KEYS)
    kwargs: dict[str, Any] = {}
    if values.get("admin") is not None:
        admin = values["admin"]
        if not isinstance(admin, str) or admin.lower() not in UI_ADMIN:
            raise ConfigError(f"ui.admin: expected acl or open, got {str(admin)[:40]!r}")
        kwargs["admin"] = admin.lower()
    return UiConfig(**kwargs)


def _acl_rule(i: int, raw: Any) -> AclRule:
    key = f"auth.acl[{i}]"
    values = _mapping(key, raw, {"match", "actions"})
    match = _mapping(f"{key}.match", values.get("match", {}), {"account", "name"})
    account = match.get("account", "*")
    name = match.get("name", "*")
    for k, v in (("account", account), ("name", name)):
        if not isinstance(v, str) or not v.isprintable() or len(v) > 256:
            raise ConfigError(f"{key}.match.{k}: expected a glob like \"alice\" or \"docker.io/*\"")
    actions = _list(f"{key}.actions", values.get("actions", []))
    bad = [a for a in actions if a not in _ACTIONS]
    if bad:
        raise ConfigError(f"{key}.actions: unknown action {bad[0]!r} "
                          "(known: pull, push, delete, *)")
    return AclRule(account, name, frozenset(actions))
