"""config.yml -> frozen, validated settings.

Every key has a default, so no file at all gives the embedded default: a mirror
of Docker Hub on 0.0.0.0:5000 caching under ./data. A bad file raises
``ConfigError`` whose message is one line naming the key and the problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import yaml

from .models import NAME_RE

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"


class ConfigError(Exception):
    """One line: where, which key, what is wrong."""


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
class Config:
    host: str = "0.0.0.0"
    port: int = 5000
    data_dir: Path = Path("data")
    max_size: int | None = None       # cache budget in bytes; None: unbounded
    high_watermark: float = 0.90      # evict when the cache passes this share of max_size
    low_watermark: float = 0.80       # ... down to this share
    expire_unused: float | None = None  # seconds without access after which content goes
    default: str = DOCKER_HUB
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=lambda: MappingProxyType(
        {DOCKER_HUB: UpstreamConfig(DOCKER_HUB, DOCKER_HUB_URL, library_prefix=True)}))
    log_level: str = "info"
    access_log: bool = True           # one line per request on the log
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    public_url: str | None = None     # how clients reach the mirror (challenges name it)
    limits: LimitsConfig = LimitsConfig()

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


# -- value parsers: each raises ValueError with a short reason ------------------------------

_UNITS_TIME = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = r"(\d+(?:\.\d+)?)\s*(ms|[smhdw])"
_UNITS_SIZE = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
               "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_duration(value: Any) -> float:
    """``90s``, ``5m``, ``1h30m``, ``7d``, ``2w``, ``500ms`` (Go's and Prometheus's
    units, which may be combined) or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90s, 5m, 1h30m or 7d")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(rf"(?:{_DURATION_PART}\s*)+", text):
            seconds = sum(float(n) * _UNITS_TIME[u] for n, u in re.findall(_DURATION_PART, text))
        else:
            raise ValueError(f"expected a duration like 90s, 5m, 1h30m or 7d, got {value!r}")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: Any) -> int:
    """``50GiB`` or ``50Gi`` (powers of 1024), ``500MB`` or ``500M`` (powers of 1000),
    or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512MiB, 50Gi or 500MB")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS_SIZE:
            raise ValueError(f"expected a size like 512MiB, 50Gi or 500MB, got {value!r}")
        size = int(float(m.group(1)) * _UNITS_SIZE[unit])
    if size <= 0:
        raise ValueError("must be positive")
    return size


def format_duration(seconds: float) -> str:
    """The inverse of ``parse_duration``: 5400 -> ``1h30m``, 0.5 -> ``500ms``."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400_000), ("h", 3600_000), ("m", 60_000), ("s", 1000),
                       ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def format_size(size: int) -> str:
    """The inverse of ``parse_size``, exact: ``50GiB``, ``500MB`` or a number of bytes."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2),
                         ("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2),
                         ("KiB", 1024), ("KB", 1000)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_fraction(value: Any) -> float:
    """``90%`` or ``0.9``: a share of the budget, above 0 and at most 1."""
    text = str(value).strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"expected a share like 90% or 0.9, got {value!r}") from None
    if isinstance(value, bool) or not 0 < share <= 1:
        raise ValueError(f"expected a share like 90% or 0.9, got {value!r}")
    return share


def parse_listen(value: Any) -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", text
    host = host.strip("[]") or "0.0.0.0"
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT like 0.0.0.0:5000, got {text!r}")
    return host, int(port)


def parse_url(value: Any) -> str:
    url = str(value).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return url


def parse_public_url(value: Any) -> str:
    """``https://mirror.example`` or ``https://mirror.example:5000``: no path, query or
    user, since it names the host the mirror's own endpoints (/v2/, /token) are on."""
    url = parse_url(value)
    parts = urlsplit(url)
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"expected scheme://host[:port] like https://mirror.example, got {value!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    return url


