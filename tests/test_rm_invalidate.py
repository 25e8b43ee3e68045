"""`mirror rm` and `mirror invalidate` as real subprocesses beside a running mirror:
what they remove or expire, what they keep, and that the server then fetches again
exactly what went (and revalidates exactly what was invalidated)."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from tests.support.client import MANIFEST_V2, RegistryClient
from tests.support.image_set import Image
from tests.support.images import (
    docker_manifest,
    make_config,
    make_layer,
    push_blob,
    push_manifest,
    sha256_bytes,
)
from tests.test_cli import FLUSH, cli, fails, ok, ok_json, on_disk
from tests.test_pull_through import ALL_ACCEPT, get_manifest, hub_config, pull


def _image(dir, client, repo, tags, layers) -> Image:
    config = make_config(dir, [layer.diff_id for layer in layers])
    for blob in [*layers, config]:
        push_blob(client, None, repo, blob)
    data = docker_manifest(config, layers)
    for tag in tags:
        push_manifest(client, None, repo, tag, data, MANIFEST_V2)
    return Image(repo, list(tags), data, MANIFEST_V2, sha256_bytes(data), [config, *layers])


@pytest.fixture
def shared(make_registry, tmp_path):
    """app/one:1 and :latest, app/two:1 sharing a base layer with it, and other/copy:1,
    the very manifest of app/one under another name."""
    registry = make_registry()
    base = make_layer(tmp_path, 300_000, seed=71)
    own1, own2 = make_layer(tmp_path, 200_000, seed=72), make_layer(tmp_path, 100_000, seed=73)
    with RegistryClient(registry.url) as client:
        one = _image(tmp_path, client, "app/one", ["1", "latest"], [base, own1])
        two = _image(tmp_path, client, "app/two", ["1"], [base, own2])
        copy = _image(tmp_path, client, "other/copy", ["1"], [base, own1])
    assert copy.digest == one.digest
    return registry, one, two, copy


def listed(out: str) -> dict[str, str]:
    """WHAT -> KIND of the table rm prints."""
    rows = [line.split() for line in out.splitlines()]
    return {r[-1]: r[-2] for r in rows if len(r) >= 3 and r[-2] in ("tag", "manifest", "blob")}


def consistent(mirror) -> None:
    """The index and the files agree after a removal."""
    files = on_disk(mirror)
    stats = ok_json(mirror, "stats")
    assert stats["size"] == sum(files.values())
    assert stats["blobs"] + stats["manifests"] == len(files)


def test_rm_removes_a_tag_and_only_what_nothing_else_uses(make_mirror, shared):
    registry, one, two, copy = shared
    mirror = make_mirror({"upstreams": {"docker.io": {"url": registry.url}}})
    base, own1, own2 = one.blobs[1].digest, one.blobs[2].digest, two.blobs[2].digest
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        for image in (one, two, copy):
            pull(client, image)
        before = on_disk(mirror)
        assert len(before) == 2 + 5        # two manifests; base, two layers, two configs

        dry = ok(mirror, "rm", "app/two:1", "--dry-run")
        assert dry.splitlines()[0].split() == ["SIZE", "KIND", "WHAT"]
        gone = {"docker.io/app/two:1": "tag", two.digest: "manifest",
                two.blobs[0].digest: "blob", own2: "blob"}     # not the shared base
        assert listed(dry) == gone
        size = len(two.manifest) + two.blobs[0].size + two.blobs[2].size
        assert dry.splitlines()[-1].startswith("would remove 1 tag, 1 manifest and 2 blobs, ")
        assert "(dry run: nothing changed)" in dry
        assert on_disk(mirror) == before

        out = ok(mirror, "rm", "app/two:1")
        assert listed(out) == gone and out.splitlines()[-1].startswith("removed 1 tag, ")
        assert set(before) - set(on_disk(mirror)) == {two.digest, two.blobs[0].digest, own2}
        assert sum(before.values()) - sum(on_disk(mirror).values()) == size
        fails(mirror, "ls", "app/two", status=1, says="nothing cached for docker.io/app/two")
        consistent(mirror)

        # A bare name is NAME:latest, as docker reads it: that tag goes, and the manifest
        # stays while another tag points at it.
        out = ok(mirror, "rm", "app/one")
        assert listed(out) == {"docker.io/app/one:latest": "tag"}
        assert f"kept manifest {one.digest}: tagged docker.io/app/one:1" in out
        assert "removed 1 tag, 0 manifests and 0 blobs, 0 B" in out
        # Every tag of the repository; the manifest is still other/copy:1.
        out = ok(mirror, "rm", "app/one:*")
        assert listed(out) == {"docker.io/app/one:1": "tag"}
        assert f"kept manifest {one.digest}: tagged docker.io/other/copy:1" in out
        assert "app/one" not in {r["name"] for r in ok_json(mirror, "ls")}
        assert set(on_disk(mirror)) == {one.digest, *(b.digest for b in one.blobs)}
        # The last user of the manifest and of the base layer.
        out = ok(mirror, "rm", "other/copy:1")
        assert set(listed(out)) == {"docker.io/other/copy:1", one.digest, base, own1,
                                    one.blobs[0].digest}
        assert on_disk(mirror) == {}
        consistent(mirror)
        assert ok(mirror, "ls") == "the cache is empty\n"

        # The running server fetches again what went, and only that, then serves it cached.
        time.sleep(FLUSH)
        mark = registry.mark()
        pull(client, two)
        assert registry.count("GET", "/manifests/", since=mark) == 1
        assert registry.count("GET", "/blobs/", since=mark) == 3
        pull(client, one)
        assert registry.count("GET", "/manifests/", since=mark) == 1 + 2    # :1 and :latest
        assert registry.count("GET", "/blobs/", since=mark) == 3 + 2         # base is cached
        mark = registry.mark()
        for image in (one, two):
            pull(client, image)
        assert registry.count("GET", since=mark) == 0


def test_rm_an_index_a_glob_and_an_image_being_served(make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream))
    lists = (image_set.oci_index, image_set.docker_list)
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in image_set.images:
            pull(client, image)
        before = on_disk(mirror)
        fails(mirror, "rm", "alpinetest", status=1, says="nothing cached matches 'alpinetest' "
              "(read as docker.io/library/alpinetest:latest)")
        fails(mirror, "rm", "nosuch/*", status=1, says="nothing cached matches 'nosuch/*'")
        fails(mirror, "rm", "Bad@sha256:00", status=2, says="invalid")
        assert on_disk(mirror) == before

        # A name glob: every tag of every match, each index with its children and blobs.
        dry = ok(mirror, "rm", "multiarch/*", "--dry-run")
        content = {m.digest for i in lists for m in i.manifests()} | \
                  {b.digest for i in lists for b in i.blobs}
        assert set(listed(dry)) == {f"docker.io/{i.repo}:latest" for i in lists} | content
        assert "would remove 2 tags, 6 manifests and 8 blobs" in dry
        assert on_disk(mirror) == before

        # Removed while a client downloads it: that download still completes, intact.
        big = image_set.big.largest_blob
        with client.stream("GET", f"/v2/{image_set.big.repo}/blobs/{big.digest}") as resp:
            assert resp.status_code == 200
            chunks = resp.iter_bytes()
            first = next(chunks)
            out = ok(mirror, "rm", "big/image")            # big/image:latest
            assert big.digest in listed(out) and big.digest not in on_disk(mirror)
            digest = hashlib.sha256(first)
            for chunk in chunks:
                digest.update(chunk)
        assert f"sha256:{digest.hexdigest()}" == big.digest

        oci = image_set.oci_index
        out = ok(mirror, "rm", "multiarch/oci:*")
        gone = {m.digest for m in oci.manifests()} | {b.digest for b in oci.blobs}
        assert set(listed(out)) == {"docker.io/multiarch/oci:latest"} | gone
        assert not gone & set(on_disk(mirror))
        assert all(m.digest in on_disk(mirror) for m in image_set.docker_list.manifests())
        consistent(mirror)

        time.sleep(FLUSH)
        mark = upstream.mark()
        pull(client, oci)                 # the index, both children, four blobs again
        assert upstream.count("GET", "/manifests/", since=mark) == 3
        assert upstream.count("GET", "/blobs/", since=mark) == 4
        pull(client, image_set.big)
        assert upstream.count("GET", "/blobs/", since=mark) == 4 + 2
        mark = upstream.mark()
        for image in image_set.images:
            pull(client, image)
        assert upstream.count("GET", since=mark) == 0
    assert on_disk(mirror) == before


def test_rm_keeps_pinned_images_unless_forced(make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream))
    alpine, app = image_set.docker, image_set.oci
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, alpine)
        pull(client, app)
    before = on_disk(mirror)
    ok(mirror, "pin", "alpinetest:v1")
    ok(mirror, "pin", f"{app.repo}@{app.digest}")

    result = cli(mirror, "rm", "alpinetest:v1")
    assert result.returncode == 1
    assert result.stderr == ("mirror: docker.io/library/alpinetest:v1 is pinned "
                             "(docker.io/library/alpinetest:v1): kept; unpin it, or rm --force\n")
    assert "removed 0 tags, 0 manifests and 0 blobs" in result.stdout
    # A pattern removes what is not pinned and says what it kept.
    result = cli(mirror, "rm", "alpinetest:*")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert listed(result.stdout) == {"docker.io/library/alpinetest:alias": "tag"}
    assert f"kept manifest {alpine.digest}: tagged docker.io/library/alpinetest:v1" in \
        result.stdout
    result = cli(mirror, "rm", f"{app.repo}:1.0")           # its digest is pinned
    assert result.returncode == 1 and f"@{app.digest}): kept" in result.stderr
    assert on_disk(mirror) == before

    out = ok(mirror, "rm", "--force", "alpinetest:v1", f"{app.repo}:1.0")
    assert "removed 2 tags, 2 manifests and 6 blobs" in out
    assert on_disk(mirror) == {}
    stats = ok_json(mirror, "stats")
    assert (stats["pins"], stats["tags"], stats["size"]) == (0, 0, 0)


def test_invalidate_makes_the_next_pull_revalidate_once(make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream, ttl="1h"))
    alpine = image_set.docker
    name = "library/alpinetest"

    def fetch(tag):
        resp = get_manifest(client, name, tag, accept=ALL_ACCEPT)
        assert resp.status_code == 200 and resp.content == alpine.manifest

    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, alpine)
        mark = upstream.mark()
        fetch("v1")
        assert upstream.count(since=mark) == 0              # fresh for an hour

        out = ok(mirror, "invalidate", "alpinetest:v1")
        assert out == (f"invalidated docker.io/{name}:v1 (was {alpine.digest})\n"
                       "1 tag stale now: the next pull of each asks upstream\n")
        ttl = {t["tag"]: t["ttl"] for t in ok_json(mirror, "ls", "alpinetest")["tags"]}
        assert ttl == {"v1": "expired", "alias": "fresh"}
        time.sleep(FLUSH)                                     # the server reloads its tags
        mark = upstream.mark()
        fetch("v1")
        fetch("alias")
        assert upstream.count("HEAD", "/manifests/v1", since=mark) == 1
        assert upstream.count("GET", "/manifests/", since=mark) == 0
        assert upstream.count(None, "/manifests/alias", since=mark) == 0
        mark = upstream.mark()
        fetch("v1")                                           # fresh again for an hour
        assert upstream.count(since=mark) == 0

        out = ok(mirror, "invalidate", "library/*")
        assert out.endswith("2 tags stale now: the next pull of each asks upstream\n")
        time.sleep(FLUSH)
        mark = upstream.mark()
        fetch("v1")
        fetch("alias")
        assert upstream.count("HEAD", "/manifests/", since=mark) == 2
        assert upstream.count("GET", "/manifests/", since=mark) == 0

    fails(mirror, "invalidate", "alpinetest", status=1, says="nothing cached matches "
          "'alpinetest' (read as docker.io/library/alpinetest:latest)")
    fails(mirror, "invalidate", f"alpinetest@{alpine.digest}", status=2,
          says="expected a tag (NAME[:TAG]), not a digest")
