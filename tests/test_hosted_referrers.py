"""Hosted repositories, content discovery (issue 11): the referrers API of the OCI
distribution-spec v1.1 (``GET /v2/<name>/referrers/<digest>``), with ``artifactType``
filtering and ``OCI-Filters-Applied``; referrers pushed before their subject are listed,
an unknown digest gives an empty index, a deleted referrer is no longer listed. The
mirror is a real process; manifests are pushed with raw HTTP."""

from __future__ import annotations

import json
import os
import sqlite3

import httpx
import pytest
from starlette.responses import JSONResponse, Response

from mirror.passwords import hash_password
from tests.support.scripted import Scripted
from tests.test_hosted_push import OCI_MANIFEST, errors, push_manifest, sha

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = b"{}"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
SBOM = "application/spdx+json"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
CONFIG_TYPED = "application/vnd.example.config.v1+json"
HOSTED = {"upstreams": {}, "hosted": {"repositories": ["*"], "delete": True}}


@pytest.fixture
def http(make_mirror):
    mirror = make_mirror(HOSTED)
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        yield client


def push_blob(http, data: bytes, repo: str = "team/app") -> None:
    r = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data)
    assert r.status_code == 201, r.text


def push_artifact(http, subject: tuple[bytes, str], artifact_type: str | None,
                  annotations: dict[str, str], repo: str = "team/app",
                  config_type: str = EMPTY_TYPE) -> tuple[bytes, str]:
    """An OCI artifact manifest whose subject is ``subject`` (body, digest), by digest."""
    payload = os.urandom(64)
    push_blob(http, EMPTY, repo)
    push_blob(http, payload, repo)
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": sha(EMPTY), "size": len(EMPTY)},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha(payload),
                    "size": len(payload)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject[1], "size": len(subject[0])},
        "annotations": annotations}
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    body = json.dumps(doc).encode()
    r = http.put(f"/v2/{repo}/manifests/{sha(body)}", content=body,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    assert r.headers["oci-subject"] == subject[1]
    return body, sha(body)


def listing(http, digest: str, repo: str = "team/app", **params: str) -> httpx.Response:
    r = http.get(f"/v2/{repo}/referrers/{digest}", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == OCI_INDEX
    doc = r.json()
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    return r


def test_referrers_listed_also_when_pushed_before_their_subject(http):
    # the image's manifest bytes are known before it is pushed: its digest is the subject
    layer = os.urandom(2000)
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    image = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer),
                    "size": len(layer)}]}).encode()
    subject = (image, sha(image))
    early, early_digest = push_artifact(http, subject, SBOM, {"org.example.sbom": "spdx"})
    assert listing(http, subject[1]).json()["manifests"][0]["digest"] == early_digest

    pushed, digest = push_manifest(http, [layer], ref="v1")
    assert (pushed, digest) == subject
    late, late_digest = push_artifact(http, subject, SIGNATURE, {"org.example.signer": "ci"})

    manifests = listing(http, digest).json()["manifests"]
    assert sorted(manifests, key=lambda d: d["digest"]) == sorted([
        {"mediaType": OCI_MANIFEST, "digest": early_digest, "size": len(early),
         "artifactType": SBOM, "annotations": {"org.example.sbom": "spdx"}},
        {"mediaType": OCI_MANIFEST, "digest": late_digest, "size": len(late),
         "artifactType": SIGNATURE, "annotations": {"org.example.signer": "ci"}},
    ], key=lambda d: d["digest"])
    # each artifact is an ordinary manifest of the repository too
    assert http.get(f"/v2/team/app/manifests/{late_digest}",
                    headers={"Accept": OCI_MANIFEST}).content == late
    # the image itself has no subject: nothing refers to the artifacts
    assert listing(http, late_digest).json()["manifests"] == []


def test_artifact_type_filter_and_header(http):
    image, digest = push_manifest(http, [os.urandom(500)], ref="v1")
    _, sbom = push_artifact(http, (image, digest), SBOM, {})
    _, sig = push_artifact(http, (image, digest), SIGNATURE, {})
    r = listing(http, digest)
    assert "oci-filters-applied" not in r.headers
    assert {d["digest"] for d in r.json()["manifests"]} == {sbom, sig}

    r = listing(http, digest, artifactType=SBOM)
    assert r.headers["oci-filters-applied"] == "artifactType"
    assert [d["digest"] for d in r.json()["manifests"]] == [sbom]
    r = listing(http, digest, artifactType="application/vnd.example.none")
    assert r.headers["oci-filters-applied"] == "artifactType"
    assert r.json()["manifests"] == []


