"""S3Store (mirror/storage/s3.py) against a real moto server over a socket: blobs are
streamed up as multipart uploads, become visible only once verified, leave nothing
behind when wrong or aborted, read back byte-exact with Range, and presign."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import httpx
import pytest

from mirror.config import S3Config
from mirror.errors import BlobUnknown, CacheUnavailable, DigestInvalid
from mirror.storage.s3 import S3Store
from tests.support.ports import free_port
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, moto, s3_bucket  # noqa: F401

MiB = 1 << 20
PART = 5 * MiB


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_store(moto, bucket, prefix="mirror/", **config) -> S3Store:  # noqa: F811
    config.setdefault("access_key", ACCESS_KEY)
    config.setdefault("secret_key", SECRET_KEY)
    return S3Store(S3Config(bucket=bucket, endpoint=moto.url, region=REGION, prefix=prefix,
                            **config), part_size=PART)


def objects(moto, bucket) -> dict[str, dict]:  # noqa: F811
    listing = moto.inspect().list_objects_v2(Bucket=bucket)
    return {item["Key"]: item for item in listing.get("Contents", [])}


def uploads(moto, bucket) -> list[dict]:  # noqa: F811
    return moto.inspect().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


async def feed(writer, data: bytes, chunk: int = MiB) -> None:
    for offset in range(0, len(data), chunk):
        await writer.write(data[offset:offset + chunk])


async def read_all(store, digest, start=0, end=None) -> bytes:
    return b"".join([chunk async for chunk in store.read(digest, start, end)])


def test_round_trip_of_a_multipart_blob_with_ranges(moto, s3_bucket):  # noqa: F811
    data = os.urandom(20 * MiB + 12345)
    digest = digest_of(data)
    store = make_store(moto, s3_bucket)

    async def go():
        writer = await store.writer(digest)
        await feed(writer, data)
        # every byte is up, none of it visible: an upload in progress, no object
        assert objects(moto, s3_bucket) == {}
        assert len(uploads(moto, s3_bucket)) == 1
        assert await store.exists(digest) is None
        assert await writer.commit() == len(data)
        assert await store.exists(digest) == len(data)
        assert await read_all(store, digest) == data
        for start, end in [(0, 1), (PART - 1, PART + 1), (3, 11 * MiB), (len(data) - 1, None),
                           (17 * MiB, None), (7, 7)]:
            stop = len(data) if end is None else end
            assert await read_all(store, digest, start, end) == data[start:stop], (start, end)

    asyncio.run(go())
    hexpart = digest.split(":")[1]
    listing = objects(moto, s3_bucket)
    assert list(listing) == [f"mirror/blobs/sha256/{hexpart[:2]}/{hexpart}"]
    # a multipart ETag ("<md5 of md5s>-<parts>"): the blob was streamed in parts
    assert listing[f"mirror/blobs/sha256/{hexpart[:2]}/{hexpart}"]["ETag"].endswith('-5"')
    assert uploads(moto, s3_bucket) == []


def test_small_blob_is_one_put(moto, s3_bucket):  # noqa: F811
    data = os.urandom(1000)
    digest = digest_of(data)
    store = make_store(moto, s3_bucket, prefix="")

    async def go():
        writer = await store.writer(digest)
        await feed(writer, data, chunk=300)
        assert objects(moto, s3_bucket) == {}
        assert await writer.commit() == 1000
        assert await read_all(store, digest) == data
        assert await read_all(store, digest, 10, 20) == data[10:20]
        assert await store.exists(digest) == 1000

    asyncio.run(go())
    assert list(objects(moto, s3_bucket)) == [store.key(digest)]
    assert store.key(digest).startswith("blobs/sha256/")


@pytest.mark.parametrize("size", [12 * MiB, 2000])
def test_wrong_digest_commits_nothing(moto, s3_bucket, size):  # noqa: F811
    data = os.urandom(size)
    claimed = digest_of(b"something else")
    store = make_store(moto, s3_bucket)

    async def go():
        writer = await store.writer(claimed)
        await feed(writer, data)
        with pytest.raises(DigestInvalid):
            await writer.commit()
        assert await store.exists(claimed) is None

    asyncio.run(go())
    assert objects(moto, s3_bucket) == {}
    assert uploads(moto, s3_bucket) == []


def test_abort_leaves_nothing(moto, s3_bucket):  # noqa: F811
    data = os.urandom(12 * MiB)
    store = make_store(moto, s3_bucket)

    async def go():
        writer = await store.writer(digest_of(data))
        await feed(writer, data)
        assert len(uploads(moto, s3_bucket)) == 1
        await writer.abort()
        await writer.abort()                 # twice is harmless
        small = await store.writer(digest_of(b"x"))
        await small.write(b"x")
        await small.abort()

    asyncio.run(go())
    assert objects(moto, s3_bucket) == {}
    assert uploads(moto, s3_bucket) == []


@pytest.mark.parametrize("size", [11 * MiB, 3000])
def test_two_writers_of_one_digest_both_succeed(moto, s3_bucket, size):  # noqa: F811
    data = os.urandom(size)
    digest = digest_of(data)
    store = make_store(moto, s3_bucket)

    async def go():
        first, second = await store.writer(digest), await store.writer(digest)
        for offset in range(0, size, MiB):   # interleaved, as two fills would be
            await first.write(data[offset:offset + MiB])
            await second.write(data[offset:offset + MiB])
        assert await asyncio.gather(first.commit(), second.commit()) == [size, size]
        assert await read_all(store, digest) == data

    asyncio.run(go())
    assert list(objects(moto, s3_bucket)) == [store.key(digest)]
    assert uploads(moto, s3_bucket) == []


def test_small_commit_is_create_only(moto, s3_bucket):  # noqa: F811
    """The single PUT carries If-None-Match: * and leaves what is there alone (here a
    stand-in planted under the key, so that the two can be told apart)."""
    data = b"the blob"
    digest = digest_of(data)
    store = make_store(moto, s3_bucket)
    moto.inspect().put_object(Bucket=s3_bucket, Key=store.key(digest), Body=b"planted")

    async def go():
        writer = await store.writer(digest)
        await writer.write(data)
        assert await writer.commit() == len(data)

    asyncio.run(go())
    body = moto.inspect().get_object(Bucket=s3_bucket, Key=store.key(digest))["Body"].read()
    assert body == b"planted"


def test_missing_blob_and_delete(moto, s3_bucket):  # noqa: F811
    data = os.urandom(100)
    digest = digest_of(data)
    store = make_store(moto, s3_bucket)

    async def go():
        assert await store.exists(digest) is None
        with pytest.raises(BlobUnknown):
            await read_all(store, digest)
        await store.delete(digest)           # not there: not an error
        writer = await store.writer(digest)
        await writer.write(data)
        await writer.commit()
        await store.delete(digest)
        assert await store.exists(digest) is None

    asyncio.run(go())
    assert objects(moto, s3_bucket) == {}


def test_presigned_url_fetched_with_plain_httpx(moto, s3_bucket):  # noqa: F811
    data = os.urandom(6 * MiB + 1)
    digest = digest_of(data)
    store = make_store(moto, s3_bucket, redirect=True)

    async def go():
        writer = await store.writer(digest)
        await feed(writer, data)
        await writer.commit()
        return await store.presign(digest, 60)

    url = asyncio.run(go())
    assert url.startswith(f"{moto.url}/{s3_bucket}/mirror/blobs/sha256/")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    ranged = httpx.get(url, headers={"Range": "bytes=5-9"})
    assert ranged.status_code == 206 and ranged.content == data[5:10]


def test_credentials_from_aws_environment(moto, s3_bucket, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-environment")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-environment")
    data = b"env"
    digest = digest_of(data)
    store = S3Store(S3Config(bucket=s3_bucket, endpoint=moto.url, region=REGION),
                    part_size=PART)

    async def go():
        writer = await store.writer(digest)
        await writer.write(data)
        await writer.commit()
        return await store.presign(digest, 30)

    url = asyncio.run(go())
    assert "X-Amz-Credential=from-the-environment%2F" in url
    assert httpx.get(url).content == data


BAD_DIGESTS = [
    "", "sha256:", "sha256:abc", "sha256:" + "A" * 64, "sha256:" + "g" * 64,
    "md5:" + "a" * 32, "sha256:" + "a" * 64 + "/../x", "../" + "a" * 64,
    "sha256:" + "a" * 63 + "\n", "sha256/" + "a" * 64,
]


def test_bad_digest_refused_before_any_request(moto, s3_bucket):  # noqa: F811
    store = make_store(moto, s3_bucket)

    def requests_seen() -> int:
        time.sleep(0.2)                      # let moto's access log catch up
        return moto.log_path.read_text(errors="replace").count('HTTP/1.1"')

    async def go():
        for bad in BAD_DIGESTS:
            with pytest.raises(DigestInvalid):
                await store.writer(bad)
            with pytest.raises(DigestInvalid):
                await store.exists(bad)
            with pytest.raises(DigestInvalid):
                await read_all(store, bad)
            with pytest.raises(DigestInvalid):
                await store.delete(bad)
            with pytest.raises(DigestInvalid):
                await store.presign(bad, 60)

    before = requests_seen()
    asyncio.run(go())
    assert requests_seen() == before
    assert objects(moto, s3_bucket) == {}


def test_writer_as_context_manager_aborts_on_error(moto, s3_bucket):  # noqa: F811
    data = os.urandom(12 * MiB)
    store = make_store(moto, s3_bucket)

    async def go():
        with pytest.raises(RuntimeError, match="the upstream broke"):
            async with await store.writer(digest_of(data)) as writer:
                await feed(writer, data[:11 * MiB])
                assert len(uploads(moto, s3_bucket)) == 1
                raise RuntimeError("the upstream broke")
        assert uploads(moto, s3_bucket) == []      # aborted on the way out, not at exit
        assert objects(moto, s3_bucket) == {}
        async with await store.writer(digest_of(data)) as writer:   # committed: kept
            await feed(writer, data)
            await writer.commit()

    asyncio.run(go())
    assert list(objects(moto, s3_bucket)) == [store.key(digest_of(data))]
    assert uploads(moto, s3_bucket) == []


def test_unreachable_store_is_a_503():
    store = S3Store(S3Config(bucket="nowhere", endpoint=f"http://127.0.0.1:{free_port()}",
                             region=REGION, access_key="a", secret_key="b"), part_size=PART)
    digest = digest_of(b"x")

    async def go():
        with pytest.raises(CacheUnavailable):
            await store.exists(digest)
        writer = await store.writer(digest)
        await writer.write(b"x")
        with pytest.raises(CacheUnavailable):
            await writer.commit()

    started = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - started < 60


def test_cancelled_writer_leaves_nothing(moto, s3_bucket):  # noqa: F811
    """A fill cancelled mid-stream (its client gone): the writer's ``async with`` aborts
    the multipart upload on the way out."""
    data = os.urandom(11 * MiB)
    store = make_store(moto, s3_bucket)
    fed = None

    async def fill():
        async with await store.writer(digest_of(data + b"more")) as writer:
            await feed(writer, data)
            fed.set()
            await asyncio.sleep(60)          # waiting for more upstream bytes

    async def go():
        nonlocal fed
        fed = asyncio.Event()
        task = asyncio.create_task(fill())
        await fed.wait()
        assert len(uploads(moto, s3_bucket)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert uploads(moto, s3_bucket) == []

    asyncio.run(go())
    assert objects(moto, s3_bucket) == {}
