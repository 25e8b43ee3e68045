"""The CLI's report queries, rewritten to be cheaper at a million rows (`mirror stats`,
`ls`, `gc`: indexes, one look per digest instead of two joins, NOT EXISTS for NOT IN),
return exactly the rows the earlier queries (kept here as the reference) returned, on
an index crafted with the awkward cases: shared children (diamonds), an image index
over manifests, referenced content that is not cached, a digest that is both a blob
and a manifest, hosted links, pins, expired tags, orphans, sha512 digests. The new
indexes are also added to an index.db from before them."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time

from mirror.config_scale import IndexConfig, PostgresConfig
from mirror.index import Index, open_index
from mirror.models import HOSTED
from tests.support import postgres as _postgres

postgres = _postgres.postgres     # the fixture: a PostgreSQL cluster for the session

OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"

REFERENCE = {
    "linked_sizes":
        "SELECT l.upstream, l.repository, sum(coalesce(b.size, m.size, 0)) FROM repo_links l "
        "LEFT JOIN blobs b ON b.digest = l.digest LEFT JOIN manifests m ON m.digest = l.digest "
        "GROUP BY l.upstream, l.repository",
    "repositories":
        "SELECT DISTINCT upstream, repository FROM repo_links "
        "WHERE digest IN (SELECT digest FROM manifests) ORDER BY upstream, repository",
    "orphan_blobs":
        "SELECT digest, size FROM blobs WHERE first_seen < :before AND digest NOT IN "
        "(SELECT r.child FROM manifest_refs r JOIN manifests m ON m.digest = r.manifest)",
    "tag_report": """WITH RECURSIVE reach(root, d) AS (
                   SELECT DISTINCT digest, digest FROM tags
                   WHERE (:u IS NULL OR upstream = :u) AND (:r IS NULL OR repository = :r)
                   UNION SELECT reach.root, x.child FROM manifest_refs x
                         JOIN reach ON x.manifest = reach.d),
               closure(root, size) AS (
                   SELECT root, sum(coalesce(b.size, m.size, 0)) FROM reach
                   LEFT JOIN blobs b ON b.digest = reach.d
                   LEFT JOIN manifests m ON m.digest = reach.d GROUP BY root)
               SELECT t.upstream, t.repository, t.tag, t.digest, m.media_type,
                      coalesce(c.size, 0), t.fetched_at, t.expires_at, t.pulls, t.last_pull,
                      EXISTS (SELECT 1 FROM pins p WHERE p.upstream = t.upstream
                              AND p.repository = t.repository AND p.reference IN (t.tag, t.digest))
               FROM tags t LEFT JOIN manifests m ON m.digest = t.digest
               LEFT JOIN closure c ON c.root = t.digest
               WHERE (:u IS NULL OR t.upstream = :u) AND (:r IS NULL OR t.repository = :r)
               ORDER BY t.upstream, t.repository, t.tag""",
}


def d(name: str, algorithm: str = "sha256") -> str:
    return f"{algorithm}:" + hashlib.new(algorithm, name.encode()).hexdigest()


def craft(path) -> float:
    """Rows of an index with every awkward case; a time between the old and new rows."""
    now = time.time()
    old = now - 3600
    blobs = {d(f"b{i}"): 1000 * i + 7 for i in range(12)}
    blobs[d("b512", "sha512")] = 99
    blobs[d("both")] = 55                         # also a manifest row, same bytes
    blobs[d("orphan-new")] = 3
    manifests = {d(f"m{i}"): (OCI, 300 + i) for i in range(5)}
    manifests[d("both")] = (OCI, 55)
    manifests[d("index")] = (INDEX, 800)
    manifests[d("m512", "sha512")] = (OCI, 41)
    refs = [(d("m0"), d("b0"), "blob"), (d("m0"), d("b1"), "blob"), (d("m0"), d("b2"), "blob"),
            (d("m1"), d("b0"), "blob"), (d("m1"), d("b3"), "blob"),
            (d("m1"), d("not-cached"), "blob"),
            (d("m2"), d("b4"), "blob"), (d("m2"), d("both"), "blob"),
            (d("m2"), d("b512", "sha512"), "blob"),
            (d("index"), d("m0"), "manifest"), (d("index"), d("m1"), "manifest"),
            (d("index"), d("m-not-cached"), "manifest"),
            (d("gone-manifest"), d("b5"), "blob"),     # its manifest row is gone: b5 orphan
            (d("m512", "sha512"), d("b6"), "blob"), (d("m3"), d("b7"), "blob")]
    tags = [("docker.io", "library/a", "1", d("m0"), now + 60),
            ("docker.io", "library/a", "multi", d("index"), now + 60),
            ("docker.io", "library/a", "old", d("m1"), now - 60),
            ("docker.io", "library/b", "x", d("m2"), now + 60),
            ("docker.io", "library/b", "missing", d("not-a-manifest"), now + 60),
            ("ghcr.io", "org/c", "v", d("m512", "sha512"), now + 60),
            (HOSTED, "team/app", "v1", d("m3"), now - 60)]
    links = [("docker.io", "library/a", x) for x in
             (d("m0"), d("b0"), d("b1"), d("b2"), d("index"), d("m1"), d("b3"), d("not-cached"))]
    links += [("docker.io", "library/b", x) for x in (d("m2"), d("b4"), d("both"),
                                                      d("b512", "sha512"), d("b9"))]
    links += [("ghcr.io", "org/c", x) for x in (d("m512", "sha512"), d("b6"))]
    links += [(HOSTED, "team/app", x) for x in (d("m3"), d("b7"), d("b0"))]
    links += [("docker.io", "library/blobs-only", d("b10"))]
    pins = [("docker.io", "library/a", "old"), ("docker.io", "library/b", d("m2"))]

    async def schema():
        index = await Index.open(path, flush=False)
        await index.close()
    asyncio.run(schema())
    db = sqlite3.connect(path)
    with db:
        db.executemany("INSERT INTO blobs (digest, size, first_seen, last_access) "
                       "VALUES (?, ?, ?, ?)",
                       [(x, s, now if x == d("orphan-new") else old, old)
                        for x, s in blobs.items()])
        db.executemany("INSERT INTO manifests (digest, media_type, size, first_seen, "
                       "last_access) VALUES (?, ?, ?, ?, ?)",
                       [(x, mt, s, old, old) for x, (mt, s) in manifests.items()])
        db.executemany("INSERT INTO manifest_refs VALUES (?, ?, ?)", refs)
        db.executemany("INSERT INTO tags (upstream, repository, tag, digest, fetched_at, "
                       "expires_at, pulls) VALUES (?, ?, ?, ?, ?, ?, 2)",
                       [(u, r, t, x, old, e) for u, r, t, x, e in tags])
        db.executemany("INSERT INTO repo_links VALUES (?, ?, ?, ?)",
                       [(*link, old) for link in links])
        db.executemany("INSERT INTO pins VALUES (?, ?, ?, ?)", [(*p, old) for p in pins])
    db.close()
    return now - 1


def reference(path, name: str, **params) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return [tuple(r) for r in db.execute(REFERENCE[name], params)]
    finally:
        db.close()


def test_rewritten_report_queries_return_the_rows_the_earlier_ones_did(tmp_path):
    path = tmp_path / "index.db"
    before = craft(path)

    async def new() -> dict:
        index = await Index.open(path, flush=False)
        try:
            await index.for_reports()
            keys = ("upstream", "repository", "tag", "digest", "media_type", "size",
                    "fetched_at", "expires_at", "pulls", "last_pull", "pinned")
            return {
                "linked_sizes": sorted((u, r, s) for (u, r), s in
                                       (await index.linked_sizes()).items()),
                "repositories": await index.repositories(),
                "orphan_blobs": sorted(await index.orphan_blobs(before)),
                "tag_report": [tuple(row[k] for k in keys) for row in await index.tag_report()],
                "tag_report a": [tuple(row[k] for k in keys)
                                 for row in await index.tag_report("docker.io", "library/a")],
            }
        finally:
            await index.close()
    got = asyncio.run(new())

    assert got["linked_sizes"] == sorted(reference(path, "linked_sizes"))
    assert got["repositories"] == reference(path, "repositories")
    assert got["orphan_blobs"] == sorted(reference(path, "orphan_blobs", before=before))
    assert got["tag_report"] == reference(path, "tag_report", u=None, r=None)
    assert got["tag_report a"] == reference(path, "tag_report", u="docker.io", r="library/a")
    # The crafted cases are there to be compared: not empty, not trivial.
    assert len(got["repositories"]) == 4 and len(got["tag_report"]) == 7
    assert {x for x, _ in got["orphan_blobs"]} == {d("b5"), d("b8"), d("b9"), d("b10"), d("b11")}
    sizes = {row[2]: row[5] for row in got["tag_report"]}
    assert sizes["multi"] == 800 + 300 + 7 + 1007 + 2007 + 301 + 3007   # b0 counted once
    assert sizes["x"] == 302 + 4007 + 55 + 99 and sizes["missing"] == 0


def test_the_new_indexes_are_added_to_an_index_from_before_them(tmp_path):
    path = tmp_path / "index.db"
    craft(path)
    db = sqlite3.connect(path)
    for name in ("blobs_digest_size", "manifests_digest_entry", "repo_links_digest"):
        db.execute(f"DROP INDEX {name}")
    db.commit()

    async def reopen() -> dict:
        index = await Index.open(path, flush=False)
        try:
            return await index.linked_sizes()
        finally:
            await index.close()
    sizes = asyncio.run(reopen())
    assert sizes[("docker.io", "library/b")] == 302 + 4007 + 55 + 99 + 9007
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert {"blobs_digest_size", "manifests_digest_entry", "repo_links_digest"} <= names


TABLES = ("blobs", "manifests", "manifest_refs", "tags", "repo_links", "pins")


def test_postgres_answers_every_report_as_sqlite_does(tmp_path, postgres):
    """The same crafted rows copied into a PostgreSQL index: each report, closure,
    eviction and removal query returns what SQLite's does (the SQL is written once)."""
    path = tmp_path / "index.db"
    before = craft(path)
    db = sqlite3.connect(path)
    tables = {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}
    db.close()
    pg = IndexConfig(postgres=PostgresConfig(postgres.dsn(postgres.new_database())))

    async def answers(index: Index) -> dict:
        digests = [d(x) for x in ("b0", "b3", "m0", "index", "not-cached", "both")]
        return {
            "linked_sizes": await index.linked_sizes(),
            "linked_size": await index.linked_size("docker.io", "library/a"),
            "repositories": await index.repositories(),
            "orphan_blobs": sorted(await index.orphan_blobs(before)),
            "tag_report": await index.tag_report(),
            "tag_report a": await index.tag_report("docker.io", "library/a"),
            "pins": await index.pins(),
            "closure_size": await index.closure_size(d("index")),
            "protected": await index.protected(time.time()),
            "by_last_access": sorted(await index.by_last_access()),
            "parents": await index.parents([d("b0")]),
            "children": sorted(await index.children(digests)),
            "referrers": sorted(await index.referrers(digests)),
            "children_sizes": sorted(await index.children_sizes(d("index"))),
            "tag_groups": sorted(await index.tag_groups()),
            "totals": await index.totals(),
        }

    async def run() -> tuple[dict, dict]:
        lite = await open_index(tmp_path, IndexConfig(), flush=False)
        other = await open_index(tmp_path, pg, flush=False)
        try:
            async with other.db.writing() as tx:
                for table, found in tables.items():
                    marks = ", ".join("?" * len(found[0]))
                    await tx.executemany(f"INSERT INTO {table} VALUES ({marks})", found)
            return await answers(lite), await answers(other)
        finally:
            await other.close()
            await lite.close()
    lite, other = asyncio.run(run())
    assert other == lite
    assert len(lite["tag_report"]) == 7 and lite["closure_size"] > 0 and lite["parents"]