def test_artifact_type_falls_back_to_the_config_media_type(http):
    image, digest = push_manifest(http, [os.urandom(500)], ref="v1")
    _, typed = push_artifact(http, (image, digest), None, {}, config_type=CONFIG_TYPED)
    [descriptor] = listing(http, digest).json()["manifests"]
    assert descriptor["digest"] == typed and descriptor["artifactType"] == CONFIG_TYPED
    assert "annotations" not in descriptor
    r = listing(http, digest, artifactType=CONFIG_TYPED)
    assert [d["digest"] for d in r.json()["manifests"]] == [typed]


def test_unknown_digest_is_an_empty_index_and_a_bad_one_400(http):
    push_manifest(http, [os.urandom(100)], ref="v1")
    r = listing(http, sha(b"nothing refers to this"))
    assert r.json()["manifests"] == []
    # in a repository nothing was pushed to, too
    assert listing(http, sha(b"x"), repo="nobody/here").json()["manifests"] == []
    r = http.get("/v2/team/app/referrers/sha256:not-a-digest")
    assert r.status_code == 400 and errors(r) == ["DIGEST_INVALID"]


def test_referrers_stay_in_their_repository(http):
    image, digest = push_manifest(http, [os.urandom(300)], ref="v1")
    push_manifest(http, [os.urandom(300)], repo="team/other", ref="v1")
    _, art = push_artifact(http, (image, digest), SBOM, {})
    assert [d["digest"] for d in listing(http, digest).json()["manifests"]] == [art]
    assert listing(http, digest, repo="team/other").json()["manifests"] == []


def test_deleted_referrer_is_no_longer_listed(http):
    image, digest = push_manifest(http, [os.urandom(300)], ref="v1")
    _, gone = push_artifact(http, (image, digest), SBOM, {})
    _, kept = push_artifact(http, (image, digest), SIGNATURE, {})
    assert http.delete(f"/v2/team/app/manifests/{gone}").status_code == 202
    assert [d["digest"] for d in listing(http, digest).json()["manifests"]] == [kept]
    # pushed again, it is listed again
    body = http.get(f"/v2/team/app/manifests/{kept}", headers={"Accept": OCI_MANIFEST}).content
    assert http.delete(f"/v2/team/app/manifests/{kept}").status_code == 202
    assert listing(http, digest).json()["manifests"] == []
    assert http.put(f"/v2/team/app/manifests/{kept}", content=body,
                    headers={"Content-Type": OCI_MANIFEST}).status_code == 201
    assert [d["digest"] for d in listing(http, digest).json()["manifests"]] == [kept]


