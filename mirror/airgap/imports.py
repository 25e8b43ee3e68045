"""``mirror import``: a bundle, an OCI image layout (directory, or ``oci-archive`` tar),
or a ``docker save`` tar of Docker 25+, into the cache.

A tar is read in one pass (stdin works), so members may come in any order. Each
blob is hashed as it is written to a temp file in the cache and committed (fsync,
atomic rename, then the index row) only if it matches its digest; a blob already
cached is read past. Members that are manifests (small JSON with ``schemaVersion``
and layers or manifests) are kept in memory, as are ``index.json``,
``oci-layout`` and ``mirror-bundle.json`` (capped); images are registered at the
end: manifests put and linked, every blob linked to the repository, the tag set
(and pinned with ``--pin``), then the index generation bumped so a running
server sees them. An image that needs a blob which failed verification, or is
neither in the layout nor cached, is not registered; the message names the blob.

Names: ``io.containerd.image.name``, else ``org.opencontainers.image.ref.name``
if it is a full reference; ``--as REPO`` puts every entry in REPO, tagged with the
entry's tag (``ref.name`` when that is a bare tag, as skopeo's ``oci:DIR:TAG``
writes it). Names route as a pull would (references.parse): an upstream and
repository, or a hosted repository.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from .. import fileio
from ..cache import CannotOpen, LocalCache
from ..config import Config
from ..errors import RegistryError
from ..index import IndexUnavailable, where
from ..models import DIGEST_RE, HOSTED, INDEX_TYPES, MANIFEST_MAX, Manifest, parse_manifest
from ..routing import Router
from . import layout, references
from .export import CONTAINERD_NAME, REF_NAME
from .progress import Progress, add_arguments, from_args

HOSTED_TAG_TTL = 100 * 365 * 24 * 3600.0     # as hosted/store.py: hosted tags never expire


class ImportError_(Exception):
    """One line for stderr; exit status 1."""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("import", parents=[common], help="read a bundle (`mirror export`), "
                       "an OCI image layout or a `docker save` tar into the cache")
    p.add_argument("source", metavar="BUNDLE.tar|DIR|-", help="a tar file, an OCI layout "
                   "directory, or '-' for a tar on stdin")
    p.add_argument("--as", dest="as_repo", metavar="REPO", help="register every image in "
                   "this repository (as clients pull it), tagged as in the layout")
    p.add_argument("--pin", action="store_true", help="pin what is imported (never evicted)")
    add_arguments(p)


def run(args: argparse.Namespace, config: Config) -> int:
    with from_args(args, "import") as progress:
        try:
            return asyncio.run(import_(args, config, progress))
        except (ImportError_, layout.BadLayout, references.BadReference) as exc:
            why = str(exc)
        except IndexUnavailable as exc:
            why = f"{where(config.data_dir, config.index)}: {exc}"
        progress.close(False)
    print(f"mirror: import: {why}", file=sys.stderr)
    return 1


def _is_full(name: str | None) -> bool:
    return bool(name) and any(c in str(name) for c in ":/@")


def looks_like_manifest(data: bytes) -> str | None:
    """The media type if ``data`` is an image manifest or index, else None."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        return None
    if not ("manifests" in doc or "layers" in doc or "config" in doc):
        return None
    try:
        media_type, _ = parse_manifest(data, None)
    except RegistryError:
        return None
    return media_type


@dataclass
class State:
    small: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)       # digest -> why refused
    committed: int = 0
    failures: list[str] = field(default_factory=list)


