"""The index's tables in PostgreSQL, as versioned migrations (applied by
mirror.cluster.schema.apply under its advisory lock, component ``index``): the same
tables as SQLite's (sqlite.SCHEMA), with digests and names collated "C" (byte order:
the cache's maps are loaded in digest order and searched by their bytes), and the
change log written by plpgsql triggers.

The change log's numbers are consecutive and in commit order, as SQLite's are: every
write transaction of the index takes the writer lock (``WRITER_LOCK``, a
transaction-scoped advisory lock) first, and the triggers take it too and number
their rows from a counter row (``change_seq``) updated in the same transaction, so a
rolled-back transaction leaves no hole and a reader never skips a row committed late.
"""

from __future__ import annotations

COMPONENT = "index"
WRITER_LOCK = 0x6D69_7272_6F72_0001     # the index's writer lock (advisory, per transaction)

_TEXT = 'text COLLATE "C"'
_TIME = "double precision"

_TABLES = f"""
CREATE TABLE meta (key {_TEXT} PRIMARY KEY, value text NOT NULL);
CREATE TABLE blobs (
    digest {_TEXT} PRIMARY KEY, size bigint NOT NULL,
    first_seen {_TIME} NOT NULL, last_access {_TIME} NOT NULL, hits bigint NOT NULL DEFAULT 0);
CREATE TABLE manifests (
    digest {_TEXT} PRIMARY KEY, media_type text NOT NULL, size bigint NOT NULL,
    first_seen {_TIME} NOT NULL, last_access {_TIME} NOT NULL, hits bigint NOT NULL DEFAULT 0);
CREATE INDEX blobs_digest_size ON blobs (digest) INCLUDE (size);
CREATE INDEX manifests_digest_entry ON manifests (digest) INCLUDE (media_type, size);
CREATE TABLE manifest_refs (
    manifest {_TEXT} NOT NULL, child {_TEXT} NOT NULL, kind text NOT NULL,
    PRIMARY KEY (manifest, child));
CREATE INDEX manifest_refs_child ON manifest_refs (child);
CREATE TABLE tags (
    upstream {_TEXT} NOT NULL, repository {_TEXT} NOT NULL, tag {_TEXT} NOT NULL,
    digest {_TEXT} NOT NULL, fetched_at {_TIME} NOT NULL, expires_at {_TIME} NOT NULL,
    pulls bigint NOT NULL DEFAULT 0, last_pull {_TIME},
    PRIMARY KEY (upstream, repository, tag));
CREATE INDEX tags_digest ON tags (digest);
CREATE TABLE repo_links (
    upstream {_TEXT} NOT NULL, repository {_TEXT} NOT NULL, digest {_TEXT} NOT NULL,
    linked_at {_TIME} NOT NULL DEFAULT 0,
    PRIMARY KEY (upstream, repository, digest));
CREATE INDEX repo_links_digest ON repo_links (digest);
CREATE TABLE pins (
    upstream {_TEXT} NOT NULL, repository {_TEXT} NOT NULL, reference {_TEXT} NOT NULL,
    pinned_at {_TIME} NOT NULL, PRIMARY KEY (upstream, repository, reference));
CREATE TABLE counters (name {_TEXT} PRIMARY KEY, value bigint NOT NULL);
CREATE TABLE hourly (
    hour bigint NOT NULL, name {_TEXT} NOT NULL, value bigint NOT NULL,
    PRIMARY KEY (hour, name));
CREATE TABLE tag_lists (
    upstream {_TEXT} NOT NULL, repository {_TEXT} NOT NULL, tags text NOT NULL,
    fetched_at {_TIME} NOT NULL, expires_at {_TIME} NOT NULL,
    PRIMARY KEY (upstream, repository));
CREATE TABLE referrer_lists (
    upstream {_TEXT} NOT NULL, repository {_TEXT} NOT NULL, subject {_TEXT} NOT NULL,
    manifests text NOT NULL, fetched_at {_TIME} NOT NULL, expires_at {_TIME} NOT NULL,
    PRIMARY KEY (upstream, repository, subject));
CREATE TABLE referrers (
    upstream {_TEXT} NOT NULL, repository {_TEXT} NOT NULL, subject {_TEXT} NOT NULL,
    digest {_TEXT} NOT NULL, media_type text NOT NULL, artifact_type text, size bigint NOT NULL,
    annotations text, PRIMARY KEY (upstream, repository, subject, digest));
CREATE TABLE change_seq (one boolean PRIMARY KEY DEFAULT true CHECK (one), seq bigint NOT NULL);
INSERT INTO change_seq VALUES (true, 0);
CREATE TABLE changes (
    seq bigint PRIMARY KEY,
    at {_TIME} NOT NULL DEFAULT extract(epoch FROM clock_timestamp()),
    kind text NOT NULL, a text, b text, c text, d text, n bigint, x {_TIME}, y {_TIME});
CREATE INDEX changes_at ON changes (at);
INSERT INTO meta VALUES ('schema_version', '1');
"""

_LOG = f"""
CREATE FUNCTION mirror_log_change(k text, a text, b text, c text, d text, n bigint,
                                  x double precision, y double precision) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE next bigint;
BEGIN
    PERFORM pg_advisory_xact_lock({WRITER_LOCK});
    UPDATE change_seq SET seq = seq + 1 RETURNING seq INTO next;
    INSERT INTO changes (seq, kind, a, b, c, d, n, x, y) VALUES (next, k, a, b, c, d, n, x, y);
END $$"""

# table -> (the change logged for a new or changed row, for a removed one, the columns
# whose update is a change), as sqlite.SCHEMA's triggers.
_TRIGGERS = {
    "blobs": ("'blob', NEW.digest, NULL, NULL, NULL, NEW.size, NULL, NULL",
              "'blob-', OLD.digest, NULL, NULL, NULL, NULL, NULL, NULL", "size"),
    "manifests": ("'manifest', NEW.digest, NEW.media_type, NULL, NULL, NEW.size, NULL, NULL",
                  "'manifest-', OLD.digest, NULL, NULL, NULL, NULL, NULL, NULL", None),
    "tags": ("'tag', NEW.upstream, NEW.repository, NEW.tag, NEW.digest, NULL, "
             "NEW.fetched_at, NEW.expires_at",
             "'tag-', OLD.upstream, OLD.repository, OLD.tag, NULL, NULL, NULL, NULL",
             "digest, fetched_at, expires_at"),
    "repo_links": ("'link', NEW.upstream, NEW.repository, NEW.digest, NULL, NULL, NULL, NULL",
                   "'link-', OLD.upstream, OLD.repository, OLD.digest, NULL, NULL, NULL, "
                   "NULL", None),
}


def _trigger(table: str, added: str, gone: str, columns: str | None) -> list[str]:
    events = "INSERT OR DELETE" + (f" OR UPDATE OF {columns}" if columns else "")
    return [f"""
CREATE FUNCTION mirror_{table}_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN PERFORM mirror_log_change({gone});
    ELSE PERFORM mirror_log_change({added}); END IF;
    RETURN NULL;
END $$""", f"CREATE TRIGGER {table}_changed AFTER {events} ON {table} "
           f"FOR EACH ROW EXECUTE FUNCTION mirror_{table}_changed()"]


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";\n") if s.strip()]


# Migration i brings the schema to version i + 1; never edit one that was released,
# append a new one.
MIGRATIONS: list[list[str]] = [
    [*_statements(_TABLES), _LOG,
     *(s for table, spec in _TRIGGERS.items() for s in _trigger(table, *spec))],
]
