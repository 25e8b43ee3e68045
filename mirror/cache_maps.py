"""The cache's in-memory maps, packed: what ``LocalCache`` answers hot lookups from.

A million blobs as a dict of digest strings took 224 MB, a million repository links
as a set of tuples 209 MB. Here the rows loaded from the index stay packed: the 32
raw bytes of each sha256 digest (after a 4-byte repository number for a link), in
sorted order in one bytes object, the values in an ``array`` beside them, found by
binary search (microseconds). What changes after the load goes into a small dict or
set on top; loaded rows dropped since are flagged in a ``bytearray``. Other digests
(sha512) always live in the dict or set. Each (re)load builds new maps from scratch,
off the event loop (``load``, on a worker thread), with the totals the cache keeps.

``DigestTable`` and ``LinkSet`` behave like the ``dict`` and ``set`` they replace, so
the cache's code reads the same. Nothing here touches the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sqlite3
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from .index import TagRow
from .models import HOSTED

V = TypeVar("V")


class Reader(Protocol):
    """What the maps are read from: ``execute(sql)`` gives a cursor (sqlite3's)."""

    def execute(self, sql: str, /) -> Any: ...

PREFIX = "sha256:"
RAW = 32                 # bytes of a sha256 digest
REPO = 4                 # bytes of a repository number in a packed link
BATCH = 50_000           # rows fetched at a time while loading
MEDIA_BITS = 10          # a packed manifest: size << MEDIA_BITS | media type number


def raw(digest: str) -> bytes | None:
    """The 32 bytes of a ``sha256:<64 lowercase hex>`` digest; None for any other text."""
    if len(digest) != 71 or not digest.startswith(PREFIX):
        return None
    try:
        data = bytes.fromhex(digest[7:])
    except ValueError:
        return None
    return data if len(data) == RAW and data.hex() == digest[7:] else None


class _Records:
    """Fixed-width records of a bytes object, as a sequence ``bisect`` can search."""

    __slots__ = ("data", "width")

    def __init__(self, data: bytes, width: int) -> None:
        self.data, self.width = data, width

    def __len__(self) -> int:
        return len(self.data) // self.width

    def __getitem__(self, i: int) -> bytes:
        w = self.width
        return self.data[i * w:(i + 1) * w]

    def find(self, key: bytes) -> int:
        """The record's position, or -1."""
        i = bisect_left(self, key)
        return i if i < len(self) and self[i] == key else -1


class Codec(Generic[V]):
    """How a value is kept in the table's array: an int (None: it cannot be)."""

    def encode(self, value: V) -> int | None:
        raise NotImplementedError

    def decode(self, number: int) -> V:
        raise NotImplementedError


class Sizes(Codec[int]):
    def encode(self, value: int) -> int | None:
        return value if 0 <= value < 1 << 62 else None

    def decode(self, number: int) -> int:
        return number


class MediaSizes(Codec[tuple[str, int]]):
    """(media type, size): a manifest's entry; the few media types kept once each."""

    def __init__(self) -> None:
        self.types: list[str] = []
        self.numbers: dict[str, int] = {}

    def encode(self, value: tuple[str, int]) -> int | None:
        media_type, size = value
        number = self.numbers.get(media_type)
        if number is None:
            if len(self.types) >= 1 << MEDIA_BITS:
                return None
            number = self.numbers[media_type] = len(self.types)
            self.types.append(media_type)
        return size << MEDIA_BITS | number if 0 <= size < 1 << 52 else None

    def decode(self, number: int) -> tuple[str, int]:
        return self.types[number & ((1 << MEDIA_BITS) - 1)], number >> MEDIA_BITS


class DigestTable(Generic[V]):
    """digest -> value, like a dict: the loaded rows packed, later changes in a dict."""

    __slots__ = ("_keys", "_values", "_gone", "_live", "_extra", "_codec")

    def __init__(self, codec: Codec[V], keys: bytes = b"",
                 values: array | None = None) -> None:
        self._codec = codec
        self._keys = _Records(keys, RAW)
        self._values = values if values is not None else array("q")
        self._gone = bytearray(len(self._keys))      # 1: dropped since the load
        self._live = len(self._keys)
        self._extra: dict[str, V] = {}               # not among the loaded rows

    def _at(self, digest: str) -> int:
        key = raw(digest)
        return -1 if key is None else self._keys.find(key)

    def get(self, digest: str, default: V | None = None) -> V | None:
        value = self._extra.get(digest)
        if value is not None:
            return value
        i = self._at(digest)
        if i < 0 or self._gone[i]:
            return default
        return self._codec.decode(self._values[i])

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self.get(digest) is not None

    def __getitem__(self, digest: str) -> V:
        value = self.get(digest)
        if value is None:
            raise KeyError(digest)
        return value

    def __setitem__(self, digest: str, value: V) -> None:
        i = self._at(digest)
        number = self._codec.encode(value) if i >= 0 else None
        if number is None:
            self.pop(digest, None)
            self._extra[digest] = value
            return
        self._values[i] = number
        if self._gone[i]:
            self._gone[i] = 0
            self._live += 1

    def pop(self, digest: str, default: V | None = None) -> V | None:
        if digest in self._extra:
            return self._extra.pop(digest)
        i = self._at(digest)
        if i < 0 or self._gone[i]:
            return default
        self._gone[i] = 1
        self._live -= 1
        return self._codec.decode(self._values[i])

    def __len__(self) -> int:
        return self._live + len(self._extra)

    def items(self) -> Iterator[tuple[str, V]]:
        data, gone, values, decode = self._keys.data, self._gone, self._values, self._codec.decode
        for i in range(len(gone)):
            if not gone[i]:
                yield PREFIX + data[i * RAW:(i + 1) * RAW].hex(), decode(values[i])
        yield from list(self._extra.items())

    def __iter__(self) -> Iterator[str]:
        return (d for d, _ in self.items())

    def keys(self) -> Iterator[str]:
        return iter(self)

    def values(self) -> Iterator[V]:
        return (v for _, v in self.items())


Link = tuple[str, str, str]          # (upstream, repository, digest)


class LinkSet:
    """(upstream, repository, digest) links, like a set: the loaded ones packed as a
    repository number (4 bytes, numbered in sorted order) and the digest's 32 bytes."""

    __slots__ = ("_records", "_gone", "_live", "_extra", "_numbers", "_names")

    def __init__(self, records: bytes = b"", names: list[tuple[str, str]] | None = None) -> None:
        self._records = _Records(records, REPO + RAW)
        self._names = names or []                     # repository number -> (upstream, repo)
        self._numbers = {name: n for n, name in enumerate(self._names)}
        self._gone = bytearray(len(self._records))
        self._live = len(self._records)
        self._extra: set[Link] = set()

    def _at(self, link: Link) -> int:
        number = self._numbers.get((link[0], link[1]))
        key = raw(link[2])
        if number is None or key is None:
            return -1
        return self._records.find(number.to_bytes(REPO, "big") + key)

    def __contains__(self, link: object) -> bool:
        if not isinstance(link, tuple) or len(link) != 3:
            return False
        if link in self._extra:
            return True
        i = self._at(link)
        return i >= 0 and not self._gone[i]

    def add(self, link: Link) -> None:
        i = self._at(link)
        if i < 0:
            self._extra.add(link)
        elif self._gone[i]:
            self._gone[i] = 0
            self._live += 1

    def update(self, links: Iterable[Link]) -> None:
        for link in links:
            self.add(link)

    def discard(self, link: Link) -> None:
        if link in self._extra:
            self._extra.discard(link)
            return
        i = self._at(link)
        if i >= 0 and not self._gone[i]:
            self._gone[i] = 1
            self._live -= 1

    def __len__(self) -> int:
        return self._live + len(self._extra)

    def _loaded(self, lo: int, hi: int) -> Iterator[Link]:
        data, gone, width = self._records.data, self._gone, REPO + RAW
        for i in range(lo, hi):
            if not gone[i]:
                at = i * width
                upstream, repository = self._names[int.from_bytes(data[at:at + REPO], "big")]
                yield upstream, repository, PREFIX + data[at + REPO:at + width].hex()

    def __iter__(self) -> Iterator[Link]:
        yield from self._loaded(0, len(self._gone))
        yield from list(self._extra)

    def of(self, upstream: str) -> Iterator[Link]:
        """The links of one upstream's repositories (their loaded ones are together)."""
        numbers = [n for n, (u, _) in enumerate(self._names) if u == upstream]
        if numbers:
            lo = bisect_left(self._records, numbers[0].to_bytes(REPO, "big"))
            hi = bisect_left(self._records, (numbers[-1] + 1).to_bytes(REPO, "big"))
            yield from self._loaded(lo, hi)
        yield from [link for link in self._extra if link[0] == upstream]


@dataclass
class Maps:
    """Everything the cache keeps in memory about the index, and its totals."""

    blobs: DigestTable[int] = field(default_factory=lambda: DigestTable(Sizes()))
    manifests: DigestTable[tuple[str, int]] = field(
        default_factory=lambda: DigestTable(MediaSizes()))
    tags: dict[tuple[str, str, str], TagRow] = field(default_factory=dict)
    links: LinkSet = field(default_factory=LinkSet)
    hosted: Counter[str] = field(default_factory=Counter)   # digest -> hosted repos linking it
    size: int = 0
    hosted_size: int = 0

    def stored(self, digest: str) -> int:
        """What a digest counts for: its blob's size, else its manifest's, else 0."""
        return self.blobs.get(digest) or (self.manifests.get(digest) or ("", 0))[1]


def _fetch(db: Reader, sql: str) -> Iterator[list[tuple]]:
    """The rows of ``sql``, a batch at a time."""
    cur = db.execute(sql)
    while rows := cur.fetchmany(BATCH):
        yield rows


def _sha256(digests: list[str]) -> bytes | None:
    """The packed 32 bytes of each of ``digests`` if every one is a lowercase sha256
    digest (checked for the batch at once, the common case), else None."""
    if not all(len(d) == 71 for d in digests) or {d[:7] for d in digests} != {PREFIX}:
        return None
    text = "".join([d[7:] for d in digests])
    try:
        packed = bytes.fromhex(text)
    except ValueError:
        return None
    return packed if packed.hex() == text else None


def _table(batches: Iterable[list[tuple]], codec: Codec[V],
           value: Callable[[tuple], V]) -> DigestTable[V]:
    """A table of rows (digest first) sorted by digest."""
    keys, numbers, extra = bytearray(), array("q"), {}
    for rows in batches:
        if isinstance(codec, Sizes):      # blobs, by the million: no call per row
            sizes = [r[1] for r in rows]
            try:
                encoded = sizes if min(sizes) >= 0 and max(sizes) < 1 << 62 else [None]
            except TypeError:             # not all integers
                encoded = [None]
        else:
            encoded = [codec.encode(value(r)) for r in rows]
        packed = _sha256([r[0] for r in rows]) if None not in encoded else None
        if packed is not None:
            keys += packed
            numbers.extend(encoded)       # type: ignore[arg-type]
            continue
        for row in rows:                  # the odd one out, somewhere in the batch
            key, number = raw(row[0]), codec.encode(value(row))
            if key is None or number is None:
                extra[row[0]] = value(row)
            else:
                keys += key
                numbers.append(number)
    table = DigestTable(codec, bytes(keys), numbers)
    table._extra.update(extra)
    return table


def _links(db: Reader, hosted: Counter[str]) -> LinkSet:
    """The link set, read as each repository's link count and then the digests alone
    in the same order (a third of the strings to make of reading every column of every
    row); counts the hosted repositories linking each digest into ``hosted``."""
    groups = db.execute("SELECT upstream, repository, count(*) FROM repo_links "
                        "GROUP BY upstream, repository ORDER BY upstream, repository").fetchall()
    cur = db.execute("SELECT digest FROM repo_links ORDER BY upstream, repository, digest")
    names: list[tuple[str, str]] = []
    records, extra = bytearray(), []
    for upstream, repository, count in groups:
        prefix = len(names).to_bytes(REPO, "big").hex()
        names.append((upstream, repository))
        digests = [r[0] for r in cur.fetchmany(count)]
        if upstream == HOSTED:
            hosted.update(digests)
        if _sha256(digests) is not None:
            records += bytes.fromhex("".join([prefix + d[7:] for d in digests]))
            continue
        for digest in digests:            # the odd one out
            if raw(digest) is None:
                extra.append((upstream, repository, digest))
            else:
                records += bytes.fromhex(prefix + digest[7:])
    links = LinkSet(bytes(records), names)
    links._extra.update(extra)
    return links


def load(path: Path) -> Maps:
    """Read a SQLite index.db into new maps, in one read transaction (a consistent
    snapshot). Blocks for seconds at a million rows: call it on a worker thread."""
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    try:
        db.execute("BEGIN")
        maps = read(db)
        db.execute("COMMIT")
    finally:
        db.close()
    return maps


def read(db: Reader) -> Maps:
    """New maps from ``db`` (a sqlite3 connection, or the PostgreSQL index's bridge:
    ``Index.snapshot_read`` runs this on a worker thread inside one snapshot)."""
    maps = Maps()
    maps.blobs = _table(_fetch(db, "SELECT digest, size FROM blobs ORDER BY digest"),
                        Sizes(), lambda r: r[1])
    maps.manifests = _table(
        _fetch(db, "SELECT digest, media_type, size FROM manifests ORDER BY digest"),
        MediaSizes(), lambda r: (r[1], r[2]))
    maps.links = _links(db, maps.hosted)
    shared = {name: name for name in maps.links._names}
    for rows in _fetch(db, "SELECT upstream, repository, tag, digest, fetched_at, "
                           "expires_at FROM tags"):
        for row in rows:
            upstream, repository = shared.setdefault((row[0], row[1]), (row[0], row[1]))
            maps.tags[(upstream, repository, row[2])] = TagRow(upstream, repository,
                                                               *row[2:])
    blobs, manifests = maps.blobs, maps.manifests      # nothing dropped yet: the arrays
    maps.size = (sum(blobs._values) + sum(blobs._extra.values())
                 + sum(n >> MEDIA_BITS for n in manifests._values)
                 + sum(s for _, s in manifests._extra.values()))
    maps.hosted_size = sum(maps.stored(d) for d in maps.hosted)
    return maps


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):      # not glibc: nothing to do
        return None


_trim = _libc_trim()


def give_back_memory() -> None:
    """Return the memory freed by dropping old maps to the system: glibc keeps freed
    heap memory otherwise (at a million rows the server grew from 193 to 315 MB
    resident over three reloads; 185 to 255 MB with this). Blocks for milliseconds:
    call it on a worker thread."""
    if _trim is not None:
        _trim(0)
