"""A power loss never leaves wrong bytes under a right name: every cached file's bytes,
its rename and its directory are on disk before the index names it, and `mirror verify`
re-hashes everything cached and drops what does not match, beside a running server."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.support import syscalls
from tests.support.index_backend import using_postgres
from tests.support.s3 import using_s3
from tests.test_pull_through import hub_config, pull

RESYNC = 1.5         # the server looks for index changes by other processes every second
CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
FD = re.compile(r"^-?\d+<((?:\\x[0-9a-f]{2})*)>")


def traced_calls(text: str, cwd: str) -> list[tuple[str, list[str], str]]:
    """(syscall, paths, full argument text) of every call strace saw, in the order the
    calls completed (an interrupted call's two lines joined)."""
    calls, pending = [], {}
    for raw in text.splitlines():
        if raw.endswith("<unfinished ...>"):
            pid = raw.split(None, 1)[0]
            pending[pid] = raw[: -len("<unfinished ...>")]
            continue
        if "resumed>" in raw:
            pid = raw.split(None, 1)[0]
            raw = pending.pop(pid, "") + raw[raw.index("resumed>") + len("resumed>"):]
        m = CALL.match(raw)
        if m:
            _, name, args = m.groups()
            fd = FD.match(args)
            paths = [syscalls._unhex(fd.group(1))] if fd else syscalls._paths(args, cwd)
            calls.append((name, paths, args))
    return calls


def escaped(text: str) -> str:
    return "".join(f"\\x{b:02x}" for b in text.encode())


FRONTEND = set(b"BCDEFHPQSXcdf")   # PostgreSQL's frontend message types


def pg_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each PostgreSQL frontend message in one ``sendto`` buffer, or []
    when the buffer is not such messages end to end (HTTP, blob bytes to a client)."""
    found, at = [], 0
    while at + 5 <= len(data):
        kind, length = data[at], int.from_bytes(data[at + 1:at + 5], "big")
        if kind not in FRONTEND or length < 4:
            return []
        found.append((bytes([kind]), data[at + 5:at + 1 + length]))
        at += 1 + length
    return found if at == len(data) else []


def sent_statements(calls) -> list[tuple[int, str, bytes]]:
    """(call index, SQL, the Bind message) of each statement bound on a PostgreSQL
    connection, from the ``sendto`` calls in ``calls`` (the wire protocol: a Parse message
    names a prepared statement and its SQL, a Bind runs it with its parameters)."""
    sql: dict[bytes, str] = {}
    found = []
    for i, (name, _, args) in enumerate(calls):
        if name != "sendto" or '"' not in args:
            continue
        data = syscalls._unhex(args.split('"', 2)[1]).encode("utf-8", "surrogateescape")
        for kind, body in pg_messages(data):
            parts = body.split(b"\0", 2)
            if kind == b"P" and len(parts) == 3:
                sql[parts[0]] = parts[1].decode(errors="replace")
            elif kind == b"B" and len(parts) == 3:
                found.append((i, sql.get(parts[1], ""), body))
    return found


@pytest.mark.skipif(not syscalls.available(), reason="needs strace")
@pytest.mark.skipif(using_s3(),
                    reason="about files: the fsyncs and the rename into blobs/ (on S3 a blob "
                           "is committed by completing its upload: tests/test_s3_store.py)")
def test_bytes_rename_and_directory_are_synced_before_the_index_row(make_mirror, upstream,
                                                                    image_set, tmp_path):
    """The index row is a write to index.db-wal, or with a PostgreSQL index the INSERT
    sent to the server: either comes after the file's bytes and rename are synced."""
    mirror = make_mirror(hub_config(upstream))
    image = image_set.oci
    trace = syscalls.SyscallTrace(mirror.proc.pid, tmp_path / "strace.out", mirror.dir,
                                  trace="%file,fsync,fdatasync,pwrite64,sendto")
    with trace, httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
    calls = traced_calls(trace.out_path.read_text(errors="replace"), str(mirror.dir))
    wal = str(mirror.data_dir / "index.db-wal")
    inserts = [(i, body) for i, sql, body in sent_statements(calls)
               if sql.startswith(("INSERT INTO blobs ", "INSERT INTO manifests "))]
    assert bool(inserts) == using_postgres()

    digests = [image.digest, *(b.digest for b in image.blobs)]
    assert len(digests) >= 3
    for digest in digests:
        final = str(mirror.cached_path(digest))
        renames = [i for i, (name, paths, _) in enumerate(calls)
                   if name.startswith("rename") and paths[-1:] == [final]]
        assert len(renames) == 1, digest
        r = renames[0]
        temp = calls[r][1][0]
        assert temp.startswith(str(mirror.data_dir / "tmp") + "/")
        synced = [i for i, (name, paths, _) in enumerate(calls)
                  if name in ("fsync", "fdatasync") and paths == [temp]]
        assert synced and synced[-1] < r, f"{digest}: bytes not synced before the rename"
        dir_synced = [i for i, (name, paths, _) in enumerate(calls)
                      if i > r and name == "fsync" and paths == [final.rsplit("/", 1)[0]]]
        assert dir_synced, f"{digest}: the rename was never synced"
        row = [i for i, (name, paths, args) in enumerate(calls)
               if i > r and name == "pwrite64" and paths[0].startswith(wal)
               and escaped(digest) in args]
        row += [i for i, body in inserts if digest.encode() in body]   # any, even before
        assert row, f"{digest}: no index write after the rename"
        assert dir_synced[0] < min(row), \
            f"{digest}: index row written before the rename was synced"


def verify(mirror, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirror", "verify", *extra,
                           "--config", str(mirror.config_path)],
                          capture_output=True, text=True, timeout=60, cwd=mirror.dir)


