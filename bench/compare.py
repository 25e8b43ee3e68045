"""The mirror against the reference pull-through cache, side by side, in one run.

    scripts/bench            (installs wrk and curl if missing, then runs this)
    python bench/compare.py [--size-mb 300] [--rounds 3] [--seconds 5]

Starts a real upstream (Debian's docker-registry), pushes an image with one
--size-mb layer, and measures the mirror and docker-registry in proxy mode
(`proxy.remoteurl` pointing at the same upstream; distribution 2.8, Go) on:

  1. warm blob GET throughput, 1 client (curl)
  2. warm blob GET aggregate throughput, 16 concurrent clients (curl)
  3. warm manifest GET by tag, requests/s with 32 keep-alive connections (wrk)
  4. cold blob GET throughput, 1 client, against the same blob straight from upstream
  5. 16 concurrent cold clients of the blob, fresh caches: wall time, and upstream
     GETs of the blob (from the upstream's access log)
  6. peak RSS of the server process during rows 2 and 5

Clients write to /dev/null while timed; afterwards every server's answer is fetched
once more and hashed, and the mirror's cached file is hashed on disk. The script
exits 1 if the mirror ever served or kept wrong bytes, or fetched the blob from
upstream more than once in row 5. Everything listens on 127.0.0.1; every loop is
bounded in time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.client import MANIFEST_ACCEPT, RegistryClient  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402


def curl(url: str) -> tuple[int, float]:
    out = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                          "--max-time", "300", url], capture_output=True, text=True, check=True)
    size, seconds = out.stdout.split()
    return int(size), float(seconds)


def sha256_of(url: str) -> str:
    h = hashlib.sha256()
    with subprocess.Popen(["curl", "-sf", "--max-time", "300", url], stdout=subprocess.PIPE) as p:
        for chunk in iter(lambda: p.stdout.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


class PeakRss:
    """Samples a process's RSS every 20 ms while in the with-block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _rss(self) -> int:
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def parallel(n: int, fn) -> tuple[float, list]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: fn(), range(n)))
    return time.perf_counter() - start, results


def wrk(url: str, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", "-H", f"Accept: {MANIFEST_ACCEPT}",
                          url], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            non2xx = [ln for ln in out.splitlines() if "Non-2xx" in ln]
            if non2xx:
                raise SystemExit(f"wrk saw errors from {url}: {non2xx[0]}")
            return float(line.split()[1])
    raise SystemExit(f"no wrk result for {url}:\n{out}")


