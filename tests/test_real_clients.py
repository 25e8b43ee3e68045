"""Pulls through the mirror with the real clients our users run.

skopeo (required), podman, containerd (ctr + hosts.toml) and dockerd
(--registry-mirror), each against a fresh mirror whose default upstream
``docker.io`` (and ``local.test``) is the test registry.  docker.io itself is
not reachable here, so an image that arrives with the right digest came
through the mirror; the upstream's access log says which requests reached it.

podman, containerd and dockerd run as root with all their state in test
directories and no systemd; a test is skipped only when its binary is not
installed (scripts/test installs them).
"""

from __future__ import annotations

import json
import platform
import re

import httpx
import pytest

from tests.support.clients import (
    ContainerdProcess,
    DockerdProcess,
    Podman,
    check_dir_image,
    hosts_dir,
    needs,
    registries_conf,
    run,
    which,
)


def mirror_config(upstream, ttl="5m"):
    """The test upstream as the default 'docker.io' (library/ prefix) and as 'local.test'."""
    return {"upstreams": {"docker.io": {"url": upstream.url, "tag_ttl": ttl},
                          "local.test": {"url": upstream.url, "tag_ttl": ttl}},
            "default": "docker.io", "workers": 2}     # as on a 2-core site: two processes


@pytest.fixture
def mirror(make_mirror, upstream, image_set):
    return make_mirror(mirror_config(upstream))




def host_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def host_child(image):
    """The list/index entry a client on this machine picks."""
    return next(c for c in image.children if c.platform["architecture"] == host_arch())


def config_digest(image) -> str:
    return image.blobs[0].digest  # config first, then layers


def blob_gets(upstream, since) -> list[str]:
    """Paths of upstream blob GETs since ``since``."""
    return [r.path for r in upstream.requests(since=since)
            if r.method == "GET" and "/blobs/" in r.path]


def assert_blobs_fetched_once(upstream, since, image) -> None:
    """Upstream served each of the image's blobs exactly once, from its own repository."""
    paths = blob_gets(upstream, since)
    assert sorted(paths) == sorted(f"/v2/{image.repo}/blobs/{d}"
                                   for d in {b.digest for b in image.blobs})


# -- skopeo ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def skopeo():
    path = which("skopeo")
    if path is None:
        pytest.fail("skopeo is required (apt-get install skopeo; scripts/test does)")

    def skopeo(*args, **kwargs):
        return run([path, *args], **kwargs)
    return skopeo


SKOPEO_CASES = [
    # (name as pulled from the mirror, ImageSet attribute)
    ("multiarch/oci:latest", "oci_index"),            # OCI index, --all copies both children
    ("multiarch/docker:latest", "docker_list"),       # docker manifest list
    ("alpinetest:v1", "docker"),                       # default upstream, library/ added
    ("local.test/org/team/app:1.0", "oci"),           # upstream chosen by the path prefix
    ("big/image:latest", "big"),                      # MIRROR_TEST_BIG_LAYER_MB layer
]


@pytest.mark.parametrize("name, attr", SKOPEO_CASES, ids=[c[1] for c in SKOPEO_CASES])
def test_skopeo_copy_all_is_byte_exact_and_second_copy_is_local(
        skopeo, mirror, upstream, upstream_client, image_set, tmp_path, name, attr):
    image = getattr(image_set, attr)
    src = f"docker://{mirror.host}/{name}"
    # what the upstream itself serves is what the copy must hold, byte for byte
    tag = name.rsplit(":", 1)[1]
    assert upstream_client.get_manifest(image.repo, tag).content == image.manifest

    mark = upstream.mark()
    skopeo("--insecure-policy", "copy", "--all", "--src-tls-verify=false", src,
           f"dir:{tmp_path / 'first'}")
    check_dir_image(tmp_path / "first", image)
    assert_blobs_fetched_once(upstream, mark, image)

    mark = upstream.mark()
    skopeo("--insecure-policy", "copy", "--all", "--src-tls-verify=false", src,
           f"dir:{tmp_path / 'second'}")
    check_dir_image(tmp_path / "second", image)
    assert blob_gets(upstream, mark) == []
    assert upstream.requests(since=mark) == []  # tags are fresh: nothing at all upstream


