"""``mirror warm REF... [-f LIST] [--platform os/arch[/variant],... | --all-platforms]
[--pin]``: fill the cache with images, as a client pulling them through the mirror would.

Everything goes through a mirror server (via_server.py): the one running on the data
directory, or one started in this process for the time of the warm. For each image:
the manifest (an index or manifest list: the chosen platforms' children, by default
all of them, as ``skopeo copy --all``), then each blob streamed through the server
and dropped. A blob the index already has, linked to the repository, is skipped
without a request, so a warm run again transfers nothing and an interrupted one
resumes blob by blob. An image that fails (upstream error, broken stream) is named
with the blob and the server's message; the others go on; exit status 1.
``--pin`` pins each image warmed, as ``mirror pin`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import RegistryError
from ..models import INDEX_TYPES, validate_digest
from .progress import Progress, add_arguments, from_args, human_size
from .references import BadReference, ImageRef, full_name, parse

PARALLEL = 3          # blobs of one image fetched at once


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    warm = sub.add_parser("warm", parents=[common], help="fetch images into the cache "
                          "(through the running server, or one started for the time of it)")
    warm.add_argument("refs", nargs="*", metavar="REF", help="an image as users pull it: "
                      "alpine:3.19, ghcr.io/org/app:1, docker.io/library/busybox@sha256:...")
    warm.add_argument("-f", dest="lists", action="append", default=[], metavar="LIST",
                      help="a file of references, one a line (# comments); - for stdin")
    which = warm.add_mutually_exclusive_group()
    which.add_argument("--platform", metavar="OS/ARCH[/VARIANT],...", help="only these "
                       "platforms of a multi-platform image (default: all of them)")
    which.add_argument("--all-platforms", action="store_true", help="every platform "
                       "(the default)")
    warm.add_argument("--pin", action="store_true", help="pin each image warmed (never "
                      "evicted), as mirror pin does")
    add_arguments(warm)


class Usage(Exception):
    """Bad arguments: exit status 2, before anything is fetched."""


Platform = tuple[str, str, str | None]


def parse_platforms(text: str | None) -> list[Platform]:
    if not text:
        return []
    found: list[Platform] = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise Usage(f"--platform: {item.strip()!r} is not OS/ARCH[/VARIANT] "
                        "(e.g. linux/amd64,linux/arm64/v8)")
        found.append((parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    return found


def read_refs(args: argparse.Namespace) -> list[str]:
    texts = list(args.refs)
    for name in args.lists:
        try:
            if name == "-":
                lines = sys.stdin.read().splitlines()
            else:
                with open(name, encoding="utf-8") as f:
                    lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise Usage(f"-f {name}: {getattr(exc, 'strerror', None) or exc}") from None
        texts += [t for t in (line.split("#", 1)[0].strip() for line in lines) if t]
    if not texts:
        raise Usage("warm: no image to warm: give REF... or -f LIST")
    return texts


def parse_refs(texts: list[str], config: Config) -> list[ImageRef]:
    refs = []
    for text in texts:
        try:
            ref = parse(text, config)
        except BadReference as exc:
            raise Usage(f"warm: {exc}") from None
        if ref.hosted:
            raise Usage(f"warm: {text!r} is a hosted repository (pushed here, not pulled "
                        "from an upstream): there is nothing to warm")
        refs.append(ref)
    return list({r: None for r in refs})


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        platforms = parse_platforms(args.platform)
        refs = parse_refs(read_refs(args), config)
    except Usage as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    progress = from_args(args, "warm")
    try:
        results = asyncio.run(warm(config, refs, platforms, args.pin, progress))
    except KeyboardInterrupt:
        progress.close(False)
        print("mirror: warm: interrupted; run it again to resume", file=sys.stderr)
        return 130
    except OSError as exc:       # the data directory (lock, token, index) cannot be used
        from ..cache import unusable
        progress.close(False)
        print(f"mirror: warm: {unusable(config.data_dir.resolve(), exc)}", file=sys.stderr)
        return 1
    except Exception as exc:     # e.g. the in-process server could not start
        progress.close(False)
        print(f"mirror: warm: {exc}", file=sys.stderr)
        return 1
    ok = all(r.ok for r in results)
    if args.json:      # the table shows counts; the log said what happened to each image
        progress.close(ok, images=[r.as_dict() for r in results])
    else:
        progress.close(ok)
    for r in results:
        if not r.ok:
            print(f"mirror: warm: {r.ref.text}: {r.error}", file=sys.stderr)
    return 0 if ok else 1


@dataclass
class Result:
    ref: ImageRef
    name: str
    digest: str | None = None
    platforms: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    pinned: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) if self.errors else None

    def as_dict(self) -> dict[str, Any]:
        return {"ref": self.ref.text, "name": self.name, "digest": self.digest,
                "platforms": self.platforms, "blobs": self.blobs, "bytes": self.bytes,
                "skipped": self.skipped, "ok": self.ok, "error": self.error,
                "pinned": self.pinned}


async def warm(config: Config, refs: list[ImageRef], platforms: list[Platform], pin: bool,
               progress: Progress) -> list[Result]:
    from .via_server import Index, Puller, serving

    results = []
    index = Index(config.data_dir, config.index, files=config.storage.s3 is None)
    try:
        async with serving(config) as conn:
            if not conn.started_here:
                progress.log(f"warm: through the mirror running at {conn.url}")
            for ref in refs:
                result = Result(ref, full_name(config, ref.upstream, ref.repository)
                                + (f"@{ref.digest}" if ref.digest else f":{ref.tag}"))
                await warm_one(Puller(conn.client, ref.upstream), index, ref, platforms,
                               progress, result)
                if result.ok:
                    if pin:
                        await pin_image(config, ref)
                        result.pinned = True
                    progress.image(ref.text)
                    progress.log(f"warm: {result.name}: {result.blobs} fetched "
                                 f"({human_size(result.bytes)}), {result.skipped} already "
                                 f"cached{', pinned' if result.pinned else ''}")
                results.append(result)
    finally:
        await index.close()
    return results


def _platform_text(p: dict[str, Any] | None) -> str:
    if not isinstance(p, dict):
        return "unknown"
    text = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return f"{text}/{p['variant']}" if p.get("variant") else text


def _matches(p: dict[str, Any] | None, want: Platform) -> bool:
    if not isinstance(p, dict):
        return False
    os_, arch, variant = want
    if p.get("os") != os_ or p.get("architecture") != arch:
        return False
    have = p.get("variant") or ("v8" if arch == "arm64" else None)
    return variant is None or variant == have


def blobs_of(doc: dict[str, Any]) -> list[tuple[str, int | None]]:
    """(digest, size) of an image manifest's config and layers (schema 1: its
    fsLayers, sizes unknown); foreign (non-distributable) layers are not in any registry."""
    if doc.get("schemaVersion") == 1:
        return [(layer["blobSum"], None) for layer in doc.get("fsLayers") or []
                if isinstance(layer, dict) and isinstance(layer.get("blobSum"), str)]
    found: list[tuple[str, int | None]] = []
    for d in [doc.get("config"), *(doc.get("layers") or [])]:
        if not isinstance(d, dict) or not isinstance(d.get("digest"), str):
            continue
        media_type = str(d.get("mediaType", ""))
        if "foreign" in media_type or "nondistributable" in media_type:
            continue
        size = d.get("size")
        found.append((d["digest"], size if isinstance(size, int) else None))
    return found


async def warm_one(puller: Any, index: Any, ref: ImageRef, platforms: list[Platform],
                   progress: Progress, result: Result) -> None:
    from .via_server import PullFailed

    repo = ref.repository
    try:
        data, media_type, result.digest = await puller.manifest(repo, ref.reference)
        doc = json.loads(data)
        if media_type in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            children = [c for c in doc.get("manifests") or [] if isinstance(c, dict)]
            chosen = children if not platforms else \
                [c for c in children if any(_matches(c.get("platform"), p) for p in platforms)]
            for want in platforms:
                if not any(_matches(c.get("platform"), want) for c in children):
                    has = ", ".join(_platform_text(c.get("platform")) for c in children)
                    progress.log(f"warm: {ref.text}: warning: no platform "
                                 f"{'/'.join(filter(None, want))} (it has {has or 'none'})")
            if not chosen:
                result.errors.append("no child manifest for the platforms asked for")
                return
            blobs: list[tuple[str, int | None]] = []
            for child in chosen:
                digest = validate_digest(str(child.get("digest", "")))
                child_data, _, _ = await puller.manifest(repo, digest)
                blobs += blobs_of(json.loads(child_data))
                result.platforms.append(_platform_text(child.get("platform")))
        else:
            blobs = blobs_of(doc)
        for digest, _ in blobs:
            validate_digest(digest)
    except PullFailed as exc:
        result.errors.append(str(exc))
        return
    except (ValueError, RegistryError, AttributeError, TypeError) as exc:
        result.errors.append(f"unreadable manifest: {getattr(exc, 'message', None) or exc}")
        return
    blobs = list(dict.fromkeys(blobs))
    progress.plan(sum(size or 0 for _, size in blobs), blobs=len(blobs))
    slots = asyncio.Semaphore(PARALLEL)

    async def one(digest: str, size: int | None) -> None:
        label = f"{ref.text} {digest[:19]}"
        async with slots:
            if await index.cached(ref.upstream, repo, digest):
                progress.skipped(label, size or 0)
                result.skipped += 1
                return
            task = progress.task(label, size)
            try:
                got = await puller.blob(repo, digest, size, task.advance)
            except PullFailed as exc:
                task.advance(-task.transferred)     # a failed blob's bytes are not done
                task.failed(str(exc))
                result.errors.append(str(exc))
                return
            task.done()
            result.blobs += 1
            result.bytes += got

    await asyncio.gather(*(one(d, s) for d, s in blobs))


async def pin_image(config: Config, ref: ImageRef) -> None:
    """As ``mirror pin`` does: the pin, then the pins generation for a running server."""
    from ..index import open_index

    index = await open_index(config.data_dir.resolve(), config.index, flush=False)
    try:
        await index.pin(ref.upstream, ref.repository, ref.reference)
        await index.bump_generation("pins")
    finally:
        await index.close()
