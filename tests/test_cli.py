"""The maintenance commands (`mirror stats`, `ls`, `pin`, `unpin`, `gc`) as a real
subprocess, against the data directory of a real mirror while it runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.support.client import RegistryClient
from tests.support.image_set import push_rotating_images
from tests.test_pull_through import hub_config, pull

KB = 1000
FLUSH = 1.5          # the server writes usage and counters to the index about once a second


def cli(mirror, *args, config=None) -> subprocess.CompletedProcess:
    config = config or mirror.config_path
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=mirror.dir)


def ok(mirror, *args, **kw) -> str:
    result = cli(mirror, *args, **kw)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def ok_json(mirror, *args, **kw):
    return json.loads(ok(mirror, *args, "--json", **kw))


def fails(mirror, *args, status: int, says: str, **kw) -> None:
    """Exit ``status`` with one line on stderr that contains ``says``; nothing on stdout."""
    result = cli(mirror, *args, **kw)
    assert result.returncode == status, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirror: ") and says in lines[0], lines


def on_disk(mirror) -> dict[str, int]:
    """digest -> size of every file in the cache."""
    root = mirror.data_dir / "blobs"
    return {f"{p.parent.parent.name}:{p.name}": p.stat().st_size
            for p in root.glob("*/*/*") if p.is_file()}


def closure(image) -> int:
    """Bytes of an image as cached: its manifests and every blob."""
    return sum(len(m.manifest) for m in image.manifests()) + sum(b.size for b in image.blobs)


def files_of(mirror, image) -> list[bool]:
    digests = [m.digest for m in image.manifests()] + [b.digest for b in image.blobs]
    present = on_disk(mirror)
    return [d in present for d in digests]


# -- ls and stats ---------------------------------------------------------------------------

def test_ls_and_stats_describe_what_was_pulled(make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in image_set.images:
            pull(client, image)
        pull(client, image_set.oci, name=f"local.test/{image_set.oci.repo}")
        for image in image_set.images:          # again: everything from the cache
            pull(client, image)
    time.sleep(FLUSH)

    repos = {r["name"]: r for r in ok_json(mirror, "ls")}
    names = {i.repo for i in image_set.images} | {f"local.test/{image_set.oci.repo}"}
    assert set(repos) == names
    assert repos["library/alpinetest"]["tags"] == 2 and repos["big/image"]["tags"] == 1
    assert repos["big/image"]["size"] == closure(image_set.big)
    listing = ok(mirror, "ls")
    assert listing.splitlines()[0].split() == ["REPOSITORY", "TAGS", "SIZE", "LAST", "PULLED"]
    assert all(name in listing for name in names)

    for image in image_set.images:
        # The name as clients write it: alpinetest is docker.io's library/alpinetest.
        name = image.repo.removeprefix("library/")
        report = ok_json(mirror, "ls", name)
        assert (report["upstream"], report["repository"]) == ("docker.io", image.repo)
        assert {t["tag"]: t["digest"] for t in report["tags"]} == \
               {tag: image.digest for tag in image.tags}
        for tag in report["tags"]:
            assert tag["media_type"] == image.media_type
            assert tag["size"] == closure(image)
            assert tag["ttl"] == "fresh" and tag["pinned"] is False
        text = ok(mirror, "ls", name)
        assert text.startswith(f"docker.io/{image.repo}: ")
        for tag in image.tags:
            assert any(line.split()[0] == tag and line.endswith(image.digest)
                       for line in text.splitlines())
    other = ok_json(mirror, "ls", f"local.test/{image_set.oci.repo}")
    assert (other["upstream"], [t["tag"] for t in other["tags"]]) == ("local.test", ["1.0"])

    files = on_disk(mirror)
    stats = ok_json(mirror, "stats")
    manifests = {m.digest for m in image_set.manifests()}
    blobs = {b.digest for _, b in image_set.blobs()}
    assert stats["size"] == sum(files.values())
    assert set(files) == manifests | blobs
    assert (stats["manifests"], stats["blobs"]) == (len(manifests), len(blobs))
    assert (stats["repositories"], stats["tags"], stats["pins"]) == (6, 7, 0)
    assert stats["max_size"] is None
    blob_bytes = sum(b.size for i in image_set.images for b in i.blobs)
    counters = stats["counters"]
    assert counters["blob_misses"] == len(blobs)
    assert counters["bytes_from_upstream"] == blob_bytes
    assert counters["bytes_from_cache"] == blob_bytes + sum(b.size for b in image_set.oci.blobs)
    assert counters["blob_hits"] == len(blobs) + len(image_set.oci.blobs)
    assert counters["evictions"] == counters["stale_serves"] == 0
    assert 0 < stats["hit_ratio"]["manifests"] < 1 and 0 < stats["hit_ratio"]["blobs"] < 1
    biggest = stats["top_by_size"][0]
    assert (biggest["image"], biggest["size"]) == ("big/image:latest", closure(image_set.big))
    assert len(stats["top_by_size"]) == 7

    text = ok(mirror, "stats")
    assert f"{len(blobs)} blobs, {len(manifests)} manifests in 6 repositories" in text
    assert "(no max_size: unbounded)" in text
    assert "big/image:latest" in text and "top images by size" in text

    # No budget, nothing unused or unreferenced: gc has nothing to do.
    assert "would remove 0 manifests and 0 blobs" in ok(mirror, "gc", "--dry-run")
    assert "removed 0 manifests and 0 blobs" in ok(mirror, "gc")
    assert on_disk(mirror) == files


# -- pin and unpin ----------------------------------------------------------------------------

@pytest.fixture
def small_images(make_registry, tmp_path):
    """Six ~600 KB images in a registry of the test's own."""
    registry = make_registry()
    with RegistryClient(registry.url) as client:
        images = push_rotating_images(tmp_path, client, seed=40_000)
    return registry, images