def test_skopeo_through_registries_conf_mirror(skopeo, mirror, upstream, image_set, tmp_path):
    """docker.io/... with a registries.conf [[registry.mirror]]: served by the mirror."""
    conf = registries_conf(tmp_path / "registries.conf", mirror.host)
    image = image_set.docker
    src = "docker://docker.io/library/alpinetest:v1"

    mark = upstream.mark()
    skopeo("--registries-conf", conf, "--insecure-policy", "copy", "--all", src,
           f"dir:{tmp_path / 'first'}")
    check_dir_image(tmp_path / "first", image)
    assert_blobs_fetched_once(upstream, mark, image)

    mark = upstream.mark()
    skopeo("--registries-conf", conf, "--insecure-policy", "copy", "--all", src,
           f"dir:{tmp_path / 'second'}")
    check_dir_image(tmp_path / "second", image)
    assert upstream.count("GET", "/blobs/", since=mark) == 0
    assert upstream.requests(since=mark) == []

    raw = skopeo("--registries-conf", conf, "inspect", "--raw", src).stdout
    assert raw.encode() == image.manifest


def test_skopeo_inspect_and_list_tags(skopeo, mirror, image_set):
    index = image_set.oci_index
    raw = skopeo("inspect", "--raw", "--tls-verify=false",
                 f"docker://{mirror.host}/multiarch/oci:latest").stdout
    assert raw.encode() == index.manifest

    oci = image_set.oci
    info = json.loads(skopeo("inspect", "--tls-verify=false",
                             f"docker://{mirror.host}/local.test/org/team/app:1.0").stdout)
    assert info["Digest"] == oci.digest
    assert info["Layers"] == [b.digest for b in oci.blobs[1:]]
    assert info["Architecture"] == "amd64"

    tags = json.loads(skopeo("list-tags", "--tls-verify=false",
                             f"docker://{mirror.host}/alpinetest").stdout)
    assert sorted(tags["Tags"]) == ["alias", "v1"]


def test_star_accept_probe_does_not_change_what_clients_pull(skopeo, mirror, image_set,
                                                             tmp_path):
    """curl's default Accept: */* must not make the mirror cache a down-converted
    schema1 manifest under the tag (distribution 2.8 converts for such clients)."""
    probe = httpx.get(f"{mirror.url}/v2/alpinetest/manifests/v1", headers={"Accept": "*/*"})
    assert probe.status_code == 200
    skopeo("--insecure-policy", "copy", "--all", "--src-tls-verify=false",
           f"docker://{mirror.host}/alpinetest:v1", f"dir:{tmp_path / 'copy'}")
    check_dir_image(tmp_path / "copy", image_set.docker)


# -- podman ------------------------------------------------------------------------------------

@needs("podman")
def test_podman_pull_through_mirror(as_root, mirror, upstream, image_set, tmp_path):
    conf = registries_conf(tmp_path / "registries.conf", mirror.host)
    with Podman(tmp_path / "podman", conf) as podman:
        docker = image_set.docker
        mark = upstream.mark()
        podman.run("pull", "docker.io/library/alpinetest:v1")
        info = podman.inspect("docker.io/library/alpinetest:v1")
        assert info["Digest"] == docker.digest
        assert info["Id"] == config_digest(docker).split(":")[1]
        assert f"docker.io/library/alpinetest@{docker.digest}" in info["RepoDigests"]
        assert_blobs_fetched_once(upstream, mark, docker)

        index = image_set.oci_index
        child = host_child(index)
        podman.run("pull", "docker.io/multiarch/oci:latest")
        info = podman.inspect("docker.io/multiarch/oci:latest")
        assert info["Digest"] == index.digest
        assert info["Id"] == config_digest(child).split(":")[1]
        assert info["Architecture"] == host_arch()
        assert {f"docker.io/multiarch/oci@{index.digest}",
                f"docker.io/multiarch/oci@{child.digest}"} <= set(info["RepoDigests"])

        # Straight at the mirror, the upstream picked by the path prefix.
        oci = image_set.oci
        podman.run("pull", "--tls-verify=false", f"{mirror.host}/local.test/org/team/app:1.0")
        info = podman.inspect(f"{mirror.host}/local.test/org/team/app:1.0")
        assert info["Digest"] == oci.digest
        assert info["Id"] == config_digest(oci).split(":")[1]

        # From an empty store again: everything comes from the mirror's cache.
        podman.run("rmi", "--all", "--force")
        mark = upstream.mark()
        podman.run("pull", "docker.io/library/alpinetest:v1")
        assert podman.inspect("docker.io/library/alpinetest:v1")["Digest"] == docker.digest
        assert upstream.requests(since=mark) == []


# -- containerd --------------------------------------------------------------------------------

_DO_REQUEST = re.compile(r'msg="do request".*\burl="?([^"\s]+)')
_NS_HEADER = re.compile(r'response\.header\.oci-namespace=(\S+)')


def ctr_pull(ctd, certs, ref, *extra):
    """``ctr images pull`` through hosts.toml; returns (request URLs, OCI-Namespace values)."""
    out = ctd.ctr("images", "pull", "--plain-http", "--hosts-dir", certs,
                  "--snapshotter", "native", *extra, ref, debug=True)
    log = out.stderr + out.stdout
    return _DO_REQUEST.findall(log), set(_NS_HEADER.findall(log))


