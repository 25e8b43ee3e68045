"""Site mirrors in front of a regional mirror (README "Several replicas"): a site
mirror lists the regional one under ``mirrors:`` of each upstream and tells it which
registry it means with ``?ns=<upstream name>``, as containerd does, so one regional
mirror serves every registry and the site goes upstream only through it."""

from __future__ import annotations

import httpx

from tests.support.ports import free_port
from tests.test_pull_through import check_manifest, fetch_blob, get_manifest


def test_site_mirror_reaches_a_non_default_registry_through_the_regional_mirror(
        make_mirror, upstream, image_set):
    image = image_set.docker
    nowhere = f"http://127.0.0.1:{free_port()}"      # nothing listens: not reachable
    # The regional mirror: its default upstream goes nowhere, the images' registry is
    # its upstream "registry.example"; only ?ns=registry.example reaches it.
    regional = make_mirror({"upstreams": {
        "docker.io": {"url": nowhere, "retries": 0, "timeout": "2s"},
        "registry.example": {"url": upstream.url}}, "default": "docker.io"})
    # The site mirror: registry.example itself is unreachable from the site; the
    # regional mirror is its mirror, trusted for tags too.
    site = make_mirror({"upstreams": {"registry.example": {
        "url": nowhere, "retries": 0, "timeout": "2s", "revalidate_timeout": "2s",
        "mirrors": [{"url": regional.url, "capabilities": ["pull", "resolve"]}]}},
        "default": "registry.example"})
    with httpx.Client(base_url=site.url, timeout=60) as client:
        check_manifest(get_manifest(client, image.repo, image.tags[0]), image)
        for blob in image.blobs:
            fetch_blob(client, image.repo, blob)
    regional_log = regional.log_text()
    assert "ns=registry.example" in regional_log
    with httpx.Client(base_url=regional.url, timeout=60) as client:
        # What the site pulled is now cached at the regional mirror, under that registry.
        resp = get_manifest(client, image.repo, image.digest,
                            params={"ns": "registry.example"})
        check_manifest(resp, image)
