"""What the web page's pages are made of, without a browser: the repository list's
snapshot (catalog.py) over a real index file that a real ``Index`` writes, and the
pure shaping in web/views.py (secrets hidden, platforms, the chart's hours)."""

from __future__ import annotations

import asyncio
import html as html_module
import re
import time

from mirror import catalog as catalog_module
from mirror.catalog import Catalog
from mirror.index import Index, TagRow
from mirror.models import HOSTED, References
from mirror.web import views
from mirror.web.session import Viewer
from mirror.web.site import templates


def display(upstream: str, repository: str) -> str:
    return repository if upstream in (HOSTED, "docker.io") else f"{upstream}/{repository}"


async def fill(index: Index, n: int, start: int = 0) -> None:
    for i in range(start, n):
        manifest, blob = f"sha256:{i:064x}", f"sha256:{i + 1000:064x}"
        await index.add_blob(blob, 1000 * (i + 1))
        await index.add_manifest(manifest, "application/vnd.oci.image.manifest.v1+json", 10,
                                 References(blobs=(blob,), manifests=()))
        await index.link("docker.io", f"team/app{i}", [manifest, blob])
        await index.set_tag(TagRow("docker.io", f"team/app{i}", "v1", manifest, time.time(),
                                   time.time() + 60))


def test_list_is_searched_sorted_paged_and_read_once_for_many(tmp_path):
    async def main() -> None:
        index = await Index.open(tmp_path / "index.db", flush=False)
        await fill(index, 7)
        cat = await Catalog.open(index, display, ttl=60)
        reads = 0
        real_read = cat._read

        async def counted():
            nonlocal reads
            reads += 1
            return await real_read()
        cat._read = counted             # type: ignore[method-assign]
        try:
            pages = await asyncio.gather(*(cat.page() for _ in range(5)))
            assert reads == 1           # five requests, one read of the aggregates
            first = pages[0]
            assert first.total == 7 and first.pages == 1
            assert [r.name for r in first.rows] == [f"team/app{i}" for i in range(7)]
            assert [r.size for r in first.rows] == [1000 * (i + 1) + 10 for i in range(7)]
            assert {r.tags for r in first.rows} == {1}

            by_size = await cat.page(sort="size", descending=True, per_page=3, page=2)
            assert [r.name for r in by_size.rows] == ["team/app3", "team/app2", "team/app1"]
            assert (by_size.total, by_size.pages) == (7, 3)
            found = await cat.page(q="APP6")
            assert [r.name for r in found.rows] == ["team/app6"]
            allowed = await cat.page(may_pull=lambda u, r: r.endswith(("1", "2")))
            assert [r.name for r in allowed.rows] == ["team/app1", "team/app2"]
            assert reads == 1

            # older than its lifetime: the old list is served while the next is read
            await fill(index, 8, 7)                   # team/app7 is new
            cat._snapshot.taken -= 61                 # type: ignore[union-attr]
            stale = await cat.page()
            assert stale.total == 7
            await cat._reading                        # type: ignore[misc]
            assert (await cat.page()).total == 8 and reads == 2

            # far older: read again before answering
            cat._snapshot.taken -= catalog_module.STALE_MAX + 1  # type: ignore[union-attr]
            await fill(index, 9, 8)
            assert (await cat.page()).total == 9 and reads == 3
        finally:
            await cat.close()
            await index.close()
    asyncio.run(main())


def test_secret_looking_environment_values_are_hidden():
    summary = views.config_summary({
        "created": "2026-01-01T00:00:00Z", "os": "linux", "architecture": "arm64",
        "variant": "v8",
        "config": {"Env": ["PATH=/bin", "AWS_SECRET_ACCESS_KEY=x", "GITHUB_TOKEN=y",
                           "MYSQL_ROOT_PASSWORD=z", "API_KEY=k", "HOME=/root"],
                   "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"],
                   "Labels": {"b": "2", "a": "1"}}})
    assert summary["env"] == [("PATH", "/bin"), ("AWS_SECRET_ACCESS_KEY", None),
                              ("GITHUB_TOKEN", None), ("MYSQL_ROOT_PASSWORD", None),
                              ("API_KEY", None), ("HOME", "/root")]
    assert summary["platform"] == "linux/arm64/v8"
    assert summary["entrypoint"] == "/bin/sh -c" and summary["cmd"] == '"echo hi"'
    assert summary["labels"] == [("a", "1"), ("b", "2")]
    # not a config at all: nothing shown, nothing raised
    assert views.config_summary({"config": "nonsense"})["env"] == []


