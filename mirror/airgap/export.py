"""``mirror export``: what the cache (and hosted repositories) hold, as one OCI image
layout in a tar (a bundle).

Members, in this order: ``oci-layout``, ``mirror-bundle.json`` (what is inside, so
``--since`` and people read it without going through the blobs), ``index.json``
(one entry per image, annotated with the full reference under both
``org.opencontainers.image.ref.name`` and ``io.containerd.image.name``), then
``blobs/sha256/<hex>``: every manifest first, then configs and layers.

Everything is planned before a byte is written: an image not cached (a tag, a
child manifest of a chosen platform, a blob) is an error naming it and nothing is
written. The bundle goes to a temp file next to ``-o`` and is renamed into place at
the end (``-o -`` streams to stdout). Blobs are copied in ``CHUNK`` pieces on worker
threads, read straight from the cache's files (safe beside a running server: an
open file survives eviction; a blob evicted before it is opened fails the export,
naming it).
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .. import __version__, fileio
from ..cache import CannotOpen, LocalCache, existing
from ..config import Config
from ..errors import BlobUnknown, RegistryError
from ..fileio import CHUNK
from ..index import IndexUnavailable, TagRow, where
from ..models import HOSTED, INDEX_TYPES, MANIFEST_MAX, parse_manifest
from ..routing import Router
from . import layout, references
from .progress import Progress, add_arguments, from_args

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
BUNDLE_FORMAT = 1
CONFIG_MAX = 1024 * 1024      # a config read for its platform


class ExportError(Exception):
    """One line for stderr; exit status 1."""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="write cached images as an OCI "
                       "image layout in a tar (a bundle) for `mirror import`")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE.tar",
                   help="the bundle to write ('-': stdout)")
    p.add_argument("refs", nargs="*", metavar="REF", help="images as users type them "
                   "(alpine:3.19, ghcr.io/org/app:1, name@sha256:...)")
    p.add_argument("--all", action="store_true", help="every tagged image, cached and hosted")
    p.add_argument("--repository", action="append", default=[], metavar="GLOB",
                   help="every tag of the repositories matching GLOB (full name, e.g. "
                   "'docker.io/library/*', or as clients pull it)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT],...",
                   help="only these platforms of multi-platform images (default: all)")
    p.add_argument("--since", metavar="BUNDLE_OR_DATE", help="leave out blobs a previous "
                   "bundle carried, or that were cached before a date (2024-05-01, "
                   "2024-05-01T12:00)")
    add_arguments(p)


def run(args: argparse.Namespace, config: Config) -> int:
    if not (args.refs or args.all or args.repository):
        print("mirror: export: name images (REF...), or give --all or --repository GLOB",
              file=sys.stderr)
        return 2
    try:
        platforms = parse_platforms(args.platform)
        since = Since.parse(args.since) if args.since else None
    except ValueError as exc:
        print(f"mirror: export: {exc}", file=sys.stderr)
        return 2
    with from_args(args, "export") as progress:
        if args.output == "-":
            progress.out = sys.stderr         # stdout carries the bundle
        try:
            return asyncio.run(export(args, config, progress, platforms, since))
        except (ExportError, layout.BadLayout, references.BadReference) as exc:
            why = str(exc)
        except IndexUnavailable as exc:
            why = f"{where(config.data_dir, config.index)}: {exc}"
        progress.close(False)
    print(f"mirror: export: {why}", file=sys.stderr)
    return 1


# -- platforms and --since ----------------------------------------------------------------

Platform = tuple[str, str, str | None]


def parse_platforms(text: str | None) -> list[Platform] | None:
    if not text:
        return None
    found: list[Platform] = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"--platform: {item!r} is not OS/ARCH or OS/ARCH/VARIANT")
        found.append((parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    return found


def platform_text(p: dict[str, Any] | None) -> str | None:
    if not isinstance(p, dict) or not p.get("os") or not p.get("architecture"):
        return None
    text = f"{p['os']}/{p['architecture']}"
    return f"{text}/{p['variant']}" if p.get("variant") else text


def platform_matches(p: Any, wanted: list[Platform]) -> bool:
    if not isinstance(p, dict):
        return False
    return any(p.get("os") == o and p.get("architecture") == a
               and (v is None or p.get("variant") == v) for o, a, v in wanted)


@dataclass
class Since:
    text: str
    bundle: Path | None = None
    date: float | None = None
    present: set[str] = field(default_factory=set)   # blobs the other side has (bundle)

    @classmethod
    def parse(cls, text: str) -> Since:
        path = Path(text)
        if text != "-" and path.exists():
            return cls(text, bundle=path)
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"--since: {text!r} is neither a bundle file nor an ISO date "
                             "(2024-05-01 or 2024-05-01T12:00:00)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return cls(text, date=when.timestamp())

    def describe(self, left_out: list[str]) -> dict[str, Any]:
        d: dict[str, Any] = {"bundle": str(self.bundle)} if self.bundle else {
            "date": datetime.fromtimestamp(self.date or 0, UTC).isoformat()}
        # What the other side has: carried by the base bundle(s), so a chain of
        # updates each built --since the last one still leaves out everything.
        d["assumed_present"] = sorted(self.present | set(left_out)) if self.bundle \
            else sorted(left_out)
        d["left_out"] = len(left_out)
        return d


def read_previous(path: Path) -> set[str]:
    """The blobs a previous bundle carried (and assumed present): its mirror-bundle.json
    (an early member) if it has one, else the names of its blob members."""
    stream, directory = layout.open_source(str(path))
    found: set[str] = set()
    try:
        for member in layout.members(stream, directory):
            if member.name == layout.BUNDLE_JSON:
                try:
                    doc = json.loads(layout.read_small(member))
                    blobs = doc["blobs"]["digests"]
                    assumed = (doc.get("since") or {}).get("assumed_present") or []
                except (ValueError, KeyError, TypeError) as exc:
                    raise layout.BadLayout(f"{path}: {layout.BUNDLE_JSON} unreadable: "
                                           f"{exc}") from None
                return {str(d) for d in [*blobs, *assumed]}
            if member.digest:
                found.add(member.digest)
    finally:
        if stream is not None:
            stream.close()
    return found


# -- planning -----------------------------------------------------------------------------

@dataclass
class Planned:
    upstream: str
    repository: str
    tag: str | None
    digest: str
    name: str                       # full reference, upstream included
    media_type: str = ""
    size: int = 0                   # of the top manifest
    platforms: list[str] = field(default_factory=list)
    platform: dict[str, Any] | None = None     # a single manifest's, if known
    manifests: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)


def _full_name(config: Config, upstream: str, repository: str) -> str:
    try:
        return references.full_name(config, upstream, repository)
    except KeyError:                 # an upstream no longer configured: its name stands in
        return f"{upstream}/{repository}"


def select(args: argparse.Namespace, config: Config, router: Router, cache: LocalCache,
           tags: list[TagRow]) -> list[Planned]:
    chosen: dict[tuple[str, str, str | None, str], Planned] = {}

    def add(upstream: str, repository: str, tag: str | None, digest: str) -> None:
        base = _full_name(config, upstream, repository)
        name = f"{base}:{tag}" if tag else f"{base}@{digest}"
        chosen.setdefault((upstream, repository, tag, digest),
                          Planned(upstream, repository, tag, digest, name))

    for text in args.refs:
        ref = references.parse(text, config, router)
        if ref.digest:
            if cache.manifest_info(ref.digest) is None:
                raise ExportError(f"{text}: manifest {ref.digest} is not cached")
            add(ref.upstream, ref.repository, ref.tag, ref.digest)
            continue
        assert ref.tag is not None
        row = cache.tag(ref.upstream, ref.repository, ref.tag)
        if row is None:
            raise ExportError(f"{text}: not cached (no tag {ref.tag} of "
                              f"{_full_name(config, ref.upstream, ref.repository)}); "
                              "pull or `mirror warm` it first")
        add(ref.upstream, ref.repository, ref.tag, row.digest)
    for row in sorted(tags, key=lambda r: (r.upstream, r.repository, r.tag)):
        if args.all or any(
                fnmatch.fnmatchcase(n, glob) for glob in args.repository
                for n in (_full_name(config, row.upstream, row.repository),
                          router.display_name(row.upstream, row.repository))):
            add(row.upstream, row.repository, row.tag, row.digest)
    if not chosen:
        raise ExportError("no cached image matches " + " ".join(
            [*(f"--repository {g}" for g in args.repository)] or ["--all"]))
    return list(chosen.values())


async def _read_verified(cache: LocalCache, digest: str, limit: int) -> bytes:
    """A small cached object (a manifest, a config) read whole from the store, checked."""
    data = bytearray()
    try:
        async for chunk in cache.store.read(digest, 0, None):
            data += chunk
            if len(data) > limit:
                break
    except BlobUnknown:
        raise FileNotFoundError(digest) from None       # as a file that went
    if len(data) > limit:
        raise ExportError(f"{digest}: larger than {limit} bytes")
    algorithm = digest.split(":", 1)[0]
    if f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" != digest:
        raise ExportError(f"{digest}: the cached file does not match its digest "
                          "(run `mirror verify`)")
    return bytes(data)


async def plan_image(cache: LocalCache, image: Planned, platforms: list[Platform] | None,
                     manifests: dict[str, bytes]) -> None:
    """Fill in ``image``'s manifests and blobs; ExportError names what is not cached."""
    async def manifest(digest: str, what: str) -> tuple[str, Any, bytes]:
        info = cache.manifest_info(digest)
        if info is None:
            raise ExportError(f"{image.name}: {what} {digest} is not cached"
                              + ("" if platforms else "; warm it, or choose platforms "
                                 "with --platform"))
        data = manifests.get(digest)
        if data is None:
            try:
                data = await _read_verified(cache, digest, MANIFEST_MAX)
            except FileNotFoundError:
                raise ExportError(f"{image.name}: manifest {digest} vanished from the "
                                  "cache (evicted?)") from None
            manifests[digest] = data
        return info.media_type, json.loads(data), data

    def need_blobs(digests: tuple[str, ...]) -> None:
        for d in digests:
            if cache.blob_size(d) is None:
                raise ExportError(f"{image.name}: blob {d} is not cached; warm the image "
                                  "first")
            if d not in image.blobs:
                image.blobs.append(d)

    media_type, doc, data = await manifest(image.digest, "manifest")
    image.media_type, image.size = media_type, len(data)
    image.manifests.append(image.digest)
    _, refs = parse_manifest(data, media_type)
    if media_type in INDEX_TYPES or refs.manifests:
        for child in doc.get("manifests") or []:
            if not isinstance(child, dict) or not isinstance(child.get("digest"), str):
                continue
            if platforms is not None and not platform_matches(child.get("platform"), platforms):
                continue
            label = platform_text(child.get("platform")) or child["digest"]
            child_type, _, child_data = await manifest(child["digest"], f"{label} manifest")
            if child_type in INDEX_TYPES:
                raise ExportError(f"{image.name}: nested index {child['digest']} not supported")
            _, child_refs = parse_manifest(child_data, child_type)
            need_blobs(child_refs.blobs)
            if child["digest"] not in image.manifests:
                image.manifests.append(child["digest"])
            if platform_text(child.get("platform")):
                image.platforms.append(str(platform_text(child.get("platform"))))
        if platforms is not None and len(image.manifests) == 1:
            raise ExportError(f"{image.name}: has none of the platforms asked for")
        return
    need_blobs(refs.blobs)
    config = doc.get("config") if isinstance(doc, dict) else None
    if isinstance(config, dict) and isinstance(config.get("digest"), str) \
            and cache.blob_size(config["digest"]) is not None \
            and (cache.blob_size(config["digest"]) or 0) <= CONFIG_MAX:
        try:
            cfg = json.loads(await _read_verified(cache, config["digest"],
                                              CONFIG_MAX))
            plat = {k: cfg[k] for k in ("architecture", "os", "variant")
                    if isinstance(cfg, dict) and isinstance(cfg.get(k), str) and cfg[k]}
            if platform_text(plat):
                image.platform = plat
                image.platforms.append(str(platform_text(plat)))
        except (ValueError, OSError, ExportError):
            pass                     # no platform then: it is only informative
    if platforms is not None and image.platform is not None \
            and not platform_matches(image.platform, platforms):
        raise ExportError(f"{image.name}: is {platform_text(image.platform)}, not a platform "
                          "asked for")