def test_subject_without_a_digest_is_manifest_invalid(http):
    push_blob(http, EMPTY)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_TYPE, "digest": sha(EMPTY), "size": len(EMPTY)},
        "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": "sha256:zz"}}).encode()
    r = http.put("/v2/team/app/manifests/x", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and errors(r) == ["MANIFEST_INVALID"]


def test_referrers_need_pull(make_mirror, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    hashed = hash_password("secret", rounds=4)
    htpasswd.write_text(f"alice:{hashed}\nbob:{hashed}\n")
    mirror = make_mirror({**HOSTED, "auth": {"htpasswd": str(htpasswd), "acl": [
        {"match": {"account": "alice"}, "actions": ["*"]},
        {"match": {"account": "bob", "name": "other/*"}, "actions": ["pull"]}]}})
    with httpx.Client(base_url=mirror.url, timeout=30, auth=("alice", "secret")) as alice:
        image, digest = push_manifest(alice, [os.urandom(300)], ref="v1")
        _, art = push_artifact(alice, (image, digest), SBOM, {})
        assert [d["digest"] for d in listing(alice, digest).json()["manifests"]] == [art]
    with httpx.Client(base_url=mirror.url, timeout=30, auth=("bob", "secret")) as bob:
        r = bob.get(f"/v2/team/app/referrers/{digest}")
        assert r.status_code in (401, 403) and errors(r) in (["DENIED"], ["UNAUTHORIZED"])
    with httpx.Client(base_url=mirror.url, timeout=30) as anonymous:
        r = anonymous.get(f"/v2/team/app/referrers/{digest}")
        assert r.status_code == 401 and errors(r) == ["UNAUTHORIZED"]


def test_referrers_pushed_before_the_upgrade_are_listed_after_it(make_mirror):
    """An index.db from before referrers (no referrers table): the hosted manifests
    already pushed are recorded once, at the next start."""
    mirror = make_mirror(HOSTED)
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        image, digest = push_manifest(http, [os.urandom(300)], ref="v1")
        _, art = push_artifact(http, (image, digest), SBOM, {"k": "v"})
        _, gone = push_artifact(http, (image, digest), SIGNATURE, {})
        assert http.delete(f"/v2/team/app/manifests/{gone}").status_code == 202
    mirror.stop()
    with sqlite3.connect(mirror.data_dir / "index.db") as db:   # as the old version left it
        db.execute("DROP TABLE referrers")
        db.execute("DELETE FROM meta WHERE key = 'referrers_backfill'")
    mirror.start()
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        r = listing(http, digest)
        assert [(d["digest"], d["artifactType"], d["annotations"])
                for d in r.json()["manifests"]] == [(art, SBOM, {"k": "v"})]


# -- mirrored repositories: upstream's referrers, cached with the tag TTL --------------------


def upstream_push(client: httpx.Client, repo: str, ref: str, data: bytes, media_type: str) -> None:
    r = client.put(f"/v2/{repo}/manifests/{ref}", content=data,
                   headers={"Content-Type": media_type})
    assert r.status_code == 201, r.text


def test_mirrored_referrers_from_the_tag_schema_fallback(make_mirror, upstream):
    """distribution 2.8 has no referrers API (404): the index under the tag
    ``sha256-<hex>`` of the subject is the list, as the OCI spec's fallback has it."""
    repo = f"refs/fallback{os.urandom(4).hex()}"
    subject = sha(os.urandom(32))
    payload = os.urandom(64)
    with httpx.Client(base_url=upstream.url, timeout=30) as up:
        for data in (EMPTY, payload):
            r = up.post(f"/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            location = r.headers["location"]
            location += ("&" if "?" in location else "?") + f"digest={sha(data)}"
            r = up.put(location, content=data)
            assert r.status_code == 201, r.text
        sig = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIGNATURE,
            "config": {"mediaType": EMPTY_TYPE, "digest": sha(EMPTY), "size": len(EMPTY)},
            "layers": [{"mediaType": "application/octet-stream", "digest": sha(payload),
                        "size": len(payload)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 10}}).encode()
        upstream_push(up, repo, sha(sig), sig, OCI_MANIFEST)
        tagged = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha(sig), "size": len(sig),
             "artifactType": SIGNATURE, "annotations": {"org.example.signer": "ci"}}]}).encode()
        upstream_push(up, repo, subject.replace(":", "-"), tagged, OCI_INDEX)
    mirror = make_mirror({"upstreams": {"up": {"url": upstream.url}}, "default": "up",
                          "hosted": {"repositories": ["myorg/*"]}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        mark = upstream.mark()
        expected = [{"mediaType": OCI_MANIFEST, "digest": sha(sig), "size": len(sig),
                     "artifactType": SIGNATURE, "annotations": {"org.example.signer": "ci"}}]
        assert listing(http, subject, repo=repo).json()["manifests"] == expected
        assert upstream.count(path_substring="/referrers/", since=mark) == 1
        assert upstream.count(path_substring=f"/manifests/{subject.replace(':', '-')}",
                              since=mark) == 1
        # cached for the tag TTL: no second upstream request
        assert listing(http, subject, repo=repo).json()["manifests"] == expected
        assert upstream.count(path_substring="/referrers/", since=mark) == 1
        r = listing(http, subject, repo=repo, artifactType=SBOM)
        assert r.json()["manifests"] == [] and r.headers["oci-filters-applied"] == "artifactType"
        # no tag either: an empty index
        assert listing(http, sha(b"unsigned"), repo=repo).json()["manifests"] == []


def test_mirrored_referrers_api_cached_and_served_stale(make_mirror):
    subject = sha(b"the image")
    sig = {"mediaType": OCI_MANIFEST, "digest": sha(b"sig"), "size": 321,
           "artifactType": SIGNATURE, "annotations": {"a": "b"}}
    state = {"down": False}

    def answer(request):
        if state["down"]:
            return Response("down", status_code=503)
        if request.url.path == f"/v2/app/referrers/{subject}":
            return Response(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                        "manifests": [sig]}), media_type=OCI_INDEX)
        if request.url.path == "/v2/":
            return JSONResponse({})
        return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]},
                            status_code=404)

    with Scripted(answer, name="api") as origin:
        mirror = make_mirror({"upstreams": {"up": {"url": origin.url, "tag_ttl": "0s"}},
                              "default": "up"})
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            assert listing(http, subject, repo="app").json()["manifests"] == [sig]
            seen = [s for s in origin.requests if "/referrers/" in s.path]
            assert len(seen) == 1 and seen[0].headers.get("accept") == OCI_INDEX
            state["down"] = True
            # expired (TTL 0s) and upstream answering 503: the cached list, stale
            assert listing(http, subject, repo="app").json()["manifests"] == [sig]
            # (asked again: the upstream client retries a 503 as it does for manifests)
            assert len([s for s in origin.requests if "/referrers/" in s.path]) > 1
            # never fetched and upstream down: an error, not a made-up empty list
            r = http.get(f"/v2/app/referrers/{sha(b'other')}")
            assert r.status_code == 503, r.text
            state["down"] = False
            assert listing(http, subject, repo="app").json()["manifests"] == [sig]


