"""The standard set of test images pushed to an upstream registry.

===================  ==============  ===========================================
repo                 tags            content
===================  ==============  ===========================================
library/alpinetest   v1, alias       docker schema2 image, 2 layers
org/team/app         1.0             OCI image manifest, 2 layers
multiarch/oci        latest          OCI index -> linux/amd64 + linux/arm64 (v8)
multiarch/docker     latest          docker manifest list -> amd64 + arm64 (v8)
big/image            latest          docker schema2 image, 1 layer of big_layer_size
===================  ==============  ===========================================

Children of the two lists are pushed by digest only (untagged) into the
same repo.  Content is seeded, so digests are reproducible for equal args.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .client import MANIFEST_LIST_V2, MANIFEST_V2, OCI_INDEX, OCI_MANIFEST
from .images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    OCI_CONFIG,
    OCI_LAYER,
    Blob,
    docker_manifest,
    docker_manifest_list,
    make_config,
    make_layer,
    oci_index,
    oci_manifest,
    push_blob,
    push_manifest,
    sha256_bytes,
)

AMD64 = {"architecture": "amd64", "os": "linux"}
ARM64 = {"architecture": "arm64", "os": "linux", "variant": "v8"}


@dataclass
class Image:
    repo: str
    tags: list[str]
    manifest: bytes
    media_type: str
    digest: str
    blobs: list[Blob]  # config + layers; for a list/index, all children's blobs
    children: list[Image] = field(default_factory=list)  # list/index entries
    platform: dict | None = None  # set on list/index children

    @property
    def ref(self) -> str:
        """``repo:first-tag`` (or ``repo@digest`` if untagged)."""
        return f"{self.repo}:{self.tags[0]}" if self.tags else f"{self.repo}@{self.digest}"

    @property
    def largest_blob(self) -> Blob:
        return max(self.blobs, key=lambda b: b.size)

    def manifests(self) -> list[Image]:
        """This image and its children."""
        return [self, *self.children]


@dataclass
class ImageSet:
    docker: Image       # library/alpinetest:v1 (+ alias)
    oci: Image          # org/team/app:1.0
    oci_index: Image    # multiarch/oci:latest
    docker_list: Image  # multiarch/docker:latest
    big: Image          # big/image:latest

    @property
    def images(self) -> list[Image]:
        return [self.docker, self.oci, self.oci_index, self.docker_list, self.big]

    def manifests(self) -> list[Image]:
        """Every manifest, including list/index children."""
        return [m for image in self.images for m in image.manifests()]

    def blobs(self) -> list[tuple[str, Blob]]:
        """Every (repo, blob) pair, without duplicates."""
        seen, out = set(), []
        for image in self.images:
            for blob in image.blobs:
                if (image.repo, blob.digest) not in seen:
                    seen.add((image.repo, blob.digest))
                    out.append((image.repo, blob))
        return out


class _Builder:
    def __init__(self, dir: Path, client, registry_url: str | None, seed: int):
        self.dir, self.client, self.url, self.seed = dir, client, registry_url, seed

    def _seed(self) -> int:
        self.seed += 1
        return self.seed

    def image(self, repo: str, tags: list[str], layer_sizes: list[int], oci: bool = False,
              platform: dict = AMD64) -> Image:
        layer_type, config_type = (OCI_LAYER, OCI_CONFIG) if oci else (DOCKER_LAYER, DOCKER_CONFIG)
        layers = [make_layer(self.dir, size, seed=self._seed(), media_type=layer_type)
                  for size in layer_sizes]
        config = make_config(self.dir, [b.diff_id for b in layers], os=platform["os"],
                             arch=platform["architecture"], media_type=config_type,
                             variant=platform.get("variant"))
        for blob in [*layers, config]:
            push_blob(self.client, self.url, repo, blob)
        data = (oci_manifest if oci else docker_manifest)(config, layers)
        media_type = OCI_MANIFEST if oci else MANIFEST_V2
        digest = sha256_bytes(data)
        for ref in tags or [digest]:
            push_manifest(self.client, self.url, repo, ref, data, media_type)
        return Image(repo, list(tags), data, media_type, digest, [config, *layers],
                     platform=None if tags else dict(platform))

    def multi(self, repo: str, tag: str, oci: bool) -> Image:
        children = [self.image(repo, [], [48 * 1024], oci=oci, platform=p) for p in (AMD64, ARM64)]
        pairs = [(c.manifest, c.platform) for c in children]
        data, media_type = (oci_index(pairs), OCI_INDEX) if oci else \
            (docker_manifest_list(pairs), MANIFEST_LIST_V2)
        digest = push_manifest(self.client, self.url, repo, tag, data, media_type)
        blobs = [b for c in children for b in c.blobs]
        return Image(repo, [tag], data, media_type, digest, blobs, children)


def build_image_set(dir, registry_client, big_layer_size: int = 100 * 1024 * 1024,
                    registry_url: str | None = None, seed: int = 1000) -> ImageSet:
    """Create the blobs under ``dir`` and push the set (see module docstring)."""
    b = _Builder(Path(dir), registry_client, registry_url, seed)
    return ImageSet(
        docker=b.image("library/alpinetest", ["v1", "alias"], [1024 * 1024, 4 * 1024]),
        oci=b.image("org/team/app", ["1.0"], [512 * 1024, 8 * 1024], oci=True),
        oci_index=b.multi("multiarch/oci", "latest", oci=True),
        docker_list=b.multi("multiarch/docker", "latest", oci=False),
        big=b.image("big/image", ["latest"], [big_layer_size]),
    )


def push_image(dir, registry_client, repo: str, tags: list[str], layer_sizes: list[int],
               oci: bool = False, seed: int = 5000) -> Image:
    """Build one single-platform image and push it (for registries other than the
    standard image set's, e.g. the authenticated ones)."""
    return _Builder(Path(dir), registry_client, None, seed).image(repo, tags, layer_sizes, oci=oci)


def push_rotating_images(dir, registry_client, seed: int, count: int = 6) -> list[Image]:
    """``count`` small (~600 KB) images ``rot/app0..`` for cache-budget tests."""
    return [push_image(Path(dir) / f"img{i}", registry_client, f"rot/app{i}", ["1"],
                       [400_000, 200_000], seed=seed + 10 * i) for i in range(count)]
