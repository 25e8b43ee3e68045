"""Names, references, digests and manifests: the grammar and the value types.

Everything a request carries is validated here before any other layer sees it,
so no file path or SQL value is ever built from unchecked request text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DigestInvalid, ManifestInvalid, ManifestUnknown, NameInvalid, TagInvalid

# -- grammar (OCI distribution spec) -------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
NAME_MAX = 255
HOSTED = ""     # the route and index "upstream" of hosted repositories; never an upstream name

HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


def validate_name(name: str) -> str:
    if not name or len(name) > NAME_MAX or not NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}",
                          detail={"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag[:200]!r}", detail={"tag": tag[:200]})
    return tag


def validate_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise DigestInvalid(f"invalid digest {digest[:200]!r}",
                            detail={"digest": digest[:200]})
    return digest


def is_name(name: str) -> bool:
    """``name`` is a valid repository name (``validate_name`` would pass it)."""
    return bool(name) and len(name) <= NAME_MAX and NAME_RE.fullmatch(name) is not None


def is_digest(reference: str) -> bool:
    return ":" in reference


def validate_reference(reference: str) -> str:
    """A manifest reference: a digest or a tag."""
    return validate_digest(reference) if is_digest(reference) else validate_tag(reference)


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{HASHES[algorithm](data).hexdigest()}"


# -- media types -----------------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST,
                  DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
# What the mirror asks upstream for when a client sends no Accept of its own.
DEFAULT_ACCEPT = ", ".join(MANIFEST_TYPES)

MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
                           r"/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
MANIFEST_MAX = 4 * 1024 * 1024


def accepted_types(accept_headers: list[str]) -> list[str]:
    """The media types named by every Accept header line, parameters dropped."""
    types = []
    for line in accept_headers:
        for item in line.split(","):
            mt = item.split(";", 1)[0].strip()
            if MEDIA_TYPE_RE.fullmatch(mt) or mt == "*/*":
                types.append(mt)
    return types


def sanitize_accept(lines: list[str], max_lines: int = 32) -> list[str]:
    """The client's Accept lines, each kept as a line (so all of them can be forwarded
    upstream) but holding only well-formed media ranges; empty lines dropped."""
    out = []
    for line in lines[:max_lines]:
        items = []
        for item in line.split(","):
            item = item.strip()
            mt = item.split(";", 1)[0].strip()
            if (len(item) <= 256 and item.isprintable()
                    and (MEDIA_TYPE_RE.fullmatch(mt) or mt == "*/*")):
                items.append(item)
        if items:
            out.append(", ".join(items))
    return out


def upstream_accept(lines: list[str]) -> list[str]:
    """What to ask upstream for: the client's lines when they name manifest types,
    else (no Accept, or only */*) every type, so upstream answers with the tag's own
    manifest rather than down-converting for a client it thinks is ancient."""
    named = [t for t in accepted_types(lines) if t != "*/*"]
    return lines if named else [DEFAULT_ACCEPT]


def schema1_digest(data: bytes) -> str | None:
    """The digest of a signed schema1 manifest: over its payload without the JWS
    signatures (libtrust's formatLength/formatTail), as docker and registries compute it."""
    try:
        doc = json.loads(data)
        protected = doc["signatures"][0]["protected"]
        header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        length = int(header["formatLength"])
        tail = header["formatTail"]
        payload = data[:length] + base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4))
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return digest_of(payload)


def acceptable(media_type: str, accepted: list[str]) -> bool:
    """Whether a client that sent ``accepted`` may be served ``media_type``.

    No Accept (or */*) accepts anything; otherwise the type must be named.
    Clients that only speak schema1 are not served schema2 (they asked not to be).
    """
    if not accepted or "*/*" in accepted:
        return True
    return media_type in accepted


def require_acceptable(media_type: str, accept: list[str], what: str) -> None:
    """``ManifestUnknown`` naming the stored type, unless a client that sent the Accept
    lines ``accept`` takes ``media_type`` (as registry:2 answers "OCI index found, but
    accept header does not support OCI indexes"): the stored manifest, with no other
    form to give instead."""
    accepted = accepted_types(accept)
    if not acceptable(media_type, accepted):
        raise ManifestUnknown(f"{what} is stored as {media_type}, which the request's Accept "
                              "does not include",
                              detail={"mediaType": media_type, "accept": accepted[:16]})


