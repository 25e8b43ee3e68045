"""Which S3 client for mirror/storage/s3.py: obstore against aiobotocore, measured.

Uploads ``--mb`` MB (default 200) as a streamed multipart upload (8 MiB parts, fed
in 1 MiB chunks as a fill would) and downloads it back streamed, against moto's
server on loopback (started here unless ``--endpoint`` is given). Prints wall MB/s
and the client process's CPU seconds per GB (user + system of this process, every
thread included, so obstore's Rust runtime is counted) for each direction.

moto is a Python server: its own CPU bounds the MB/s, so the MB/s column compares
little; the CPU-s/GB column is what the client costs the mirror.

Usage: python3 bench/s3_client.py --client obstore|aiobotocore [--mb 200]
       [--endpoint http://127.0.0.1:PORT]
(aiobotocore pins its own botocore: run that half from a venv that has it.)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import socket
import subprocess
import sys
import time

import httpx

CHUNK = 1 << 20
PART = 8 << 20
BUCKET = "bench"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    httpx.put(f"{url}/{BUCKET}")
    return proc, url


async def chunks(total: int):
    block = os.urandom(CHUNK)
    for _ in range(total // CHUNK):
        yield block


async def run_obstore(endpoint: str, total: int) -> tuple[float, float, float, float]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, region="us-east-1",
                    access_key_id="bench", secret_access_key="bench",
                    client_options={"allow_http": True})
    t0, c0 = time.monotonic(), cpu()
    await obstore.put_async(store, "blob", chunks(total), chunk_size=PART)
    t1, c1 = time.monotonic(), cpu()
    got = 0
    result = await obstore.get_async(store, "blob")
    async for piece in result.stream(min_chunk_size=CHUNK):
        got += len(piece)
    t2, c2 = time.monotonic(), cpu()
    assert got == total, got
    return t1 - t0, c1 - c0, t2 - t1, c2 - c1


async def run_aiobotocore(endpoint: str, total: int) -> tuple[float, float, float, float]:
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                     aws_access_key_id="bench",
                                     aws_secret_access_key="bench") as s3:
        t0, c0 = time.monotonic(), cpu()
        upload = await s3.create_multipart_upload(Bucket=BUCKET, Key="blob")
        parts, buf, number = [], bytearray(), 1
        async for chunk in chunks(total):
            buf += chunk
            if len(buf) >= PART:
                r = await s3.upload_part(Bucket=BUCKET, Key="blob", PartNumber=number,
                                         UploadId=upload["UploadId"], Body=bytes(buf))
                parts.append({"PartNumber": number, "ETag": r["ETag"]})
                number, buf = number + 1, bytearray()
        if buf:
            r = await s3.upload_part(Bucket=BUCKET, Key="blob", PartNumber=number,
                                     UploadId=upload["UploadId"], Body=bytes(buf))
            parts.append({"PartNumber": number, "ETag": r["ETag"]})
        await s3.complete_multipart_upload(Bucket=BUCKET, Key="blob",
                                           UploadId=upload["UploadId"],
                                           MultipartUpload={"Parts": parts})
        t1, c1 = time.monotonic(), cpu()
        got = 0
        response = await s3.get_object(Bucket=BUCKET, Key="blob")
        async with response["Body"] as body:
            async for piece in body.iter_chunks(CHUNK):
                got += len(piece)
        t2, c2 = time.monotonic(), cpu()
    assert got == total, got
    return t1 - t0, c1 - c0, t2 - t1, c2 - c1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=["obstore", "aiobotocore"], required=True)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--endpoint")
    args = parser.parse_args()
    proc = None
    endpoint = args.endpoint
    if endpoint is None:
        proc, endpoint = start_moto()
    total = args.mb * CHUNK
    hashlib.sha256()   # warm imports out of the timing
    try:
        run = run_obstore if args.client == "obstore" else run_aiobotocore
        up_s, up_cpu, down_s, down_cpu = asyncio.run(run(endpoint, total))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    gb = total / 1e9
    print(f"{args.client}: upload {total / 1e6 / up_s:.0f} MB/s, {up_cpu / gb:.2f} CPU-s/GB; "
          f"download {total / 1e6 / down_s:.0f} MB/s, {down_cpu / gb:.2f} CPU-s/GB "
          f"({args.mb} MB, moto server on loopback)")


if __name__ == "__main__":
    main()