def summary(result) -> str:
    return result.stdout.strip().splitlines()[-1]


def corrupt_in_place(path) -> bytes:
    """Flip the bits of the first 64 bytes; the size stays the same. The bytes it had."""
    before = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(flipped(before))
    assert path.stat().st_size == len(before)
    return before


def flipped(data: bytes) -> bytes:
    """``data`` with the bits of its first 64 bytes flipped; the size stays the same."""
    return bytes(b ^ 0xFF for b in data[:64]) + data[64:]


def test_verify_drops_corrupt_and_missing_files_and_the_next_pull_fetches_them(
        make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream))
    images = [image_set.docker, image_set.oci]
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for image in images:
            pull(client, image)
        sizes = mirror.stored_sizes()
        files, total = len(sizes), sum(sizes)
        noun = "objects" if mirror.on_s3 else "files"
        clean = verify(mirror)
        assert clean.returncode == 0, clean.stderr
        assert summary(clean) == (f"verified {files} {noun} ({total / 1024 ** 3:.2f} GiB): "
                                  "0 corrupt, 0 missing")

        bad, gone = image_set.docker.largest_blob, image_set.oci.blobs[0]
        mirror.replace_cached(bad.digest, flipped(mirror.cached_bytes(bad.digest)))
        served = client.get(f"/v2/{image_set.docker.repo}/blobs/{bad.digest}")
        assert hashlib.sha256(served.content).hexdigest() != bad.digest.split(":")[1]  # the harm
        mirror.drop_cached(gone.digest)

        found = verify(mirror)
        assert found.returncode == 1, found.stderr
        assert summary(found) == (f"verified {files} {noun} "
                                  f"({(total - gone.size) / 1024 ** 3:.2f} GiB): "
                                  "1 corrupt, 1 missing")
        assert f"corrupt blob {bad.digest}" in found.stdout
        assert f"missing blob {gone.digest}" in found.stdout
        assert "verifying: 100%" in found.stderr       # progress, as plain lines off a terminal
        assert not mirror.is_cached(bad.digest)

        time.sleep(RESYNC)
        mark = upstream.mark()
        for image in images:
            pull(client, image)                       # byte-exact: pull() checks every hash
        assert upstream.count("GET", f"/blobs/{bad.digest}", since=mark) == 1
        assert upstream.count("GET", f"/blobs/{gone.digest}", since=mark) == 1
        assert upstream.count("GET", "/blobs/", since=mark) == 2
        again = verify(mirror)
        assert again.returncode == 0 and summary(again).endswith(": 0 corrupt, 0 missing")


@pytest.mark.skipif(using_s3(), reason="--quarantine moves files aside in the data dir; "
                    "with blobs on S3 it is refused, and a corrupt object is deleted "
                    "(tests/test_s3_storage.py)")
def test_verify_quarantine_keeps_the_bad_file_aside(make_mirror, upstream, image_set):
    mirror = make_mirror(hub_config(upstream))
    image = image_set.oci
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        pull(client, image)
        path = mirror.cached_path(image.digest)        # a manifest this time
        corrupt_in_place(path)
        bad_bytes = path.read_bytes()
        found = verify(mirror, "--quarantine")
        assert found.returncode == 1
        assert summary(found).endswith(": 1 corrupt, 0 missing")
        assert f"corrupt manifest {image.digest}" in found.stdout
        kept = mirror.data_dir / "quarantine" / image.digest.replace(":", "-")
        assert kept.read_bytes() == bad_bytes and not path.exists()
        time.sleep(RESYNC)
        pull(client, image)                           # the tag went with the manifest: refetched
        assert path.read_bytes() == image.manifest