class Bench:
    def __init__(self, work: Path, args) -> None:
        self.work, self.args = work, args
        self.failures: list[str] = []

    def reference(self, name: str) -> RegistryProcess:
        return RegistryProcess(self.work / name, extra_config={
            "proxy": {"remoteurl": self.upstream.url},
            "log": {"level": "warn", "accesslog": {"disabled": True}}}).start()

    def mirror(self, name: str) -> MirrorProcess:
        return MirrorProcess(self.work / name, {
            "upstreams": {"docker.io": {"url": self.upstream.url}},
            "log_level": "warning"}).start()

    def check(self, label: str, got: str) -> None:
        if got != self.blob.digest:
            self.failures.append(f"{label}: served {got}, expected {self.blob.digest}")

    def run(self) -> dict:
        a, rows = self.args, {}
        with RegistryProcess(self.work / "upstream") as self.upstream:
            with RegistryClient(self.upstream.url) as client:
                image = push_image(self.work / "img", client, "bench/big", ["latest"],
                                   [a.size_mb * 1024 * 1024], seed=42)
            self.blob = image.largest_blob
            path = f"/v2/{image.repo}/blobs/{self.blob.digest}"
            manifest_path = f"/v2/{image.repo}/manifests/latest"
            servers = {"mirror": self.mirror, "reference": self.reference}

            # Rows 4 and 5 first: cold, each on fresh caches.
            for name, make in servers.items():
                for r in range(a.rounds):
                    server = make(f"{name}-cold-{r}")
                    try:
                        size, t = curl(server.url + path)
                        rows.setdefault(("cold 1 client MB/s", name), []).append(size / t / 1e6)
                        self.check(f"{name} cold", sha256_of(server.url + path))
                    finally:
                        server.stop()
                for r in range(a.rounds):
                    server = make(f"{name}-cold16-{r}")
                    try:
                        mark = self.upstream.mark()
                        with PeakRss(server.proc.pid) as rss:
                            wall, _ = parallel(16, lambda s=server: curl(s.url + path))
                        gets = self.upstream.count("GET", f"/blobs/{self.blob.digest}", since=mark)
                        rows.setdefault(("cold 16 clients wall s", name), []).append(wall)
                        rows.setdefault(("cold 16 clients upstream GETs", name), []).append(gets)
                        rows.setdefault(("peak RSS MB, cold 16", name), []).append(rss.peak / 1e6)
                        self.check(f"{name} after cold 16", sha256_of(server.url + path))
                    finally:
                        server.stop()
            for _ in range(a.rounds):
                size, t = curl(self.upstream.url + path)
                rows.setdefault(("cold 1 client MB/s", "upstream direct"), []).append(
                    size / t / 1e6)

            # Rows 1-3: warm, one server of each kind, interleaved.
            warm = {name: make(f"{name}-warm") for name, make in servers.items()}
            try:
                for server in warm.values():
                    curl(server.url + path)                   # fill the cache
                    subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H",
                                    f"Accept: {MANIFEST_ACCEPT}", server.url + manifest_path],
                                   check=True)
                for _ in range(a.rounds):
                    for name, server in warm.items():
                        size, t = curl(server.url + path)
                        rows.setdefault(("warm 1 client MB/s", name), []).append(size / t / 1e6)
                        with PeakRss(server.proc.pid) as rss:
                            wall, sizes = parallel(16, lambda s=server: curl(s.url + path))
                        total = sum(n for n, _ in sizes)
                        rows.setdefault(("warm 16 clients MB/s", name), []).append(
                            total / wall / 1e6)
                        rows.setdefault(("peak RSS MB, warm 16", name), []).append(rss.peak / 1e6)
                for _ in range(a.rounds):
                    for name, server in warm.items():
                        rows.setdefault(("manifest req/s, 32 conns", name), []).append(
                            wrk(server.url + manifest_path, a.seconds))
                mirror = warm["mirror"]
                self.check("mirror warm", sha256_of(mirror.url + path))
                cached = mirror.cached_path(self.blob.digest)
                cached_digest = "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest()
                self.check("mirror cached file", cached_digest)
            finally:
                for server in warm.values():
                    server.stop()
        return {k: median(v) for k, v in rows.items()}


TARGETS = [  # (row, ratio wanted, how the ratio is read)
    ("warm 1 client MB/s", 1.5, "mirror / reference"),
    ("warm 16 clients MB/s", 1.2, "mirror / reference"),
    ("manifest req/s, 32 conns", 20.0, "mirror / reference"),
    ("cold 1 client MB/s", 0.9, "mirror / upstream direct"),
    ("cold 16 clients wall s", 0.7, "mirror / reference (lower is better)"),
    ("cold 16 clients upstream GETs", None, "mirror must be 1"),
    ("peak RSS MB, warm 16", None, "mirror <= 120"),
    ("peak RSS MB, cold 16", None, "mirror <= 120"),
]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:10.1f}"


def report(results: dict, args) -> list[str]:
    missed = []
    print(f"blob {args.size_mb} MiB, {args.rounds} rounds (median), {os.cpu_count()} cores, "
          f"everything on 127.0.0.1")
    print(f"{'row':32} {'mirror':>10} {'reference':>10} {'direct':>10} {'ratio':>7} {'target':>7}")
    for row, want, how in TARGETS:
        mirror = results.get((row, "mirror"))
        ref = results.get((row, "reference"))
        direct = results.get((row, "upstream direct"))
        base = direct if "direct" in how else ref
        ratio = mirror / base if base else None
        if want is None:
            ok = mirror == 1 if "GETs" in row else mirror <= 120
            target = "1" if "GETs" in row else "<=120"
        elif "lower" in how:
            ok, target = ratio <= want, f"<={want}"
        else:
            ok, target = ratio >= want, f">={want}"
        if not ok:
            missed.append(row)
        print(f"{row:32} {_fmt(mirror)} {_fmt(ref)} {_fmt(direct)} "
              f"{'-' if ratio is None else f'{ratio:7.2f}'} {target:>7} {'' if ok else 'MISSED'}")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    args = parser.parse_args()
    for tool in ("curl", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install {tool} (scripts/bench does)")
    work = Path(tempfile.mkdtemp(prefix="mirror-compare-"))
    try:
        bench = Bench(work, args)
        results = bench.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missed = report(results, args)
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    if bench.failures:
        print("WRONG BYTES:\n  " + "\n  ".join(bench.failures))
        return 1
    if results.get(("cold 16 clients upstream GETs", "mirror")) != 1:
        print("the mirror fetched the blob from upstream more than once")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
