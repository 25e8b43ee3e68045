"""The web page (issue 15) in a real headless browser: Debian's chromium driven by
Playwright, against a mirror (a real process) that has pulled real images through the
real upstream registry (a multi-arch index among them) and holds a hosted repository
with a signature. Each page is loaded and what it shows is checked against the index
(`mirror ls --json`, the CLI's report) and /metrics; a search, a sort and paging are
run through the page's own links and form.

Screenshots go to the test's tmp dir; with ``UPDATE_SCREENSHOTS=1`` to docs/screenshots/
(the README shows those).

The browser tests skip only when chromium is missing (scripts/test installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mirror.admin import human_size, percent
from tests.support.client import read_blob
from tests.support.images import OCI_LAYER
from tests.support.mirror import MirrorProcess
from tests.support.ports import free_port
from tests.test_hosted_referrers import SIGNATURE, push_artifact, sha
from tests.test_observability import scrape, value
from tests.test_pull_through import hub_config, pull
from tests.test_workers import REPO, fresh_blob

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

browser_needed = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="chromium is not installed (apt-get install chromium; scripts/test does)")


def push_hosted_image(http: httpx.Client, repo: str, tag: str) -> tuple[bytes, str, dict]:
    """An OCI image whose config has a secret-looking variable and labels."""
    layer = os.urandom(3000)
    config = {"architecture": "amd64", "os": "linux", "created": "2026-01-02T03:04:05Z",
              "config": {"Env": ["PATH=/usr/bin", "API_TOKEN=hunter2", "DB_PASSWORD=s3cret"],
                         "Entrypoint": ["/app/serve"], "Cmd": ["--port", "8080"],
                         "Labels": {"org.opencontainers.image.source":
                                    "https://example.com/team/web"}},
              "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}
    config_bytes = json.dumps(config).encode()
    for data in (layer, config_bytes):
        r = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data)
        assert r.status_code == 201, r.text
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config_bytes),
                   "size": len(config_bytes)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha(layer), "size": len(layer)}],
    }).encode()
    r = http.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return manifest, sha(manifest), {"layer": len(layer), "config": len(config_bytes)}


@pytest.fixture(scope="module")
def site(tmp_path_factory, upstream, image_set):
    """A mirror that pulled the docker image (twice: hits), the OCI image and the
    multi-arch index, and holds team/web:1.0 (hosted) with a signature."""
    config = hub_config(upstream, max_size="1GiB",
                        hosted={"repositories": ["team/*"], "delete": True})
    config["upstreams"]["down.test"] = {"url": f"http://127.0.0.1:{free_port()}"}
    mirror = MirrorProcess(tmp_path_factory.mktemp("web-mirror"), config).start()
    try:
        with httpx.Client(base_url=mirror.url, timeout=60) as http:
            for image in (image_set.docker, image_set.docker, image_set.oci,
                          image_set.oci_index):
                pull(http, image)
            manifest, digest, sizes = push_hosted_image(http, "team/web", "1.0")
            _, signature = push_artifact(http, (manifest, digest), SIGNATURE,
                                         {"dev.cosignproject.cosign/signature": "MEUC"},
                                         repo="team/web")
            # an upstream nobody listens on: down, with its error
            assert http.get("/v2/down.test/some/app/manifests/1").status_code >= 500
        time.sleep(2.5)      # the usage counters reach the index about once a second
        yield {"mirror": mirror, "hosted": (digest, sizes, signature)}
    finally:
        mirror.stop()


def ls(mirror, *args: str):
    """The index's own report (`mirror ls --json`), beside the running server."""
    out = subprocess.run([sys.executable, "-m", "mirror", "ls", "--json", *args, "--config",
                          str(mirror.config_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=mirror.dir,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # console errors: a script or style the Content-Security-Policy blocked, a 404 for one
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield pg
    context.close()
    assert not errors, f"errors on the page: {errors}"


def screenshot(pg, name: str, tmp_path: Path) -> None:
    out = ROOT / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(out / name), full_page=True)
    assert (out / name).stat().st_size > 10_000


def bytes_of(pg, selector: str) -> int:
    return int(pg.locator(selector).get_attribute("data-bytes"))


@browser_needed
def test_overview_shows_what_metrics_and_the_index_say(site, page, tmp_path):
    mirror = site["mirror"]
    metrics = scrape(mirror)
    page.goto(f"{mirror.url}/")                       # / redirects to /ui/
    assert page.url == f"{mirror.url}/ui/"
    assert page.title() == "Overview · mirror"

    cached = value(metrics, "mirror_cache_size_bytes")
    assert cached > 0
    assert bytes_of(page, "[data-metric=cached]") == cached
    assert page.inner_text("[data-metric=cached]") == human_size(int(cached))
    assert bytes_of(page, "[data-metric=hosted]") == value(metrics, "mirror_hosted_size_bytes") > 0
    assert bytes_of(page, "[data-metric=budget]") == 1024 ** 3
    from_cache = value(metrics, "mirror_bytes_served_total", source="cache")
    from_upstream = value(metrics, "mirror_bytes_served_total", source="upstream")
    assert from_cache > 0 and from_upstream > 0
    assert bytes_of(page, "[data-metric=saved]") == from_cache
    assert bytes_of(page, "[data-metric=from-upstream]") == from_upstream

    lookups = "mirror_cache_lookups_total"
    hits = sum(value(metrics, lookups, kind=k, result="hit") for k in ("blob", "manifest"))
    misses = sum(value(metrics, lookups, kind=k, result="miss") for k in ("blob", "manifest"))
    assert hits and misses
    assert page.inner_text("[data-metric=hit-ratio]") == percent(round(hits / (hits + misses),
                                                                       4))
    repos = ls(mirror)
    assert page.inner_text("[data-metric=repositories]") == f"{len(repos)} repositories"
    # the charts: everything happened within the hour, so in both windows
    for window in ("day", "week"):
        shown = page.locator(f"[data-metric={window}]")
        assert int(shown.get_attribute("data-cache")) == from_cache
        assert int(shown.get_attribute("data-upstream")) == from_upstream
    assert page.locator("svg.chart rect.c[height]").evaluate_all(
        "rs => rs.filter(r => Number(r.getAttribute('height')) > 0).length") == 2

    # each upstream's health: the one pulled from is up, the closed port down
    up = page.locator("tr[data-upstream='docker.io']")
    assert up.locator("td[data-state]").get_attribute("data-state") == "up"
    assert "ago" in up.locator("td").nth(3).inner_text()          # last success
    down = page.locator("tr[data-upstream='down.test']")
    assert down.locator("td[data-state]").get_attribute("data-state") == "down"
    assert down.locator("td").nth(4).inner_text() != "-"          # its last error
    assert page.locator("[data-fills='0']").count() == 1
    assert page.locator("svg.chart").count() == 2
    screenshot(page, "overview.png", tmp_path)


@browser_needed
def test_a_fill_in_progress_shows_its_progress(make_mirror, faulty_upstream, upstream,
                                              tmp_path, page):
    blob = fresh_blob(tmp_path, upstream, 512 * 1024, "web-progress")
    faulty_upstream.arm("drip", path_contains=f"/blobs/{blob.digest}", method="GET",
                        chunk=16 * 1024, delay=0.1)
    mirror = make_mirror(hub_config(faulty_upstream))
    reader = threading.Thread(target=lambda: read_blob(mirror, REPO, blob))
    reader.start()
    try:
        deadline = time.monotonic() + 30
        done = 0
        while time.monotonic() < deadline:
            page.goto(f"{mirror.url}/ui/")
            row = page.locator(f"tr[data-fill='{blob.digest}']")
            if row.count() and int(row.locator("td[data-done]").get_attribute("data-done")):
                done = int(row.locator("td[data-done]").get_attribute("data-done"))
                break
            time.sleep(0.2)
        assert 0 < done < blob.size
        assert int(row.locator("progress").get_attribute("max")) == blob.size
        assert human_size(blob.size) in row.inner_text()
    finally:
        reader.join(60)
    page.goto(f"{mirror.url}/ui/")
    assert page.locator("[data-fills='0']").count() == 1


@browser_needed
def test_repositories_listed_with_the_index_sizes_searched_sorted_paged(site, page):
    mirror = site["mirror"]
    expected = {r["name"]: r for r in ls(mirror)}
    assert {"library/alpinetest", "org/team/app", "multiarch/oci", "team/web"} <= set(expected)
    page.goto(f"{mirror.url}/ui/repositories")
    rows = page.locator("tr[data-repo]")
    shown = {rows.nth(i).get_attribute("data-repo"): rows.nth(i) for i in range(rows.count())}
    assert set(shown) == set(expected)
    for name, row in shown.items():
        assert int(row.locator("td[data-bytes]").get_attribute("data-bytes")) == \
            expected[name]["size"], name
        assert row.locator("td").nth(2).inner_text() == str(expected[name]["tags"])
    assert page.locator("[data-total]").get_attribute("data-total") == str(len(expected))

    # search, through the form
    page.fill("input[name=q]", "MULTI")
    page.click("form.search button")
    page.wait_for_url(re.compile(r".*q=MULTI.*"))
    names = page.locator("tr[data-repo]").evaluate_all("rs => rs.map(r => r.dataset.repo)")
    assert names == ["multiarch/oci"]

    # sort by size, through the column's link: biggest first, then the other way
    page.goto(f"{mirror.url}/ui/repositories")
    page.click("a[data-sort=size]")
    page.wait_for_url(re.compile(r".*sort=size.*"))
    sizes = page.locator("tr[data-repo] td[data-bytes]").evaluate_all(
        "cs => cs.map(c => Number(c.dataset.bytes))")
    assert sizes == sorted((r["size"] for r in expected.values()), reverse=True)
    page.click("a[data-sort=size]")
    page.wait_for_url(re.compile(r".*order=asc.*"))
    sizes = page.locator("tr[data-repo] td[data-bytes]").evaluate_all(
        "cs => cs.map(c => Number(c.dataset.bytes))")
    assert sizes == sorted(r["size"] for r in expected.values())

    # page through by name, two at a time: every repository once, in order
    page.goto(f"{mirror.url}/ui/repositories?per=2")
    seen: list[str] = []
    for _ in range(len(expected)):
        seen += page.locator("tr[data-repo]").evaluate_all("rs => rs.map(r => r.dataset.repo)")
        nxt = page.locator("a[rel=next]")
        if not nxt.count():
            break
        nxt.click()
        page.wait_for_load_state()
    assert seen == sorted(expected)


@browser_needed
def test_multiarch_repository_shows_platforms_with_their_sizes(site, page, image_set,
                                                               tmp_path):
    mirror = site["mirror"]
    image = image_set.oci_index
    report = ls(mirror, image.repo)
    (tag,) = report["tags"]
    page.goto(f"{mirror.url}/ui/r/docker.io/{image.repo}")
    row = page.locator(f"tr[data-tag='{tag['tag']}']")
    assert int(row.locator("td.num[data-bytes]").get_attribute("data-bytes")) == tag["size"]
    assert image.digest[:19] in row.inner_text()
    assert "fresh" in row.inner_text()
    for child in image.children:
        p = child.platform
        name = "/".join(v for v in (p["os"], p["architecture"], p.get("variant")) if v)
        size = len(child.manifest) + sum(b.size for b in child.blobs)
        item = row.locator(f"li[data-platform='{name}']")
        assert int(item.locator("[data-bytes]").get_attribute("data-bytes")) == size, name
    assert page.inner_text("[data-metric=size]") == human_size(tag["size"])
    pulls = page.locator("code[data-copy]").all_inner_texts()
    assert pulls == [f"docker pull {mirror.host}/{image.repo}:latest",
                     f"podman pull {mirror.host}/{image.repo}:latest"]
    # no logins and no ui.admin: read-only, no action buttons
    assert page.locator("form.action").count() == 0
    screenshot(page, "repository.png", tmp_path)

    # a platform's link opens that image: its layers with their sizes
    child = image.children[1]
    page.click("li[data-platform='linux/arm64/v8'] a")
    page.wait_for_url(f"**@{child.digest}")
    layers = page.locator("tr[data-layer]")
    assert layers.evaluate_all("rs => rs.map(r => r.dataset.layer)") == \
        [b.digest for b in child.blobs[1:]]
    assert [int(x) for x in layers.locator("td[data-bytes]").evaluate_all(
        "cs => cs.map(c => c.dataset.bytes)")] == [b.size for b in child.blobs[1:]]


@browser_needed
def test_docker_repository_counts_pulls(site, page, image_set):
    mirror = site["mirror"]
    image = image_set.docker
    report = ls(mirror, image.repo)
    # the name as a client pulls it (no library/) finds it too
    page.goto(f"{mirror.url}/ui/r/docker.io/{image.repo.removeprefix('library/')}")
    assert page.url == f"{mirror.url}/ui/r/docker.io/{image.repo}"
    assert page.inner_text("[data-metric=pulls]") == str(sum(t["pulls"] for t in
                                                               report["tags"]))
    assert sum(t["pulls"] for t in report["tags"]) >= 4      # two tags, pulled twice
    assert page.locator("tr[data-tag]").evaluate_all("rs => rs.map(r => r.dataset.tag)") == \
        sorted(image.tags)
    # the name a client uses (the default upstream: no prefix)
    assert page.locator("code[data-copy]").first.inner_text() == \
        f"docker pull {mirror.host}/{image.repo}:{sorted(image.tags)[0]}"


@browser_needed
def test_hosted_image_page_hides_secrets_and_lists_referrers(site, page):
    mirror = site["mirror"]
    digest, sizes, signature = site["hosted"]
    page.goto(f"{mirror.url}/ui/hosted/team/web")
    assert "hosted" in page.inner_text("h1")
    page.click("tr[data-tag='1.0'] td.digest a")
    page.wait_for_url(f"**/ui/hosted/team/web@{digest}")
    text = page.inner_text("main")
    assert "hunter2" not in text and "s3cret" not in text
    assert page.inner_text("li[data-env='API_TOKEN']") == "API_TOKEN (hidden)"
    assert page.inner_text("li[data-env='DB_PASSWORD']") == "DB_PASSWORD (hidden)"
    assert page.inner_text("li[data-env='PATH']") == "PATH=/usr/bin"
    assert "https://example.com/team/web" in page.inner_text(
        "tr[data-label='org.opencontainers.image.source']")
    assert "2026-01-02T03:04:05Z" in text and "/app/serve" in text
    assert int(page.locator("tr[data-layer] td[data-bytes]").get_attribute("data-bytes")) == \
        sizes["layer"]
    referrer = page.locator(f"tr[data-referrer='{signature}']")
    assert SIGNATURE in referrer.inner_text()
    manifest = json.loads(page.inner_text("pre[data-manifest]"))
    assert manifest["config"]["size"] == sizes["config"]
    # the signature's own page names its subject
    referrer.locator("a").click()
    page.wait_for_url(f"**@{signature}")
    assert page.locator(f"a[href$='@{digest}']").count() >= 1


@browser_needed
def test_phone_width_has_no_sideways_scroll(site, browser):
    context = browser.new_context(viewport={"width": 375, "height": 740})
    pg = context.new_page()
    try:
        for path in ("/ui/", "/ui/repositories", "/ui/r/docker.io/multiarch/oci"):
            pg.goto(site["mirror"].url + path)
            width = pg.evaluate("document.documentElement.scrollWidth")
            assert width <= 375, f"{path} is {width}px wide on a 375px screen"
    finally:
        context.close()


@pytest.mark.parametrize("path, status", [
    ("/ui/r/docker.io/library/nothing-here", 404),
    ("/ui/r/no-such-upstream/x", 404),
    ("/ui/r/docker.io/UPPER/case", 400),
    ("/ui/r/docker.io/alpinetest@sha256:short", 400),
    ("/ui/r/docker.io/library/alpinetest@sha256:" + "0" * 64, 404),
    ("/ui/hosted/team/none", 404),
    ("/ui/repositories?page=0", 400),
    ("/ui/repositories?page=x", 400),
    ("/ui/repositories?page=99", 404),
    ("/ui/repositories?sort=digest", 400),
    ("/ui/repositories?order=up", 400),
    ("/ui/repositories?per=-1", 400),
    ("/ui/no/such/page", 404),
])
def test_bad_input_is_a_4xx_page(site, path, status):
    r = httpx.get(site["mirror"].url + path)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("text/html")
    assert "<h1>" in r.text
    # the registry API is untouched: still JSON errors
    r = httpx.get(site["mirror"].url + "/v2/library/nothing-here/tags/list")
    assert r.headers["content-type"].startswith("application/json")
