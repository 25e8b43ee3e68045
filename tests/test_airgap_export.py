"""``mirror export``: a filled mirror written as an OCI image layout in a tar (a bundle),
readable by skopeo; the CLI runs as a subprocess against a real mirror's data directory
(the mirror keeps running beside it)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.test_pull_through import pull

LAYOUT_HEAD = ["oci-layout", "mirror-bundle.json", "index.json"]
MANIFEST_TYPES = {"application/vnd.oci.image.index.v1+json",
                  "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}


def airgap_config(upstream, **extra) -> dict:
    """The test registry as upstream "up" (the default): full references are
    ``127.0.0.1:PORT/<repo>:<tag>``."""
    return {"upstreams": {"up": {"url": upstream.url, **extra}}, "default": "up"}


def cli(config_path, *args, stdin=None, input=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--config", str(config_path)],
                          capture_output=True, stdin=stdin, input=input, timeout=timeout)


def full_ref(upstream, image, tag=None) -> str:
    return f"{upstream.host}/{image.repo}:{tag or image.tags[0]}"


def filled_mirror(make_mirror, upstream, image_set, images=None):
    """A mirror that pulled ``images`` (default: the whole set) through itself."""
    mirror = make_mirror(airgap_config(upstream))
    with httpx.Client(base_url=mirror.url, timeout=120) as client:
        for image in images or image_set.images:
            pull(client, image)
    return mirror


def members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def member_bytes(path, name) -> bytes:
    with tarfile.open(path) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def blob_digests(path) -> list[str]:
    return ["sha256:" + m.name.rsplit("/", 1)[1] for m in members(path)
            if m.name.startswith("blobs/sha256/")]


def all_digests(images) -> set[str]:
    return {*(m.digest for i in images for m in i.manifests()),
            *(b.digest for i in images for b in i.blobs)}


def test_export_all_writes_an_oci_layout_in_order_that_skopeo_reads(make_mirror, upstream,
                                                                     image_set, tmp_path):
    mirror = filled_mirror(make_mirror, upstream, image_set)
    bundle = tmp_path / "bundle.tar"
    done = cli(mirror.config_path, "export", "-o", str(bundle), "--all", "--progress", "none",
               "--json")
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["images"] == 6      # alpinetest has two tags

    names = [m.name for m in members(bundle)]
    assert names[:3] == LAYOUT_HEAD
    assert all(n.startswith("blobs/sha256/") for n in names[3:])
    assert set(blob_digests(bundle)) == all_digests(image_set.images)
    assert len(names) == len(set(names))
    manifests = {m.digest for i in image_set.images for m in i.manifests()}
    kinds = [d in manifests for d in blob_digests(bundle)]
    assert kinds == sorted(kinds, reverse=True)          # every manifest before any blob
    for digest in blob_digests(bundle):                  # byte-exact members
        data = member_bytes(bundle, f"blobs/sha256/{digest[7:]}")
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest

    assert json.loads(member_bytes(bundle, "oci-layout")) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(member_bytes(bundle, "index.json"))
    expected = {full_ref(upstream, i, t): i for i in image_set.images for t in i.tags}
    seen = {}
    for entry in index["manifests"]:
        ann = entry["annotations"]
        assert ann["org.opencontainers.image.ref.name"] == ann["io.containerd.image.name"]
        seen[ann["io.containerd.image.name"]] = entry
    assert set(seen) == set(expected)
    for name, entry in seen.items():
        image = expected[name]
        assert (entry["digest"], entry["size"], entry["mediaType"]) == \
            (image.digest, len(image.manifest), image.media_type)
    assert seen[full_ref(upstream, image_set.oci)]["platform"] == \
        {"architecture": "amd64", "os": "linux"}

    info = json.loads(member_bytes(bundle, "mirror-bundle.json"))
    assert info["version"] == 1 and info["since"] is None
    assert info["blobs"]["count"] == len(names) - 3
    assert set(info["blobs"]["digests"]) == set(blob_digests(bundle))
    assert info["blobs"]["bytes"] == sum(m.size for m in members(bundle)[3:])
    by_name = {i["name"]: i for i in info["images"]}
    multi = by_name[full_ref(upstream, image_set.oci_index)]
    assert sorted(multi["platforms"]) == ["linux/amd64", "linux/arm64/v8"]
    assert (multi["upstream"], multi["repository"], multi["hosted"], multi["tag"]) == \
        ("up", "multiarch/oci", False, "latest")

    # skopeo finds images by the full reference and copies them byte-exact (its OCI
    # layout reader only considers entries of OCI media types: Docker schema2 images
    # are in the bundle, for `mirror import`, but skopeo does not pick them).
    for image in (image_set.oci, image_set.oci_index):
        out = tmp_path / f"dir-{image.repo.replace('/', '-')}"
        copied = subprocess.run(["skopeo", "--insecure-policy", "copy", "--all",
                                 f"oci-archive:{bundle}:{full_ref(upstream, image)}",
                                 f"dir:{out}"], capture_output=True, timeout=120)
        assert copied.returncode == 0, copied.stderr.decode()
        assert (out / "manifest.json").read_bytes() == image.manifest
        for blob in image.blobs:
            assert (out / blob.digest[7:]).read_bytes() == Path(blob.path).read_bytes()


def test_export_of_refs_with_platform_leaves_other_platforms_out(make_mirror, upstream,
                                                                  image_set, tmp_path):
    mirror = filled_mirror(make_mirror, upstream, image_set,
                           [image_set.oci_index, image_set.docker_list, image_set.oci])
    bundle = tmp_path / "arm.tar"
    done = cli(mirror.config_path, "export", "-o", str(bundle), "--platform", "linux/arm64",
               full_ref(upstream, image_set.oci_index), "multiarch/docker:latest",
               "--progress", "none")
    assert done.returncode == 0, done.stderr.decode()
    carried = set(blob_digests(bundle))
    for image in (image_set.oci_index, image_set.docker_list):
        amd, arm = image.children
        assert image.digest in carried                   # the index, bytes unchanged
        assert {arm.digest, *(b.digest for b in arm.blobs)} <= carried
        assert not ({amd.digest, *(b.digest for b in amd.blobs)} & carried)
    assert member_bytes(bundle, f"blobs/sha256/{image_set.oci_index.digest[7:]}") == \
        image_set.oci_index.manifest

    # --repository GLOB on the full name
    glob = tmp_path / "glob.tar"
    done = cli(mirror.config_path, "export", "-o", str(glob), "--repository",
               f"{upstream.host}/org/*", "--progress", "none")
    assert done.returncode == 0, done.stderr.decode()
    assert set(blob_digests(glob)) == all_digests([image_set.oci])


def test_export_of_something_not_cached_fails_naming_it_and_writes_nothing(
        make_mirror, upstream, image_set, tmp_path):
    mirror = filled_mirror(make_mirror, upstream, image_set, [image_set.oci])
    bundle = tmp_path / "out.tar"
    done = cli(mirror.config_path, "export", "-o", str(bundle), "org/team/app:1.0",
               "library/alpinetest:v1", "--progress", "none")
    assert done.returncode == 1
    assert "library/alpinetest:v1" in done.stderr.decode()
    assert list(tmp_path.iterdir()) == []                # no bundle, no temp file
    # a cached tag whose blob went (evicted): named, nothing written
    layer = image_set.oci.blobs[-1]
    mirror.drop_cached(layer.digest)
    done = cli(mirror.config_path, "export", "-o", str(bundle), "org/team/app:1.0",
               "--progress", "none")
    assert done.returncode == 1
    assert layer.digest in done.stderr.decode()
    assert list(tmp_path.iterdir()) == []
    done = cli(mirror.config_path, "export", "-o", str(bundle), "--platform", "linux",
               "org/team/app:1.0", "--progress", "none")
    assert done.returncode == 2 and "--platform" in done.stderr.decode()


@pytest.mark.parametrize("date, carried", [("2000-01-01", True), ("2999-01-01T00:00", False)])
def test_export_since_a_date_leaves_out_blobs_cached_before_it(make_mirror, upstream, image_set,
                                                                tmp_path, date, carried):
    mirror = filled_mirror(make_mirror, upstream, image_set, [image_set.oci])
    bundle = tmp_path / "since.tar"
    done = cli(mirror.config_path, "export", "-o", str(bundle), "--since", date,
               "org/team/app:1.0", "--progress", "none")
    assert done.returncode == 0, done.stderr.decode()
    blobs = {b.digest for b in image_set.oci.blobs}
    assert set(blob_digests(bundle)) == ({image_set.oci.digest} | (blobs if carried else set()))
    info = json.loads(member_bytes(bundle, "mirror-bundle.json"))
    assert info["since"]["left_out"] == (0 if carried else len(blobs))
