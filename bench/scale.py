"""Cost as the cache grows: start-up, memory, latency and stalls at a million objects.

    python bench/scale.py [--blobs 1000000] [--manifests 100000] [--tags 50000] [--work DIR]

Builds a data directory whose index holds ``--blobs`` blobs, ``--manifests`` manifests
(OCI image manifests, each naming ``blobs / manifests`` of the blobs: one config and
the rest layers) and ``--tags`` tags (on the first manifests, 10 per repository), every
one linked to its repository. Rows go straight into index.db (the schema made by the
real ``Index.open``) in one transaction; every blob and manifest also gets its real
file (a few bytes, hashing to its digest), since start-up reconciles files with rows
and would forget rows without files. The build is kept in ``--work`` and reused.

Then ``python -m mirror serve`` runs on it (a real process; its one upstream is a
closed port, so nothing below can reach upstream) and the script measures:

  start-up      spawn to ``/v2/`` answering, and RSS (VmRSS) once it answers
  tag GET       a warm manifest by tag, median of 200 (a new connection each)
  blob GET      a warm blob, median of 200
  /metrics      one scrape, median of 20
  stats / ls    ``mirror stats`` / ``mirror ls`` wall time (own processes, beside it)
  gc plan       ``mirror gc --dry-run`` with max_size the size of the cache and
                low_watermark 90%: an eviction plan for 10% of it
  idle          5 s of nothing (the periodic work)
  reload        the index's content generation bumped, as `mirror gc` or `import` do
                after a change: the server reloads its maps (5 s)

and, during every step, the longest event-loop stall seen from outside: a thread GETs
``/healthz`` (answered by the loop alone) every 10 ms and the step's longest gap
between two answers is reported. The same requests on a cache holding only what they
touch give the "empty" column.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.proctree import read_stats, tree_of  # noqa: E402
from tests.support.ports import free_port, stop_process  # noqa: E402

WORKERS = 1      # --workers

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
UPSTREAM = "docker.io"
PER_REPO = 10        # tags per repository


def blob(i: int) -> tuple[str, bytes]:
    data = b"blob %d\n" % i
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def manifest(j: int, per: int, blobs: list[tuple[str, int]]) -> tuple[str, bytes, list[str]]:
    """Manifest j names blobs j*per .. j*per+per-1 (wrapping), the first as its config."""
    n = len(blobs)
    named = [blobs[(j * per + k) % n] for k in range(per)]
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": named[0][0], "size": named[0][1]},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": d, "size": s} for d, s in named[1:]]}
    data = json.dumps(doc, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest(), data, [d for d, _ in named]


def repository(j: int) -> str:
    return f"library/app{j // PER_REPO}"


def build(data_dir: Path, n_blobs: int, n_manifests: int, n_tags: int) -> dict:
    """Fill ``data_dir`` (index rows and files); what the requests will ask for."""
    import asyncio

    from mirror.index import Index

    started = time.perf_counter()
    (data_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    async def schema() -> None:
        index = await Index.open(data_dir / "index.db", flush=False)
        await index.close()
    asyncio.run(schema())

    root = data_dir / "blobs" / "sha256"
    for k in range(256):
        (root / f"{k:02x}").mkdir(exist_ok=True)

    def put(digest: str, data: bytes) -> None:
        hexpart = digest[7:]
        fd = os.open(f"{root}/{hexpart[:2]}/{hexpart}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o644)
        os.write(fd, data)
        os.close(fd)

    now = time.time()
    blobs = []
    for i in range(n_blobs):
        digest, data = blob(i)
        put(digest, data)
        blobs.append((digest, len(data)))
    t_blobs = time.perf_counter() - started
    per = max(2, n_blobs // max(1, n_manifests))
    manifests, refs, links = [], [], []
    for j in range(n_manifests):
        digest, data, named = manifest(j, per, blobs)
        put(digest, data)
        manifests.append((digest, OCI_MANIFEST, len(data), now, now))
        refs += [(digest, d, "blob") for d in dict.fromkeys(named)]
        links += [(UPSTREAM, repository(j), d, now) for d in (digest, *named)]
    tags = [(UPSTREAM, repository(j), f"t{j}", manifests[j][0], now, now + 10 * 365 * 86400)
            for j in range(min(n_tags, n_manifests))]
    t_files = time.perf_counter() - started
    db = sqlite3.connect(data_dir / "index.db")
    with db:
        db.executemany("INSERT OR IGNORE INTO blobs (digest, size, first_seen, last_access) "
                       "VALUES (?, ?, ?, ?)", [(d, s, now, now) for d, s in blobs])
        db.executemany("INSERT OR IGNORE INTO manifests (digest, media_type, size, first_seen, "
                       "last_access) VALUES (?, ?, ?, ?, ?)", manifests)
        db.executemany("INSERT OR IGNORE INTO manifest_refs VALUES (?, ?, ?)", refs)
        db.executemany("INSERT OR IGNORE INTO repo_links VALUES (?, ?, ?, ?)", links)
        db.executemany("INSERT OR IGNORE INTO tags (upstream, repository, tag, digest, "
                       "fetched_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)", tags)
    db.close()
    total = sum(s for _, s in blobs) + sum(m[2] for m in manifests)
    print(f"built {data_dir}: {n_blobs} blobs, {n_manifests} manifests, {len(tags)} tags, "
          f"{len(links)} links, {total} bytes; blob files {t_blobs:.0f} s, all files "
          f"{t_files:.0f} s, rows {time.perf_counter() - started - t_files:.0f} s",
          flush=True)
    return {"repository": repository(0), "tag": "t0", "blob": blobs[1][0], "bytes": total}


class Probe(threading.Thread):
    """GETs /healthz every 10 ms; the times its answers came back."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.answers, self.running = port, [], True

    def run(self) -> None:
        while self.running:
            get(self.port, "/healthz")
            self.answers.append(time.perf_counter())
            time.sleep(0.01)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest wait between answers that overlaps [start, end], minus the 10 ms
        the probe sleeps between requests."""
        a = list(self.answers)
        gaps = [b - x for x, b in zip(a, a[1:], strict=False) if b > start and x < end]
        return max(gaps, default=0.0) - 0.01


def rss(pid: int) -> tuple[int, int]:
    """(RSS, peak RSS) of the biggest process of the server's tree (with ``--workers``
    above 1 the supervisor is small and each worker holds its own maps)."""
    best = (0, 0)
    for member in tree_of(pid, {p: s.ppid for p, s in read_stats().items()}) or [pid]:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{member}/status")
                          .read_text().splitlines() if ":" in line)
        except OSError:
            continue
        best = max(best, (int(fields["VmRSS"].split()[0]) * 1024,
                          int(fields["VmHWM"].split()[0]) * 1024))
    return best


def get(port: int, path: str, headers: dict | None = None) -> int:
    """One GET on a new connection (a second request on a kept-alive connection waits
    ~40 ms for a delayed ACK here, which would hide everything else); the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def median_get(port: int, path: str, n: int, headers: dict | None = None) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        status = get(port, path, headers)
        times.append(time.perf_counter() - t)
        if status != 200:
            raise SystemExit(f"GET {path}: {status}")
    return statistics.median(times)


