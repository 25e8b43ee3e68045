"""OCI image layouts on disk and in a tar: what ``mirror export`` writes and ``mirror
import`` reads.

``TarWriter`` writes a tar one member at a time to a binary file object (a file, or
stdout): a header, the bytes in ``CHUNK`` pieces, the padding; nothing is seeked, so
it streams. ``members(source)`` reads a tar (a file, or stdin: one pass, stream mode)
or a layout directory and yields ``Member``s in the order they come; a tar member
must be read (or skipped) before the next is asked for. Names are checked: an
absolute path or one with a ``..`` component is refused (``BadLayout``), whatever
the caller means to do with it.

Every blocking call here is a plain function: the async callers run them with
``fileio.run``.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..fileio import CHUNK
from ..models import DIGEST_RE

OCI_LAYOUT = "oci-layout"
INDEX_JSON = "index.json"
BUNDLE_JSON = "mirror-bundle.json"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
SMALL_MAX = 16 * 1024 * 1024     # cap on index.json, mirror-bundle.json, oci-layout


class BadLayout(Exception):
    """The input is not a tar or an OCI image layout, or a member is unsafe or cut
    short; the message names the member."""


def blob_name(digest: str) -> str:
    algorithm, hexpart = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexpart}"


def clean_name(name: str) -> str:
    """A member name made relative (``./index.json`` -> ``index.json``); refuses an
    absolute path or one that climbs out (``../x``, ``a/../../x``)."""
    if name.startswith("/") or "\\" in name:
        raise BadLayout(f"member {name[:200]!r}: absolute or odd path refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BadLayout(f"member {name[:200]!r}: a path escaping the layout is refused")
    return posixpath.join(*parts) if parts else ""


def digest_of_name(name: str) -> str | None:
    """``blobs/sha256/<hex>`` -> ``sha256:<hex>``; None for any other name."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        digest = f"{parts[1]}:{parts[2]}"
        if DIGEST_RE.fullmatch(digest):
            return digest
    return None


# -- writing ---------------------------------------------------------------------------

class TarWriter:
    """A tar written member by member, never seeking (blocking calls: run them on a
    worker thread)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.written = 0
        self.mtime = int(time.time())

    def _put(self, data: bytes | bytearray) -> None:
        self.out.write(data)
        self.written += len(data)

    def header(self, name: str, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = self.mtime
        info.mode = 0o644
        info.type = tarfile.REGTYPE
        self._put(info.tobuf(tarfile.PAX_FORMAT))

    def data(self, chunk: bytes | bytearray) -> None:
        self._put(chunk)

    def pad(self, size: int) -> None:
        rest = size % tarfile.BLOCKSIZE
        if rest:
            self._put(b"\0" * (tarfile.BLOCKSIZE - rest))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.header(name, len(data))
        self._put(data)
        self.pad(len(data))

    def finish(self) -> None:
        """The end-of-archive blocks, padded to a whole record, as tar writes them."""
        self._put(b"\0" * (2 * tarfile.BLOCKSIZE))
        rest = self.written % tarfile.RECORDSIZE
        if rest:
            self._put(b"\0" * (tarfile.RECORDSIZE - rest))
        self.out.flush()


# -- reading ---------------------------------------------------------------------------

@dataclass
class Member:
    name: str                  # cleaned: ``index.json``, ``blobs/sha256/<hex>``
    size: int
    reader: IO[bytes] | None   # None: not a regular file (directory, link): skip it

    @property
    def digest(self) -> str | None:
        return digest_of_name(self.name)


def read_small(member: Member) -> bytes:
    """The whole of a small member (index.json and the like), capped at SMALL_MAX."""
    if member.reader is None:
        raise BadLayout(f"{member.name}: not a regular file")
    if member.size > SMALL_MAX:
        raise BadLayout(f"{member.name}: {member.size} bytes, more than {SMALL_MAX} allowed")
    data = read_chunk(member, member.size + 1)
    if len(data) != member.size:
        raise BadLayout(f"{member.name}: cut short ({len(data)} of {member.size} bytes)")
    return data


def read_chunk(member: Member, n: int = CHUNK) -> bytes:
    """Up to ``n`` bytes of ``member``; a tar cut short is a BadLayout naming it."""
    assert member.reader is not None
    try:
        return member.reader.read(n)
    except (tarfile.TarError, EOFError) as exc:
        raise BadLayout(f"{member.name}: the tar ends inside this member ({exc})") from None


def open_source(path: str) -> tuple[IO[bytes] | None, Path | None]:
    """``-`` is stdin; a directory is a layout directory; anything else a tar file."""
    if path == "-":
        return os.fdopen(os.dup(0), "rb", buffering=CHUNK), None
    p = Path(path)
    if p.is_dir():
        return None, p
    return open(p, "rb", buffering=CHUNK), None


def members(stream: IO[bytes] | None, directory: Path | None) -> Iterator[Member]:
    if directory is not None:
        yield from _dir_members(directory)
    else:
        assert stream is not None
        yield from _tar_members(stream)


def _tar_members(stream: IO[bytes]) -> Iterator[Member]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except tarfile.TarError as exc:
        raise BadLayout(f"not a tar archive ({exc})") from None
    current = "the first member"
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError) as exc:
            raise BadLayout(f"the tar is damaged or cut short after {current} ({exc})") from None
        if info is None:
            return
        name = clean_name(info.name)
        current = name or info.name
        if not info.isfile():
            if info.issym() or info.islnk():
                clean_name(info.linkname)       # a link escaping is refused too
            yield Member(name, 0, None)
            continue
        reader = tar.extractfile(info)
        yield Member(name, info.size, reader)


def _dir_members(directory: Path) -> Iterator[Member]:
    """A layout directory: the small files first, then every blob (not following
    links: a layout holds plain files)."""
    names = [OCI_LAYOUT, BUNDLE_JSON, INDEX_JSON]
    blobs = directory / "blobs"
    if blobs.is_dir():
        for algorithm in sorted(os.listdir(blobs)):
            sub = blobs / algorithm
            if sub.is_dir() and not sub.is_symlink():
                names += [f"blobs/{algorithm}/{n}" for n in sorted(os.listdir(sub))]
    for name in names:
        path = directory / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            yield Member(name, 0, None)
            continue
        with open(path, "rb", buffering=0) as f:
            yield Member(name, st.st_size, io.BufferedReader(f, CHUNK))
