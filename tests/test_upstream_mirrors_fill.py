"""Blob bodies across an upstream's endpoints (issue 13): a fill walks the ``pull``
sources best first (a ``mirrors:`` accelerator, then the source of truth ``url``),
resumes with ``Range`` on the next source when one breaks or is too slow, starts
again from byte 0 on another source when one served wrong bytes, and remembers who
failed (the penalty). Two real registries hold the same images; the accelerator sits
behind the fault-injecting proxy; the mirror runs as a real process."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from tests.support.client import read_blob
from tests.support.clients import check_dir_image, needs, run, which


def config_for(truth_url: str, mirror_url: str, **upstream) -> dict:
    return {"upstreams": {"docker.io": {
        "url": truth_url,
        "mirrors": [{"url": mirror_url, "capabilities": ["pull"]}],
        **upstream}}, "default": "docker.io"}


def cached_digest(mirror, digest: str) -> str:
    h = hashlib.sha256()
    with open(mirror.cached_path(digest), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


@pytest.fixture
def big(image_set, accelerator_images):
    image = image_set.big
    return image, image.largest_blob


def blob_gets(registry, digest: str, since: int, status: int | None = None) -> int:
    """Blob GETs in the registry's access log (waiting up to 5 s for a first one: a
    line is written once the response has ended)."""
    return registry.wait_count("GET", f"/blobs/{digest}", 1, since=since, status=status)


def wait_for_log(mirror, *texts: str, timeout: float = 60) -> None:
    """Until one of ``texts`` is in the mirror's log."""
    deadline = time.monotonic() + timeout
    while not any(text in mirror.log_text() for text in texts):
        assert time.monotonic() < deadline, f"none of {texts!r} in the mirror's log"
        time.sleep(0.1)


def test_blobs_come_from_a_healthy_accelerator(make_mirror, upstream, accelerator,
                                               faulty_accelerator, big):
    image, blob = big
    truth_mark, acc_mark = upstream.mark(), accelerator.mark()
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url))
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    assert blob_gets(accelerator, blob.digest, acc_mark) == 1
    assert upstream.count("GET", "/blobs/", since=truth_mark) == 0
    assert cached_digest(mirror, blob.digest) == blob.digest
    text = httpx.get(f"{mirror.url}/metrics").text
    source = faulty_accelerator.host
    line = next(x for x in text.splitlines()
                if x.startswith("mirror_upstream_source_bytes_total{")
                and f'source="{source}"' in x)
    assert float(line.rsplit(" ", 1)[1]) == blob.size
    # The access log names the source the miss came from.
    blob_line = next(x for x in mirror.log_text().splitlines()
                     if "mirror.access" in x and f"/blobs/{blob.digest}" in x)
    assert f"miss@{source}" in blob_line


def test_corrupt_bytes_from_the_accelerator_are_never_served_and_the_truth_completes(
        make_mirror, upstream, accelerator, faulty_accelerator, big):
    image, blob = big
    truth_mark = upstream.mark()
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url))
    fault = faulty_accelerator.arm("corrupt", path_contains=blob.digest, method="GET",
                                   offset=blob.size // 3)
    attempts = []
    for _ in range(3):          # a client following the bad download is cut off, retries
        n, digest, error = read_blob(mirror, image.repo, blob)
        attempts.append((n, digest, error))
        if error is None:
            break
    for n, _digest, error in attempts[:-1]:
        assert error is not None and n < blob.size      # aborted, never complete-looking
    assert attempts[-1] == (blob.size, blob.digest, None), attempts
    assert fault.hits == 1
    # The truth sent the whole blob again, from byte 0 (not a resume of bad bytes).
    assert blob_gets(upstream, blob.digest, truth_mark, status=200) == 1
    assert blob_gets(upstream, blob.digest, truth_mark) == 1
    assert cached_digest(mirror, blob.digest) == blob.digest
    assert "wrong bytes" in mirror.log_text() or "hashed to" in mirror.log_text()


def test_accelerator_going_down_mid_blob_costs_one_resume_on_the_truth(
        make_mirror, upstream, accelerator, faulty_accelerator, big):
    image, blob = big
    truth_mark = upstream.mark()
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url))
    fault = faulty_accelerator.arm("reset", path_contains=blob.digest, method="GET",
                                   after=blob.size // 2)
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    assert fault.hits == 1
    assert faulty_accelerator.count("GET", f"/blobs/{blob.digest}") == 1
    # One ranged GET on the truth for the rest, nothing from byte 0.
    assert blob_gets(upstream, blob.digest, truth_mark, status=206) == 1
    assert blob_gets(upstream, blob.digest, truth_mark) == 1
    assert cached_digest(mirror, blob.digest) == blob.digest


def test_a_slow_accelerator_is_abandoned_for_the_faster_truth(
        make_mirror, upstream, accelerator, faulty_accelerator, big):
    image, blob = big
    truth_mark = upstream.mark()
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url,
                                    min_speed=1024 * 1024))
    # ~640 KB/s: the whole blob would take 13 s at 8 MB (160 s at 100 MB).
    faulty_accelerator.arm("drip", path_contains=blob.digest, method="GET", times=None,
                           chunk=32 * 1024, delay=0.05)
    started = time.monotonic()
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    elapsed = time.monotonic() - started
    assert blob_gets(upstream, blob.digest, truth_mark, status=206) == 1
    assert "slower than min_speed" in mirror.log_text()
    assert elapsed < 30 + blob.size / 20e6, elapsed       # does not wait out the drip


