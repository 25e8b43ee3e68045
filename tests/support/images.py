"""Build real image blobs on disk and push them over the registry HTTP API.

Blobs are streamed: layers are written (tar -> gzip level 1 -> file) while
both digests are computed, and uploads read the file in chunks.  Nothing
holds a whole layer in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx

from .client import MANIFEST_LIST_V2, MANIFEST_V2, OCI_INDEX, OCI_MANIFEST

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

READ_CHUNK = 1 << 20        # file reads / random generation
UPLOAD_CHUNK = 32 << 20     # bytes per PATCH request


@dataclass(frozen=True)
class Blob:
    path: Path
    digest: str
    size: int
    media_type: str
    diff_id: str | None = None  # sha256 of the uncompressed tar (layers only)

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def iter_file(path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """Yield ``length`` bytes (default: to EOF) of a file from ``start``."""
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(READ_CHUNK if left is None else min(READ_CHUNK, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk


class _HashingWriter:
    """File-like sink that hashes and counts what passes through to ``f``."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _random_chunks(size: int, seed) -> Iterator[bytes]:
    rng = random.Random(seed) if seed is not None else None
    left = size
    while left > 0:
        n = min(READ_CHUNK, left)
        yield rng.randbytes(n) if rng else os.urandom(n)
        left -= n


def _store(dir: Path, tmp: Path, digest: str, suffix: str) -> Path:
    final = dir / (digest.split(":", 1)[1] + suffix)
    os.replace(tmp, final)
    return final


def make_layer(dir, size_bytes: int, seed=None, media_type: str = DOCKER_LAYER,
               filename: str = "random.bin") -> Blob:
    """A .tar.gz layer holding one file of ``size_bytes`` random bytes.

    With a ``seed`` the bytes (and so both digests) are reproducible.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tmp = dir / f".layer-{os.getpid()}-{random.random()}.tmp"
    info = tarfile.TarInfo(filename)
    info.size, info.mode, info.mtime = size_bytes, 0o644, 0
    with open(tmp, "wb") as raw:
        sink = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1, mtime=0) as gz:
            tar = _HashingWriter(gz)
            tar.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            for chunk in _random_chunks(size_bytes, seed):
                tar.write(chunk)
            tar.write(b"\0" * (-size_bytes % 512) + b"\0" * 1024)  # pad + end blocks
    digest = "sha256:" + sink.hash.hexdigest()
    path = _store(dir, tmp, digest, ".tar.gz")
    return Blob(path, digest, sink.size, media_type, "sha256:" + tar.hash.hexdigest())


def _write_blob(dir, data: bytes, media_type: str, suffix: str) -> Blob:
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    digest = sha256_bytes(data)
    path = dir / (digest.split(":", 1)[1] + suffix)
    path.write_bytes(data)
    return Blob(path, digest, len(data), media_type)


def make_config(dir, diff_ids: list[str], os: str = "linux", arch: str = "amd64",
                media_type: str = DOCKER_CONFIG, variant: str | None = None) -> Blob:
    """A valid image config JSON whose rootfs.diff_ids are ``diff_ids``."""
    config = {
        "architecture": arch,
        "os": os,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"test layer {i}"}
                    for i in range(len(diff_ids))],
    }
    if variant:
        config["variant"] = variant
    return _write_blob(dir, json.dumps(config, indent=2).encode(), media_type, ".json")


# -- manifests (indent=3 like docker: not the canonical JSON a mirror might
#    produce by re-serialising, so byte-for-byte checks mean something) ------

def _dump(obj: dict) -> bytes:
    return json.dumps(obj, indent=3).encode()


def docker_manifest(config: Blob, layers: list[Blob]) -> bytes:
    return _dump({
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": {"mediaType": DOCKER_CONFIG, "size": config.size, "digest": config.digest},
        "layers": [{"mediaType": DOCKER_LAYER, "size": b.size, "digest": b.digest}
                   for b in layers],
    })


def oci_manifest(config: Blob, layers: list[Blob]) -> bytes:
    return _dump({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": config.size, "digest": config.digest},
        "layers": [{"mediaType": OCI_LAYER, "size": b.size, "digest": b.digest}
                   for b in layers],
    })


def _list(media_type: str, child_type: str, children: list[tuple[bytes, dict]]) -> bytes:
    return _dump({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [{"mediaType": child_type, "size": len(data),
                       "digest": sha256_bytes(data), "platform": platform}
                      for data, platform in children],
    })


def oci_index(children: list[tuple[bytes, dict]]) -> bytes:
    """``children``: (OCI manifest bytes, {"os":..., "architecture":...})."""
    return _list(OCI_INDEX, OCI_MANIFEST, children)


def docker_manifest_list(children: list[tuple[bytes, dict]]) -> bytes:
    """``children``: (docker schema2 manifest bytes, platform dict)."""
    return _list(MANIFEST_LIST_V2, MANIFEST_V2, children)


# -- pushing -------------------------------------------------------------

def _base(client: httpx.Client, registry_url: str | None) -> str:
    return (registry_url or str(client.base_url)).rstrip("/")


def _check(response: httpx.Response, *ok: int) -> httpx.Response:
    if response.status_code not in ok:
        response.read()
        raise AssertionError(f"{response.request.method} {response.request.url} -> "
                             f"{response.status_code}: {response.text[:500]}")
    return response


def push_blob(client: httpx.Client, registry_url: str | None, repo: str, blob: Blob) -> str:
    """Upload ``blob`` unless HEAD finds it: POST, PATCH chunks, PUT ?digest=."""
    base = _base(client, registry_url)
    if client.head(f"{base}/v2/{repo}/blobs/{blob.digest}").status_code == 200:
        return blob.digest
    response = _check(client.post(f"{base}/v2/{repo}/blobs/uploads/"), 202)
    location = urljoin(str(response.url), response.headers["Location"])
    offset = 0
    while offset < blob.size:
        n = min(UPLOAD_CHUNK, blob.size - offset)
        response = _check(client.patch(
            location,
            content=iter_file(blob.path, offset, n),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                     "Content-Range": f"{offset}-{offset + n - 1}"},
        ), 202)
        location = urljoin(str(response.url), response.headers["Location"])
        offset += n
    # (httpx 0.28's params= would replace the upload's _state query, so merge)
    final = httpx.URL(location).copy_merge_params({"digest": blob.digest})
    response = _check(client.put(final), 201)
    got = response.headers.get("Docker-Content-Digest", blob.digest)
    assert got == blob.digest, f"registry stored {got}, expected {blob.digest}"
    return blob.digest


def push_manifest(client: httpx.Client, registry_url: str | None, repo: str, ref: str,
                  data: bytes, media_type: str) -> str:
    """PUT a manifest under ``ref`` (tag or digest); returns its digest."""
    base = _base(client, registry_url)
    response = _check(client.put(f"{base}/v2/{repo}/manifests/{ref}", content=data,
                                 headers={"Content-Type": media_type}), 201)
    digest = sha256_bytes(data)
    got = response.headers.get("Docker-Content-Digest", digest)
    assert got == digest, f"registry says {got}, we computed {digest}"
    return digest
