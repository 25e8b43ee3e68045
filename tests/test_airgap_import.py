"""``mirror import``: bundles (``mirror export``), skopeo's OCI layouts, and damaged or
hostile input, into a mirror that serves them offline. Real processes throughout: the
test registry as upstream, mirrors as servers, the CLI as a subprocess."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time

import httpx
import pytest

from tests.test_airgap_export import airgap_config, blob_digests, cli, filled_mirror
from tests.test_pull_through import get_manifest, pull


def offline_mirror(make_mirror, upstream):
    """Mirror B: a fresh data directory, the same upstream name and host, offline."""
    return make_mirror(airgap_config(upstream, offline=True))


def export(mirror, bundle, *refs, extra=()):
    done = cli(mirror.config_path, "export", "-o", str(bundle), *(refs or ["--all"]),
               "--progress", "none", *extra)
    assert done.returncode == 0, done.stderr.decode()
    return bundle


def import_(mirror, source, *extra, **kwargs):
    return cli(mirror.config_path, "import", str(source), "--progress", "none", *extra, **kwargs)


def serves(mirror, images, timeout=10.0) -> None:
    """Every image byte-exact from ``mirror`` (offline: no upstream involved). The
    server picks up the import within a second or two (index generation)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        while get_manifest(client, images[0].repo, images[0].tags[0]).status_code != 200:
            assert time.monotonic() < deadline, "the import never showed up"
            time.sleep(0.2)
        for image in images:
            pull(client, image)


def not_served(mirror, image) -> None:
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        assert get_manifest(client, image.repo, image.tags[0]).status_code == 404