def test_a_failed_accelerator_is_asked_after_the_truth_for_the_next_fill(
        make_mirror, upstream, accelerator, faulty_accelerator, big, image_set):
    image, blob = big
    other = image_set.docker
    small = other.largest_blob
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url))
    faulty_accelerator.arm("reset", path_contains=blob.digest, method="GET",
                           after=blob.size // 2)
    assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    assert faulty_accelerator.count("GET", f"/blobs/{blob.digest}") == 1
    truth_mark = upstream.mark()
    assert read_blob(mirror, other.repo, small) == (small.size, small.digest, None)
    assert blob_gets(upstream, small.digest, truth_mark) == 1
    assert faulty_accelerator.count("GET", f"/blobs/{small.digest}") == 0


def test_skopeo_copy_through_the_mirror_is_byte_exact_from_the_accelerator(
        make_mirror, upstream, accelerator, faulty_accelerator, image_set, big, tmp_path):
    path = which("skopeo")
    if path is None:
        pytest.fail("skopeo is required (apt-get install skopeo; scripts/test does)")
    truth_mark = upstream.mark()
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url))
    for image in (image_set.oci_index, image_set.big):
        out = tmp_path / image.repo.replace("/", "-")
        run([path, "--insecure-policy", "copy", "--all", "--src-tls-verify=false",
             f"docker://{mirror.host}/{image.ref}", f"dir:{out}"])
        check_dir_image(out, image)
    assert upstream.count("GET", "/blobs/", since=truth_mark) == 0
    assert faulty_accelerator.count("GET", "/blobs/") > 0


def test_a_blob_missing_at_the_accelerator_comes_from_the_truth_without_penalty(
        make_mirror, upstream, accelerator, faulty_accelerator, image_set, big):
    first, second = image_set.docker.largest_blob, image_set.oci.largest_blob
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url))
    faulty_accelerator.arm("status", path_contains=first.digest, method="GET", status=404,
                           code="BLOB_UNKNOWN", message="blob unknown to registry")
    truth_mark = upstream.mark()
    assert read_blob(mirror, image_set.docker.repo, first) == (first.size, first.digest, None)
    assert blob_gets(upstream, first.digest, truth_mark, status=200) == 1
    # A 404 is no failure of the accelerator: the next blob still comes from it.
    assert read_blob(mirror, image_set.oci.repo, second) == (second.size, second.digest, None)
    assert faulty_accelerator.count("GET", f"/blobs/{second.digest}", status=200) == 1
    assert upstream.count("GET", f"/blobs/{second.digest}", since=truth_mark) == 0


def test_wrong_bytes_everywhere_fail_the_fill_once_and_cache_nothing(
        make_mirror, faulty_upstream, faulty_accelerator, big):
    image, blob = big
    mirror = make_mirror(config_for(faulty_upstream.url, faulty_accelerator.url))
    for proxy in (faulty_upstream, faulty_accelerator):
        proxy.arm("corrupt", path_contains=blob.digest, method="GET", times=None, offset=7)
    n, digest, error = read_blob(mirror, image.repo, blob)
    assert error is not None and n < blob.size
    # The client was cut off when the accelerator's bytes were thrown away; the fill
    # goes on on the truth (until it fails, or is let go with no one reading it).
    wait_for_log(mirror, f"fill of {blob.digest} failed",
                 f"blob {blob.digest}: no client has read it")
    assert not mirror.is_cached(blob.digest)
    # Each source was asked once: no loop between them.
    assert faulty_accelerator.count("GET", f"/blobs/{blob.digest}") == 1
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 1


@needs("dockerd", "containerd")
def test_dockerd_pulls_byte_exact_through_an_accelerator(as_root, make_mirror, upstream,
                                                         accelerator, faulty_accelerator,
                                                         image_set, tmp_path):
    """dockerd's registry-mirrors -> the mirror -> the accelerator, with the accelerator
    breaking mid-blob on the image's layer: the pull still completes byte-exact."""
    from tests.support.clients import DockerdProcess

    image = image_set.docker
    layer = image.largest_blob
    truth_mark, acc_mark = upstream.mark(), accelerator.mark()
    mirror = make_mirror(config_for(upstream.url, faulty_accelerator.url))
    faulty_accelerator.arm("reset", path_contains=layer.digest, method="GET")  # at half
    with DockerdProcess(tmp_path / "dockerd", mirror.url) as dockerd:
        dockerd.docker("pull", "alpinetest:v1")
        info = dockerd.inspect("alpinetest:v1")
        assert info["Id"] == image.blobs[0].digest           # the config: byte-exact
        assert f"alpinetest@{image.digest}" in info["RepoDigests"]
    # The config came from the accelerator; the broken layer was finished by url.
    assert blob_gets(accelerator, image.blobs[0].digest, acc_mark) == 1
    assert upstream.count("GET", f"/blobs/{layer.digest}", since=truth_mark) == 1
    assert cached_digest(mirror, layer.digest) == layer.digest