def cli(config: Path, *args: str) -> float:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mirror", *args, "--config", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise SystemExit(f"mirror {' '.join(args)} failed: {done.stderr.decode()[-2000:]}")
    return time.perf_counter() - t


def changed_elsewhere(data_dir: Path) -> float:
    """Bump the index's content generation as `mirror gc` or `import` do after a change
    (the server reloads its maps within a second or two), then wait 5 s."""
    from mirror.index import GENERATIONS

    db = sqlite3.connect(data_dir / "index.db", timeout=30)
    with db:
        db.execute("INSERT INTO meta VALUES (?, '1') ON CONFLICT (key) "
                   "DO UPDATE SET value = CAST(value AS INTEGER) + 1", (GENERATIONS["content"],))
    db.close()
    time.sleep(5)
    return 5.0


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Until the server started as ``proc`` answers ``/v2/`` on ``port``."""
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"mirror exited; see {log}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.02)


def measure(work: Path, data_dir: Path, target: dict) -> dict[str, tuple[float, float]]:
    """step -> (value, longest stall s)."""
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "data_dir": str(data_dir), "log_level": "warning",
              "upstreams": {UPSTREAM: {"url": f"http://127.0.0.1:{free_port()}"}},
              "workers": WORKERS}
    config_path = work / f"{data_dir.name}.yml"
    config_path.write_text(yaml.safe_dump(config))
    gc_path = work / f"{data_dir.name}-gc.yml"
    # gc evicts down to the low watermark: at 90% of a max_size the size of the cache,
    # that is a plan for 10% of it.
    gc_path.write_text(yaml.safe_dump({**config, "max_size": target["bytes"],
                                       "high_watermark": "95%", "low_watermark": "90%"}))
    log = open(work / f"{data_dir.name}.log", "ab")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config",
                             str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    results: dict[str, tuple[float, float]] = {}
    try:
        wait_ready(proc, port, work / f"{data_dir.name}.log")
        results["start-up s"] = (time.perf_counter() - started, 0.0)
        now_rss, peak = rss(proc.pid)
        results["RSS MB after start-up"] = (now_rss / 1e6, 0.0)
        results["peak RSS MB (start-up)"] = (peak / 1e6, 0.0)
        probe = Probe(port)
        probe.start()
        time.sleep(0.2)
        repo = target["repository"]
        steps = {
            "tag GET ms (median)": lambda: 1000 * median_get(
                port, f"/v2/{repo}/manifests/{target['tag']}", 200, {"Accept": OCI_MANIFEST}),
            "blob GET ms (median)": lambda: 1000 * median_get(
                port, f"/v2/{repo}/blobs/{target['blob']}", 200),
            "/metrics ms (median)": lambda: 1000 * median_get(port, "/metrics", 20),
            "mirror stats s": lambda: cli(config_path, "stats"),
            "mirror ls s": lambda: cli(config_path, "ls"),
            "gc --dry-run (10%) s": lambda: cli(gc_path, "gc", "--dry-run"),
            "idle 5 s": lambda: time.sleep(5) or 5.0,
            "reload after a change elsewhere, 5 s": lambda: changed_elsewhere(data_dir),
        }
        for name, step in steps.items():
            t = time.perf_counter()
            value = step()
            time.sleep(0.05)
            results[name] = (value, probe.longest_gap(t, time.perf_counter()))
        probe.running = False
        probe.join()
        results["RSS MB at the end"] = (rss(proc.pid)[0] / 1e6, 0.0)
    finally:
        stop_process(proc)
        log.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", type=int, default=1_000_000)
    parser.add_argument("--manifests", type=int, default=100_000)
    parser.add_argument("--tags", type=int, default=50_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--workers", type=int, default=1,
                        help="the server's workers (default 1: the figures are per process; "
                             "with more, start-up is until worker 0 answers and RSS is the "
                             "biggest worker's)")
    args = parser.parse_args()
    global WORKERS
    WORKERS = args.workers
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    big = work / f"data-{args.blobs}-{args.manifests}-{args.tags}"
    small = work / "data-small"
    targets = {}
    for data_dir, sizes in ((big, (args.blobs, args.manifests, args.tags)), (small, (10, 1, 1))):
        marker = data_dir / "built.json"
        if not marker.exists():
            targets[data_dir] = build(data_dir, *sizes)
            marker.write_text(json.dumps(targets[data_dir]))
        targets[data_dir] = json.loads(marker.read_text())
    full = measure(work, big, targets[big])
    empty = measure(work, small, targets[small])
    print(f"\n{args.blobs} blobs, {args.manifests} manifests, {args.tags} tags; "
          f"2 vCPU, 127.0.0.1\n")
    print("| step | at scale | longest stall ms | empty cache | longest stall ms |")
    print("|---|---|---|---|---|")
    for name, (value, stall) in full.items():
        e_value, e_stall = empty[name]
        stalls = (f"{1000 * stall:.0f}", f"{1000 * e_stall:.0f}") if stall or e_stall \
            else ("", "")
        print(f"| {name} | {value:.2f} | {stalls[0]} | {e_value:.2f} | {stalls[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