async def take(cache: LocalCache, member: layout.Member, state: State,
               progress: Progress) -> None:
    if member.reader is None:
        return
    if member.name in (layout.OCI_LAYOUT, layout.INDEX_JSON, layout.BUNDLE_JSON):
        state.small[member.name] = await fileio.run(layout.read_small, member)
        return
    digest = member.digest
    if digest is None:
        return                         # manifest.json, repositories (docker save): not ours
    progress.plan(member.size, 1)
    if cache.blob_size(digest) is not None or cache.manifest_info(digest) is not None:
        progress.skipped(digest, member.size)
        return                         # a tar reader reads past it at the next member
    keep = member.size <= MANIFEST_MAX
    head = bytearray()
    task = progress.task(digest, member.size)
    temp = await cache.new_temp(digest.split(":", 1)[0])
    try:
        got = 0
        while True:
            chunk = await fileio.run(layout.read_chunk, member)
            if not chunk:
                break
            await temp.write([chunk])
            if keep:
                head += chunk
            got += len(chunk)
            task.advance(len(chunk))
        if got != member.size:
            raise layout.BadLayout(f"{member.name}: cut short ({got} of {member.size} bytes)")
        if temp.digest != digest:
            why = f"digest mismatch (the bytes hash to {temp.digest})"
            state.bad[digest] = why
            await temp.discard()
            task.failed(f"blob {digest}: {why}: refused")
            return
        media_type = looks_like_manifest(bytes(head)) if keep else None
        if media_type is not None:
            state.manifests[digest] = bytes(head)      # put with its image at the end
            await temp.discard()
        else:
            await cache.commit_blob(temp, digest)
            state.committed += 1
        task.done()
    except BaseException as exc:
        await temp.discard()
        task.failed(str(exc))
        raise


@dataclass
class Entry:
    number: int
    digest: str
    media_type: str | None
    upstream: str
    repository: str
    tag: str | None
    name: str


def entries(doc: Any, args: argparse.Namespace, config: Config,
            router: Router) -> tuple[list[Entry], list[str]]:
    found: list[Entry] = []
    errors: list[str] = []
    items = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ImportError_("index.json has no manifests list: not an OCI image layout")
    target = references.parse(args.as_repo, config, router) if args.as_repo else None
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("digest"), str) \
                or not DIGEST_RE.fullmatch(item["digest"]):
            errors.append(f"index.json entry {n}: no valid digest")
            continue
        digest = item["digest"]
        raw = item.get("annotations")
        ann: dict[str, Any] = raw if isinstance(raw, dict) else {}
        ref_name = ann.get(REF_NAME) if isinstance(ann.get(REF_NAME), str) else None
        full = ann.get(CONTAINERD_NAME) if isinstance(ann.get(CONTAINERD_NAME), str) else None
        if full is None and _is_full(ref_name):
            full = ref_name
        try:
            if target is not None:
                tag = references.split(full)[1] if full else ref_name
                if tag is not None:
                    references.split(f"x:{tag}")           # a valid tag
                upstream, repository = target.upstream, target.repository
            elif full is not None:
                ref = references.parse(full, config, router)
                tag = ref.tag
                upstream, repository = ref.upstream, ref.repository
            else:
                errors.append(f"index.json entry {n} ({digest}): no image name (neither "
                              f"{CONTAINERD_NAME} nor a full {REF_NAME}); give --as REPO")
                continue
        except references.BadReference as exc:
            errors.append(f"index.json entry {n} ({digest}): {exc}")
            continue
        base = references.full_name(config, upstream, repository) \
            if upstream == HOSTED or upstream in config.upstreams else repository
        media_type = item.get("mediaType") if isinstance(item.get("mediaType"), str) else None
        found.append(Entry(n, digest, media_type, upstream, repository, tag,
                           f"{base}:{tag}" if tag else f"{base}@{digest}"))
    return found, errors


