"""A hung upstream costs one revalidation timeout for the whole outage, not one per
request; /metrics says whether each upstream is up and what Docker Hub's rate limit
has left."""

from __future__ import annotations

import time

import httpx

from tests.test_observability import scrape, value
from tests.test_pull_through import check_manifest, get_manifest


def outage_config(faulty, **extra):
    return {"upstreams": {"docker.io": {"url": faulty.url, "tag_ttl": "1s",
                                        "revalidate_timeout": "1s", "timeout": "20s", **extra}},
            "default": "docker.io"}


def up(mirror) -> float:
    return value(scrape(mirror), "mirror_upstream_up", upstream="docker.io")


def test_a_hung_upstream_costs_one_revalidation_timeout(make_mirror, faulty_upstream, image_set):
    images = [image_set.docker, image_set.oci, image_set.oci_index, image_set.docker_list]
    mirror = make_mirror(outage_config(faulty_upstream))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in images:
            check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        assert up(mirror) == 1
        time.sleep(1.1)                                   # every tag is past its TTL
        faulty_upstream.arm("hang", times=None)           # accepts, never answers
        heads = faulty_upstream.count("HEAD", "/manifests/")
        took = []
        for image in images + images:
            started = time.monotonic()
            check_manifest(get_manifest(client, image.repo, image.tags[0]), image)   # stale
            took.append(time.monotonic() - started)
        assert took[0] < 5, took             # revalidate_timeout (1 s), not timeout (20 s)
        assert sum(took[1:]) < 3, took       # the rest at once: upstream is known to be down
        assert faulty_upstream.count("HEAD", "/manifests/") - heads == 1
        assert up(mirror) == 0

        faulty_upstream.clear()                           # the outage ends
        deadline = time.monotonic() + 20
        while up(mirror) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert up(mirror) == 1, "the background probe did not bring the upstream back"
        heads = faulty_upstream.count("HEAD", "/manifests/")
        check_manifest(get_manifest(client, images[0].repo, images[0].tags[0]), images[0])
        assert faulty_upstream.count("HEAD", "/manifests/") - heads == 1   # revalidated again
    log = mirror.log_text()
    assert "upstream docker.io is down" in log and "upstream docker.io is back" in log


def test_a_refusing_upstream_is_marked_down_and_misses_still_try(make_mirror, faulty_upstream,
                                                                 image_set):
    """Connection refused (the upstream's port closed): stale copies at once; a miss is
    still tried (nothing else could answer it) and says why it failed."""
    image, other = image_set.docker, image_set.oci
    mirror = make_mirror(outage_config(faulty_upstream, retries=0))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, "v1"), image)
        time.sleep(1.1)
        faulty_upstream.server.stop()
        check_manifest(get_manifest(client, image.repo, "v1"), image)               # stale
        assert up(mirror) == 0
        resp = get_manifest(client, other.repo, other.tags[0])                      # a miss
        assert resp.status_code == 503
        assert "Connection refused" in resp.json()["errors"][0]["message"]
        faulty_upstream.server.start()
        deadline = time.monotonic() + 20
        while up(mirror) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert up(mirror) == 1
        check_manifest(get_manifest(client, other.repo, other.tags[0]), other)


def test_ratelimit_remaining_is_exposed(make_mirror, faulty_upstream, image_set):
    image = image_set.docker
    mirror = make_mirror(outage_config(faulty_upstream))
    faulty_upstream.arm("add_headers", path_contains="/manifests/v1", method="GET",
                        headers={"RateLimit-Limit": "100;w=21600",
                                 "RateLimit-Remaining": "97;w=21600"})
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        check_manifest(get_manifest(client, image.repo, "v1"), image)
    assert value(scrape(mirror), "mirror_upstream_ratelimit_remaining", upstream="docker.io") == 97