# -- writing ------------------------------------------------------------------------------

def _copy_blob(writer: layout.TarWriter, fd: int, pos: int, size: int) -> int:
    data = os.pread(fd, min(CHUNK, size - pos), pos)
    if not data:
        return 0
    writer.data(data)
    return len(data)


async def write_blob(cache: LocalCache, writer: layout.TarWriter, digest: str, size: int,
                     progress: Progress) -> None:
    if not cache.store.local_files:
        return await _write_stored(cache, writer, digest, size, progress)
    try:
        fd = await fileio.open_read(cache.path_for(digest))
    except FileNotFoundError:
        raise ExportError(f"blob {digest} vanished from the cache while exporting "
                          "(evicted, or removed by `mirror gc`); nothing was written") from None
    task = progress.task(digest, size)
    try:
        actual = (await fileio.run(os.fstat, fd)).st_size
        if actual != size:
            raise ExportError(f"blob {digest}: the cached file has {actual} bytes, the index "
                              f"says {size} (run `mirror verify`)")
        await fileio.run(writer.header, layout.blob_name(digest), size)
        pos = 0
        while pos < size:
            n = await fileio.run(_copy_blob, writer, fd, pos, size)
            if n == 0:
                raise ExportError(f"blob {digest}: the cached file was cut short")
            pos += n
            task.advance(n)
        await fileio.run(writer.pad, size)
        task.done()
    except BaseException as exc:
        task.failed(str(exc))
        raise
    finally:
        os.close(fd)


