"""Upstream mirrors, the manifest and tag side: manifests by digest come from a healthy
accelerator (verified), tags are resolved only where ``resolve`` allows (a HEAD at
``url``), a pull-only accelerator's tags are never used, a resolve mirror answers tags
while url is down, cached tags are served stale when nobody can resolve, wrong bytes
move on to url, Docker Hub's rate-limit reserve stops tag GETs, and /metrics, the
access log and `mirror stats` name the sources. Two real registries: ``upstream``
(the source of truth) and ``accelerator`` (behind ``faulty_accelerator``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.client import RegistryClient
from tests.support.clients import check_dir_image
from tests.support.image_set import push_image
from tests.test_observability import scrape, value
from tests.test_pull_through import check_manifest, get_manifest


def config(url, *mirrors, **extra):
    return {"upstreams": {"docker.io": {"url": url, "tag_ttl": "1s", "retries": 0,
                                        "revalidate_timeout": "2s", "timeout": "10s",
                                        "mirrors": [{"url": u, "capabilities": caps}
                                                    for u, caps in mirrors], **extra}},
            "default": "docker.io"}


def host(url: str) -> str:
    return url.split("://", 1)[1]


def test_manifests_by_digest_come_from_the_accelerator_and_the_tag_is_headed_at_url(
        make_mirror, upstream, image_set, faulty_accelerator):
    image = image_set.docker
    mirror = make_mirror(config(upstream.url, (faulty_accelerator.url, ["pull"])))
    since = upstream.mark()
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        metrics = scrape(mirror)
    tag_path = f"/manifests/{image.tags[0]}"
    assert upstream.count("HEAD", tag_path, since=since) == 1          # resolved at url
    assert upstream.count("GET", "/manifests/", since=since) == 0      # no bytes from url
    assert faulty_accelerator.count("GET", f"/manifests/{image.digest}") == 1
    assert faulty_accelerator.count(None, tag_path) == 0               # never asked for a tag
    acc = host(faulty_accelerator.url)
    assert f"miss@{acc}" in mirror.log_text()
    assert f"+mirror {faulty_accelerator.url} [pull]" in mirror.log_text()     # start-up line
    assert value(metrics, "mirror_upstream_source_requests_total", upstream="docker.io",
                 source=acc, kind="manifest") >= 1
    assert value(metrics, "mirror_upstream_source_up", upstream="docker.io", source=acc) == 1
    assert value(metrics, "mirror_upstream_source_up", upstream="docker.io",
                 source=host(upstream.url)) == 1
    assert value(metrics, "mirror_upstream_up", upstream="docker.io") == 1
    assert value(metrics, "mirror_upstream_source_bytes_total", upstream="docker.io",
                 source=acc) == len(image.manifest)
    mirror.stop()
    stats = subprocess.run([sys.executable, "-m", "mirror", "stats", "--json", "--config",
                            str(mirror.config_path)], capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["bytes_by_source"]["docker.io"] == [[acc, len(image.manifest)]]
    text = subprocess.run([sys.executable, "-m", "mirror", "stats", "--config",
                           str(mirror.config_path)], capture_output=True, text=True, timeout=60)
    assert f"from {acc}" in text.stdout, text.stdout


@pytest.fixture
def divergent(tmp_path, upstream, accelerator, accelerator_images):
    """Under one tag, url holds one image and the accelerator another (it lags behind)."""
    repo = f"diverge/app{time.monotonic_ns()}"
    with RegistryClient(upstream.url) as client:
        truth = push_image(tmp_path / "truth", client, repo, ["1"], [3000], seed=8100)
    with RegistryClient(accelerator.url) as client:
        stale = push_image(tmp_path / "stale", client, repo, ["1"], [3000], seed=8200)
    assert truth.digest != stale.digest
    return truth, stale


@pytest.mark.parametrize("capabilities", [["pull"], ["pull", "resolve"]])
def test_a_pull_only_accelerator_is_never_asked_for_a_tag(make_mirror, upstream,
                                                          faulty_accelerator, divergent,
                                                          capabilities):
    """The control case (resolve allowed: the accelerator answers the tag first) shows
    the test can tell them apart."""
    truth, stale = divergent
    mirror = make_mirror(config(upstream.url, (faulty_accelerator.url, capabilities)))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        got = get_manifest(client, truth.repo, "1")
        head = get_manifest(client, truth.repo, "1", method="HEAD")
    assert got.status_code == 200, got.text
    if capabilities == ["pull"]:
        check_manifest(got, truth)
        assert head.headers["docker-content-digest"] == truth.digest
        assert faulty_accelerator.count(None, f"{truth.repo}/manifests/1") == 0
        # The bytes were asked of it by digest; it lacks them: no penalty, url answers.
        assert faulty_accelerator.count("GET", f"/manifests/{truth.digest}", status=404) == 1
        assert value(scrape(mirror), "mirror_upstream_source_up", upstream="docker.io",
                     source=host(faulty_accelerator.url)) == 1
    else:
        check_manifest(got, stale)


def test_with_url_down_a_resolve_mirror_answers_tags(make_mirror, faulty_upstream, image_set,
                                                     faulty_accelerator):
    image = image_set.oci
    mirror = make_mirror(config(faulty_upstream.url, (faulty_accelerator.url,
                                                      ["pull", "resolve"])))
    faulty_upstream.arm("status", status=503, times=None)
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        tags = client.get(f"/v2/{image.repo}/tags/list")
    assert tags.status_code == 200, tags.text
    assert set(image.tags) <= set(tags.json()["tags"])
    assert faulty_accelerator.count("GET", "/tags/list") == 1
    assert faulty_upstream.count("GET", "/tags/list") == 1         # url first, then the mirror


def test_with_url_down_and_no_resolve_mirror_cached_tags_are_served_stale(
        make_mirror, faulty_upstream, image_set, faulty_accelerator):
    images = [image_set.docker, image_set.oci_index]
    mirror = make_mirror(config(faulty_upstream.url, (faulty_accelerator.url, ["pull"])))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in images:
            check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        time.sleep(1.2)                                      # past the tag TTL
        faulty_upstream.arm("drop", times=None)              # url unreachable
        took = []
        for image in images + images:
            started = time.monotonic()
            check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
            took.append(time.monotonic() - started)
    assert sum(took) < 8, took                 # revalidate_timeout bounds it; no hangs
    assert faulty_accelerator.count(None, f"/manifests/{images[0].tags[0]}") == 0
    assert "serving stale" in mirror.log_text()
    assert value(scrape(mirror), "mirror_stale_serves_total", upstream="docker.io") >= 4


def test_with_every_source_hung_stale_tags_cost_one_timeout_per_source(
        make_mirror, faulty_upstream, image_set, faulty_accelerator):
    """url and a resolve mirror both hang: the first revalidations give up after
    revalidate_timeout (each marking the source it waited on down), the rest are
    served stale at once."""
    image = image_set.docker
    mirror = make_mirror(config(faulty_upstream.url, (faulty_accelerator.url,
                                                      ["pull", "resolve"])))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        time.sleep(1.2)
        faulty_upstream.arm("hang", times=None)
        faulty_accelerator.arm("hang", times=None)
        took = []
        for _ in range(5):
            started = time.monotonic()
            check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
            took.append(time.monotonic() - started)
    assert all(t < 3.5 for t in took), took     # revalidate_timeout (2 s), not 2 x 2 s or 10 s
    assert sum(took[2:]) < 1.5, took                  # both known down: no waiting
    assert value(scrape(mirror), "mirror_upstream_up", upstream="docker.io") == 0


def test_a_mirror_that_denies_access_is_passed_over_and_logged_once(make_mirror, upstream,
                                                                     image_set,
                                                                     htpasswd_upstream):
    """A mirror asking for credentials it was not given (401): url answers, no penalty,
    one warning however many requests it denied."""
    mirror = make_mirror(config(upstream.url, (htpasswd_upstream.url, ["pull"])))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in (image_set.docker, image_set.oci, image_set.oci_index):
            check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        metrics = scrape(mirror)
    log = mirror.log_text()
    assert log.count(f"mirror {host(htpasswd_upstream.url)} denied access") == 1, log
    assert value(metrics, "mirror_upstream_source_errors_total", upstream="docker.io",
                 source=host(htpasswd_upstream.url), reason="denied") >= 3
    assert value(metrics, "mirror_upstream_source_up", upstream="docker.io",
                 source=host(htpasswd_upstream.url)) == 1


def test_corrupt_manifest_bytes_from_the_accelerator_are_fetched_from_url(
        make_mirror, upstream, image_set, faulty_accelerator):
    image = image_set.oci_index
    mirror = make_mirror(config(upstream.url, (faulty_accelerator.url, ["pull"])))
    faulty_accelerator.arm("corrupt", path_contains="/manifests/sha256:", offset=10)
    since = upstream.mark()
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        metrics = scrape(mirror)
    assert upstream.count("GET", f"/manifests/{image.digest}", since=since) == 1
    assert value(metrics, "mirror_upstream_source_errors_total", upstream="docker.io",
                 source=host(faulty_accelerator.url), reason="bad_content") == 1
    assert value(metrics, "mirror_upstream_source_up", upstream="docker.io",
                 source=host(faulty_accelerator.url)) == 0          # sits out a backoff
    assert f"miss@{host(upstream.url)}" in mirror.log_text()


def test_below_the_ratelimit_reserve_no_tag_gets_go_to_url(make_mirror, faulty_upstream,
                                                           image_set):
    first, second = image_set.docker, image_set.oci
    faulty_upstream.arm("add_headers", headers={"ratelimit-remaining": "1;w=21600"}, times=None)
    mirror = make_mirror(config(faulty_upstream.url, ratelimit_reserve=5))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, first.repo, first.tags[0]), first)  # learns "1 left"
        gets = faulty_upstream.count("GET", f"/manifests/{second.tags[0]}")
        check_manifest(get_manifest(client, second.repo, second.tags[0]), second)
        time.sleep(1.2)                                              # past the tag TTL
        check_manifest(get_manifest(client, first.repo, first.tags[0]), first)
        metrics = scrape(mirror)
    # The second tag: a HEAD (free) and the bytes by digest, no GET of the tag.
    assert faulty_upstream.count("GET", f"/manifests/{second.tags[0]}") == gets == 0
    assert faulty_upstream.count("HEAD", f"/manifests/{second.tags[0]}") == 1
    assert faulty_upstream.count("GET", f"/manifests/{first.tags[0]}") == 1      # before
    assert value(metrics, "mirror_upstream_ratelimit_reserve_hit", upstream="docker.io",
                 source=host(faulty_upstream.url)) == 1
    assert value(metrics, "mirror_upstream_source_ratelimit_remaining", upstream="docker.io",
                 source=host(faulty_upstream.url)) == 1
    assert "ratelimit_reserve 5" in mirror.log_text()


def test_skopeo_copies_byte_exact_through_an_accelerator(make_mirror, upstream, image_set,
                                                         faulty_accelerator, tmp_path):
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is required (apt-get install skopeo; scripts/test does)")
    mirror = make_mirror(config(upstream.url, (faulty_accelerator.url, ["pull"])))
    for image in (image_set.docker, image_set.oci):
        dest = tmp_path / image.repo.replace("/", "_")
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                        f"docker://{mirror.host}/{image.repo}:{image.tags[0]}", f"dir:{dest}"],
                       check=True, capture_output=True, timeout=120)
        check_dir_image(dest, image)
    assert faulty_accelerator.count("GET", "/manifests/sha256:") >= 2


def test_ratelimit_reserve_is_checked_and_config_check_shows_the_mirrors(tmp_path):
    from mirror.config import ConfigError, describe, load_config

    path = tmp_path / "config.yml"
    base = {"upstreams": {"docker.io": {"url": "https://registry-1.docker.io",
                                        "ratelimit_reserve": 10,
                                        "mirrors": [{"url": "https://docker.m.daocloud.io",
                                                     "capabilities": ["pull"]}]}}}
    path.write_text(json.dumps(base))
    config = load_config(path)
    assert config.upstreams["docker.io"].ratelimit_reserve == 10
    shown = describe(config)["upstreams"]["docker.io"]
    assert shown["ratelimit_reserve"] == 10
    assert shown["mirrors"][0]["url"] == "https://docker.m.daocloud.io"
    assert shown["mirrors"][0]["capabilities"] == ["pull"]
    again = tmp_path / "again.yml"
    again.write_text(json.dumps(describe(config, mask=False)))
    assert load_config(again).upstreams == config.upstreams        # check's output loads back
    for bad in (-1, "many", True, 1.5):
        base["upstreams"]["docker.io"]["ratelimit_reserve"] = bad
        path.write_text(json.dumps(base))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert "upstreams.docker.io.ratelimit_reserve: expected a whole number" in str(info.value)
        assert "\n" not in str(info.value)
    (tmp_path / "ok.yml").write_text(json.dumps(
        {**base, "upstreams": {"docker.io": {**base["upstreams"]["docker.io"],
                                             "ratelimit_reserve": 3}}}))
    checked = subprocess.run([sys.executable, "-m", "mirror", "config", "check", "--config",
                              str(tmp_path / "ok.yml")], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "https://docker.m.daocloud.io" in checked.stdout
    assert "ratelimit_reserve: 3" in checked.stdout
