"""The air-gapped round trip, as the README's "Air-gapped sites" does it, with real processes.

Mirror A sits in front of a real upstream registry: ``mirror warm`` fills it with a mixed
set (an OCI index, a Docker manifest list, a Docker schema2 image, an OCI image and the
big layer), ``mirror export`` writes one bundle. The upstream is then stopped. Mirror B
has a fresh data directory, ``offline: true`` and the same upstream names; it runs and
``mirror import`` loads the bundle beside it. skopeo, podman and dockerd then pull every
image from B byte-exact, with no upstream at all.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.client import RegistryClient
from tests.support.clients import (
    DockerdProcess,
    Podman,
    check_dir_image,
    needs,
    registries_conf,
    run,
    which,
)
from tests.support.fixtures import big_layer_size
from tests.support.image_set import build_image_set
from tests.support.mirror import MirrorProcess
from tests.support.registry import RegistryProcess

# (what a user types, ImageSet attribute)
IMAGES = [
    ("multiarch/oci:latest", "oci_index"),
    ("docker.io/multiarch/docker:latest", "docker_list"),
    ("alpinetest:v1", "docker"),
    ("local.test/org/team/app:1.0", "oci"),
    ("big/image:latest", "big"),
]


def mirror_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"mirror {' '.join(args)} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(mirror B serving the imported bundle offline, the image set) for the module."""
    upstream = RegistryProcess(tmp_path_factory.mktemp("airgap-upstream")).start()
    try:
        with RegistryClient(upstream.url) as client:
            images = build_image_set(tmp_path_factory.mktemp("airgap-images"), client,
                                     big_layer_size=big_layer_size(), seed=7000)
        config = {"upstreams": {"docker.io": {"url": upstream.url},
                                "local.test": {"url": upstream.url}},
                  "default": "docker.io"}
        a = MirrorProcess(tmp_path_factory.mktemp("mirror-a"), config)   # never started
        mirror_cli("warm", "--config", str(a.config_path), "--progress", "plain",
                   *[text for text, _ in IMAGES])
        bundle = tmp_path_factory.mktemp("carry") / "bundle.tar"
        mirror_cli("export", "--config", str(a.config_path), "-o", str(bundle), "--all",
                   "--progress", "plain")
    finally:
        upstream.stop()                      # from here on there is no upstream at all
    b = MirrorProcess(tmp_path_factory.mktemp("mirror-b"), {**config, "offline": True})
    b.start()
    try:
        mirror_cli("import", "--config", str(b.config_path), str(bundle), "--progress", "plain")
        yield b, images
    finally:
        b.stop()


def test_skopeo_pulls_every_image_from_the_offline_mirror_byte_exact(site, tmp_path):
    b, images = site
    skopeo = which("skopeo")
    assert skopeo, "skopeo is required (scripts/test installs it)"
    for text, attr in IMAGES:
        image = getattr(images, attr)
        name = text.removeprefix("docker.io/")
        dest = tmp_path / attr
        run([skopeo, "--insecure-policy", "copy", "--all", "--src-tls-verify=false",
             f"docker://{b.host}/{name}", f"dir:{dest}"])
        check_dir_image(dest, image)


@needs("podman")
def test_podman_pulls_from_the_offline_mirror(as_root, site, tmp_path):
    b, images = site
    conf = registries_conf(tmp_path / "registries.conf", b.host)
    with Podman(tmp_path / "podman", conf) as podman:
        for name, image in [("docker.io/library/alpinetest:v1", images.docker),
                            ("docker.io/multiarch/oci:latest", images.oci_index),
                            ("docker.io/big/image:latest", images.big)]:
            podman.run("pull", name)
            assert podman.inspect(name)["Digest"] == image.digest


@needs("dockerd", "containerd")
def test_dockerd_pulls_from_the_offline_mirror(as_root, site, tmp_path):
    b, images = site
    with DockerdProcess(tmp_path / "dockerd", b.url) as dockerd:
        for name, image in [("alpinetest:v1", images.docker),
                            ("multiarch/docker:latest", images.docker_list)]:
            dockerd.docker("pull", name)
            short = name.split(":")[0]          # docker shortens docker.io/library/ names
            assert f"{short}@{image.digest}" in dockerd.inspect(name)["RepoDigests"]
