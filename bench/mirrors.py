"""Cold blob throughput through the mirror: a slow source of truth vs a fast accelerator.

    python bench/mirrors.py [--size-mb 128] [--rounds 2] [--truth-mb-s 10]

Starts two of Debian's docker-registry, the source of truth and an accelerator, and
pushes the same image (one random layer of --size-mb) to both. The truth sits behind
the fault-injecting proxy (tests/support/faulty.py) dripping blob bodies at about
--truth-mb-s MB/s (``drip``: 256 KiB pieces, a pause between them), as a far-away
Docker Hub would. Each round starts the mirror on a fresh data dir and GETs the layer
cold through it, for three set-ups:

- ``truth only``: ``url`` is the slow truth, no mirrors;
- ``accelerator + truth``: the accelerator as a ``mirrors:`` entry (``[pull]``);
- ``accelerator dies half-way``: the same, the accelerator's body reset at 50 %: the
  fill resumes on the truth with ``Range`` (the second half at the truth's speed).

Prints the median MB/s of each (size / time of the whole GET). Exits non-zero if a
body's sha256 is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.client import RegistryClient  # noqa: E402
from tests.support.faulty import FaultyUpstream  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402

PIECE = 256 * 1024


def cold_get(mirror: MirrorProcess, repo: str, digest: str) -> float:
    h = hashlib.sha256()
    start = time.perf_counter()
    with httpx.stream("GET", f"{mirror.url}/v2/{repo}/blobs/{digest}", timeout=600) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"GET {digest}: {resp.status_code} {resp.read()[:200]!r}")
        for chunk in resp.iter_raw():
            h.update(chunk)
    elapsed = time.perf_counter() - start
    if f"sha256:{h.hexdigest()}" != digest:
        raise SystemExit(f"wrong bytes for {digest}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--truth-mb-s", type=float, default=10.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-mirrors-"))
    size = args.size_mb * 1024 * 1024
    results: dict[str, list[float]] = {}
    try:
        with RegistryProcess(work / "truth") as truth, \
                RegistryProcess(work / "accelerator") as accelerator:
            for n, registry in enumerate((truth, accelerator)):
                with RegistryClient(registry.url) as client:
                    image = push_image(work / f"img{n}", client, "bench/big", ["latest"],
                                       [size], seed=11)
            blob = image.largest_blob
            with FaultyUpstream(truth.url) as slow_truth, \
                    FaultyUpstream(accelerator.url) as acc:
                slow_truth.arm("drip", path_contains="/blobs/", method="GET", times=None,
                               chunk=PIECE, delay=PIECE / (args.truth_mb_s * 1e6))
                mirrors = [{"url": acc.url, "capabilities": ["pull"]}]
                setups = [("truth only", [], False),
                          ("accelerator + truth", mirrors, False),
                          ("accelerator dies half-way", mirrors, True)]
                runs = 0
                for rnd in range(args.rounds):
                    for name, mirror_list, dies in setups:
                        acc.clear()
                        if dies:
                            acc.arm("reset", path_contains=blob.digest, method="GET",
                                    after=size // 2)
                        config = {"upstreams": {"docker.io": {
                            "url": slow_truth.url, "mirrors": mirror_list}},
                            "default": "docker.io"}
                        runs += 1
                        with MirrorProcess(work / f"mirror{runs}", config) as mirror:
                            seconds = cold_get(mirror, image.repo, blob.digest)
                        results.setdefault(name, []).append(size / seconds / 1e6)
                        print(f"round {rnd + 1}: {name}: {size / seconds / 1e6:.1f} MB/s "
                              f"({seconds:.2f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ncold GET of a {args.size_mb} MiB layer through the mirror, truth dripped to "
          f"~{args.truth_mb_s:g} MB/s, median of {args.rounds}:")
    for name, speeds in results.items():
        print(f"  {name:28} {statistics.median(speeds):8.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