def test_pinned_images_survive_eviction_until_unpinned(make_mirror, small_images):
    registry, images = small_images
    pinned, later, rotating = images[0], images[1], images[2:]
    mirror = make_mirror({"upstreams": {"docker.io": {"url": registry.url, "tag_ttl": "0s"}},
                          "max_size": 2_500 * KB, "high_watermark": "90%",
                          "low_watermark": "70%"})
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, pinned)
        out = ok(mirror, "pin", f"{pinned.repo}:1")
        assert out.startswith(f"pinned docker.io/{pinned.repo}:1 ({pinned.digest}, ")
        assert "already pinned" in ok(mirror, "pin", f"{pinned.repo}:1")
        # Pinned before it is ever pulled: kept once it is.
        assert "not cached yet" in ok(mirror, "pin", f"{later.repo}:1")
        pull(client, later)
        for _ in range(2):
            for image in rotating:      # ~2.4 MB of other images through a 2.5 MB budget
                pull(client, image)
        time.sleep(FLUSH)
        assert ok_json(mirror, "stats")["counters"]["evictions"] > 0
        assert all(files_of(mirror, pinned)) and all(files_of(mirror, later))
        assert not all(all(files_of(mirror, i)) for i in rotating)   # the budget did bite

        mark = registry.mark()
        pull(client, pinned)
        pull(client, later)
        # Nothing fetched again: HEADs revalidate the (expired) tags, the rest is cached.
        assert registry.count("GET", "/manifests/", since=mark) == 0
        assert registry.count("GET", "/blobs/", since=mark) == 0
        tags = ok_json(mirror, "ls", pinned.repo)["tags"]
        assert [(t["tag"], t["pinned"], t["ttl"]) for t in tags] == [("1", True, "expired")]
        assert "pins: 1" in ok(mirror, "ls", pinned.repo)
        assert ok_json(mirror, "stats")["pins"] == 2

        assert ok(mirror, "unpin", f"{pinned.repo}:1") == f"unpinned docker.io/{pinned.repo}:1\n"
        for image in rotating:          # the unpinned image is now the least recently used
            pull(client, image)
        ok(mirror, "gc")
        assert not all(files_of(mirror, pinned))
        assert all(files_of(mirror, later))
        mark = registry.mark()
        pull(client, pinned)            # it comes back from upstream
        assert registry.count("GET", "/blobs/", since=mark) > 0


def test_a_digest_pin_keeps_that_manifest(make_mirror, small_images):
    registry, images = small_images
    image = images[0]
    # ~601 KB: well under the high watermark (1080 KB), over the low one (480 KB) gc goes to.
    mirror = make_mirror({"upstreams": {"docker.io": {"url": registry.url, "tag_ttl": "0s"}},
                          "max_size": 1_200 * KB, "low_watermark": "40%"})
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, image)
    out = ok(mirror, "pin", f"{image.repo}@{image.digest}")
    assert out.startswith(f"pinned docker.io/{image.repo}@{image.digest} (") and "cached" in out
    assert [t["pinned"] for t in ok_json(mirror, "ls", image.repo)["tags"]] == [True]
    time.sleep(FLUSH)
    assert "removed 0 manifests and 0 blobs" in ok(mirror, "gc")
    assert all(files_of(mirror, image))
    ok(mirror, "unpin", f"{image.repo}@{image.digest}")
    dry = ok(mirror, "gc", "--dry-run")      # nothing protects it now
    assert image.digest in dry and " lru " in dry


# -- gc -------------------------------------------------------------------------------------