def ctr_images(ctd) -> dict[str, tuple[str, str]]:
    """ref -> (media type, digest) from ``ctr images ls``."""
    lines = ctd.ctr("images", "ls").stdout.splitlines()[1:]
    return {cols[0]: (cols[1], cols[2]) for cols in (line.split() for line in lines) if cols}


def ctr_content(ctd) -> set[str]:
    return set(ctd.ctr("content", "ls", "--quiet").stdout.split())


@needs("containerd", "ctr")
def test_containerd_pulls_through_hosts_toml_with_ns(as_root, mirror, upstream, image_set,
                                                    tmp_path):
    certs = hosts_dir(tmp_path / "certs.d", {
        "docker.io": ("https://registry-1.docker.io", mirror.url),
        "local.test": ("https://local.test", mirror.url)})
    docker, index, oci = image_set.docker, image_set.oci_index, image_set.oci

    with ContainerdProcess(tmp_path / "containerd") as ctd:
        mark = upstream.mark()
        urls, namespaces = ctr_pull(ctd, certs, "docker.io/library/alpinetest:v1")
        assert urls, "ctr --debug logged no requests"
        assert all(u.startswith(f"{mirror.url}/v2/library/alpinetest/") and
                   u.endswith("?ns=docker.io") for u in urls), urls
        assert namespaces == {"docker.io"}  # the mirror echoed OCI-Namespace
        assert ctr_images(ctd)["docker.io/library/alpinetest:v1"] == (docker.media_type,
                                                                        docker.digest)
        assert ctr_content(ctd) == {docker.digest, *(b.digest for b in docker.blobs)}
        assert_blobs_fetched_once(upstream, mark, docker)

        urls, namespaces = ctr_pull(ctd, certs, "docker.io/multiarch/oci:latest",
                                    "--all-platforms")
        assert all("?ns=docker.io" in u for u in urls) and namespaces == {"docker.io"}
        assert ctr_images(ctd)["docker.io/multiarch/oci:latest"] == (index.media_type,
                                                                       index.digest)
        assert {index.digest, *(c.digest for c in index.children),
                *(b.digest for b in index.blobs)} <= ctr_content(ctd)

        urls, namespaces = ctr_pull(ctd, certs, "local.test/org/team/app:1.0")
        assert urls and all(u.startswith(f"{mirror.url}/v2/org/team/app/") and
                            u.endswith("?ns=local.test") for u in urls), urls
        assert namespaces == {"local.test"}
        assert ctr_images(ctd)["local.test/org/team/app:1.0"] == (oci.media_type, oci.digest)

    # A new containerd with an empty store: the mirror answers from its cache.
    with ContainerdProcess(tmp_path / "containerd-2") as ctd:
        mark = upstream.mark()
        ctr_pull(ctd, certs, "docker.io/library/alpinetest:v1")
        assert ctr_images(ctd)["docker.io/library/alpinetest:v1"][1] == docker.digest
        assert upstream.requests(since=mark) == []


# -- dockerd -----------------------------------------------------------------------------------

@needs("dockerd", "containerd")
@pytest.mark.parametrize("containerd", ["own-containerd", "external-containerd"])
def test_dockerd_pulls_through_registry_mirror(as_root, mirror, upstream, image_set, tmp_path,
                                               containerd):
    external = None
    if containerd == "external-containerd":
        external = ContainerdProcess(tmp_path / "containerd").start()
    try:
        with DockerdProcess(tmp_path / "dockerd", mirror.url,
                            containerd_socket=external and external.socket) as dockerd:
            docker = image_set.docker
            mark = upstream.mark()
            dockerd.docker("pull", "alpinetest:v1")
            info = dockerd.inspect("alpinetest:v1")
            assert info["Id"] == config_digest(docker)
            assert info["RepoDigests"] == [f"alpinetest@{docker.digest}"]
            assert_blobs_fetched_once(upstream, mark, docker)

            for name, image in [("multiarch/docker:latest", image_set.docker_list),
                                ("multiarch/oci:latest", image_set.oci_index)]:
                dockerd.docker("pull", name)
                info = dockerd.inspect(name)
                assert info["Id"] == config_digest(host_child(image))
                assert f"{image.repo}@{image.digest}" in info["RepoDigests"]
                assert info["Architecture"] == host_arch()

            # Pulled again from scratch: the mirror answers from its cache.
            dockerd.docker("rmi", "alpinetest:v1")
            mark = upstream.mark()
            dockerd.docker("pull", "alpinetest:v1")
            assert dockerd.inspect("alpinetest:v1")["Id"] == config_digest(docker)
            assert upstream.requests(since=mark) == []
    finally:
        if external is not None:
            external.stop()
