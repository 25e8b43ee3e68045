"""Cold and warm blob GET throughput through the mirror, against the upstream direct.

    python bench/blobs.py [--size-mb 300] [--rounds 3]

Starts Debian's docker-registry as the upstream and the mirror, both on 127.0.0.1,
pushes one image with a random layer of --size-mb, then measures (one client,
httpx streaming, bytes hashed and discarded): the upstream direct, the mirror cold
(a fresh data dir per round: upstream fetch + verify + write + serve) and the
mirror warm (served from the cache). Reports MB/s and the mirror's CPU seconds
per GB served (utime+stime from /proc), the steadier figure on a shared machine.
Then 1 and 16 concurrent cold clients of the blob on a fresh cache: wall time and
upstream GETs of it (from the upstream's access log; must be exactly 1).
Exits non-zero if any response's bytes do not hash to the digest.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.client import RegistryClient  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetch(url: str, digest: str) -> tuple[int, float]:
    h = hashlib.sha256()
    n = 0
    start = time.perf_counter()
    with httpx.stream("GET", url, timeout=300) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_raw(1024 * 1024):
            h.update(chunk)
            n += len(chunk)
    elapsed = time.perf_counter() - start
    if f"sha256:{h.hexdigest()}" != digest:
        raise SystemExit(f"WRONG BYTES from {url}")
    return n, elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    concurrent: dict[int, list[tuple[float, int]]] = {1: [], 16: []}
    rows: dict[str, list[tuple[float, float | None]]] = {"upstream direct": [], "mirror cold": [],
                                                          "mirror warm": []}
    try:
        with RegistryProcess(work / "upstream") as upstream:
            with RegistryClient(upstream.url) as client:
                image = push_image(work / "img", client, "bench/big", ["latest"],
                                   [args.size_mb * 1024 * 1024], seed=42)
            blob = image.largest_blob
            path = f"/v2/{image.repo}/blobs/{blob.digest}"
            config = {"upstreams": {"docker.io": {"url": upstream.url}}, "log_level": "warning"}
            for _ in range(args.rounds):
                # 16 concurrent cold clients against one cold client, fresh cache each.
                for clients in (1, 16):
                    mdir = work / "mirror-concurrent"
                    shutil.rmtree(mdir, ignore_errors=True)
                    with MirrorProcess(mdir, config) as mirror:
                        mark = upstream.mark()
                        start = time.perf_counter()
                        with ThreadPoolExecutor(clients) as pool:
                            list(pool.map(lambda _: fetch(mirror.url + path, blob.digest),
                                          range(clients)))
                        wall = time.perf_counter() - start
                        gets = upstream.count("GET", f"/blobs/{blob.digest}", since=mark)
                        concurrent[clients].append((wall, gets))
                n, t = fetch(upstream.url + path, blob.digest)
                rows["upstream direct"].append((n / t / 1e6, None))
                mdir = work / "mirror"
                shutil.rmtree(mdir, ignore_errors=True)
                with MirrorProcess(mdir, config) as mirror:
                    for label in ("mirror cold", "mirror warm", "mirror warm"):
                        cpu0 = cpu_seconds(mirror.proc.pid)
                        n, t = fetch(mirror.url + path, blob.digest)
                        cpu = cpu_seconds(mirror.proc.pid) - cpu0
                        rows[label].append((n / t / 1e6, cpu / (n / 1e9)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"blob {args.size_mb} MiB, {args.rounds} rounds, {os.cpu_count()} cores")
    print(f"{'':18} {'MB/s (median)':>14} {'MB/s (best)':>12} {'mirror CPU-s/GB':>16}")
    for label, values in rows.items():
        speeds = sorted(v[0] for v in values)
        cpus = sorted(v[1] for v in values if v[1] is not None)
        cpu = f"{cpus[len(cpus) // 2]:.2f}" if cpus else "-"
        print(f"{label:18} {speeds[len(speeds) // 2]:14.0f} {speeds[-1]:12.0f} {cpu:>16}")
    print()
    print(f"{'cold clients':18} {'wall s (median)':>15} {'upstream GETs of the blob':>26}")
    for clients, values in concurrent.items():
        walls = sorted(w for w, _ in values)
        gets = sorted({g for _, g in values})
        print(f"{clients:<18} {walls[len(walls) // 2]:15.2f} {','.join(map(str, gets)):>26}")
    if any(g != 1 for values in concurrent.values() for _, g in values):
        print("FAIL: a cold blob was fetched from upstream more than once")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
