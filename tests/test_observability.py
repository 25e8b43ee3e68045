"""/metrics, /healthz, /readyz and the access log, after known hits and misses."""

from __future__ import annotations

import shutil
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.test_pull_through import hub_config, pull


def scrape(mirror) -> dict[tuple, float]:
    resp = httpx.get(f"{mirror.url}/metrics")
    assert resp.status_code == 200
    values = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values, name, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_hits_and_misses(make_mirror, upstream, image_set):
    image = image_set.docker
    mirror = make_mirror(hub_config(upstream))
    before = scrape(mirror)
    blob_bytes = sum(b.size for b in image.blobs)
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, image)              # 2 tags + 1 digest: 1 miss, then hits; blobs: misses
        after_cold = scrape(mirror)
        pull(client, image)              # everything from the cache
        after_warm = scrape(mirror)

    def delta(a, b, name, **labels):
        return value(b, name, **labels) - value(a, name, **labels)

    n_blobs = len(image.blobs)
    lookups = "mirror_cache_lookups_total"
    assert delta(before, after_cold, lookups, kind="manifest", result="miss") == 2
    assert delta(before, after_cold, lookups, kind="manifest", result="hit") == 1
    assert delta(before, after_cold, lookups, kind="blob", result="miss") == n_blobs
    assert delta(after_cold, after_warm, lookups, kind="manifest", result="hit") == 3
    assert delta(after_cold, after_warm, lookups, kind="blob", result="hit") == n_blobs
    assert delta(after_cold, after_warm, lookups, kind="blob", result="miss") == 0
    assert delta(before, after_cold, "mirror_bytes_served_total", source="upstream") == blob_bytes
    assert delta(after_cold, after_warm, "mirror_bytes_served_total", source="cache") == blob_bytes
    assert delta(before, after_cold, "mirror_upstream_bytes_total",
                 upstream="docker.io") == blob_bytes
    assert delta(after_cold, after_warm, "mirror_upstream_bytes_total", upstream="docker.io") == 0
    assert delta(before, after_cold, "mirror_upstream_requests_total", upstream="docker.io",
                 method="GET", status="200") == 2 + n_blobs
    assert delta(after_cold, after_warm, "mirror_http_requests_total", route="blob", method="GET",
                 status="200") == n_blobs
    assert value(after_warm, "mirror_cache_size_bytes") >= blob_bytes
    assert value(after_warm, "mirror_fills_in_progress") == 0


def test_health_and_readiness(make_mirror, upstream):
    mirror = make_mirror(hub_config(upstream))
    assert httpx.get(f"{mirror.url}/healthz").status_code == 200
    assert httpx.get(f"{mirror.url}/readyz").text == "ready\n"
    shutil.rmtree(mirror.data_dir / "tmp")               # the data dir is no longer usable
    resp = httpx.get(f"{mirror.url}/readyz")
    assert resp.status_code == 503 and "not writable" in resp.text
    (mirror.data_dir / "tmp").mkdir()
    assert httpx.get(f"{mirror.url}/readyz").status_code == 200


def test_access_log_has_one_line_per_request_with_the_cache_outcome(make_mirror, upstream,
                                                                   image_set):
    image = image_set.docker
    mirror = make_mirror(hub_config(upstream))
    blob = image.blobs[0]
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        client.get(f"/v2/{image.repo}/blobs/{blob.digest}")       # miss
        client.get(f"/v2/{image.repo}/blobs/{blob.digest}")       # hit
        client.get("/v2/a%0Ab/manifests/latest")                  # a newline in the request
    time.sleep(0.2)
    lines = [line for line in mirror.log_text().splitlines() if "mirror.access" in line]
    blob_lines = [line for line in lines if f"/blobs/{blob.digest}" in line]
    assert len(blob_lines) == 2
    agent = f'"python-httpx/{httpx.__version__}"'
    assert blob_lines[0].endswith(f" miss {agent}") and f" 200 {blob.size} " in blob_lines[0]
    assert blob_lines[1].endswith(f" hit {agent}")
    bad = [line for line in lines if "a%0Ab" in line]
    # logged escaped, on one line
    assert len(bad) == 1 and (" 400 " in bad[0] or " 404 " in bad[0])
