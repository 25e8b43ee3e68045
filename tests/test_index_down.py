"""A mirror whose index database is gone answers a clear 503 its clients retry, never a
500 "internal error": the PostgreSQL index dropped under a running replica."""

from __future__ import annotations

import os

import httpx

from tests.support import postgres as _postgres
from tests.support.client import RegistryClient
from tests.support.images import make_layer, push_blob
from tests.support.replicas import Replicas

postgres, pg_dsn = _postgres.postgres, _postgres.pg_dsn

REPO = "indexdown/fresh"


def test_a_replica_whose_postgresql_is_gone_answers_503_not_500(
        tmp_path, postgres, pg_dsn, upstream):
    blob = make_layer(tmp_path / "blob", 256 * 1024, seed=int.from_bytes(os.urandom(4), "big"))
    with RegistryClient(upstream.url) as client:
        push_blob(client, None, REPO, blob)
    with Replicas(tmp_path, 1, pg_dsn,
                  {"upstreams": {"docker.io": {"url": upstream.url}}}) as site:
        postgres.psql(f"DROP DATABASE {pg_dsn.rsplit('/', 1)[1]} WITH (FORCE)")
        r = httpx.get(f"{site[0].url}/v2/{REPO}/blobs/{blob.digest}", timeout=30)
        assert r.status_code == 503, (r.status_code, r.text, site.log_text())
        error = r.json()["errors"][0]
        assert error["message"] == "the mirror's index is unavailable; retry later"
        assert error["detail"]["code"] == "UNAVAILABLE"
        assert "internal error" not in site.log_text()
        assert "the index is unavailable" in site[0].log_text()