async def _write_stored(cache: LocalCache, writer: layout.TarWriter, digest: str, size: int,
                       progress: Progress) -> None:
    """``write_blob`` of a blob in an object store: streamed (with the tar writer on a
    worker thread), never whole in memory. Its size is the index's: a shorter object
    fails the export."""
    task = progress.task(digest, size)
    try:
        await fileio.run(writer.header, layout.blob_name(digest), size)
        pos = 0
        try:
            async for chunk in cache.store.read(digest, 0, size):
                await fileio.run(writer.data, chunk)
                pos += len(chunk)
                task.advance(len(chunk))
        except BlobUnknown:
            raise ExportError(f"blob {digest} vanished from the cache while exporting "
                              "(evicted, or removed by `mirror gc`)") from None
        if pos != size:
            raise ExportError(f"blob {digest}: the stored object has {pos} bytes, the index "
                              f"says {size} (run `mirror verify`)")
        await fileio.run(writer.pad, size)
        task.done()
    except BaseException as exc:
        task.failed(str(exc))
        raise


def bundle_doc(config: Config, images: list[Planned], carried: list[str], sizes: dict[str, int],
               since: Since | None, left_out: list[str]) -> dict[str, Any]:
    return {
        "format": "mirror-bundle", "version": BUNDLE_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mirror_version": __version__,
        "images": [{
            "name": i.name, "tag": i.tag, "digest": i.digest, "mediaType": i.media_type,
            "platforms": i.platforms,
            "upstream": None if i.upstream == HOSTED else i.upstream,
            "upstream_url": None if i.upstream == HOSTED or i.upstream not in config.upstreams
            else config.upstreams[i.upstream].url,
            "repository": i.repository, "hosted": i.upstream == HOSTED,
            "size": sum(sizes.get(d, 0) for d in (*i.manifests, *i.blobs)),
        } for i in images],
        "blobs": {"count": len(carried), "bytes": sum(sizes[d] for d in carried),
                  "digests": carried},
        "since": since.describe(left_out) if since else None,
    }