def referrer(n: int) -> dict[str, object]:
    return {"mediaType": OCI_MANIFEST, "digest": sha(b"sig %d" % n), "size": 100 + n,
            "artifactType": SIGNATURE, "annotations": {"n": str(n)}}


def index_page(items: list[dict[str, object]], link: str | None = None) -> Response:
    return Response(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": items}),
                    media_type=OCI_INDEX, headers={"Link": link} if link else None)


def test_mirrored_referrers_pages_are_followed_and_merged(make_mirror):
    """Upstream's referrers API paginated with ``Link: <...>; rel="next"``: the pages on
    its own origin are merged into one list; a link to another origin is not followed,
    and an endless chain stops after a bounded number of pages."""
    paged, endless, elsewhere = sha(b"paged"), sha(b"endless"), sha(b"elsewhere")

    def answer(request):
        path, page = request.url.path, int(request.query_params.get("page", "0"))
        if path == f"/v2/app/referrers/{paged}":
            # three pages (one repeats a descriptor), the last with a relative link too
            pages = {0: ([referrer(0), referrer(1)], f'</v2/app/referrers/{paged}?page=1>; '
                                                     'rel="next"'),
                     1: ([referrer(1), referrer(2)], f'<{origin.url}/v2/app/referrers/{paged}'
                                                     '?page=2>; rel="next"'),
                     2: ([referrer(3)], None)}
            return index_page(*pages[page])
        if path == f"/v2/app/referrers/{endless}":
            return index_page([referrer(100 + page)],
                              f'</v2/app/referrers/{endless}?page={page + 1}>; rel="next"')
        if path == f"/v2/app/referrers/{elsewhere}":
            return index_page([referrer(7)], '<http://127.0.0.2:9/v2/app/referrers/x?page=1>; '
                                             'rel="next"')
        if path == "/v2/":
            return JSONResponse({})
        return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]},
                            status_code=404)

    with Scripted(answer, name="paged") as origin:
        mirror = make_mirror({"upstreams": {"up": {"url": origin.url}}, "default": "up"})
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            listed = listing(http, paged, repo="app").json()["manifests"]
            assert sorted(listed, key=lambda d: d["annotations"]["n"]) == [
                referrer(n) for n in range(4)]
            assert len([s for s in origin.requests if paged in s.path]) == 3

            listed = listing(http, endless, repo="app").json()["manifests"]
            asked = [s for s in origin.requests if endless in s.path]
            assert len(asked) == 20 and len(listed) == 20

            assert listing(http, elsewhere, repo="app").json()["manifests"] == [referrer(7)]
            assert len([s for s in origin.requests if elsewhere in s.path]) == 1


