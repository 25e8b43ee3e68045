"""What manifests and tag revalidations cost a site of replicas without a lease.

    python bench/cluster_manifests.py [--replicas 3] [--clients 16] [--rounds 5]

Starts a throw-away PostgreSQL, moto's S3 server and the real upstream registry
(Debian's docker-registry) and ``--replicas`` mirror processes sharing a database and
a bucket (tests/support/replicas.py: ``services``), each with ``tag_ttl: 1s``. Each
round pushes a fresh image and sends ``--clients`` concurrent GETs of its tag,
round-robin over the replicas (cold), then again after the TTL (revalidation).
Prints, per phase, the upstream manifest GETs and HEADs the round cost (median over
rounds) and the wall time of the burst; and the median time of one manifest GET from
the registry directly, to compare with a lease round trip
(bench/fill_lease.py: acquire + release).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from tests.support.client import (  # noqa: E402
    MANIFEST_LIST_V2,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,  # noqa: E402
)
from tests.support.client import MANIFEST_V2 as DOCKER_MANIFEST  # noqa: E402
from tests.support.images import (  # noqa: E402
    docker_manifest,
    make_config,
    make_layer,
    push_blob,
    push_manifest,
)
from tests.support.replicas import services  # noqa: E402

# what docker and containerd send: every manifest type (else the tag is not kept)
ACCEPT = {"Accept": ", ".join([DOCKER_MANIFEST, MANIFEST_LIST_V2, OCI_MANIFEST, OCI_INDEX])}


def burst(rr, repo: str, tag: str, clients: int) -> float:
    start = threading.Barrier(clients)
    failures: list = []

    def one() -> None:
        mirror = rr.next()
        start.wait()
        r = httpx.get(f"{mirror.url}/v2/{repo}/manifests/{tag}", headers=ACCEPT, timeout=30)
        if r.status_code != 200:
            failures.append(r.status_code)
    threads = [threading.Thread(target=one) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with services("bench-cluster-manifests-") as s:
        tmp, upstream = s.tmp, s.upstream
        config = {"upstreams": {"docker.io": {"url": upstream.url, "tag_ttl": "1s"}}}
        with s.replicas(args.replicas, config, name="site") as site:
            rr = site.round_robin()
            rows: dict[str, list[float]] = {k: [] for k in
                                            ("cold_get", "cold_head", "cold_s", "reval_get",
                                             "reval_head", "reval_s", "direct_ms")}
            with RegistryClient(upstream.url) as client:
                for i in range(args.rounds):
                    repo, tag = "bench/manifests", f"t{i}-{os.urandom(3).hex()}"
                    layer = make_layer(tmp / f"l{i}", 1024, seed=i + 1000 * os.getpid())
                    config_blob = make_config(tmp / f"c{i}", [layer.diff_id])
                    for blob in (layer, config_blob):
                        push_blob(client, None, repo, blob)
                    push_manifest(client, None, repo, tag,
                                  docker_manifest(config_blob, [layer]), DOCKER_MANIFEST)
                    t = time.perf_counter()
                    client.get(f"{upstream.url}/v2/{repo}/manifests/{tag}", headers=ACCEPT)
                    rows["direct_ms"].append((time.perf_counter() - t) * 1000)
                    path = f"/manifests/{tag}"
                    mark = upstream.mark()
                    rows["cold_s"].append(burst(rr, repo, tag, args.clients))
                    rows["cold_get"].append(upstream.count("GET", path, since=mark))
                    rows["cold_head"].append(upstream.count("HEAD", path, since=mark))
                    time.sleep(1.2)                       # past the tag TTL
                    mark = upstream.mark()
                    rows["reval_s"].append(burst(rr, repo, tag, args.clients))
                    rows["reval_get"].append(upstream.count("GET", path, since=mark))
                    rows["reval_head"].append(upstream.count("HEAD", path, since=mark))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.clients} clients of one fresh tag over {args.replicas} replicas "
          f"(median of {args.rounds} rounds):")
    print(f"  cold:        {med['cold_get']:.0f} upstream manifest GETs, "
          f"{med['cold_head']:.0f} HEADs, burst {med['cold_s'] * 1000:.0f} ms")
    print(f"  revalidate:  {med['reval_get']:.0f} upstream manifest GETs, "
          f"{med['reval_head']:.0f} HEADs, burst {med['reval_s'] * 1000:.0f} ms")
    print(f"  one manifest GET from the registry directly: {med['direct_ms']:.2f} ms")


if __name__ == "__main__":
    main()
