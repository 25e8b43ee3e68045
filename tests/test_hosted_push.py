"""Hosted repositories, the push path (issue 11, first increment): blob uploads in every
variant the OCI distribution spec v1.1 has, manifest PUT, reading pushed content back,
and a real client (skopeo) pushing and pulling byte-exact. The mirror is a real process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from mirror.passwords import hash_password
from tests.support.clients import check_dir_image, run
from tests.support.images import OCI_CONFIG

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PRIVATE = {"upstreams": {}, "hosted": {"repositories": ["*"]}}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def errors(r: httpx.Response) -> list[str]:
    return [e["code"] for e in r.json()["errors"]]


@pytest.fixture
def private(make_mirror):
    return make_mirror(PRIVATE)


@pytest.fixture
def http(private):
    with httpx.Client(base_url=private.url, timeout=30) as client:
        yield client


def start(http, repo="team/app") -> str:
    r = http.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    assert r.headers["location"].startswith(f"/v2/{repo}/blobs/uploads/")
    assert r.headers["docker-upload-uuid"] in r.headers["location"]
    assert r.headers["range"] == "0-0"
    assert "oci-chunk-min-length" in r.headers
    return r.headers["location"]


def visible(http, digest: str, repo="team/app") -> bool:
    return http.head(f"/v2/{repo}/blobs/{digest}").status_code == 200


def push_manifest(http, blobs: list[bytes], repo="team/app", ref="v1") -> tuple[bytes, str]:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    for data in [config, *blobs]:
        r = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data)
        assert r.status_code == 201, r.text
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(b),
                    "size": len(b)} for b in blobs]}).encode()
    r = http.put(f"/v2/{repo}/manifests/{ref}", content=body,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return body, sha(body)


# -- uploads ----------------------------------------------------------------------------------


def test_monolithic_post_commits_and_reads_back(http):
    data = os.urandom(3000)
    r = http.post("/v2/team/app/blobs/uploads/", params={"digest": sha(data)}, content=data)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v2/team/app/blobs/{sha(data)}"
    assert r.headers["docker-content-digest"] == sha(data)
    got = http.get(f"/v2/team/app/blobs/{sha(data)}")
    assert got.status_code == 200 and got.content == data
    assert not visible(http, sha(data), "other/repo")     # linked to the repository pushed


def test_post_then_put_with_body(http):
    data = os.urandom(5000)
    location = start(http)
    r = http.put(location, params={"digest": sha(data)}, content=data)
    assert r.status_code == 201, r.text
    assert http.get(f"/v2/team/app/blobs/{sha(data)}").content == data


def test_streamed_patch_then_put(http):
    data = os.urandom(3 * 1024 * 1024 + 17)

    def body():
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]
    location = start(http)
    r = http.patch(location, content=body())
    assert r.status_code == 202, r.text
    assert r.headers["range"] == f"0-{len(data) - 1}"
    status = http.get(r.headers["location"])
    assert status.status_code == 204 and status.headers["range"] == f"0-{len(data) - 1}"
    r = http.put(r.headers["location"], params={"digest": sha(data)})
    assert r.status_code == 201, r.text
    assert http.get(f"/v2/team/app/blobs/{sha(data)}").content == data


def test_chunked_patch_and_out_of_order_chunk_is_416(http):
    data = os.urandom(10_000)
    location = start(http)
    r = http.patch(location, content=data[:4000],
                   headers={"Content-Range": "0-3999", "Content-Type": "application/octet-stream"})
    assert r.status_code == 202 and r.headers["range"] == "0-3999"
    # a retried first chunk and a chunk past the end both start in the wrong place
    for first, last in ((0, 3999), (5000, 9999)):
        bad = http.patch(location, content=data[first:last + 1],
                         headers={"Content-Range": f"{first}-{last}"})
        assert bad.status_code == 416, bad.text
        assert bad.headers["range"] == "0-3999"
    r = http.patch(location, content=data[4000:], headers={"Content-Range": "4000-9999"})
    assert r.status_code == 202 and r.headers["range"] == "0-9999"
    r = http.put(location, params={"digest": sha(data)})
    assert r.status_code == 201, r.text
    assert http.get(f"/v2/team/app/blobs/{sha(data)}").content == data


def test_wrong_digest_is_400_and_nothing_is_visible(http, private):
    data = os.urandom(2000)
    wrong = sha(b"something else")
    location = start(http)
    r = http.put(location, params={"digest": wrong}, content=data)
    assert r.status_code == 400 and errors(r) == ["DIGEST_INVALID"]
    assert not visible(http, wrong) and not visible(http, sha(data))
    assert not private.is_cached(wrong)
    assert not private.is_cached(sha(data))
    r = http.post("/v2/team/app/blobs/uploads/", params={"digest": wrong}, content=data)
    assert r.status_code == 400 and errors(r) == ["DIGEST_INVALID"]
    assert not visible(http, wrong)


def test_cancel_and_unknown_session(http):
    location = start(http)
    assert http.delete(location).status_code == 204
    r = http.get(location)
    assert r.status_code == 404 and errors(r) == ["BLOB_UPLOAD_UNKNOWN"]
    r = http.get("/v2/team/app/blobs/uploads/../../etc")
    assert r.status_code in (400, 404)


def test_blob_larger_than_max_blob_size_is_refused(make_mirror):
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"],
                                                      "max_blob_size": "1KiB"}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        data = os.urandom(2048)
        r = http.post("/v2/a/blobs/uploads/", params={"digest": sha(data)}, content=data)
        assert r.status_code == 400 and errors(r) == ["SIZE_INVALID"]
        assert not visible(http, sha(data), "a")


def test_session_survives_a_restart(http, private):
    data = os.urandom(50_000)
    location = start(http)
    r = http.patch(location, content=data[:20_000], headers={"Content-Range": "0-19999"})
    assert r.status_code == 202
    private.restart()
    status = http.get(location)
    assert status.status_code == 204 and status.headers["range"] == "0-19999"
    r = http.patch(location, content=data[20_000:], headers={"Content-Range": "20000-49999"})
    assert r.status_code == 202, r.text
    r = http.put(location, params={"digest": sha(data)})
    assert r.status_code == 201, r.text
    assert http.get(f"/v2/team/app/blobs/{sha(data)}").content == data


def test_cross_repository_mount(http):
    data = os.urandom(1000)
    assert http.post("/v2/src/blobs/uploads/", params={"digest": sha(data)},
                     content=data).status_code == 201
    r = http.post("/v2/dst/blobs/uploads/", params={"mount": sha(data), "from": "src"})
    assert r.status_code == 201 and r.headers["docker-content-digest"] == sha(data)
    assert http.get(f"/v2/dst/blobs/{sha(data)}").content == data
    # not in the source repository: a normal upload session instead
    other = sha(b"not pushed")
    r = http.post("/v2/dst/blobs/uploads/", params={"mount": other, "from": "src"})
    assert r.status_code == 202 and "/blobs/uploads/" in r.headers["location"]


# -- manifests --------------------------------------------------------------------------------


def test_manifest_put_by_tag_and_digest_then_pull(http):
    layer = os.urandom(4000)
    body, digest = push_manifest(http, [layer])
    r = http.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200 and r.content == body
    assert r.headers["docker-content-digest"] == digest
    r = http.put(f"/v2/team/app/manifests/{digest}", content=body,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201 and r.headers["location"] == f"/v2/team/app/manifests/{digest}"
    assert http.head(f"/v2/team/app/manifests/{digest}").status_code == 200
    assert http.get("/v2/team/app/tags/list").json() == {"name": "team/app", "tags": ["v1"]}
    assert "team/app" in http.get("/v2/_catalog").json()["repositories"]
    wrong = sha(b"x")
    r = http.put(f"/v2/team/app/manifests/{wrong}", content=body,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and errors(r) == ["DIGEST_INVALID"]


def test_manifest_with_subject_answers_oci_subject(http):
    _, subject = push_manifest(http, [os.urandom(100)])
    config = b"{}"
    http.post("/v2/team/app/blobs/uploads/", params={"digest": sha(config)}, content=config)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "artifactType": "application/vnd.example.sig",
                       "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                                  "digest": sha(config), "size": 2},
                       "layers": [],
                       "subject": {"mediaType": OCI_MANIFEST, "digest": subject,
                                   "size": 10}}).encode()
    r = http.put(f"/v2/team/app/manifests/{sha(body)}", content=body,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    assert r.headers["oci-subject"] == subject


def test_manifest_referencing_a_missing_blob_is_400(http):
    config = b"{}"
    http.post("/v2/team/app/blobs/uploads/", params={"digest": sha(config)}, content=config)
    body = oci_manifest_bytes(sha(config), sha(b"never pushed"))
    r = http.put("/v2/team/app/manifests/v2", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and errors(r) == ["MANIFEST_BLOB_UNKNOWN"]
    assert http.get("/v2/team/app/manifests/v2").status_code == 404
    # a blob pushed to another repository is not in this one either
    layer = os.urandom(10)
    http.post("/v2/other/blobs/uploads/", params={"digest": sha(layer)}, content=layer)
    body = oci_manifest_bytes(sha(config), sha(layer))
    r = http.put("/v2/team/app/manifests/v2", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and errors(r) == ["MANIFEST_BLOB_UNKNOWN"]


def oci_manifest_bytes(config: str, layer: str) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 2},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                   "digest": layer, "size": 10}]}).encode()


def test_manifest_media_type_must_match_content_type(http):
    layer = os.urandom(100)
    body, _ = push_manifest(http, [layer])
    r = http.put("/v2/team/app/manifests/v3", content=body,
                 headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    assert r.status_code == 400 and errors(r) == ["MANIFEST_INVALID"]
    r = http.put("/v2/team/app/manifests/v3", content=b"{not json",
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and errors(r) == ["MANIFEST_INVALID"]


# -- routing and auth -------------------------------------------------------------------------


def test_mixed_config_denies_push_to_mirrored_names(make_mirror, upstream, image_set):
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}, "default": "up",
                          "hosted": {"repositories": ["myorg/*"]}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = http.post("/v2/org/team/app/blobs/uploads/")
        assert r.status_code == 403 and errors(r) == ["DENIED"]
        assert "up" in r.json()["errors"][0]["message"]
        assert "hosted" in r.json()["errors"][0]["message"]
        r = http.put("/v2/up/org/team/app/manifests/x", content=b"{}")
        assert r.status_code == 403 and errors(r) == ["DENIED"]
        # pulls of mirrored names still work beside the hosted ones
        oci = image_set.oci
        r = http.get(f"/v2/{oci.repo}/manifests/{oci.tags[0]}", headers={"Accept": oci.media_type})
        assert r.status_code == 200 and r.content == oci.manifest
        assert start(http, "myorg/app")


def test_push_needs_the_push_action(make_mirror, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    hashed = hash_password("secret", rounds=4)
    htpasswd.write_text(f"alice:{hashed}\nbob:{hashed}\n")
    mirror = make_mirror({**PRIVATE, "auth": {"htpasswd": str(htpasswd), "acl": [
        {"match": {"account": "alice"}, "actions": ["*"]},
        {"match": {"account": "bob", "name": "team/*"}, "actions": ["pull"]}]}})
    with httpx.Client(base_url=mirror.url, timeout=30, auth=("bob", "secret")) as bob:
        r = bob.post("/v2/team/app/blobs/uploads/")
        assert r.status_code == 403 and errors(r) == ["DENIED"]
    with httpx.Client(base_url=mirror.url, timeout=30, auth=("alice", "secret")) as alice:
        start(alice)


def test_without_hosted_pushes_are_405(make_mirror, upstream):
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = http.post("/v2/a/blobs/uploads/")
        assert r.status_code == 405 and errors(r) == ["UNSUPPORTED"]
        r = http.put("/v2/a/manifests/x", content=b"{}")
        assert r.status_code == 405 and errors(r) == ["UNSUPPORTED"]


# -- a real client ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["private", "mixed"])
def test_skopeo_push_and_pull_back_byte_exact(config, make_mirror, upstream, image_set,
                                               tmp_path):
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is required (apt-get install skopeo; scripts/test does)")
    cfg = PRIVATE if config == "private" else {
        "upstreams": {"up": {"url": upstream.url}}, "default": "up",
        "hosted": {"repositories": ["pushed/*"]}}
    mirror = make_mirror(cfg)
    image = image_set.oci
    src = f"docker://{upstream.host}/{image.repo}:{image.tags[0]}"
    dest = f"docker://{mirror.host}/pushed/app:1"
    run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
         "--dest-tls-verify=false", "--preserve-digests", src, dest])
    out = tmp_path / "back"
    run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", dest, f"dir:{out}"])
    check_dir_image(out, image)
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = http.head("/v2/pushed/app/manifests/1", headers={"Accept": image.media_type})
        assert r.headers["docker-content-digest"] == image.digest
        assert "pushed/app" in http.get("/v2/_catalog").json()["repositories"]


# -- config and eviction ----------------------------------------------------------------------


def test_hosted_config_keys_and_one_line_errors(tmp_path):
    from mirror.config import ConfigError, load_config

    def load(text: str):
        path = tmp_path / "config.yml"
        path.write_text(text)
        return load_config(path, environ={})

    config = load("upstreams: {}\nhosted: {repositories: ['*']}\n")
    assert config.default is None and config.upstreams == {}
    assert config.hosted.repositories == ("*",) and config.hosted.delete is False
    assert config.hosted.upload_ttl == 24 * 3600 and config.hosted.max_blob_size == 10 * 1024 ** 3
    config = load("hosted: {repositories: ['myorg/*'], delete: true, upload_ttl: 1h, "
                  "max_blob_size: 1GiB}\n")
    assert config.default == "docker.io" and config.hosted.upload_ttl == 3600
    for text, key in (("upstreams: {}\n", "upstreams"),
                      ("hosted: {repositories: 'x'}\n", "hosted.repositories"),
                      ("hosted: {upload_ttl: soon}\n", "hosted.upload_ttl"),
                      ("hosted: {max_blob_size: lots}\n", "hosted.max_blob_size"),
                      ("hosted: {delete: maybe}\n", "hosted.delete"),
                      ("hosted: {push: true}\n", "hosted.push"),
                      ("upstreams: {}\nhosted: {}\ndefault: docker.io\n", "default")):
        with pytest.raises(ConfigError) as err:
            load(text)
        message = str(err.value)
        assert "\n" not in message and f": {key}" in message, message


def test_hosted_content_is_never_evicted(private, http):
    layer = os.urandom(20_000)
    body, digest = push_manifest(http, [layer])
    orphan = os.urandom(5000)       # uploaded, its manifest not pushed yet
    assert http.post("/v2/team/app/blobs/uploads/", params={"digest": sha(orphan)},
                     content=orphan).status_code == 201
    time.sleep(1.5)                 # the server flushes usage to the index about once a second
    budget = private.dir / "budget.yml"
    budget.write_text(yaml.safe_dump({**private.config, "max_size": 1}))
    result = subprocess.run([sys.executable, "-m", "mirror", "gc", "--config", str(budget)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for d in (digest, sha(layer), sha(orphan)):
        assert private.is_cached(d), f"{d} was evicted"
    assert http.get("/v2/team/app/manifests/v1").content == body
    assert http.get(f"/v2/team/app/blobs/{sha(layer)}").content == layer
