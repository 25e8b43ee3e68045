"""Hosted manifest GET/HEAD honour ``Accept`` (issue 11): a request whose Accept does
not include the stored manifest's media type (and is not empty, nor ``*/*``) is
``404 MANIFEST_UNKNOWN`` naming the stored type, as registry:2 answers "OCI index
found, but accept header does not support OCI indexes" (a hosted manifest has no
other form to give). The proxy answers the same for a cached tag when offline (with
upstream reachable it asks upstream for the form the client takes). Real processes."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from starlette.responses import JSONResponse, Response

from tests.support.scripted import Scripted
from tests.test_hosted_push import OCI_MANIFEST, errors, push_manifest, sha

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# what docker, containerd and podman send (each includes the OCI types)
CLIENTS = [
    f"{DOCKER_V2}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}",
    f"{OCI_INDEX}, {DOCKER_LIST}, {DOCKER_V2}, {OCI_MANIFEST}, */*",
]


@pytest.fixture
def http(make_mirror):
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"]}})
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        yield client


def push_index(http, child: tuple[bytes, str], repo="team/app", ref="multi") -> bytes:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": child[1], "size": len(child[0]),
         "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    r = http.put(f"/v2/{repo}/manifests/{ref}", content=body, headers={"Content-Type": OCI_INDEX})
    assert r.status_code == 201, r.text
    return body


def test_accept_without_the_stored_type_is_manifest_unknown_naming_it(http):
    image = push_manifest(http, [os.urandom(300)])
    index = push_index(http, image)
    for ref, stored in (("v1", OCI_MANIFEST), (image[1], OCI_MANIFEST),
                        ("multi", OCI_INDEX), (sha(index), OCI_INDEX)):
        for method in ("GET", "HEAD"):
            r = http.request(method, f"/v2/team/app/manifests/{ref}",
                             headers={"Accept": f"{DOCKER_V2}, {DOCKER_LIST}"})
            assert r.status_code == 404, (method, ref, r.status_code)
            if method == "GET":
                assert errors(r) == ["MANIFEST_UNKNOWN"]
                [error] = r.json()["errors"]
                assert error["detail"]["mediaType"] == stored
                assert stored in error["message"]


def test_what_real_clients_send_an_empty_accept_and_wildcards_get_the_manifest(http):
    image = push_manifest(http, [os.urandom(300)])
    index = push_index(http, image)
    for accept in [*CLIENTS, "*/*", f"{OCI_INDEX}; q=0.9, {OCI_MANIFEST}", None]:
        headers = {"Accept": accept} if accept else {}
        r = http.get("/v2/team/app/manifests/multi", headers=headers)
        assert r.status_code == 200 and r.content == index, (accept, r.text)
        assert r.headers["content-type"] == OCI_INDEX
        r = http.get(f"/v2/team/app/manifests/{image[1]}", headers=headers)
        assert r.status_code == 200 and r.content == image[0], (accept, r.text)
        assert http.head("/v2/team/app/manifests/v1", headers=headers).status_code == 200
    # several Accept lines count together
    r = http.get("/v2/team/app/manifests/multi",
                 headers=[("Accept", DOCKER_V2), ("Accept", OCI_INDEX)])
    assert r.status_code == 200 and r.content == index


def test_offline_proxy_answers_the_same_for_a_cached_tag(make_mirror):
    config = b"{}"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": 2},
                           "layers": []}).encode()

    def answer(request):
        if request.url.path == "/v2/app/manifests/v1":
            return Response(manifest, media_type=OCI_MANIFEST,
                            headers={"Docker-Content-Digest": sha(manifest)})
        if request.url.path == "/v2/":
            return JSONResponse({})
        return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]},
                            status_code=404)

    with Scripted(answer, name="origin") as origin:
        mirror = make_mirror({"upstreams": {"up": {"url": origin.url}}, "default": "up"})
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            # (an Accept without index types would not cache the tag: see proxy.py)
            assert http.get("/v2/app/manifests/v1", headers={"Accept": CLIENTS[0]}
                            ).content == manifest
        mirror.reconfigure(offline=True)
        mirror.restart()
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            r = http.get("/v2/app/manifests/v1", headers={"Accept": DOCKER_V2})
            assert r.status_code == 404 and errors(r) == ["MANIFEST_UNKNOWN"], r.text
            assert r.json()["errors"][0]["detail"]["mediaType"] == OCI_MANIFEST, r.text
            assert http.get("/v2/app/manifests/v1").content == manifest