def rewrite(src, dst, change) -> None:
    """Copy a tar member by member; ``change(info, data) -> (info, data) | None``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            f = tin.extractfile(info)
            data = f.read() if f else b""
            changed = change(info, data)
            if changed is None:
                continue
            info, data = changed
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_import_of_a_bundle_into_a_running_offline_mirror_serves_every_image(
        make_mirror, upstream, image_set, tmp_path):
    source = filled_mirror(make_mirror, upstream, image_set)
    bundle = export(source, tmp_path / "all.tar")
    target = offline_mirror(make_mirror, upstream)
    done = import_(target, bundle, "--json", "--pin")
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["images"] == 6 and summary["failed"] == 0
    serves(target, image_set.images)
    for image in image_set.images:                    # every tag, as in the source
        for tag in image.tags:
            with httpx.Client(base_url=target.url) as client:
                resp = get_manifest(client, image.repo, tag)
                assert resp.headers["docker-content-digest"] == image.digest
    with sqlite3.connect(target.data_dir / "index.db") as db:
        pins = {tuple(r) for r in db.execute("SELECT upstream, repository, reference FROM pins")}
    assert ("up", "library/alpinetest", "alias") in pins and len(pins) == 6

    again = import_(target, bundle, "--json")         # everything there: all skipped
    assert again.returncode == 0, again.stderr.decode()
    summary = json.loads(again.stdout)
    assert summary["blobs"] == 0 and summary["skipped"] == len(blob_digests(bundle))


def test_import_of_a_skopeo_oci_layout_with_as(make_mirror, upstream, image_set, tmp_path):
    image = image_set.oci_index
    layout = tmp_path / "layout"
    copied = subprocess.run(["skopeo", "--insecure-policy", "copy", "--all",
                             "--src-tls-verify=false", f"docker://{upstream.host}/{image.repo}:latest",
                             f"oci:{layout}:latest"], capture_output=True, timeout=120)
    assert copied.returncode == 0, copied.stderr.decode()
    target = offline_mirror(make_mirror, upstream)
    plain = import_(target, layout)                   # ref.name is just "latest": no name
    assert plain.returncode == 1 and "--as" in plain.stderr.decode()
    done = import_(target, layout, "--as", f"{upstream.host}/{image.repo}")
    assert done.returncode == 0, done.stderr.decode()
    serves(target, [image])


def test_a_flipped_byte_refuses_that_blob_and_its_image_only(make_mirror, upstream, image_set,
                                                              tmp_path):
    source = filled_mirror(make_mirror, upstream, image_set, [image_set.docker, image_set.oci])
    bundle = export(source, tmp_path / "b.tar", "library/alpinetest:v1", "org/team/app:1.0")
    bad_blob = image_set.docker.blobs[-1].digest

    def flip(info, data):
        if info.name.endswith(bad_blob[7:]):
            data = bytes([data[0] ^ 1]) + data[1:]
        return info, data
    rewrite(bundle, tmp_path / "flipped.tar", flip)
    target = offline_mirror(make_mirror, upstream)
    done = import_(target, tmp_path / "flipped.tar")
    assert done.returncode == 1
    err = done.stderr.decode()
    assert bad_blob in err and "digest mismatch" in err
    assert not target.is_cached(bad_blob)
    serves(target, [image_set.oci])                   # the sound image is there
    not_served(target, image_set.docker)              # the one needing the bad blob is not


def test_a_truncated_bundle_names_the_member_keeps_verified_blobs_and_a_rerun_completes(
        make_mirror, upstream, image_set, tmp_path):
    source = filled_mirror(make_mirror, upstream, image_set, [image_set.oci, image_set.big])
    bundle = export(source, tmp_path / "b.tar", "org/team/app:1.0", "big/image:latest")
    big = image_set.big.largest_blob.digest
    with tarfile.open(bundle) as tar:
        member = tar.getmember(f"blobs/sha256/{big[7:]}")
        before = [m for m in tar.getmembers() if m.offset < member.offset
                  and m.name.startswith("blobs/")]
    cut = tmp_path / "cut.tar"
    with open(bundle, "rb") as f:
        cut.write_bytes(f.read(member.offset_data + member.size // 2))
    target = offline_mirror(make_mirror, upstream)
    done = import_(target, cut)
    assert done.returncode == 1
    assert f"blobs/sha256/{big[7:]}" in done.stderr.decode()
    assert not target.is_cached(big)
    kept = [m for m in before if target.is_cached("sha256:" + m.name[13:])]
    assert kept                                       # verified blobs before the cut stay
    not_served(target, image_set.oci)                 # nothing registered
    again = import_(target, bundle, "--json")
    assert again.returncode == 0, again.stderr.decode()
    assert json.loads(again.stdout)["skipped"] >= len(kept)
    serves(target, [image_set.oci, image_set.big])


def test_an_import_killed_halfway_completes_when_run_again(make_mirror, upstream, image_set,
                                                          tmp_path):
    source = filled_mirror(make_mirror, upstream, image_set, [image_set.oci, image_set.big])
    bundle = export(source, tmp_path / "b.tar", "org/team/app:1.0", "big/image:latest")
    target = offline_mirror(make_mirror, upstream)
    data = bundle.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "import", "-", "--progress", "none",
                             "--config", str(target.config_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(data[:len(data) * 2 // 3])        # well into the big layer
    proc.stdin.flush()
    deadline = time.monotonic() + 20
    tmp = target.data_dir / "tmp"
    while not any(f.stat().st_size > 0 for f in tmp.iterdir()):   # writing a blob now
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    not_served(target, image_set.big)
    again = import_(target, bundle)
    assert again.returncode == 0, again.stderr.decode()
    serves(target, [image_set.oci, image_set.big])


def test_since_bundle_carries_only_new_blobs_and_base_then_update_imports(
        make_mirror, upstream, image_set, tmp_path):
    source = filled_mirror(make_mirror, upstream, image_set, [image_set.docker, image_set.oci])
    docker = ["library/alpinetest:v1", "library/alpinetest:alias"]
    base = export(source, tmp_path / "base.tar", *docker)
    update = export(source, tmp_path / "update.tar", *docker, "org/team/app:1.0",
                    extra=["--since", str(base)])
    carried = set(blob_digests(update))
    assert carried == {image_set.docker.digest, image_set.oci.digest,
                       *(b.digest for b in image_set.oci.blobs)}
    info = json.loads(tarfile.open(update).extractfile("mirror-bundle.json").read())
    assert info["since"]["bundle"] == str(base)
    assert info["since"]["left_out"] == len(image_set.docker.blobs)

    early = offline_mirror(make_mirror, upstream)      # the update alone: docker image fails
    done = import_(early, update)
    assert done.returncode == 1
    assert any(b.digest in done.stderr.decode() for b in image_set.docker.blobs)
    serves(early, [image_set.oci])

    target = offline_mirror(make_mirror, upstream)
    for bundle in (base, update):
        done = import_(target, bundle)
        assert done.returncode == 0, done.stderr.decode()
    serves(target, [image_set.docker, image_set.oci])


def test_export_to_stdout_piped_into_import_from_stdin(make_mirror, upstream, image_set):
    source = filled_mirror(make_mirror, upstream, image_set,
                           [image_set.oci_index, image_set.docker])
    target = offline_mirror(make_mirror, upstream)
    exporter = subprocess.Popen([sys.executable, "-m", "mirror", "export", "-o", "-", "--all",
                                 "--progress", "none", "--config", str(source.config_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = import_(target, "-", stdin=exporter.stdout)
    exporter.wait(timeout=60)
    assert exporter.returncode == 0, exporter.stderr.read().decode()
    assert done.returncode == 0, done.stderr.decode()
    serves(target, [image_set.oci_index, image_set.docker])


def _tar(path, entries) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("case", ["not a tar", "no index.json", "../x", "/abs/x",
                                  "blobs/../../x"])
def test_bad_input_is_refused_and_nothing_lands_outside(make_mirror, upstream, tmp_path, case):
    target = offline_mirror(make_mirror, upstream)
    bad = tmp_path / "bad.tar"
    layout = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    if case == "not a tar":
        bad.write_bytes(os.urandom(4096))
        expected = "not a tar"
    elif case == "no index.json":
        _tar(bad, layout)
        expected = "no index.json"
    else:
        _tar(bad, [*layout, (case, b"pwned"),
                   ("index.json", b'{"schemaVersion":2,"manifests":[]}')])
        expected = "refused"
    before = {p for p in tmp_path.rglob("*")} | set(target.dir.rglob("*"))
    done = import_(target, bad)
    assert done.returncode == 1
    assert expected in done.stderr.decode()
    after = {p for p in tmp_path.rglob("*")} | set(target.dir.rglob("*"))
    assert not any(p.name == "x" for p in after)
    assert {p for p in after - before if "data" not in p.parts} == set()
    assert not os.path.exists("/abs/x")


def test_hosted_images_travel_with_all_and_land_in_a_hosted_repository(make_mirror, upstream,
                                                                        image_set, tmp_path):
    from tests.test_hosted_push import push_manifest, sha
    config = {**airgap_config(upstream), "hosted": {"repositories": ["myorg/*"]}}
    source = make_mirror(config)
    layer = os.urandom(70_000)
    with httpx.Client(base_url=source.url, timeout=30) as http:
        body, digest = push_manifest(http, [layer], repo="myorg/tool", ref="2.0")
    bundle = export(source, tmp_path / "hosted.tar", "--all")
    index = json.loads(tarfile.open(bundle).extractfile("index.json").read())
    assert [e["annotations"]["io.containerd.image.name"] for e in index["manifests"]] == \
        ["myorg/tool:2.0"]
    target = make_mirror({**airgap_config(upstream, offline=True),
                          "hosted": {"repositories": ["myorg/*"]}})
    done = import_(target, bundle)
    assert done.returncode == 0, done.stderr.decode()
    with httpx.Client(base_url=target.url, timeout=30) as http:
        deadline = time.monotonic() + 10
        while (resp := http.get("/v2/myorg/tool/manifests/2.0")).status_code != 200:
            assert time.monotonic() < deadline, resp.text
            time.sleep(0.2)
        assert resp.content == body
        assert resp.headers["docker-content-digest"] == digest
        assert http.get(f"/v2/myorg/tool/blobs/{sha(layer)}").content == layer


def test_a_docker_save_style_tar_in_any_order_imports(make_mirror, upstream, image_set,
                                                       tmp_path):
    """Docker 25+ `docker save`: an OCI layout plus manifest.json and repositories, the
    containerd name annotation and a bare tag as ref.name; here index.json comes last."""
    source = filled_mirror(make_mirror, upstream, image_set, [image_set.oci])
    bundle = export(source, tmp_path / "b.tar", "org/team/app:1.0")
    with tarfile.open(bundle) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers()
                if m.name != "mirror-bundle.json"]
    kept.sort(key=lambda pair: pair[0].name == "index.json")          # index.json last
    index = json.loads(kept[-1][1])
    for entry in index["manifests"]:
        entry["annotations"]["org.opencontainers.image.ref.name"] = "1.0"
    entries = [("manifest.json", b'[{"Config":"blobs/sha256/x","RepoTags":[],"Layers":[]}]'),
               ("repositories", b"{}"), *((m.name, d) for m, d in kept[:-1]),
               ("index.json", json.dumps(index).encode())]
    saved = tmp_path / "saved.tar"
    with tarfile.open(saved, "w") as tar:
        tar.addfile(_dir("blobs"))
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = offline_mirror(make_mirror, upstream)
    done = import_(target, saved)
    assert done.returncode == 0, done.stderr.decode()
    serves(target, [image_set.oci])


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
