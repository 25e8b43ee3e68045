"""The web page at 100,000 repositories: how long its pages take, and the event loop's
longest stall meanwhile.

    python bench/web.py [--repositories 100000] [--blobs 500000] [--work DIR]

Builds (with bench/scale.py's builder, reused from ``--work``) a data directory whose
index holds ``--repositories`` repositories of one tagged OCI image each, their
manifests naming ``blobs / repositories`` blobs each, every one linked to its
repository. Then ``python -m mirror serve`` runs on it (one process; its upstream a
closed port) and the script times, each on a new connection:

  list, first       /ui/repositories when no snapshot is kept: the aggregate is read
  list              the same, the snapshot kept (median of 20)
  search            ?q=app1234 (median of 20)
  sort by size      ?sort=size&order=desc (median of 20)
  last page         ?page=<last> by name (median of 20)
  overview          /ui/ (median of 20)
  repository        /ui/r/docker.io/library/app<n> (median of 20)
  image             its manifest's page (median of 20)
  list, expired     /ui/repositories again after the snapshot's lifetime (first read)

with the longest stall of the event loop seen from outside during each step (a
thread GETs /healthz every 10 ms, as in bench/scale.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scale  # noqa: E402
from mirror.catalog import PAGE_SIZE, SNAPSHOT_TTL  # noqa: E402
from tests.support.ports import free_port, stop_process  # noqa: E402


def timed_get(port: int, path: str) -> float:
    t = time.perf_counter()
    status = scale.get(port, path)
    if status != 200:
        raise SystemExit(f"GET {path}: {status}")
    return time.perf_counter() - t


def median(port: int, path: str, n: int = 20) -> float:
    return statistics.median(timed_get(port, path) for _ in range(n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repositories", type=int, default=100_000)
    parser.add_argument("--blobs", type=int, default=500_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-web"))
    args = parser.parse_args()
    scale.PER_REPO = 1                         # one image (and tag) per repository
    data_dir = args.work / f"data-{args.repositories}-{args.blobs}"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "index.db").exists():
        scale.build(data_dir, args.blobs, args.repositories, args.repositories)
    n = args.repositories
    blobs = [(d, len(data)) for d, data in map(scale.blob, range(args.blobs))]
    digest = scale.manifest(n // 2, max(2, args.blobs // n), blobs)[0]
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "data_dir": str(data_dir), "log_level": "warning",
              "upstreams": {scale.UPSTREAM: {"url": f"http://127.0.0.1:{free_port()}"}},
              "workers": 1, "max_size": "100GiB"}
    config_path = args.work / "web.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = open(args.work / "web.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config",
                             str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        scale.wait_ready(proc, port, args.work / "web.log")
        probe = scale.Probe(port)
        probe.start()
        time.sleep(0.2)
        repo = scale.repository(n // 2)
        last = -(-n // PAGE_SIZE)
        steps = {
            "list, first (reads the aggregate) ms": lambda: timed_get(port, "/ui/repositories"),
            "list ms (median)": lambda: median(port, "/ui/repositories"),
            "search ?q=app1234 ms (median)": lambda: median(port, "/ui/repositories?q=app1234"),
            "sort by size ms (median)": lambda: median(
                port, "/ui/repositories?sort=size&order=desc"),
            f"last page (?page={last}) ms (median)": lambda: median(
                port, f"/ui/repositories?page={last}"),
            "overview ms (median)": lambda: median(port, "/ui/"),
            "repository ms (median)": lambda: median(port, f"/ui/r/{scale.UPSTREAM}/{repo}"),
            "image ms (median)": lambda: median(port, f"/ui/r/{scale.UPSTREAM}/{repo}@{digest}"),
            "list, snapshot expired ms": lambda: (time.sleep(SNAPSHOT_TTL + 0.5),
                                                  timed_get(port, "/ui/repositories"))[1],
        }
        print(f"{n} repositories, {args.blobs} blobs")
        print(f"{'step':<42}{'value':>10}{'longest stall ms':>20}")
        for name, step in steps.items():
            t = time.perf_counter()
            value = step()
            time.sleep(0.05)
            stall = probe.longest_gap(t, time.perf_counter())
            print(f"{name:<42}{value * 1000:>10.1f}{stall * 1000:>20.1f}", flush=True)
        probe.running = False
        probe.join()
    finally:
        stop_process(proc)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