def test_mirrored_referrers_pages_stop_at_the_size_bound(make_mirror):
    """Pages of 3.9 MiB each (padded with a field the index may carry): the mirror reads
    16 MiB of pages at most and lists what those held."""
    subject = sha(b"big pages")
    padding = "x" * (3900 * 1024)

    def answer(request):
        if request.url.path == f"/v2/app/referrers/{subject}":
            page = int(request.query_params.get("page", "0"))
            return Response(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                        "manifests": [referrer(page)], "padding": padding}),
                            media_type=OCI_INDEX,
                            headers={"Link": f'</v2/app/referrers/{subject}?page={page + 1}>; '
                                             'rel="next"'})
        if request.url.path == "/v2/":
            return JSONResponse({})
        return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]},
                            status_code=404)

    with Scripted(answer, name="big") as origin:
        mirror = make_mirror({"upstreams": {"up": {"url": origin.url}}, "default": "up"})
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            listed = listing(http, subject, repo="app").json()["manifests"]
        assert listed == [referrer(n) for n in range(4)]         # 4 x 3.9 MiB < 16 MiB
        assert len([s for s in origin.requests if subject in s.path]) == 5
        assert "the rest is not listed" in mirror.log_text()


def test_mirrored_referrers_denied_upstream_is_an_error_never_a_cached_empty_list(make_mirror):
    """Upstream answering 401/403 to the referrers request says nothing about what refers
    to the subject: the client gets the denial (no empty list, nothing stored), or the
    list cached before, stale."""
    subject, other = sha(b"signed image"), sha(b"other image")
    state = {"status": 403}

    def answer(request):
        path = request.url.path
        if path == "/v2/":
            return JSONResponse({})
        if "/referrers/" in path and state["status"] != 200:
            return JSONResponse({"errors": [{"code": "DENIED", "message": "not yours"}]},
                                status_code=state["status"])
        if path in (f"/v2/app/referrers/{subject}", f"/v2/app/referrers/{other}"):
            return index_page([referrer(1)])
        return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]},
                            status_code=404)

    with Scripted(answer, name="denying") as origin:
        mirror = make_mirror({"upstreams": {"up": {"url": origin.url, "tag_ttl": "0s"}},
                              "default": "up"})
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            for status in (403, 401):
                state["status"] = status
                r = http.get(f"/v2/app/referrers/{subject}")
                assert r.status_code == 403 and errors(r) == ["DENIED"], r.text
                assert "not yours" in r.json()["errors"][0]["message"]
            state["status"] = 200           # not remembered as "no referrers"
            assert listing(http, subject, repo="app").json()["manifests"] == [referrer(1)]
            # cached (expired at once, TTL 0s), then denied: the cached list, stale
            assert listing(http, other, repo="app").json()["manifests"] == [referrer(1)]
            state["status"] = 403
            assert listing(http, other, repo="app").json()["manifests"] == [referrer(1)]
            asked = len([s for s in origin.requests if other in s.path])
            assert asked >= 2
            state["status"] = 200
            assert listing(http, other, repo="app").json()["manifests"] == [referrer(1)]
        assert "serving stale referrers" in mirror.log_text()


def test_mirrored_referrers_offline_serve_the_cached_list_and_ask_nothing(make_mirror):
    """``offline: true``: the cached list is served however old; a subject never asked
    for is an empty index (as an unknown digest is), and upstream hears nothing."""
    subject = sha(b"image")

    def answer(request):
        if request.url.path == f"/v2/app/referrers/{subject}":
            return index_page([referrer(5)])
        if request.url.path == "/v2/":
            return JSONResponse({})
        return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]},
                            status_code=404)

    with Scripted(answer, name="offline") as origin:
        mirror = make_mirror({"upstreams": {"up": {"url": origin.url, "tag_ttl": "0s"}},
                              "default": "up"})
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            assert listing(http, subject, repo="app").json()["manifests"] == [referrer(5)]
        mirror.reconfigure(offline=True)
        mirror.restart()
        before = len(origin.requests)
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            assert listing(http, subject, repo="app").json()["manifests"] == [referrer(5)]
            assert listing(http, sha(b"never asked"), repo="app").json()["manifests"] == []
        assert origin.requests[before:] == []
