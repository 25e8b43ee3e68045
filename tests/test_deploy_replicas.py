"""deploy/replicas/: three replicas, PostgreSQL, SeaweedFS and HAProxy in one compose
file. No container engine runs here, so the files are parsed and checked against each
other and against the code: every replica's config loads with its environment, names
the database, the bucket and the credentials the other services are given, and the
load balancer sends to exactly the replicas, on the port they listen on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from mirror.config import load_config
from tests.test_deploy import image_env, image_port, pyproject

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "deploy" / "replicas"


def compose() -> dict:
    return yaml.safe_load((HERE / "compose.yml").read_text())


def replicas(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in doc["services"].items() if name.startswith("mirror-")}


def replica_config(svc: dict, tmp_path: Path):
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    path = HERE / mounts[svc["environment"]["MIRROR_CONFIG"]]
    return load_config(path, environ={k: str(v) for k, v in svc["environment"].items()})


def test_three_replicas_from_the_image_each_advertising_its_own_name(tmp_path):
    doc = compose()
    found = replicas(doc)
    assert len(found) == 3
    version = pyproject()["project"]["version"]
    for name, svc in found.items():
        assert (HERE / svc["build"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
        assert svc["image"] == f"mirror:{version}"
        assert svc["environment"]["MIRROR_CONFIG"] == image_env()["MIRROR_CONFIG"]
        config = replica_config(svc, tmp_path)
        assert config.port == image_port()
        assert config.cluster.advertise == f"http://{name}:{config.port}"
        assert svc["hostname"] == name
        assert "ports" not in svc, "clients reach the replicas through the load balancer"


def test_replicas_name_the_database_and_store_the_compose_file_runs(tmp_path):
    doc = compose()
    services = doc["services"]
    pg_env = services["postgres"]["environment"]
    s3_identity = json.loads((HERE / "seaweedfs-s3.json").read_text())["identities"][0]
    key = s3_identity["credentials"][0]
    bucket_command = " ".join(services["bucket"]["command"])
    for svc in replicas(doc).values():
        config = replica_config(svc, tmp_path)
        env = svc["environment"]
        assert config.index.postgres is not None
        dsn = urlsplit(config.index.postgres.dsn)
        assert dsn.hostname == "postgres" and dsn.username == pg_env["POSTGRES_USER"]
        assert dsn.path.lstrip("/") == pg_env["POSTGRES_DB"]
        assert env["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"]
        s3 = config.storage.s3
        assert s3 is not None and urlsplit(s3.endpoint).hostname == "s3"
        assert f"-s3.port={urlsplit(s3.endpoint).port}" in services["s3"]["command"]
        assert f"-name {s3.bucket}" in bucket_command
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
            (key["accessKey"], key["secretKey"])
        assert set(svc["depends_on"]) == {"postgres", "bucket"}


def test_load_balancer_sends_to_every_replica_on_its_port(tmp_path):
    doc = compose()
    cfg = (HERE / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+):(\d+)", cfg, re.M)
    found = replicas(doc)
    assert {(n, h) for n, h, _ in servers} == {(n, n) for n in found}
    for name, _, port in servers:
        assert int(port) == replica_config(found[name], tmp_path).port
    assert re.search(r"^\s*balance\s+roundrobin", cfg, re.M)
    assert re.search(r"option httpchk GET /readyz", cfg)
    lb = doc["services"]["lb"]
    assert [p.split(":")[-1] for p in lb["ports"]] == [str(image_port())]
    assert re.search(rf"^\s*bind\s+:{image_port()}\b", cfg, re.M)
