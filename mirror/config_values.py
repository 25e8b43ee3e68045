"""Config values: the parsers for what people write in config.yml (durations, sizes,
shares, addresses, URLs), their inverses for `mirror config check`, ``${VAR}``
expansion, the small validators the sections share, and ``ConfigError``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """One line: where, which key, what is wrong."""


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
        raise ValueError("expected scheme://host[:port] like https://mirror.example, "
                         f"got {value!r}")
    try:
        _ = parts.port          # parsed on access: a bad port raises here
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


def _field(key: str, parse, value):
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


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
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key "
                          f"(known: {', '.join(sorted(known))})")
    return dict(raw)


def _whole(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: expected a whole number from {low} to {high}")
    return value


def _list(key: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list")
    return value