def test_gc_dry_run_changes_nothing_and_gc_removes_what_it_listed(make_mirror, upstream,
                                                                  image_set):
    total = sum(closure(i) for i in image_set.images)
    # The server never reaches its high watermark (even counting a fill twice while it
    # commits); gc goes down to the low one.
    budget = 3 * total
    mirror = make_mirror(hub_config(upstream, ttl="0s", max_size=budget,
                                    high_watermark="95%", low_watermark="25%"))
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in image_set.images:
            pull(client, image)
        time.sleep(FLUSH)
        before = on_disk(mirror)
        stats_before = ok_json(mirror, "stats")
        assert stats_before["size"] == sum(before.values()) == total

        dry = ok(mirror, "gc", "--dry-run")
        listed = {line.split()[-1] for line in dry.splitlines() if line.split()[-1:] and
                  line.split()[-1].startswith("sha256:")}
        assert listed and "dry run: nothing changed" in dry
        assert dry.splitlines()[0].split() == ["SIZE", "REASON", "KIND", "DIGEST"]
        assert on_disk(mirror) == before
        assert ok_json(mirror, "stats") == stats_before

        out = ok(mirror, "gc")
        after = on_disk(mirror)
        assert set(before) - set(after) == listed and set(after) <= set(before)
        freed = sum(before[d] for d in listed)
        assert out.startswith("removed ") and "; cache " in out
        stats = ok_json(mirror, "stats")
        assert stats["size"] == sum(after.values()) == total - freed
        assert stats["size"] <= 0.25 * budget
        assert stats["counters"]["evictions"] == len(listed)
        assert stats["counters"]["evicted_bytes"] == freed
        # What is left is consistent: tags of removed manifests went with them.
        repos = {r["name"]: r for r in ok_json(mirror, "ls")}
        for image in image_set.images:
            expected = len(image.tags) if image.digest in after else 0
            assert repos.get(image.repo, {"tags": 0})["tags"] == expected

        # The running mirror serves every image, byte-exact, fetching what gc removed.
        mark = upstream.mark()
        for image in image_set.images:
            pull(client, image)
        refetched = upstream.count("GET", "/blobs/", since=mark)
        assert refetched == sum(1 for _, b in image_set.blobs() if b.digest in listed)
        time.sleep(FLUSH)
        blobs = {b.digest for _, b in image_set.blobs()}
        assert {d for d in before if d in blobs} <= set(on_disk(mirror))   # cached again


def test_the_server_caches_again_the_manifests_gc_removed(make_mirror, small_images):
    registry, images = small_images
    image = images[0]
    # The server has no budget (so nothing but the generation makes it reload); gc runs
    # with one, so it has something to remove.
    mirror = make_mirror({"upstreams": {"docker.io": {"url": registry.url, "tag_ttl": "0s"}}})
    budget = mirror.dir / "budget.yml"
    budget.write_text(yaml.safe_dump({**mirror.config, "max_size": 700 * KB}))
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, image)
        time.sleep(FLUSH)
        ok(mirror, "gc", config=budget)
        assert image.digest not in on_disk(mirror)
        time.sleep(FLUSH)                # time enough for a server to notice
        pull(client, image)
        time.sleep(FLUSH)
        assert image.digest in on_disk(mirror)
        mark = registry.mark()
        pull(client, image)
        assert registry.count("GET", since=mark) == 0


# -- errors -----------------------------------------------------------------------------------

def test_bad_references_and_bad_config_are_one_line_errors(make_mirror, upstream, tmp_path):
    mirror = make_mirror(hub_config(upstream))
    fails(mirror, "pin", "Alpine:3.19", status=2, says="invalid repository name 'Alpine'")
    fails(mirror, "pin", "localhost:5000/alpine", status=2,
          says="invalid repository name 'localhost:5000/alpine'")
    fails(mirror, "pin", ":3.19", status=2, says="expected NAME[:TAG] or NAME@DIGEST")
    fails(mirror, "pin", "alpine:-x", status=2, says="invalid tag")
    fails(mirror, "unpin", "alpine@sha256:abc", status=2, says="invalid digest")
    fails(mirror, "ls", "UPPER/case", status=2, says="invalid repository name")
    fails(mirror, "unpin", "alpine:3.19", status=1,
          says="docker.io/library/alpine:3.19 is not pinned")
    fails(mirror, "ls", "alpine", status=1, says="nothing cached for docker.io/library/alpine")
    assert ok(mirror, "ls") == "the cache is empty\n"
    # A bare name is NAME:latest, as docker reads it.
    assert ok(mirror, "pin", "alpine") == ("pinned docker.io/library/alpine:latest (not cached "
                                           "yet: it will be kept once it is pulled)\n")
    assert ok_json(mirror, "stats")["pins"] == 1
    assert ok(mirror, "unpin", "alpine") == "unpinned docker.io/library/alpine:latest\n"
    assert ok(mirror, "pin", "local.test/org/app").startswith("pinned local.test/org/app:latest ")

    bad = tmp_path / "bad.yml"
    bad.write_text("max_size: lots\n")
    for command in (["stats"], ["ls"], ["pin", "alpine:1"], ["unpin", "alpine:1"], ["gc"]):
        fails(mirror, *command, config=bad, status=2, says="max_size: expected a size")
    fails(mirror, "gc", config=tmp_path / "missing.yml", status=2, says="cannot read")
    elsewhere = tmp_path / "elsewhere.yml"
    elsewhere.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "nothing-here")}))
    fails(mirror, "stats", config=elsewhere, status=1, says="no cache in")
    assert not (tmp_path / "nothing-here").exists()
    # --data-dir overrides the config's, as for serve.
    assert ok(mirror, "ls", "--data-dir", str(mirror.data_dir), config=elsewhere) == \
        "the cache is empty\n"
