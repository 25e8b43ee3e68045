"""The packed in-memory maps (mirror/cache_maps.py: 40 bytes a blob instead of 224,
36 a link instead of 190) answer exactly as the dict and set they replaced: loaded from
a crafted index they hold what the index rows say, and after any sequence of changes
they agree with a plain dict and set that saw the same changes."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import time

from mirror import cache_maps
from mirror.index import Index, TagRow
from mirror.models import HOSTED

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def sha256(n: int) -> str:
    return "sha256:" + hashlib.sha256(b"%d" % n).hexdigest()


def sha512(n: int) -> str:
    return "sha512:" + hashlib.sha512(b"%d" % n).hexdigest()


def crafted(path) -> dict:
    """An index with sha256 and sha512 digests, two media types, hosted and cached
    links, tags; the rows the old loaders (``Index.load_*``) give back from it."""
    async def make() -> dict:
        index = await Index.open(path, flush=False)
        await index.close()
        now = time.time()
        db = sqlite3.connect(path)
        with db:
            blobs = [(sha256(i), i * 1000 + 1) for i in range(700)] + \
                    [(sha512(i), 5 + i) for i in range(3)] + [(sha256(10**6), 0)]
            db.executemany("INSERT INTO blobs (digest, size, first_seen, last_access) "
                           "VALUES (?, ?, ?, ?)", [(d, s, now, now) for d, s in blobs])
            manifests = [(sha256(-i), OCI if i % 3 else DOCKER, 300 + i) for i in range(1, 60)] \
                + [(sha512(-1), OCI, 77)]
            db.executemany("INSERT INTO manifests (digest, media_type, size, first_seen, "
                           "last_access) VALUES (?, ?, ?, ?, ?)",
                           [(*m, now, now) for m in manifests])
            links = [("docker.io", f"library/app{i % 7}", sha256(i), now) for i in range(500)] \
                + [(HOSTED, "team/app", sha256(i), now) for i in range(0, 100, 3)] \
                + [(HOSTED, "team/other", sha256(i), now) for i in range(0, 50, 5)] \
                + [(HOSTED, "team/app", sha256(-1), now), (HOSTED, "team/app", sha512(1), now),
                   ("ghcr.io", "org/x", sha512(2), now), ("ghcr.io", "org/x", sha256(-2), now)]
            db.executemany("INSERT INTO repo_links VALUES (?, ?, ?, ?)", links)
            db.executemany("INSERT INTO tags (upstream, repository, tag, digest, fetched_at, "
                           "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                           [("docker.io", f"library/app{i % 7}", f"t{i}", sha256(-i - 1), now,
                             now + 60) for i in range(20)]
                           + [(HOSTED, "team/app", "v1", sha256(-1), now, now)])
        db.close()
        index = await Index.open(path, flush=False)
        try:
            return {"blobs": await index.load_blobs(), "manifests": await index.load_manifests(),
                    "tags": await index.load_tags(), "links": await index.load_links()}
        finally:
            await index.close()
    return asyncio.run(make())


def test_loaded_maps_hold_what_the_index_rows_say(tmp_path):
    rows = crafted(tmp_path / "index.db")
    maps = cache_maps.load(tmp_path / "index.db")

    assert dict(maps.blobs.items()) == rows["blobs"] and len(maps.blobs) == 704
    assert dict(maps.manifests.items()) == rows["manifests"]
    assert maps.tags == {(t.upstream, t.repository, t.tag): t for t in rows["tags"]}
    assert set(maps.links) == rows["links"] and len(maps.links) == len(rows["links"])
    for digest, size in rows["blobs"].items():
        assert maps.blobs.get(digest) == size and digest in maps.blobs
    for digest, entry in rows["manifests"].items():
        assert maps.manifests.get(digest) == entry
    for link in rows["links"]:
        assert link in maps.links
    for absent in (sha256(-500), sha512(99), "sha256:" + "A" * 64, "sha256:zz", "", "x" * 71):
        assert maps.blobs.get(absent) is None and absent not in maps.manifests
        assert ("docker.io", "library/app0", absent) not in maps.links
    assert ("docker.io", "library/app1", sha256(0)) not in maps.links    # app0's, not app1's
    assert ("docker.io", "library/none", sha256(0)) not in maps.links
    assert sorted(maps.links.of(HOSTED)) == sorted(k for k in rows["links"] if k[0] == HOSTED)
    assert sorted(maps.links.of("ghcr.io")) == sorted(k for k in rows["links"]
                                                     if k[0] == "ghcr.io")

    hosted = [d for u, _, d in rows["links"] if u == HOSTED]
    assert dict(maps.hosted) == {d: hosted.count(d) for d in hosted}
    sizes = {**{d: s for d, (_, s) in rows["manifests"].items()}, **rows["blobs"]}
    assert maps.size == sum(rows["blobs"].values()) + sum(s for _, s in
                                                          rows["manifests"].values())
    assert maps.hosted_size == sum(sizes.get(d, 0) for d in set(hosted))


def test_packed_maps_follow_changes_as_a_dict_and_a_set_would(tmp_path):
    rows = crafted(tmp_path / "index.db")
    maps = cache_maps.load(tmp_path / "index.db")
    blobs, manifests, links = dict(rows["blobs"]), dict(rows["manifests"]), set(rows["links"])
    rng = random.Random(14)
    digests = [*(sha256(i) for i in range(-80, 800)), *(sha512(i) for i in range(-2, 6)),
               "sha256:" + "A" * 64]
    repos = [("docker.io", f"library/app{i}") for i in range(9)] + [(HOSTED, "team/app"),
                                                                     ("ghcr.io", "org/x")]
    for step in range(6000):
        digest = rng.choice(digests)
        op = rng.randrange(6)
        if op == 0:
            size = rng.choice([0, 1, 2**40, rng.randrange(10**9)])
            maps.blobs[digest] = size
            blobs[digest] = size
        elif op == 1:
            assert maps.blobs.pop(digest, None) == blobs.pop(digest, None)
        elif op == 2:
            entry = (rng.choice([OCI, DOCKER, "application/x-new"]), rng.randrange(10**6))
            maps.manifests[digest] = entry
            manifests[digest] = entry
        elif op == 3:
            assert maps.manifests.pop(digest, None) == manifests.pop(digest, None)
        elif op == 4:
            link = (*rng.choice(repos), digest)
            maps.links.add(link)
            links.add(link)
        else:
            link = (*rng.choice(repos), digest)
            maps.links.discard(link)
            links.discard(link)
        probe = rng.choice(digests)
        assert maps.blobs.get(probe) == blobs.get(probe)
        assert maps.manifests.get(probe) == manifests.get(probe)
        assert ((*repos[step % len(repos)], probe) in maps.links) == \
            ((*repos[step % len(repos)], probe) in links)
        if step % 1000 == 0:
            assert dict(maps.blobs.items()) == blobs and len(maps.blobs) == len(blobs)
            assert dict(maps.manifests.items()) == manifests
            assert set(maps.links) == links and len(maps.links) == len(links)
    assert dict(maps.blobs.items()) == blobs and len(maps.blobs) == len(blobs)
    assert dict(maps.manifests.items()) == manifests and len(maps.manifests) == len(manifests)
    assert set(maps.links) == links and len(maps.links) == len(links)
    for upstream in ("docker.io", HOSTED, "ghcr.io", "quay.io"):
        assert sorted(maps.links.of(upstream)) == sorted(k for k in links if k[0] == upstream)


def test_tag_rows_share_their_repository_names(tmp_path):
    crafted(tmp_path / "index.db")
    maps = cache_maps.load(tmp_path / "index.db")
    rows = [t for t in maps.tags.values() if t.repository == "library/app1"]
    assert len(rows) > 1 and all(isinstance(t, TagRow) for t in rows)
    assert len({id(t.repository) for t in rows}) == 1
