"""Which source of an upstream is asked first (UpstreamGroup.endpoints): healthy before
penalized, then mirrors before url in configured order, or with ``prefer: fastest`` by
measured speed, each source measured once before the fastest wins."""

from __future__ import annotations

import asyncio

from mirror.config import UpstreamConfig
from mirror.config_sections import MirrorConfig
from mirror.upstream_group import UpstreamGroup


def group(prefer: str) -> UpstreamGroup:
    return UpstreamGroup(UpstreamConfig(
        "docker.io", "https://truth.example", prefer=prefer,
        mirrors=(MirrorConfig("https://fast.example"),
                 MirrorConfig("https://resolver.example",
                              capabilities=frozenset({"pull", "resolve"})))))


def labels(endpoints) -> list[str]:
    return [e.label for e in endpoints]


def test_configured_order_mirrors_first_and_penalized_last():
    g = group("order")
    try:
        assert labels(g.endpoints("pull")) == ["fast.example", "resolver.example",
                                               "truth.example"]
        assert labels(g.endpoints("resolve")) == ["resolver.example", "truth.example"]
        g.mirrors[0].penalize("reset mid-blob")
        assert labels(g.endpoints("pull")) == ["resolver.example", "truth.example",
                                               "fast.example"]
    finally:
        asyncio.run(g.aclose())


def test_fastest_measures_each_source_once_then_prefers_the_fastest():
    g = group("fastest")
    try:
        fast, resolver = g.mirrors
        fast.measured(10_000_000, 1.0)          # 10 MB/s
        # The two never measured come first, in configured order.
        assert labels(g.endpoints("pull")) == ["resolver.example", "truth.example",
                                               "fast.example"]
        resolver.measured(1_000_000, 1.0)       # 1 MB/s
        g.truth.measured(50_000_000, 1.0)       # 50 MB/s
        assert labels(g.endpoints("pull")) == ["truth.example", "fast.example",
                                               "resolver.example"]
    finally:
        asyncio.run(g.aclose())
