"""The config file's ``notifications`` section: webhook endpoints as registry:2
configures them (``name``, ``url``, ``headers``, ``timeout``, ``threshold``,
``backoff``, ``ignoredmediatypes``, ``ignore: {mediatypes, actions}``, ``disabled``),
plus ``queue_limit``, the bound of each endpoint's on-disk queue (mirror/notify/)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .config_values import (
    ConfigError,
    _bool,
    _field,
    _list,
    _mapping,
    _whole,
    parse_duration,
    parse_url,
)

# What registry:2 sends, and what the mirror adds about its cache.
ACTIONS = ("push", "pull", "delete", "mount", "mirror.fetch", "mirror.evict", "mirror.stale")

# Endpoint names become file names (data_dir/notifications/<name>.db).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    url: str = field(repr=False)       # may carry a token in its query
    headers: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), repr=False)
    timeout: float = 1.0               # per delivery request, seconds
    threshold: int = 10                # consecutive failures before backing off
    backoff: float = 1.0               # the first wait after threshold failures (doubles)
    ignored_media_types: frozenset[str] = frozenset()    # ignoredmediatypes + ignore.mediatypes
    ignored_actions: frozenset[str] = frozenset()
    disabled: bool = False
    queue_limit: int = 10000           # events waiting on disk; more are dropped (counted)


@dataclass(frozen=True)
class NotificationsConfig:
    endpoints: tuple[EndpointConfig, ...] = ()


_NOTIFICATIONS_KEYS = {"endpoints"}


_ENDPOINT_KEYS = {"name", "url", "headers", "timeout", "threshold", "backoff",
                  "ignoredmediatypes", "ignore", "disabled", "queue_limit"}


def _notifications(raw: Any) -> NotificationsConfig:
    values = _mapping("notifications", raw, _NOTIFICATIONS_KEYS)
    endpoints = values.get("endpoints") or []
    found = tuple(_endpoint(f"notifications.endpoints[{i}]", v)
                  for i, v in enumerate(_list("notifications.endpoints", endpoints)))
    seen: set[str] = set()
    for i, e in enumerate(found):
        if e.name in seen:
            raise ConfigError(f"notifications.endpoints[{i}].name: {e.name!r} is used by "
                              "another endpoint; names must be unique")
        seen.add(e.name)
    return NotificationsConfig(found)


def _endpoint(key: str, raw: Any) -> EndpointConfig:
    values = _mapping(key, raw, _ENDPOINT_KEYS)
    name = values.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{key}.name: expected a name of letters, digits, '.', '_' and '-' "
                          "(up to 64, it names the endpoint's queue file), e.g. alistener")
    if "url" not in values:
        raise ConfigError(f"{key}.url: missing (where events are POSTed, e.g. "
                          "https://listener.example.com/event)")
    kwargs: dict[str, Any] = {"name": name,
                              "url": _field(f"{key}.url", parse_url, values["url"])}
    if values.get("headers") is not None:
        kwargs["headers"] = _headers(f"{key}.headers", values["headers"])
    for k in ("timeout", "backoff"):
        if values.get(k) is not None:
            kwargs[k] = _field(f"{key}.{k}", parse_duration, values[k])
            if not 0 < kwargs[k] <= 3600:
                raise ConfigError(f"{key}.{k}: expected more than 0s and at most 1h, e.g. 1s")
    if values.get("threshold") is not None:
        kwargs["threshold"] = _whole(f"{key}.threshold", values["threshold"], 1, 1000)
    if values.get("queue_limit") is not None:
        kwargs["queue_limit"] = _whole(f"{key}.queue_limit", values["queue_limit"], 1, 10**7)
    if "disabled" in values:
        kwargs["disabled"] = _bool(f"{key}.disabled", values["disabled"])
    media_types = _strings(f"{key}.ignoredmediatypes", values.get("ignoredmediatypes"))
    ignore = _mapping(f"{key}.ignore", values.get("ignore") or {}, {"mediatypes", "actions"})
    media_types += _strings(f"{key}.ignore.mediatypes", ignore.get("mediatypes"))
    actions = _strings(f"{key}.ignore.actions", ignore.get("actions"))
    for a in actions:
        if a not in ACTIONS:
            raise ConfigError(f"{key}.ignore.actions: unknown action {a[:40]!r} "
                              f"(known: {', '.join(ACTIONS)})")
    kwargs["ignored_media_types"] = frozenset(media_types)
    kwargs["ignored_actions"] = frozenset(actions)
    return EndpointConfig(**kwargs)


def _strings(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    items = _list(key, value)
    for v in items:
        if not isinstance(v, str) or not v or not v.isprintable() or len(v) > 256:
            raise ConfigError(f"{key}: expected a list of names")
    return items


def _headers(key: str, raw: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """registry:2's form: header name -> list of values (a lone string is one value)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping of header name to a list of values, "
                          "e.g. Authorization: [Bearer <token>]")
    out = []
    for name, values in raw.items():
        name = str(name)
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{key}: {name[:40]!r} is not a header name")
        if isinstance(values, (str, int)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key}.{name}: expected a list of values, e.g. [Bearer <token>]")
        for v in values:
            if not isinstance(v, (str, int)) or isinstance(v, bool) or \
                    not str(v).isprintable() or len(str(v)) > 8192:
                raise ConfigError(f"{key}.{name}: expected printable text values")
        out.append((name, tuple(str(v) for v in values)))
    return tuple(out)