async def register(cache: LocalCache, entry: Entry, state: State, config: Config,
                   pin: bool) -> None:
    """Put the entry's manifests, link its blobs, set its tag; ImportError_ names what
    is missing or refused (and nothing of the image is registered then)."""
    async def manifest(digest: str, media_type: str | None) -> Manifest | None:
        data = state.manifests.get(digest)
        if data is not None:
            return Manifest(data, media_type or parse_manifest(data, None)[0], digest)
        return await cache.read_manifest(digest)

    def check_blobs(owner: str, blobs: tuple[str, ...]) -> None:
        for b in blobs:
            if b in state.bad:
                raise ImportError_(f"{entry.name}: blob {b}: {state.bad[b]}")
            if cache.blob_size(b) is None:
                raise ImportError_(f"{entry.name}: blob {b} (of {owner}) is neither in the "
                                   "layout nor cached (an update bundle imported before its "
                                   "base?)")

    if entry.digest in state.bad:
        raise ImportError_(f"{entry.name}: manifest {entry.digest}: {state.bad[entry.digest]}")
    top = await manifest(entry.digest, entry.media_type)
    if top is None:
        raise ImportError_(f"{entry.name}: manifest {entry.digest} is neither in the layout "
                           "nor cached")
    media_type, refs = parse_manifest(top.data, top.media_type)
    children: list[tuple[Manifest, Any]] = []
    if media_type in INDEX_TYPES or refs.manifests:
        doc = json.loads(top.data)
        for item in doc.get("manifests") or []:
            if not isinstance(item, dict) or not isinstance(item.get("digest"), str):
                continue
            if item["digest"] in state.bad:
                raise ImportError_(f"{entry.name}: manifest {item['digest']}: "
                                   f"{state.bad[item['digest']]}")
            child = await manifest(item["digest"], item.get("mediaType"))
            if child is None:
                continue                      # a platform left out: the index stays whole
            _, child_refs = parse_manifest(child.data, child.media_type)
            check_blobs(child.digest, child_refs.blobs)
            children.append((child, child_refs))
    else:
        check_blobs(entry.digest, refs.blobs)
    for child, child_refs in children:
        await cache.put_manifest(entry.upstream, entry.repository, child, child_refs)
    await cache.put_manifest(entry.upstream, entry.repository, top, refs)
    if entry.tag:
        ttl = HOSTED_TAG_TTL if entry.upstream == HOSTED \
            else config.upstreams[entry.upstream].tag_ttl
        await cache.set_tag(entry.upstream, entry.repository, entry.tag, entry.digest, ttl)
    if pin:
        await cache.index.pin(entry.upstream, entry.repository, entry.tag or entry.digest)


async def import_(args: argparse.Namespace, config: Config, progress: Progress) -> int:
    router = Router(config)
    if args.as_repo:
        references.parse(args.as_repo, config, router)      # a bad --as fails first
    try:
        stream, directory = await fileio.run(layout.open_source, args.source)
    except OSError as exc:
        raise ImportError_(f"{args.source}: {exc.strerror or exc}") from None
    try:
        cache = await LocalCache.open(config.data_dir, server=False,
                                      storage=config.storage, index=config.index)
    except CannotOpen as exc:
        raise ImportError_(str(exc)) from None
    state = State()
    try:
        fatal = None
        found = layout.members(stream, directory)
        while True:
            try:
                member = await fileio.run(next, found, None)
                if member is None:
                    break
                await take(cache, member, state, progress)
            except layout.BadLayout as exc:
                fatal = str(exc)
                break
        if state.committed:
            await cache.index.bump_generation("content")
        if fatal is not None:
            raise ImportError_(f"{fatal}; {state.committed} blobs verified before it were "
                               "kept, nothing was registered")
        if layout.INDEX_JSON not in state.small:
            raise ImportError_(f"{args.source}: no index.json: not an OCI image layout")
        try:
            doc = json.loads(state.small[layout.INDEX_JSON])
        except ValueError as exc:
            raise ImportError_(f"index.json: not JSON: {exc}") from None
        todo, errors = entries(doc, args, config, router)
        state.failures += errors
        registered = 0
        for entry in todo:
            try:
                await register(cache, entry, state, config, args.pin)
            except ImportError_ as exc:
                state.failures.append(str(exc))
                continue
            except RegistryError as exc:
                state.failures.append(f"{entry.name}: {exc.message}")
                continue
            registered += 1
            progress.image(entry.name)
        if registered:
            await cache.index.bump_generation("content")
            if args.pin:
                await cache.index.bump_generation("pins")
    finally:
        await cache.close()
        if stream is not None:
            stream.close()
    refused = [f"blob {d}: {why}" for d, why in state.bad.items()]
    ok = not state.failures and not refused
    progress.close(ok, refused=len(refused))
    for line in state.failures:          # refused blobs were reported as they failed
        print(f"mirror: import: {line}", file=sys.stderr)
    return 0 if ok else 1