def test_platforms_of_an_index():
    found = views.platforms({"manifests": [
        {"digest": "sha256:a", "mediaType": "m", "size": 5,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "sha256:b", "size": 6,
         "platform": {"os": "unknown", "architecture": "unknown"}},
        {"digest": "sha256:c"}, "junk", {"no": "digest"}]})
    assert [(p["digest"], p["platform"]) for p in found] == [
        ("sha256:a", "linux/arm/v7"), ("sha256:b", "unknown/unknown"), ("sha256:c", "-")]


def test_chart_hours_are_the_last_ones_and_sum():
    now = 1_800_000_000.0 + 1800           # half past an hour
    hour = int(now // 3600) * 3600
    hourly = {hour: {"bytes_from_cache": 5, "bytes_from_upstream": 1},
              hour - 3600: {"bytes_from_cache": 7},
              hour - 25 * 3600: {"bytes_from_cache": 1000}}       # outside 24 hours
    day = views.bars(hourly, 24, now)
    assert len(day) == 24 and day[-1].start == hour
    assert (day[-1].cache, day[-1].upstream, day[-2].cache) == (5, 1, 7)
    assert sum(b.cache for b in day) == 12
    week = views.bars(hourly, 7 * 24, now, per_bar=3)
    assert len(week) == 56 and sum(b.cache for b in week) == 1012
    svg = views.chart(day, "last 24 hours", 3)
    assert svg.startswith("<svg") and svg.count("<rect") == 48


class Admin(Viewer):
    def may(self, action: str, upstream: str, repository: str) -> bool:
        return action != "remove"        # any rule the ACL has: remove is refused here


def forms(html: str) -> list[dict[str, str]]:
    """Each action form: its action URL and hidden inputs."""
    found = []
    for form in re.findall(r'<form method="post" action="(/ui/actions/[a-z]+)" class="action">'
                           r'(.*?)</form>', html, re.S):
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', form[1]))
        found.append({"action": form[0],
                      **{k: html_module.unescape(v) for k, v in fields.items()}})
    return found


def render_repository(viewer: Viewer, upstream: str, tag: dict) -> str:
    return templates.get_template("repository.html").render(
        viewer=viewer, here="/ui/r/x?page=2", logins=True, upstream=upstream,
        repository="team/app", name="team/app", hosted=upstream == HOSTED, tags=[tag],
        platforms={}, pins=[], size=0, pulls=0, last_pull=None, pull_ref="h/team/app",
        ttl=300, repo_url="/ui/r/docker.io/team/app", now=time.time())


def test_action_forms_carry_what_the_actions_need_and_only_what_the_viewer_may():
    tag = {"tag": "v1", "digest": "sha256:" + "a" * 64, "media_type": None, "size": 1,
           "pulls": 0, "last_pull": None, "fresh": True, "expires_at": 0, "fetched_at": 0,
           "pinned": False, "url": "/ui/r/docker.io/team/app@sha256:" + "a" * 64}
    common = {"csrf": "tok&en", "repository": "team/app", "reference": "v1",
              "next": "/ui/r/x?page=2"}
    html = render_repository(Admin(account="alice", csrf="tok&en", how="cookie"), "docker.io", tag)
    assert forms(html) == [
        {"action": "/ui/actions/pin", "upstream": "docker.io", **common},
        {"action": "/ui/actions/invalidate", "upstream": "docker.io", **common}]
    assert ">Log out<" in html and 'action="/ui/logout"' in html
    pinned = render_repository(Admin(account="alice", csrf="tok&en"), "docker.io",
                               tag | {"pinned": True})
    assert [f["action"] for f in forms(pinned)] == ["/ui/actions/unpin",
                                                    "/ui/actions/invalidate"]
    hosted = render_repository(Admin(account="alice", csrf="tok&en"), HOSTED, tag)
    assert forms(hosted) == [{"action": "/ui/actions/delete", "upstream": "", **common}]
    # the HTML escapes what it carries
    assert 'value="tok&amp;en"' in html
    # a viewer who may not act gets no forms, and a Log in link
    anonymous = render_repository(Viewer(), "docker.io", tag)
    assert forms(anonymous) == [] and 'href="/ui/login?next=' in anonymous
