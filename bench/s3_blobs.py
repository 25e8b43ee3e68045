"""Cold and warm blob GETs through the mirror with its blobs on the file system and on
S3 (moto's server on loopback), one client, one big blob.

    python bench/s3_blobs.py [--size-mb 200] [--rounds 2] [--storage fs,s3]

Starts Debian's docker-registry as the upstream and pushes one image with a random
layer of --size-mb; then per round and per storage, a fresh mirror (fresh data dir,
fresh bucket): one cold GET (upstream fetch + hash + temp file + the tee to S3 +
commit + serve) and two warm GETs (sendfile from the file, or a streamed ranged GET
from the bucket). Reports MB/s and the mirror's CPU seconds per GB (utime+stime of
its process from /proc; moto's own CPU is not counted: it is the store, not the
mirror). Exits non-zero if any response's bytes do not hash to the digest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.blobs import cpu_seconds, fetch  # noqa: E402
from tests.support.client import RegistryClient  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402
from tests.support.s3 import s3_storage, session_moto  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--storage", default="fs,s3")
    args = parser.parse_args()
    kinds = args.storage.split(",")
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-s3-"))
    rows: dict[str, list[tuple[float, float]]] = {}
    try:
        with RegistryProcess(work / "upstream") as upstream:
            with RegistryClient(upstream.url) as client:
                image = push_image(work / "img", client, "bench/big", ["latest"],
                                   [args.size_mb * 1024 * 1024], seed=42)
            blob = image.largest_blob
            path = f"/v2/{image.repo}/blobs/{blob.digest}"
            for _ in range(args.rounds):
                for kind in kinds:
                    config = {"upstreams": {"docker.io": {"url": upstream.url}},
                              "log_level": "warning"}
                    if kind == "s3":
                        config["storage"] = s3_storage(session_moto())
                    mdir = work / f"mirror-{kind}"
                    shutil.rmtree(mdir, ignore_errors=True)
                    with MirrorProcess(mdir, config) as mirror:
                        for label in ("cold", "warm", "warm"):
                            cpu0 = cpu_seconds(mirror.proc.pid)
                            n, t = fetch(mirror.url + path, blob.digest)
                            cpu = cpu_seconds(mirror.proc.pid) - cpu0
                            rows.setdefault(f"{kind} {label}", []).append(
                                (n / t / 1e6, cpu / (n / 1e9)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"blob {args.size_mb} MiB, {args.rounds} rounds, {os.cpu_count()} cores")
    print(f"{'':10} {'MB/s (median)':>14} {'MB/s (best)':>12} {'mirror CPU-s/GB (median)':>25}")
    for label, values in rows.items():
        speeds = sorted(v[0] for v in values)
        cpus = sorted(v[1] for v in values)
        print(f"{label:10} {speeds[len(speeds) // 2]:14.0f} {speeds[-1]:12.0f} "
              f"{cpus[len(cpus) // 2]:25.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