def index_doc(images: list[Planned]) -> dict[str, Any]:
    entries = []
    for i in images:
        entry: dict[str, Any] = {"mediaType": i.media_type, "digest": i.digest, "size": i.size}
        if i.platform:
            entry["platform"] = i.platform
        entry["annotations"] = {REF_NAME: i.name, CONTAINERD_NAME: i.name}
        entries.append(entry)
    return {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries}


def _open_output(output: str) -> tuple[IO[bytes], Path | None]:
    if output == "-":
        return os.fdopen(os.dup(1), "wb", buffering=CHUNK), None
    target = Path(output)
    temp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    return open(temp, "wb", buffering=CHUNK), temp


def _finish_output(out: IO[bytes], temp: Path | None, output: str) -> None:
    out.flush()
    if temp is not None:
        os.fsync(out.fileno())
    out.close()
    if temp is not None:
        os.replace(temp, output)


async def export(args: argparse.Namespace, config: Config, progress: Progress,
                 platforms: list[Platform] | None, since: Since | None) -> int:
    router = Router(config)
    try:
        async with existing(config.data_dir, storage=config.storage,
                            index=config.index) as cache:
            return await _export(args, config, progress, platforms, since, router, cache)
    except CannotOpen as exc:
        raise ExportError(str(exc)) from None
    except RegistryError as exc:
        raise ExportError(exc.message) from None