# -- manifests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A manifest exactly as upstream published it."""

    data: bytes
    media_type: str
    digest: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ManifestInfo:
    """What a HEAD answers: no body needed."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Referrer:
    """A manifest naming a subject: its descriptor in a referrers list (OCI v1.1)."""

    digest: str
    media_type: str
    artifact_type: str | None
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


def referrers_of_index(doc: Any) -> list[Referrer]:
    """The descriptors of an image index (a referrers answer, or the index an upstream
    without the referrers API keeps under the ``sha256-<hex>`` tag); ones that are not
    a manifest descriptor with a valid digest are skipped."""
    found: list[Referrer] = []
    items = doc.get("manifests") if isinstance(doc, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        digest, media_type, size = item.get("digest"), item.get("mediaType"), item.get("size")
        if not (isinstance(digest, str) and DIGEST_RE.fullmatch(digest)
                and isinstance(media_type, str) and isinstance(size, int)):
            continue
        artifact_type = item.get("artifactType")
        annotations = item.get("annotations")
        found.append(Referrer(
            digest, media_type, artifact_type if isinstance(artifact_type, str) else None, size,
            {str(k): str(v) for k, v in annotations.items()}
            if isinstance(annotations, dict) else {}))
    return found


def referrers_index(found: list[Referrer]) -> dict[str, Any]:
    """The OCI image index a referrers listing answers with."""
    manifests: list[dict[str, Any]] = []
    for r in found:
        descriptor: dict[str, Any] = {"mediaType": r.media_type, "digest": r.digest,
                                      "size": r.size}
        if r.artifact_type:
            descriptor["artifactType"] = r.artifact_type
        if r.annotations:
            descriptor["annotations"] = r.annotations
        manifests.append(descriptor)
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}


@dataclass(frozen=True)
class References:
    blobs: tuple[str, ...]
    manifests: tuple[str, ...]


def parse_manifest(data: bytes, content_type: str | None) -> tuple[str, References]:
    """Media type and referenced digests of a manifest; MANIFEST_INVALID if it is not one."""
    if len(data) > MANIFEST_MAX:
        raise ManifestInvalid(f"manifest larger than {MANIFEST_MAX} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestInvalid(f"manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    media_type = _media_type(doc, content_type)
    blobs: list[str] = []
    manifests: list[str] = []
    if media_type in INDEX_TYPES or "manifests" in doc and "layers" not in doc:
        manifests = _digests(doc.get("manifests"))
    else:
        config = doc.get("config")
        if isinstance(config, dict) and isinstance(config.get("digest"), str):
            blobs.append(config["digest"])
        blobs += _digests(doc.get("layers"))
        blobs += _digests(doc.get("blobs"))
        for layer in doc.get("fsLayers") or []:  # docker schema1
            if isinstance(layer, dict) and isinstance(layer.get("blobSum"), str):
                blobs.append(layer["blobSum"])
    for digest in blobs + manifests:
        if not DIGEST_RE.fullmatch(digest):
            raise ManifestInvalid(f"manifest references invalid digest {digest[:200]!r}")
    return media_type, References(tuple(dict.fromkeys(blobs)), tuple(dict.fromkeys(manifests)))


def _media_type(doc: dict[str, Any], content_type: str | None) -> str:
    ct = (content_type or "").split(";", 1)[0].strip()
    if ct in MANIFEST_TYPES or (ct and MEDIA_TYPE_RE.fullmatch(ct)
                                and ct not in ("application/json", "text/plain",
                                               "application/octet-stream")):
        return ct
    declared = doc.get("mediaType")
    if isinstance(declared, str) and MEDIA_TYPE_RE.fullmatch(declared):
        return declared
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


def _digests(items: Any) -> list[str]:
    out = []
    for item in items or []:
        if isinstance(item, dict) and isinstance(item.get("digest"), str):
            out.append(item["digest"])
    return out
