"""Cold clients of one fresh blob spread over a site of replicas: upstream GETs and time.

    python bench/cluster_fill.py [--replicas 1 3] [--clients 16] [--mb 100] [--rounds 3]

Starts a throw-away PostgreSQL, moto's S3 server and the real upstream registry
(Debian's docker-registry) and, for each ``--replicas`` count, that many mirror
processes sharing a database and a bucket (tests/support/replicas.py: ``services``).
Each round pushes a fresh ``--mb`` MB blob and starts ``--clients`` GETs of it at once,
round-robin over the replicas; prints the upstream GETs and the writes of the blob's
object to the bucket it cost (versions of the object: the bucket keeps them), and the
wall time until every client had all its bytes (each checked against the digest).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.client import RegistryClient  # noqa: E402
from tests.support.images import make_layer, push_blob  # noqa: E402
from tests.support.replicas import Replicas, burst, services  # noqa: E402

REPO = "bench/cluster"


def timed_burst(site: Replicas, blob, clients: int) -> tuple[float, bool]:
    began = time.perf_counter()
    results = burst(site.round_robin(), REPO, blob, clients)
    took = time.perf_counter() - began
    return took, all(r is not None and r[1] == blob.digest for r in results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with services("bench-cluster-fill-") as s:
        tmp, upstream = s.tmp, s.upstream
        for n in args.replicas:
            config = {"upstreams": {"docker.io": {"url": upstream.url}}}
            with s.replicas(n, config) as site:
                site.keep_versions()          # counts the writes of each blob's object
                for r in range(args.rounds):
                    blob = make_layer(tmp / f"blob-{n}-{r}", int(args.mb * 1024 * 1024),
                                      seed=int.from_bytes(os.urandom(4), "big"))
                    with RegistryClient(upstream.url) as client:
                        push_blob(client, None, REPO, blob)
                    mark = upstream.mark()
                    took, ok = timed_burst(site, blob, args.clients)
                    gets = upstream.count("GET", f"/blobs/{blob.digest}", since=mark)
                    writes = site.writes(blob.digest)
                    print(f"{n} replica{'s' if n > 1 else ''}, {args.clients} clients, "
                          f"{blob.size / 1e6:.0f} MB: {gets} upstream GET"
                          f"{'s' if gets != 1 else ''}, {writes} object write"
                          f"{'s' if writes != 1 else ''}, {took:.2f} s"
                          f"{'' if ok else ', WRONG BYTES'}", flush=True)
                    blob.path.unlink()


if __name__ == "__main__":
    main()
