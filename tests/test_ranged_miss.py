"""A response is complete only when every byte in it is verified.

A download holds back a blob's last byte until the blob hashes right, so a whole
blob from a download in progress can only end complete if it was right. A range
that ends before the blob does has no such byte: on a miss it waits for the
verified blob, and wrong upstream bytes give an error, never a complete-looking 206.
"""

from __future__ import annotations

import httpx

from tests.test_faults import config_for


def test_a_ranged_miss_is_answered_only_from_the_verified_blob(make_mirror, faulty_upstream,
                                                               image_set):
    image = image_set.big
    blob = image.largest_blob
    mirror = make_mirror(config_for(faulty_upstream.url))
    url = f"{mirror.url}/v2/{image.repo}/blobs/{blob.digest}"
    fault = faulty_upstream.arm("corrupt", path_contains=blob.digest, method="GET",
                                offset=blob.size // 2)         # far past the range asked for
    try:
        resp = httpx.get(url, headers={"Range": "bytes=0-9"}, timeout=60)
        answer = (resp.status_code, resp.content)
    except httpx.HTTPError as exc:       # an aborted connection is honest too
        answer = (None, exc)
    assert fault.hits == 1
    assert answer[0] != 206, "bytes of a blob that failed verification answered as complete"
    assert answer[0] == 502 and b"DIGEST_INVALID" in answer[1], answer
    assert not mirror.is_cached(blob.digest)

    faulty_upstream.clear()
    data = blob.path.read_bytes()
    for _ in ("miss", "hit"):
        resp = httpx.get(url, headers={"Range": "bytes=0-9"}, timeout=60)
        assert resp.status_code == 206
        assert resp.headers["content-range"] == f"bytes 0-9/{blob.size}"
        assert resp.content == data[:10]
        assert mirror.is_cached(blob.digest)
    resp = httpx.get(url, headers={"Range": "bytes=-10"}, timeout=60)
    assert resp.status_code == 206 and resp.content == data[-10:]
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 2