def expand_env(value: Any, key: str, environ: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` in the strings of a config file's tree with the environment's
    values, once, as the file is read (so a value may itself contain ``${``)."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k), environ)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}[{i}]", environ) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in environ:
            raise ConfigError(f"{key}: environment variable {name} is not set")
        return environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)


# -- loading --------------------------------------------------------------------------------

_TOP_KEYS = {"listen", "data_dir", "max_size", "default", "upstreams", "log_level", "offline",
             "high_watermark", "low_watermark", "expire_unused", "access_log", "tls", "auth",
             "public_url", "limits"}
_UPSTREAM_KEYS = {"url", "username", "password", "tag_ttl", "library_prefix", "timeout",
                  "retries", "offline", "max_fills", "revalidate_timeout", "token_realms"}
_LOG_LEVELS = {"critical", "error", "warning", "info", "debug"}
_TLS_KEYS = {"cert", "key"}
_AUTH_KEYS = {"htpasswd", "token", "anonymous", "acl", "max_failures", "failure_window"}
_TOKEN_KEYS = {"realm", "service", "issuer", "expiry"}
_LIMITS_KEYS = {"max_connections", "header_timeout", "keepalive_timeout"}


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
_SECTIONS = {"upstreams", "tls", "auth", "limits"}
_TEXT_KEYS = {"listen", "data_dir", "default", "public_url", "log_level", "cert", "key",
              "htpasswd", "realm", "service", "issuer", "url", "username", "password"}


def env_name(*path: str) -> str:
    """``("upstreams", "docker.io", "tag_ttl")`` -> ``MIRROR_UPSTREAMS_DOCKER_IO_TAG_TTL``."""
    return ENV_PREFIX + "_".join(re.sub(r"[^A-Za-z0-9]", "_", p).upper() for p in path)


def _settings(raw: dict) -> dict[str, list[tuple[str, ...]]]:
    """Variable name -> the key path(s) it sets, for every single-value key."""
    ups = raw.get("upstreams")
    names = [str(n) for n in ups] if isinstance(ups, dict) and ups else [DOCKER_HUB]
    paths = [(k,) for k in _TOP_KEYS - _SECTIONS]
    paths += [("tls", k) for k in _TLS_KEYS] + [("limits", k) for k in _LIMITS_KEYS]
    paths += [("auth", k) for k in _AUTH_KEYS - {"acl"}]
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
    sections = {env_name(*p): ".".join(p) for p in [(s,) for s in _SECTIONS] + [("auth", "acl")]}
    if name in sections:
        return (f"{name}: {sections[name]} is not a single value; set it in the config file"
                + ("" if name == env_name("auth", "acl") else
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


def _field(key: str, parse, value):
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _build(raw: dict, resolve: Callable[[str, str], Path]) -> Config:
    unknown = set(map(str, raw)) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
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
    if "access_log" in raw:
        kwargs["access_log"] = _bool("access_log", raw["access_log"])
    if "log_level" in raw:
        level = str(raw["log_level"]).lower()
        if level not in _LOG_LEVELS:
            raise ConfigError(f"log_level: expected one of {', '.join(sorted(_LOG_LEVELS))}")
        kwargs["log_level"] = level
    offline = _bool("offline", raw["offline"]) if "offline" in raw else False
    if "upstreams" in raw:
        ups = raw["upstreams"]
        if not isinstance(ups, dict) or not ups:
            raise ConfigError("upstreams: expected a mapping of upstream name to settings")
        kwargs["upstreams"] = MappingProxyType(
            {str(n): _upstream(str(n), v, offline) for n, v in ups.items()})
    elif offline:
        kwargs["upstreams"] = MappingProxyType(
            {n: replace(u, offline=True) for n, u in Config().upstreams.items()})
    upstreams = kwargs.get("upstreams", Config().upstreams)
    default = str(raw.get("default", DOCKER_HUB if DOCKER_HUB in upstreams else next(iter(upstreams))))
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


def _upstream(name: str, raw: Any, offline: bool = False) -> UpstreamConfig:
    key = f"upstreams.{name}"
    if not NAME_RE.fullmatch(name) or "/" in name:
        raise ConfigError(f"{key}: upstream names are one path component like docker.io or ghcr.io")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping with at least url")
    unknown = set(map(str, raw)) - _UPSTREAM_KEYS
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key "
                          f"(known: {', '.join(sorted(_UPSTREAM_KEYS))})")
    values = dict(raw)
    if "url" not in values:
        if name != DOCKER_HUB:
            raise ConfigError(f"{key}.url: missing (the upstream registry's URL, e.g. https://{name})")
        values["url"] = DOCKER_HUB_URL
    kwargs: dict[str, Any] = {"name": name, "url": _field(f"{key}.url", parse_url, values["url"]),
                              "library_prefix": name == DOCKER_HUB, "offline": offline}
    for k in ("username", "password"):
        if values.get(k) is not None:
            if not isinstance(values[k], (str, int)):
                raise ConfigError(f"{key}.{k}: expected a string")
            kwargs[k] = str(values[k])
    if ("username" in kwargs) != ("password" in kwargs):
        raise ConfigError(f"{key}: username and password go together")
    if "tag_ttl" in values:
        kwargs["tag_ttl"] = _field(f"{key}.tag_ttl", parse_duration, values["tag_ttl"])
    for k in ("timeout", "revalidate_timeout"):
        if k in values:
            kwargs[k] = _field(f"{key}.{k}", parse_duration, values[k])
            if kwargs[k] <= 0:
                raise ConfigError(f"{key}.{k}: must be positive")
    if values.get("token_realms") is not None:
        kwargs["token_realms"] = tuple(_token_realm(f"{key}.token_realms[{i}]", v) for i, v in
                                       enumerate(_list(f"{key}.token_realms", values["token_realms"])))
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
        if isinstance(max_fills, bool) or not isinstance(max_fills, int) or not 1 <= max_fills <= 1000:
            raise ConfigError(f"{key}.max_fills: expected a whole number from 1 to 1000")
        kwargs["max_fills"] = max_fills
    return UpstreamConfig(**kwargs)


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


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false")
    return value


def _mapping(key: str, raw: Any, known: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping")
    unknown = set(map(str, raw)) - known
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(known))})")
    return dict(raw)


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
        kwargs["acl"] = tuple(_acl_rule(i, r) for i, r in enumerate(_list("auth.acl", values["acl"])))
    if "max_failures" in values:
        kwargs["max_failures"] = _whole("auth.max_failures", values["max_failures"], 0, 1000000)
    if "failure_window" in values:
        kwargs["failure_window"] = _field("auth.failure_window", parse_duration,
                                          values["failure_window"])
        if not 1 <= kwargs["failure_window"] <= 86400:
            raise ConfigError("auth.failure_window: expected between 1s and 1d")
    return AuthConfig(**kwargs)


def _whole(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: expected a whole number from {low} to {high}")
    return value


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


def _list(key: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list")
    return value


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
        raise ConfigError(f"{key}.actions: unknown action {bad[0]!r} (known: pull, push, delete, *)")
    return AclRule(account, name, frozenset(actions))


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
                "token_realms": list(u.token_realms)}

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
    }
    if config.auth is not None:
        a = config.auth
        token = {"service": a.service, "issuer": a.issuer,
                 "expiry": format_duration(a.token_ttl)} if a.token else False
        if a.token and a.realm is not None:
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
