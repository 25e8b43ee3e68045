"""Self-tests of tests/support against the real distribution registry."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import httpx
import pytest

from tests.support.client import MANIFEST_ACCEPT, MANIFEST_V2, RegistryClient
from tests.support.fixtures import big_layer_size
from tests.support.images import (
    docker_manifest,
    make_config,
    make_layer,
    push_blob,
    push_manifest,
    sha256_file,
)
from tests.support.token_server import TokenServer


def push_small_image(client, repo, tag, tmp_path, seed=1):
    layer = make_layer(tmp_path, 2048, seed=seed)
    config = make_config(tmp_path, [layer.diff_id])
    for blob in (layer, config):
        push_blob(client, None, repo, blob)
    data = docker_manifest(config, [layer])
    digest = push_manifest(client, None, repo, tag, data, MANIFEST_V2)
    return data, digest, layer


# -- image set against the open registry -----------------------------------

def test_manifests_come_back_byte_for_byte(image_set, upstream_client):
    for image in image_set.manifests():
        for ref in [image.digest, *image.tags]:
            r = upstream_client.get_manifest(image.repo, ref)
            assert r.status_code == 200, (image.repo, ref, r.text)
            assert r.content == image.manifest
            assert r.headers["Docker-Content-Digest"] == image.digest
            assert r.headers["Content-Type"] == image.media_type
            assert hashlib.sha256(r.content).hexdigest() == image.digest.split(":")[1]


def test_alias_tag_shares_digest_and_tags_list(image_set, upstream_client):
    docker = image_set.docker
    assert docker.repo == "library/alpinetest" and docker.tags == ["v1", "alias"]
    head = upstream_client.head(f"/v2/{docker.repo}/manifests/alias",
                                headers={"Accept": MANIFEST_ACCEPT})
    assert head.headers["Docker-Content-Digest"] == docker.digest
    tags = upstream_client.get(f"/v2/{docker.repo}/tags/list").json()
    assert sorted(tags["tags"]) == ["alias", "v1"]
    assert image_set.oci.repo == "org/team/app"


def test_blobs_come_back_with_right_digest(image_set, upstream_client):
    for repo, blob in image_set.blobs():
        h, size = hashlib.sha256(), 0
        with upstream_client.stream("GET", f"/v2/{repo}/blobs/{blob.digest}") as r:
            assert r.status_code == 200, (repo, blob.digest)
            for chunk in r.iter_bytes():
                h.update(chunk)
                size += len(chunk)
        assert ("sha256:" + h.hexdigest(), size) == (blob.digest, blob.size)
        assert sha256_file(blob.path) == blob.digest


def test_layers_are_real_tarballs(image_set):
    layer = image_set.docker.blobs[1]
    with tarfile.open(layer.path, "r:gz") as tar:
        [member] = tar.getmembers()
        assert member.isfile() and member.size == 1024 * 1024
    config = json.loads(image_set.docker.blobs[0].path.read_bytes())
    assert config["rootfs"]["diff_ids"] == [b.diff_id for b in image_set.docker.blobs[1:]]
    assert image_set.big.blobs[1].size >= big_layer_size()  # random data: gzip can't shrink it


def test_multi_platform_children(image_set):
    for index in (image_set.oci_index, image_set.docker_list):
        entries = json.loads(index.manifest)["manifests"]
        assert [e["platform"]["architecture"] for e in entries] == ["amd64", "arm64"]
        assert [e["digest"] for e in entries] == [c.digest for c in index.children]


def test_access_log_counts_requests(image_set, upstream, upstream_client):
    image = image_set.oci
    mark = upstream.mark()
    for _ in range(3):
        upstream_client.get_manifest(image.repo, "1.0")
    upstream_client.get_blob(image.repo, image.blobs[0].digest)
    upstream_client.get_manifest(image.repo, "no-such-tag")
    requests = upstream.requests(since=mark)
    assert upstream.count("GET", f"/v2/{image.repo}/manifests/1.0", since=mark) == 3
    assert upstream.count("GET", "/blobs/", since=mark) == 1
    assert upstream.count(None, "no-such-tag", since=mark, status=404) == 1
    assert len(requests) == 5
    assert requests[0] == ("GET", f"/v2/{image.repo}/manifests/1.0", 200)


def test_access_log_line_is_there_right_after_a_big_download(image_set, upstream, upstream_client):
    big = image_set.big
    mark = upstream.mark()
    with upstream_client.stream("GET", f"/v2/{big.repo}/blobs/{big.blobs[1].digest}") as r:
        for _ in r.iter_bytes():
            pass
    path = f"/v2/{big.repo}/blobs/{big.blobs[1].digest}"
    assert upstream.requests(since=mark) == [("GET", path, 200)]



def test_access_log_of_an_abandoned_download(image_set, upstream, upstream_client):
    big = image_set.big
    mark = upstream.mark()
    with upstream_client.stream("GET", f"/v2/{big.repo}/blobs/{big.blobs[1].digest}") as r:
        next(r.iter_raw())
    assert upstream.wait_count("GET", big.blobs[1].digest, 1, since=mark) == 1


@pytest.mark.parametrize("which", ["oci_index", "docker_list"])
def test_skopeo_copies_multi_platform_image(image_set, upstream, tmp_path, which):
    image = getattr(image_set, which)
    dest = tmp_path / "copy"
    result = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--all", "--src-tls-verify=false",
         f"docker://{upstream.host}/{image.ref}", f"dir:{dest}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (dest / "manifest.json").read_bytes() == image.manifest
    for blob in image.blobs:
        assert sha256_file(dest / blob.digest.split(":")[1]) == blob.digest


# -- htpasswd ----------------------------------------------------------------

def test_htpasswd_registry(htpasswd_upstream, tmp_path):
    url = htpasswd_upstream.url
    anonymous = httpx.get(url + "/v2/")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="test-registry"'
    assert httpx.get(url + "/v2/", auth=("alice", "wrong")).status_code == 401
    with RegistryClient(url, "alice", "secret") as client:
        data, digest, layer = push_small_image(client, "basic/app", "v1", tmp_path)
        assert client.get_manifest("basic/app", "v1").content == data
        assert client.get_blob("basic/app", layer.digest).status_code == 200
    assert httpx.get(f"{url}/v2/basic/app/manifests/v1").status_code == 401


# -- token auth ---------------------------------------------------------------

def test_token_registry_push_and_pull(token_server, token_upstream, tmp_path):
    url = token_upstream.url
    challenge = httpx.get(f"{url}/v2/tok/app/manifests/v1").headers["WWW-Authenticate"]
    assert challenge == (f'Bearer realm="{token_server.realm}",service="test-registry",'
                         'scope="repository:tok/app:pull"')
    before = len(token_server.requests)
    with RegistryClient(url, "alice", "secret") as client:
        data, digest, _ = push_small_image(client, "tok/app", "v1", tmp_path)
        assert client.get_manifest("tok/app", "v1").content == data
        assert client.registry_auth.token_fetches == 1  # cached per repo
    new = token_server.requests[before:]
    assert [(r.user, r.scopes, r.status) for r in new] == \
        [("alice", ["repository:tok/app:pull,push"], 200)]


def test_token_server_checks_credentials(token_server):
    params = {"service": "test-registry", "scope": "repository:x/y:pull"}
    assert httpx.get(token_server.realm, params=params).status_code == 401
    assert httpx.get(token_server.realm, params=params, auth=("alice", "nope")).status_code == 401
    r = httpx.get(token_server.realm, params=params, auth=("alice", "secret"))
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300


def test_token_scope_is_enforced(token_server, token_upstream, tmp_path):
    with RegistryClient(token_upstream.url, "alice", "secret") as client:
        push_small_image(client, "scoped/app", "v1", tmp_path)
    manifest_url = f"{token_upstream.url}/v2/scoped/app/manifests/v1"
    accept = {"Accept": MANIFEST_ACCEPT}

    def get_with(token):
        return httpx.get(manifest_url, headers={**accept, "Authorization": f"Bearer {token}"})

    r = httpx.get(token_server.realm, auth=("alice", "secret"),
                  params={"service": "test-registry", "scope": "repository:other/repo:pull"})
    assert get_with(r.json()["token"]).status_code == 401
    right = [{"type": "repository", "name": "scoped/app", "actions": ["pull"]}]
    assert get_with(token_server.issue("alice", right)).status_code == 200
    assert get_with(token_server.issue("alice", right, audience="elsewhere")).status_code == 401
    # distribution allows 60 s of clock skew on exp
    assert get_with(token_server.issue("alice", right, expires_in=-120)).status_code == 401


def test_client_refetches_an_expired_token(token_server, token_upstream, tmp_path):
    with RegistryClient(token_upstream.url, "alice", "secret") as client:
        push_small_image(client, "expiry/app", "v1", tmp_path)
        fetches = client.registry_auth.token_fetches
        client.registry_auth.tokens["expiry/app"] = token_server.issue(
            "alice", [{"type": "repository", "name": "expiry/app", "actions": ["pull"]}],
            expires_in=-120)
        assert client.get_manifest("expiry/app", "v1").status_code == 200
        assert client.registry_auth.token_fetches == fetches + 1


def test_anonymous_token_server_grants_pull_only(tmp_path, make_registry):
    with TokenServer(allow_anonymous=True) as server:
        registry = make_registry(auth="token", token_server=server)
        with RegistryClient(registry.url, "alice", "secret") as alice:
            data, _, _ = push_small_image(alice, "anon/app", "v1", tmp_path)
        with RegistryClient(registry.url) as anonymous:
            assert anonymous.get_manifest("anon/app", "v1").content == data
            layer = make_layer(tmp_path, 100, seed=99)
            with pytest.raises(AssertionError, match="401"):
                push_blob(anonymous, None, "anon/app", layer)
        assert server.requests[-1].granted == [
            {"type": "repository", "name": "anon/app", "actions": ["pull"]}]
