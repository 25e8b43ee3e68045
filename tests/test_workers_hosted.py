"""Hosted uploads with ``workers: 2``: the POST, PATCHes and PUT of one upload may
reach different worker processes (Harbor #23926 is this bug), and two requests
writing one session at once, in two workers, never both write."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time

import httpx
import pytest

from tests.test_workers import all_ready

PRIVATE = {"upstreams": {}, "hosted": {"repositories": ["*"]}, "workers": 2}
CLOSE = {"Connection": "close"}       # each request on a new connection: any worker
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def private(make_mirror):
    return all_ready(make_mirror(PRIVATE))


def start_upload(mirror, repo: str) -> str:
    r = httpx.post(f"{mirror.url}/v2/{repo}/blobs/uploads/", headers=CLOSE, timeout=30)
    assert r.status_code == 202
    return r.headers["Location"]


def workers_of(mirror, method: str, since: int, what: str = "blobs/uploads") -> set[str]:
    return set(re.findall(rf"\[(w\d)\] mirror\.access: .*\"{method} /v2/\S+/{what}/",
                          mirror.log_text()[since:]))


def test_a_chunked_upload_whose_requests_reach_both_workers_succeeds(private):
    for _attempt in range(5):
        seen = len(private.log_text())
        data = os.urandom(6 * 1024 * 1024)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        location = start_upload(private, "team/app")
        step = 1024 * 1024
        for offset in range(0, len(data), step):
            chunk = data[offset:offset + step]
            r = httpx.patch(f"{private.url}{location}", content=chunk, timeout=30,
                            headers={**CLOSE, "Content-Type": "application/octet-stream",
                                     "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
            assert r.status_code == 202, r.text
            location = r.headers["Location"]
            assert r.headers["Range"] == f"0-{offset + len(chunk) - 1}"
        r = httpx.put(f"{private.url}{location}", params={"digest": digest}, headers=CLOSE,
                      timeout=30)
        assert r.status_code == 201, r.text
        # Read-your-writes whichever worker answers: at once, on new connections.
        for _ in range(6):
            got = httpx.get(f"{private.url}/v2/team/app/blobs/{digest}", headers=CLOSE,
                            timeout=30)
            assert got.status_code == 200 and got.content == data
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest,
                       "size": len(data)},
            "layers": []}).encode()
        tag = f"v{_attempt}"
        r = httpx.put(f"{private.url}/v2/team/app/manifests/{tag}", content=manifest,
                      headers={**CLOSE, "Content-Type": OCI_MANIFEST}, timeout=30)
        assert r.status_code == 201, r.text
        for _ in range(6):
            got = httpx.get(f"{private.url}/v2/team/app/manifests/{tag}", timeout=30,
                            headers={**CLOSE, "Accept": OCI_MANIFEST})
            assert got.status_code == 200 and got.content == manifest
            listed = httpx.get(f"{private.url}/v2/team/app/tags/list", headers=CLOSE,
                               timeout=30)
            assert tag in listed.json()["tags"]
        if len(workers_of(private, "PATCH", seen)) == 2 and \
                len(workers_of(private, "GET", seen, "manifests")) == 2:
            return
    pytest.fail("the requests never reached both workers in 5 uploads")


def slowly(body: bytes):
    for i in range(0, len(body), 64 * 1024):
        yield body[i:i + 64 * 1024]
        time.sleep(0.1)


def two_patches_at_once(mirror, location: str,
                        bodies: list[bytes]) -> list[tuple[bytes, httpx.Response]]:
    """The same first chunk (different bytes) PATCHed twice at once, each slowly."""
    answers: list[tuple[bytes, httpx.Response]] = []
    go = threading.Barrier(2)

    def patch(body: bytes) -> None:
        go.wait()
        answers.append((body, httpx.patch(
            f"{mirror.url}{location}", content=slowly(body), timeout=60,
            headers={**CLOSE, "Content-Type": "application/octet-stream",
                     "Content-Range": f"0-{len(body) - 1}"})))
    threads = [threading.Thread(target=patch, args=(body,)) for body in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_two_workers_never_write_one_session_at_once(private):
    """Two PATCHes of the same first chunk, sent at once and slowly: one is written,
    the other finds the upload moved on (416) once the first is done."""
    for _attempt in range(6):
        seen = len(private.log_text())
        location = start_upload(private, "team/race")
        bodies = [os.urandom(512 * 1024), os.urandom(512 * 1024)]
        answers = two_patches_at_once(private, location, bodies)
        assert sorted(a.status_code for _, a in answers) == [202, 416], \
            [a.text for _, a in answers]
        winner = next(body for body, a in answers if a.status_code == 202)
        digest = "sha256:" + hashlib.sha256(winner).hexdigest()
        r = httpx.put(f"{private.url}{location}", params={"digest": digest}, headers=CLOSE,
                      timeout=30)
        assert r.status_code == 201, r.text
        if len(workers_of(private, "PATCH", seen)) == 2:
            return
    pytest.fail("the two PATCHes never reached both workers in 6 tries")
