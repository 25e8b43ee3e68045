"""What a lazy-pulling client pays for a ranged miss: ``Range: bytes=0-1023`` of a cold blob.

    python bench/range_miss.py [--size-mb 64] [--rounds 3]

Starts Debian's docker-registry as the upstream and pushes one image with a random
layer of --size-mb. Each round starts the mirror on a fresh data dir and measures,
with one httpx client: the first 1 KiB range of the blob (cold: a miss, which waits
for the verified blob), the same range again (warm: from the cache), and a 1 KiB
range of another offset (warm). For scale: the same range from the upstream direct,
and a whole cold GET's time to first byte and total on another fresh data dir.
Reports medians of time to response headers and total, in milliseconds. Exits
non-zero if any range's bytes are wrong.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.client import RegistryClient  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402


def timed(url: str, headers: dict) -> tuple[float, float, bytes]:
    start = time.perf_counter()
    with httpx.stream("GET", url, headers=headers, timeout=300) as resp:
        first = time.perf_counter() - start
        if resp.status_code not in (200, 206):
            raise SystemExit(f"{url}: {resp.status_code} {resp.read()[:200]!r}")
        body = b"".join(resp.iter_raw())
    return first * 1000, (time.perf_counter() - start) * 1000, body


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-range-"))
    rows: dict[str, list[tuple[float, float]]] = {}

    def record(name: str, first: float, total: float) -> None:
        rows.setdefault(name, []).append((first, total))

    try:
        with RegistryProcess(work / "upstream") as upstream:
            with RegistryClient(upstream.url) as client:
                image = push_image(work / "img", client, "bench/lazy", ["latest"],
                                   [args.size_mb * 1024 * 1024], seed=7)
            blob = image.largest_blob
            data = blob.path.read_bytes()
            path = f"/v2/{image.repo}/blobs/{blob.digest}"
            config = {"upstreams": {"docker.io": {"url": upstream.url}}, "log_level": "warning",
                      "access_log": False}
            head = {"Range": "bytes=0-1023"}
            middle = {"Range": f"bytes={len(data) // 2}-{len(data) // 2 + 1023}"}
            for _ in range(args.rounds):
                first, total, body = timed(upstream.url + path, head)
                assert body == data[:1024], "upstream direct"
                record("upstream direct, bytes=0-1023", first, total)
                mdir = work / "mirror"
                shutil.rmtree(mdir, ignore_errors=True)
                with MirrorProcess(mdir, config) as mirror:
                    for name, headers, want in (
                            ("mirror cold (miss), bytes=0-1023", head, data[:1024]),
                            ("mirror warm, bytes=0-1023", head, data[:1024]),
                            ("mirror warm, 1 KiB mid-blob", middle,
                             data[len(data) // 2:len(data) // 2 + 1024])):
                        first, total, body = timed(mirror.url + path, headers)
                        if body != want:
                            raise SystemExit(f"WRONG BYTES: {name}")
                        record(name, first, total)
                shutil.rmtree(mdir, ignore_errors=True)
                with MirrorProcess(mdir, config) as mirror:
                    first, total, body = timed(mirror.url + path, {})
                    if body != data:
                        raise SystemExit("WRONG BYTES: whole blob")
                    record("mirror cold (miss), whole blob", first, total)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.size_mb} MiB blob, medians of {args.rounds} rounds (ms)")
    print(f"{'request':40} {'headers':>9} {'total':>9}")
    for name, values in rows.items():
        print(f"{name:40} {statistics.median(v[0] for v in values):9.1f} "
              f"{statistics.median(v[1] for v in values):9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
