"""The mirror against registry:2 in proxy mode, side by side, in one run: issue 14's table.

    scripts/bench            (installs wrk, curl and docker-registry if missing, then runs this)
    python bench/compare.py [--size-mb 300] [--rounds 3] [--seconds 5] [--workers N]
                            [--json bench/results/latest.json]

Starts a real upstream (Debian's docker-registry), pushes an image with one --size-mb
layer (and one a tenth of it), and measures the mirror and registry:2 (docker-registry,
distribution 2.8, Go) in proxy mode (`proxy.remoteurl` pointing at the same upstream),
A and B interleaved round by round, on:

  1. warm blob, 1 client: MB/s (curl)
  2. warm blob, 16 concurrent clients: aggregate MB/s (curl)
  3. manifest by tag: requests/s with 32 keep-alive connections (wrk -t2 -c32)
  4. cold blob, 1 client, fresh cache: MB/s, against registry:2 and against reading the
     same blob straight from the upstream
  5. 16 concurrent cold clients of one fresh blob: wall time, and upstream GETs of the
     blob counted in the upstream's access log (the mirror must make exactly 1)
  6. server CPU-s per GB served, warm (rows 1-2 together) and cold (row 4)
  7. peak RSS per process during rows 2 and 5 (the largest process of the server's
     tree), and how it grows from the small blob to the big one in row 5 ("flat in
     blob size": at most 16 MB, i.e. 1 MB per client, for a 10x larger blob)

Server CPU is utime+stime of the server's whole process tree (parent, workers and
exited children's cutime+cstime) from /proc, sampled before and after each row, once
the server is idle (bench/proctree.py). Every row with blobs also prints both
servers' CPU-s/GB. --workers N writes `workers: N` into the mirror's config (not set
otherwise: the mirror's default).

Clients write to /dev/null while timed; afterwards every server's answer is fetched
once more and hashed, and the mirror's cached files are hashed on disk. The script
exits 1 if the mirror ever served or kept wrong bytes, or fetched the blob from
upstream other than exactly once in any round of row 5; a missed target is printed
as MISSED but is not an error. The table goes to stdout and, with every round's
samples, to the --json file. Everything listens on 127.0.0.1; every loop is bounded
in time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proctree import PeakRss, tree_cpu_seconds  # noqa: E402
from bench.table import Line, Target, format_table, missed, number  # noqa: E402
from tests.support.client import MANIFEST_ACCEPT, RegistryClient  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402

SERVERS = ("mirror", "registry2")
FLAT_MB = 16        # row 7: peak RSS may grow this much from the small blob to the big one


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


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


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


def settled_cpu(pid: int, timeout: float = 5.0) -> float:
    """The tree's CPU seconds once it has gone idle (under 5% of a core over 0.2 s): taken
    before a row, so workers still starting are not counted, and after, so work a server
    finishes after the response (a background fill) is."""
    last, deadline = tree_cpu_seconds(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = tree_cpu_seconds(pid)
        if now - last < 0.01:
            return now
        last = now
    return last


class Bench:
    def __init__(self, work: Path, args) -> None:
        self.work, self.args = work, args
        self.failures: list[str] = []
        self.samples: dict[tuple[str, str], list[float]] = {}       # (row, server) -> values
        self.cpu: dict[tuple[str, str], list[tuple[float, int]]] = {}  # -> (CPU-s, bytes)

    def add(self, row: str, server: str, value: float) -> None:
        self.samples.setdefault((row, server), []).append(value)

    def add_cpu(self, row: str, server: str, seconds: float, nbytes: int) -> None:
        self.cpu.setdefault((row, server), []).append((seconds, nbytes))

    def reference(self, name: str) -> RegistryProcess:
        return RegistryProcess(self.work / name, extra_config={
            "proxy": {"remoteurl": self.upstream.url},
            "log": {"level": "warn", "accesslog": {"disabled": True}}}).start()

    def mirror(self, name: str) -> MirrorProcess:
        config: dict = {"upstreams": {"docker.io": {"url": self.upstream.url}},
                        "log_level": "warning"}
        if self.args.workers is not None:
            config["workers"] = self.args.workers
        return MirrorProcess(self.work / name, config).start()

    def make(self, server: str, name: str):
        return self.mirror(name) if server == "mirror" else self.reference(name)

    def check(self, label: str, got: str, blob) -> None:
        if got != blob.digest:
            self.failures.append(f"{label}: served {got}, expected {blob.digest}")

    def run(self) -> None:
        a = self.args
        with RegistryProcess(self.work / "upstream") as self.upstream:
            with RegistryClient(self.upstream.url) as client:
                image = push_image(self.work / "img", client, "bench/big", ["latest"],
                                   [a.size_mb << 20, self.small_mb << 20], seed=42)
            self.blob, self.small = image.blobs[1:3]      # blobs: config, then the layers
            self.path = f"/v2/{image.repo}/blobs/{self.blob.digest}"
            self.small_path = f"/v2/{image.repo}/blobs/{self.small.digest}"
            self.manifest_path = f"/v2/{image.repo}/manifests/latest"
            for r in range(a.rounds):           # rows 4, 5, 7: cold, each on fresh caches
                for server in SERVERS:
                    self.cold_one(server, r)
                    self.cold_sixteen(server, r)
                size, t = curl(self.upstream.url + self.path)
                self.add("direct", "upstream", size / t / 1e6)
            self.warm()                         # rows 1, 2, 3, 7: one server of each kind

    def cold_one(self, name: str, r: int) -> None:
        server = self.make(name, f"{name}-cold-{r}")
        try:
            pid = server.proc.pid
            cpu0 = settled_cpu(pid)
            size, t = curl(server.url + self.path)
            self.add_cpu("cold1", name, settled_cpu(pid) - cpu0, size)
            self.add("cold1", name, size / t / 1e6)
            self.check(f"{name} cold", sha256_of(server.url + self.path), self.blob)
        finally:
            server.stop()

    def cold_sixteen(self, name: str, r: int) -> None:
        server = self.make(name, f"{name}-cold16-{r}")
        try:
            pid = server.proc.pid
            with PeakRss(pid) as small_rss:     # the small blob first: row 7's baseline
                parallel(16, lambda: curl(server.url + self.small_path))
            mark = self.upstream.mark()
            cpu0 = settled_cpu(pid)
            with PeakRss(pid) as rss:
                wall, sizes = parallel(16, lambda: curl(server.url + self.path))
            self.add_cpu("cold16", name, settled_cpu(pid) - cpu0, sum(n for n, _ in sizes))
            self.add("cold16_wall", name, wall)
            self.add("cold16_gets", name,
                     self.upstream.count("GET", f"/blobs/{self.blob.digest}", since=mark))
            self.add("rss_cold16", name, rss.peak / 1e6)
            self.add("rss_cold16_small", name, small_rss.peak / 1e6)
            self.add("rss_flat", name, (rss.peak - small_rss.peak) / 1e6)
            self.add("processes", name, rss.processes)
            self.check(f"{name} after cold 16", sha256_of(server.url + self.path), self.blob)
            self.check(f"{name} small after cold 16", sha256_of(server.url + self.small_path),
                       self.small)
            if name == "mirror":
                for blob in (self.blob, self.small):
                    self.check("mirror cached file after cold 16",
                               file_digest(server.cached_path(blob.digest)), blob)
        finally:
            server.stop()

    def warm(self) -> None:
        a = self.args
        servers: dict = {}
        try:
            for name in SERVERS:
                servers[name] = self.make(name, f"{name}-warm")
                url = servers[name].url
                curl(url + self.path)                   # fill the cache
                subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H",
                                f"Accept: {MANIFEST_ACCEPT}", url + self.manifest_path], check=True)
            for _ in range(a.rounds):
                for name, server in servers.items():
                    pid, url = server.proc.pid, server.url + self.path
                    cpu0 = settled_cpu(pid)
                    size, t = curl(url)
                    cpu1 = settled_cpu(pid)
                    self.add_cpu("warm1", name, cpu1 - cpu0, size)
                    self.add("warm1", name, size / t / 1e6)
                    with PeakRss(pid) as rss:
                        wall, sizes = parallel(16, lambda u=url: curl(u))
                    total = sum(n for n, _ in sizes)
                    self.add_cpu("warm16", name, settled_cpu(pid) - cpu1, total)
                    self.add("warm16", name, total / wall / 1e6)
                    self.add("rss_warm16", name, rss.peak / 1e6)
            for _ in range(a.rounds):
                for name, server in servers.items():
                    self.add("manifest", name, wrk(server.url + self.manifest_path, a.seconds))
            mirror = servers["mirror"]
            self.check("mirror warm", sha256_of(mirror.url + self.path), self.blob)
            self.check("mirror cached file", file_digest(mirror.cached_path(self.blob.digest)),
                       self.blob)
        finally:
            for server in servers.values():
                server.stop()

    @property
    def small_mb(self) -> int:
        return max(1, self.args.size_mb // 10)

    # -- the table -------------------------------------------------------------------
    def value(self, row: str, server: str) -> float | None:
        return median(self.samples.get((row, server), []))

    def cpu_per_gb(self, server: str, *rows: str) -> float | None:
        pairs = [p for row in rows for p in self.cpu.get((row, server), [])]
        nbytes = sum(n for _, n in pairs)
        return sum(s for s, _ in pairs) / (nbytes / 1e9) if nbytes else None

    def line(self, key: str, label: str, unit: str, target: Target, **extra) -> Line:
        cpu_rows = extra.pop("cpu_rows", ())
        samples = {s: self.samples.get((key, s), []) for s in SERVERS}
        return Line(key, label, unit, self.value(key, "mirror"), self.value(key, "registry2"),
                    target, samples=samples,
                    cpu_mirror=self.cpu_per_gb("mirror", *cpu_rows) if cpu_rows else None,
                    cpu_registry2=self.cpu_per_gb("registry2", *cpu_rows) if cpu_rows else None,
                    **extra)

    def cpu_line(self, key: str, label: str, rows: tuple[str, ...], target: Target) -> Line:
        samples = {s: [{"row": r, "cpu_s": cpu, "bytes": n} for r in rows
                       for cpu, n in self.cpu.get((r, s), [])] for s in SERVERS}
        return Line(key, label, "CPU-s/GB", self.cpu_per_gb("mirror", *rows),
                    self.cpu_per_gb("registry2", *rows), target, samples=samples)

    def lines(self) -> list[Line]:
        mb, small = self.args.size_mb, self.small_mb
        direct = self.value("direct", "upstream")
        cold_direct = self.line("cold1", f"cold blob, 1 client, of upstream direct at "
                                f"{number(direct)} MB/s", "MB/s", Target(">=x", 0.6),
                                base=direct, base_name="direct")
        cold_direct.key, cold_direct.registry2 = "cold1_direct", None
        cold_direct.samples = {"mirror": cold_direct.samples["mirror"],
                               "upstream": self.samples.get(("direct", "upstream"), [])}
        return [
            self.line("warm1", f"warm blob, 1 client, {mb} MB", "MB/s", Target(">=x", 1.2),
                      cpu_rows=("warm1",)),
            self.line("warm16", "warm blob, 16 clients aggregate", "MB/s", Target(">=x", 1.5),
                      cpu_rows=("warm16",)),
            self.line("manifest", "manifest by tag, wrk 32 connections", "req/s",
                      Target(">=x", 40)),
            self.line("cold1", "cold blob, 1 client", "MB/s", Target(">=x", 1.2),
                      cpu_rows=("cold1",)),
            cold_direct,
            self.line("cold16_wall", "16 cold clients of one fresh blob, wall", "s",
                      Target("<=x", 0.5), cpu_rows=("cold16",)),
            self.line("cold16_gets", "16 cold clients, upstream GETs of the blob", "GETs",
                      Target("==", 1)),
            self.cpu_line("cpu_warm", "server CPU per GB served, warm (rows 1-2)",
                          ("warm1", "warm16"), Target("<=", 0.25)),
            self.cpu_line("cpu_cold", "server CPU per GB served, cold (row 4)", ("cold1",),
                          Target("<=", 1.0)),
            self.line("rss_warm16", f"peak RSS per process, 16 warm x {mb} MB", "MB",
                      Target("<=", 100)),
            self.line("rss_cold16", f"peak RSS per process, 16 cold x {mb} MB", "MB",
                      Target("<=", 100)),
            self.line("rss_flat", f"peak RSS growth, 16 cold: {mb} MB over {small} MB blob",
                      "MB", Target("<=", FLAT_MB)),
        ]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description="the mirror against registry:2, issue 14's rows")
    parser.add_argument("--size-mb", type=int, default=300, help="the blob's size (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row (median)")
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--workers", type=int, default=None,
                        help="the mirror's `workers` config key (default: not set)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json",
                        help="where the table and every sample go (default: %(default)s)")
    args = parser.parse_args()
    if args.size_mb < 1 or args.rounds < 1 or args.seconds < 1:
        parser.error("--size-mb, --rounds and --seconds must be at least 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    for tool in ("curl", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install {tool} (scripts/bench does)")
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="mirror-compare-"))
    try:
        bench = Bench(work, args)
        bench.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = bench.lines()
    gets = bench.samples.get(("cold16_gets", "mirror"), [])
    if any(g != 1 for g in gets):
        bench.failures.append(f"the mirror fetched the blob from upstream {gets} times "
                              "(per round) for 16 cold clients, not once")
    workers = "not set" if args.workers is None else args.workers
    print(f"blob {args.size_mb} MiB, {args.rounds} rounds (median), wrk {args.seconds} s, "
          f"mirror workers: {workers}, {os.cpu_count()} cores, everything on 127.0.0.1, "
          f"commit {git_commit()}")
    print(format_table(lines))
    if missed(lines):
        print(f"targets missed: {'; '.join(missed(lines))}")
    if bench.failures:
        print("FAILED:\n  " + "\n  ".join(bench.failures))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"),
        "seconds_taken": round((datetime.now(UTC) - started).total_seconds(), 1),
        "commit": git_commit(), "cpus": os.cpu_count(),
        "args": {"size_mb": args.size_mb, "small_mb": bench.small_mb, "rounds": args.rounds,
                 "wrk_seconds": args.seconds, "workers": args.workers},
        "rows": [line.as_json() for line in lines],
        "processes": {s: bench.samples.get(("processes", s), []) for s in SERVERS},
        "failures": bench.failures,
    }, indent=1) + "\n")
    print(f"JSON: {args.json}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