async def _export(args: argparse.Namespace, config: Config, progress: Progress,
                  platforms: list[Platform] | None, since: Since | None, router: Router,
                  cache: LocalCache) -> int:
    images = select(args, config, router, cache, await cache.index.load_tags())
    manifests: dict[str, bytes] = {}
    for image in images:
        await plan_image(cache, image, platforms, manifests)
    sizes = {d: len(b) for d, b in manifests.items()}
    blobs: list[str] = []
    for image in images:
        for d in image.blobs:
            if d not in sizes:
                sizes[d] = cache.blob_size(d) or 0
                blobs.append(d)
    left_out: list[str] = []
    if since is not None:
        if since.bundle is not None:
            since.present = await fileio.run(read_previous, since.bundle)
            left_out = [d for d in blobs if d in since.present]
        else:
            seen = await cache.index.first_seen(blobs)
            left_out = [d for d in blobs if seen.get(d, float("inf")) < (since.date or 0)]
    skip = set(left_out)
    carried = [*manifests, *(d for d in blobs if d not in skip)]
    progress.plan(sum(sizes[d] for d in carried), len(carried))

    out, temp = await fileio.run(_open_output, args.output)
    writer = layout.TarWriter(out)
    try:
        await fileio.run(writer.add_bytes, layout.OCI_LAYOUT, layout.LAYOUT_VERSION)
        doc = bundle_doc(config, images, carried, sizes, since, left_out)
        await fileio.run(writer.add_bytes, layout.BUNDLE_JSON,
                         json.dumps(doc, indent=1).encode())
        await fileio.run(writer.add_bytes, layout.INDEX_JSON,
                         json.dumps(index_doc(images), indent=1).encode())
        for digest, data in manifests.items():
            task = progress.task(digest, len(data))
            await fileio.run(writer.add_bytes, layout.blob_name(digest), data)
            task.advance(len(data))
            task.done()
        for digest in blobs:
            if digest in skip:
                progress.skipped(digest, sizes[digest])
                continue
            await write_blob(cache, writer, digest, sizes[digest], progress)
        await fileio.run(writer.finish)
        await fileio.run(_finish_output, out, temp, args.output)
    except BaseException:
        await fileio.run(out.close)
        if temp is not None:
            await fileio.run(temp.unlink, True)
        raise
    for image in images:
        progress.image(image.name)
    progress.close(True, bundle=args.output, left_out=len(left_out))
    return 0
