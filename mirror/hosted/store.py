"""HostedStore: the repositories pushed to this mirror.

It reads like any other ``Source`` (manifests, tags, blobs) from the local cache only,
with no upstream behind it: what was not pushed is a 404. It writes through the same
``LocalCache`` the proxy fills, so a blob both cached and pushed is stored once. Its
index rows are under the upstream ``HOSTED`` (""); everything linked there is a root
for eviction (``Index.protected``), so hosted content is never evicted. Hosted tags are
written with a TTL of a century: they never go stale.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import metrics
from ..cache import LocalCache
from ..config import HostedConfig
from ..errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    Unsupported,
)
from ..models import (
    DIGEST_RE,
    HOSTED,
    Manifest,
    ManifestInfo,
    Referrer,
    digest_of,
    is_digest,
    parse_manifest,
    require_acceptable,
)
from ..notify import events
from ..storage import StoredBlob
from . import gc
from .uploads import Uploads

TAG_TTL = 100 * 365 * 24 * 3600.0     # hosted tags never expire


class MissingReference(ManifestBlobUnknown):
    status = 400           # as distribution and the OCI spec answer a manifest PUT


@dataclass(frozen=True)
class Pushed:
    digest: str
    subject: str | None        # the manifest's subject digest, for OCI-Subject


def _subject(doc: dict[str, Any]) -> str | None:
    """The manifest's subject digest; MANIFEST_INVALID when it names none."""
    subject = doc.get("subject")
    if subject is None:
        return None
    digest = subject.get("digest") if isinstance(subject, dict) else None
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise ManifestInvalid(f"the manifest's subject has no valid digest: {subject!r:.200}")
    return digest


def _descriptor(doc: dict[str, Any], digest: str, media_type: str, size: int) -> Referrer:
    """The referrer's descriptor (OCI distribution-spec v1.1, listing referrers): its
    ``artifactType``, else its config's media type (an image manifest; an index has
    none), and its annotations."""
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str) or not artifact_type:
        config = doc.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else None
        if not isinstance(artifact_type, str) or not artifact_type:
            artifact_type = None
    annotations = doc.get("annotations")
    if not isinstance(annotations, dict):
        annotations = {}
    return Referrer(digest, media_type, artifact_type, size,
                    {str(k): str(v) for k, v in annotations.items()})


