"""Throughput of the air-gap round trip: ``mirror warm``, ``export`` and ``import``.

    python bench/airgap.py [--size-mb 1024] [--images 4]

Pushes ``--images`` images with ``--size-mb`` of layers between them (each image: one
config, a layer of a quarter of its share and one of the rest) to a real upstream
(Debian's docker-registry) on 127.0.0.1, then times, each as its own process:

  warm     mirror A (no server running) fetches every image from the upstream
  export   mirror A writes them all to one bundle (--all)
  import   mirror B (fresh data directory) reads the bundle

and prints, per step, wall seconds, MB/s (the layers' bytes over wall time), CPU
seconds per GB (user + system of the command, from wait4) and the peak RSS of the
command's process. Afterwards every layer in B is hashed against its digest; the
script exits 1 on a mismatch or a failed step.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.client import RegistryClient  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402

MB = 1_000_000


def timed(args: list[str]) -> tuple[float, float, int]:
    """(wall s, cpu s, peak RSS bytes) of ``python -m mirror ARGS`` run to the end."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mirror", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mirror {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{err.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-airgap-"))
    share = args.size_mb * 1024 * 1024 // args.images
    with RegistryProcess(work / "upstream") as upstream:
        images = []
        with RegistryClient(upstream.url) as client:
            for i in range(args.images):
                images.append(push_image(work / f"img{i}", client, f"bench/app{i}", ["1"],
                                         [share // 4, share - share // 4], seed=100 + 10 * i))
        layers = {b.digest: b.size for img in images for b in img.blobs}
        total = sum(layers.values())
        config = {"upstreams": {"docker.io": {"url": upstream.url}}, "log_level": "warning"}
        a = MirrorProcess(work / "a", config)
        b = MirrorProcess(work / "b", {**config, "offline": True})
        bundle = work / "bundle.tar"
        refs = [f"{img.repo}:1" for img in images]
        steps = {
            "warm": ["warm", "--config", str(a.config_path), "--progress", "none", *refs],
            "export": ["export", "--config", str(a.config_path), "-o", str(bundle), "--all",
                       "--progress", "none"],
            "import": ["import", "--config", str(b.config_path), str(bundle),
                       "--progress", "none"],
        }
        print(f"{len(images)} images, {len(layers)} blobs, {total / MB:.0f} MB; "
              f"2 vCPU, everything on 127.0.0.1\n")
        print("| step | wall s | MB/s | CPU-s/GB | peak RSS MB |\n|---|---|---|---|---|")
        for name, argv in steps.items():
            wall, cpu, rss = timed(argv)
            print(f"| {name} | {wall:.1f} | {total / MB / wall:.0f} | "
                  f"{cpu / (total / 1e9):.1f} | {rss / MB:.0f} |", flush=True)
        bad = [d for d in layers if sha256_file(b.cached_path(d)) != d]
    if bad:
        print(f"wrong bytes in mirror B: {bad}", file=sys.stderr)
        return 1
    print(f"\nevery blob in mirror B matches its digest; work dir {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
