"""What the templates show, shaped from what the index holds: sizes and times in words,
the hourly traffic chart (inline SVG, drawn here so the page needs no script for it),
a manifest's platforms, an image config's summary with secret-looking values hidden.
Pure functions: no I/O, so they are tested and reused without a server."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

from ..admin import SHORT_TYPES, ago, human_size, percent, ratio

__all__ = ["SHORT_TYPES", "ago", "human_size", "percent", "ratio", "short_type", "when",
           "chart", "platforms", "config_summary", "secretish", "pretty_json", "Bar"]

# Environment variable names whose values are not shown (the name is).
SECRET_RE = re.compile(r"PASSW(OR)?D|PASSWD|SECRET|TOKEN|KEY|CREDENTIAL|AUTH|PRIVATE|CERT"
                       r"|SESSION|COOKIE|SALT|DSN|CONN(ECTION)?_?STR|PWD", re.I)


def short_type(media_type: str | None) -> str:
    return SHORT_TYPES.get(media_type or "", media_type or "-")


def when(ts: float | None) -> str:
    """``ts`` as UTC, to the minute ("2026-11-30 19:02 UTC"); "-" for none."""
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def since(ts: float | None, now: float | None = None) -> str:
    return ago(ts, time.time() if now is None else now)


def secretish(name: str) -> bool:
    return bool(SECRET_RE.search(name))


def config_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """An image config's (application/vnd.oci.image.config.v1+json) created, platform,
    entrypoint, cmd, working dir, user, exposed ports, env (values of secret-looking
    names hidden: ``None``) and labels."""
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    assert isinstance(inner, dict)
    env: list[tuple[str, str | None]] = []
    for item in inner.get("Env") or []:
        if not isinstance(item, str):
            continue
        name, _, value = item.partition("=")
        env.append((name, None if secretish(name) else value))
    labels = inner.get("Labels") if isinstance(inner.get("Labels"), dict) else {}
    platform = "/".join(str(config[k]) for k in ("os", "architecture", "variant")
                        if config.get(k))

    def command(value: Any) -> str | None:
        if isinstance(value, list):
            return " ".join(json.dumps(v) if " " in str(v) else str(v) for v in value)
        return None if value is None else str(value)

    history = config.get("history") if isinstance(config.get("history"), list) else []
    assert isinstance(history, list)
    return {
        "created": config.get("created"),
        "platform": platform or None,
        "entrypoint": command(inner.get("Entrypoint")),
        "cmd": command(inner.get("Cmd")),
        "workdir": inner.get("WorkingDir") or None,
        "user": inner.get("User") or None,
        "ports": sorted(inner.get("ExposedPorts") or {}),
        "env": env,
        "labels": sorted((str(k), str(v)) for k, v in (labels or {}).items()),
        "history": [h.get("created_by", "") for h in history if isinstance(h, dict)],
    }


def platforms(index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The children of an image index or manifest list: digest, media type, platform
    ("linux/arm64/v8"; "unknown/unknown" for attestations), declared size."""
    found = []
    for m in index.get("manifests") or []:
        if not isinstance(m, dict) or not isinstance(m.get("digest"), str):
            continue
        p = m.get("platform") if isinstance(m.get("platform"), dict) else {}
        assert isinstance(p, dict)
        name = "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))
        found.append({"digest": m["digest"], "media_type": m.get("mediaType"),
                      "platform": name or "-", "declared": m.get("size"),
                      "annotations": m.get("annotations") or {}})
    return found


def pretty_json(data: bytes) -> str:
    try:
        return json.dumps(json.loads(data), indent=2, ensure_ascii=False)
    except (ValueError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")


# -- the chart -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bar:
    start: float          # the hour's (or bucket's) start, epoch seconds
    cache: int            # bytes served from the cache
    upstream: int         # bytes fetched upstream


def hour_of(key: int) -> int:
    """An hourly row's key (the hour's start, epoch seconds) as an hour number."""
    return int(key) // 3600


def bars(hourly: Mapping[int, Mapping[str, int]], hours: int, now: float | None = None,
         per_bar: int = 1) -> list[Bar]:
    """The last ``hours`` hours (this one included), ``per_bar`` hours to a bar."""
    now = time.time() if now is None else now
    last = int(now // 3600)
    first = last - hours + 1
    by_hour = {hour_of(k): v for k, v in hourly.items()}
    out = []
    for start in range(first, last + 1, per_bar):
        cache = upstream = 0
        for h in range(start, min(start + per_bar, last + 1)):
            row = by_hour.get(h) or {}
            cache += int(row.get("bytes_from_cache", 0))
            upstream += int(row.get("bytes_from_upstream", 0))
        out.append(Bar(start * 3600.0, cache, upstream))
    return out


def chart(series: list[Bar], title: str, label_every: int, fmt: str = "%H:%M") -> Markup:
    """Stacked bars (from cache below, from upstream above) as inline SVG, with a
    ``<title>`` per bar for a tooltip and a summary for screen readers."""
    width, height, top, bottom = 600, 160, 18, 20
    n = max(1, len(series))
    peak = max((b.cache + b.upstream for b in series), default=0) or 1
    slot = width / n
    gap = min(2.0, slot * 0.2)
    parts = []
    for i, b in enumerate(series):
        x = i * slot + gap / 2
        w = max(0.5, slot - gap)
        scale = (height - top - bottom) / peak
        hc, hu = b.cache * scale, b.upstream * scale
        y0 = height - bottom
        stamp = datetime.fromtimestamp(b.start, UTC).strftime("%a %H:%M UTC")
        tip = (f"{stamp}: {human_size(b.cache)} from cache, "
               f"{human_size(b.upstream)} from upstream")
        parts.append(f'<g><title>{escape(tip)}</title>'
                     f'<rect class="c" x="{x:.1f}" y="{y0 - hc:.1f}" width="{w:.1f}" '
                     f'height="{hc:.1f}"/>'
                     f'<rect class="u" x="{x:.1f}" y="{y0 - hc - hu:.1f}" width="{w:.1f}" '
                     f'height="{hu:.1f}"/></g>')
        if i % label_every == 0:
            label = datetime.fromtimestamp(b.start, UTC).strftime(fmt)
            parts.append(f'<text x="{x:.1f}" y="{height - 5}">{escape(label)}</text>')
    total_c = sum(b.cache for b in series)
    total_u = sum(b.upstream for b in series)
    desc = (f"{title}: {human_size(total_c)} from cache, {human_size(total_u)} from upstream; "
            f"peak {human_size(peak if total_c + total_u else 0)} in one bar")
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(desc)}" preserveAspectRatio="none">'
        f'<desc>{escape(desc)}</desc>'
        f'<text class="peak" x="{width - 4}" y="10" text-anchor="end">'
        f'{escape(human_size(peak if total_c + total_u else 0))}</text>'
        + "".join(parts) + "</svg>")