class HostedStore:
    def __init__(self, local: LocalCache, config: HostedConfig) -> None:
        self.local = local
        self.config = config
        self.uploads = Uploads(local, config)
        self._gc: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None

    async def open(self, leader: bool = True, *,
                   leading: Callable[[], bool] | None = None) -> None:
        """Start serving; the ``leader`` (the only process, or worker 0 of several) also
        sweeps the upload sessions (they live in this data directory) and collects in the
        background; with several replicas, it collects only while ``leading()`` (it leads
        the site: mirror/cluster/leader.py)."""
        await self.uploads.open(sweep=leader)
        if not leader:
            return
        if await self.local.index.referrers_pending():
            await self._record_referrers()
        if self.config.gc_interval is not None:
            self._gc = asyncio.create_task(
                gc.schedule(self.local, self.config.gc_interval, self.config.gc_grace,
                            leading=leading),
                name="hosted-gc")
        self._sweep = asyncio.create_task(self.uploads.schedule(self.sweep_interval),
                                          name="hosted-upload-sweep")

    @property
    def sweep_interval(self) -> float:
        """How often expired upload sessions are swept: a quarter of ``upload_ttl``
        (so one lives at most 1.25 times it), at most ``gc_interval``, at least 0.5 s."""
        interval = self.config.upload_ttl / 4
        if self.config.gc_interval is not None:
            interval = min(interval, self.config.gc_interval)
        return max(interval, 0.5)

    async def _record_referrers(self) -> None:
        """Once, on an index.db from before referrers: record the subjects of the
        hosted manifests pushed until now."""
        for repository, digest in self.local.manifests_of(HOSTED):
            manifest = await self.local.read_manifest(digest)
            try:
                doc = json.loads(manifest.data) if manifest is not None else None
                subject = _subject(doc) if isinstance(doc, dict) else None
            except (ValueError, ManifestInvalid):
                continue
            if doc is not None and manifest is not None and subject is not None:
                await self.local.add_referrer(HOSTED, repository, subject, _descriptor(
                    doc, digest, manifest.media_type, manifest.size))
        await self.local.index.referrers_recorded()

    async def aclose(self) -> None:
        for task in (self._gc, self._sweep):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.uploads.close()

    # -- the read side (store.Source)

    def _resolve(self, repository: str, reference: str) -> ManifestInfo:
        if is_digest(reference):
            digest: str | None = reference
        else:
            row = self.local.tag(HOSTED, repository, reference)
            digest = row.digest if row else None
        info = self.local.manifest_info(digest) if digest else None
        if info is None or not self.local.linked(HOSTED, repository, info.digest):
            raise ManifestUnknown(f"manifest unknown: {repository[:200]}:{reference[:200]}",
                                  detail={"reference": reference[:200]})
        return info

    async def _resolve_fresh(self, repository: str, reference: str) -> ManifestInfo:
        """As _resolve, looking again after a miss if another process (`mirror import`)
        changed the index since the maps were loaded."""
        try:
            return self._resolve(repository, reference)
        except ManifestUnknown:
            if not await self.local.changed_elsewhere():
                raise
        return self._resolve(repository, reference)

    async def get_manifest(self, repository: str, reference: str,
                           accept: list[str]) -> Manifest:
        info = await self._resolve_fresh(repository, reference)
        require_acceptable(info.media_type, accept, _named(repository, reference))
        manifest = await self.local.read_manifest(info.digest)
        if manifest is None:
            raise ManifestUnknown(f"manifest unknown: {repository[:200]}:{reference[:200]}")
        return manifest

    async def head_manifest(self, repository: str, reference: str,
                            accept: list[str]) -> ManifestInfo:
        info = await self._resolve_fresh(repository, reference)
        require_acceptable(info.media_type, accept, _named(repository, reference))
        return info

    async def tags(self, repository: str) -> list[str]:
        await self.local.catch_up()            # tags another worker was just pushed
        tags = self.local.tags_of(HOSTED, repository)
        if not tags and not await self._exists(repository):
            raise NameUnknown(f"repository {repository[:200]!r} not known to this registry",
                              detail={"name": repository[:200]})
        return tags

    async def _exists(self, repository: str) -> bool:
        return (HOSTED, repository) in set(await self.local.repositories())

    async def open_blob(self, repository: str, digest: str) -> StoredBlob:
        for last in (False, True):
            body = await self.local.open_blob(digest) \
                if self.local.linked(HOSTED, repository, digest) else None
            if body is not None:
                return body
            if last or not await self.local.changed_elsewhere():
                break
        raise BlobUnknown(f"blob unknown: {digest}", detail={"digest": digest})

    async def stat_blob(self, repository: str, digest: str) -> int:
        if not self.has_blob(repository, digest):
            await self.local.changed_elsewhere()       # pushed through another worker?
        size = self.local.blob_size(digest) \
            if self.local.linked(HOSTED, repository, digest) else None
        if size is None:
            raise BlobUnknown(f"blob unknown: {digest}", detail={"digest": digest})
        return size

    def has_blob(self, repository: str, digest: str) -> bool:
        return self.local.blob_size(digest) is not None and \
            self.local.linked(HOSTED, repository, digest)

    # -- the write side

    async def mount(self, repository: str, digest: str, source: tuple[str, str]) -> int | None:
        """Link a blob that ``source`` (upstream, repository) has into ``repository``;
        its size, or None when the source does not have it."""
        if self.local.blob_size(digest) is None or \
                not self.local.linked(source[0], source[1], digest):
            await self.local.catch_up()               # another worker's, a moment ago?
        size = self.local.blob_size(digest)
        if size is None or not self.local.linked(source[0], source[1], digest):
            return None
        if not await self.local.refresh_links(HOSTED, repository, [digest], create=True):
            return None         # gone meanwhile (hosted gc): a normal upload follows
        metrics.pushed("blob")
        events.mounted(repository, digest, size, source)
        return size

    async def put_manifest(self, repository: str, reference: str, data: bytes,
                           content_type: str | None) -> Pushed:
        media_type, refs = parse_manifest(data, content_type)
        doc = json.loads(data)
        declared = doc.get("mediaType")
        if declared is not None and content_type and declared != media_type:
            raise ManifestInvalid(f"Content-Type {media_type!r} does not match the "
                                  f"manifest's mediaType {str(declared)[:200]!r}")
        subject = _subject(doc)
        if is_digest(reference):
            digest = digest_of(data, reference.split(":", 1)[0])
            if digest != reference:
                raise DigestInvalid(f"manifest hashes to {digest}, not {reference}",
                                    detail={"digest": reference})
        else:
            digest = digest_of(data)
        await self.local.catch_up()     # blobs and children pushed through other workers
        # Stamp the links of what the manifest references, and read from the index
        # which are there: a hosted gc sweep before this lost them (and the push fails
        # here), one after sees fresh links inside its grace and keeps them.
        present = await self.local.refresh_links(HOSTED, repository,
                                                 [*refs.blobs, *refs.manifests])
        for blob in refs.blobs:
            if blob not in present or not self.has_blob(repository, blob):
                raise MissingReference(f"blob {blob} is not in {repository[:200]}; push it "
                                       "first", detail={"digest": blob})
        for child in refs.manifests:
            if child not in present or self.local.manifest_info(child) is None or \
                    not self.local.linked(HOSTED, repository, child):
                raise MissingReference(f"manifest {child} is not in {repository[:200]}; "
                                       "push it first", detail={"digest": child})
        await self.local.put_manifest(HOSTED, repository, Manifest(data, media_type, digest),
                                      refs)
        metrics.pushed("manifest")
        events.pushed(repository, digest, media_type, len(data),
                      "" if is_digest(reference) else reference)
        if not is_digest(reference):
            await self.local.set_tag(HOSTED, repository, reference, digest, TAG_TTL)
        if subject is not None:
            await self.local.add_referrer(HOSTED, repository, subject,
                                          _descriptor(doc, digest, media_type, len(data)))
        return Pushed(digest, subject)

    async def referrers(self, repository: str, subject: str) -> list[Referrer]:
        """The repository's manifests whose subject is ``subject`` (none: an empty list;
        the subject itself need not exist)."""
        return await self.local.referrers_of(HOSTED, repository, subject)

    # -- delete (content management): links and tags go; bytes stay for garbage collection

    def _deletable(self) -> None:
        if not self.config.delete:
            raise Unsupported("deleting is disabled: hosted.delete is false in the config")

    async def delete_manifest(self, repository: str, reference: str) -> None:
        """By digest: the manifest leaves the repository with every tag pointing at it.
        By tag: only the tag goes (untag)."""
        self._deletable()
        await self.local.catch_up()     # what other workers pushed or deleted
        if is_digest(reference):
            info = self._resolve(repository, reference)
            tags = [t for t in self.local.tags_of(HOSTED, repository)
                    if (row := self.local.tag(HOSTED, repository, t)) is not None
                    and row.digest == info.digest]
            await self.local.unlink(HOSTED, repository, tags, [info.digest])
            events.deleted(repository, digest=info.digest)
        else:
            if self.local.tag(HOSTED, repository, reference) is None:
                raise ManifestUnknown(f"manifest unknown: {repository[:200]}:{reference[:200]}",
                                      detail={"reference": reference[:200]})
            await self.local.unlink(HOSTED, repository, [reference])
            events.deleted(repository, tag=reference)
        metrics.deleted("manifest" if is_digest(reference) else "tag")

    async def delete_blob(self, repository: str, digest: str) -> None:
        """Unlink a blob from the repository (a manifest still referencing it is not
        checked, as registry:2 does not)."""
        self._deletable()
        await self.local.catch_up()
        if not self.has_blob(repository, digest):
            raise BlobUnknown(f"blob unknown: {digest}", detail={"digest": digest})
        await self.local.unlink(HOSTED, repository, digests=[digest])
        metrics.deleted("blob")
        events.deleted(repository, digest=digest, kind="blob")


def _named(repository: str, reference: str) -> str:
    return f"{repository[:200]}{'@' if is_digest(reference) else ':'}{reference[:200]}"
