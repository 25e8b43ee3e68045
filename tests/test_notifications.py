"""Notifications (webhooks) as registry:2 sends them (issue 15): a receiver in the test,
a Starlette app under uvicorn on a real 127.0.0.1 socket, gets the events of pushes,
pulls, cache fills and deletes, in order and in registry:2's envelope; ignore rules
hold; a receiver that is down gets what was queued once it is back (up to the bound,
the rest counted as dropped), across a restart of the mirror; with two workers each
event arrives once. The mirror is a real process, the upstream a real registry."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from datetime import datetime

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mirror.config import ConfigError, load_config
from tests.support.ports import free_port
from tests.support.server_thread import ServerThread
from tests.test_workers import all_ready

EVENTS_TYPE = "application/vnd.docker.distribution.events.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
BLOB = "application/octet-stream"
CLOSE = {"Connection": "close"}       # each request on a new connection: any worker


class Receiver:
    """Records every envelope POSTed to /<endpoint> (and its headers); ``down()`` stops
    listening, ``up()`` listens again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.posts: list[tuple[str, dict[str, str], dict]] = []
        self._lock = threading.Lock()
        self._server: ServerThread | None = None

        async def events(request: Request) -> Response:
            body = json.loads(await request.body())
            with self._lock:
                headers = {k: ", ".join(request.headers.getlist(k)) for k in request.headers}
                self.posts.append((request.path_params["name"], headers, body))
            return Response(status_code=200)

        self.app = Starlette(routes=[Route("/{name}", events, methods=["POST"])])

    def up(self) -> Receiver:
        self._server = ServerThread(self.app, "receiver", port=self.port).start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def events(self, name: str | None = None) -> list[dict]:
        """What the endpoint ``name`` (None: any) got, in the order it came."""
        with self._lock:
            return [e for to, _, body in self.posts if name in (None, to)
                    for e in body["events"]]

    def wait_for(self, count: int, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(found := self.events()) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} events: {found}"
            time.sleep(0.05)
        return found


def endpoint(receiver: Receiver, name: str = "listener", **extra) -> dict:
    return {"name": name, "url": f"{receiver.url}/{name}", "timeout": "2s", "threshold": 2,
            "backoff": "100ms", **extra}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image(http: httpx.Client, repo: str, tag: str) -> tuple[bytes, bytes, bytes]:
    """A config, one layer and an OCI manifest tagged ``tag``; (config, layer, manifest)."""
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    layer = uuid.uuid4().bytes * 100
    for data in (config, layer):
        r = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data)
        assert r.status_code == 201, r.text
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha(layer), "size": len(layer)}]}).encode()
    r = http.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
                 headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return config, layer, manifest


def metric(mirror, line_start: str) -> float:
    text = httpx.get(f"{mirror.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_push_pull_and_delete_arrive_in_order_in_registry2s_envelope(make_mirror):
    receiver = Receiver().up()
    try:
        mirror = make_mirror({
            "upstreams": {}, "hosted": {"repositories": ["*"], "delete": True},
            "notifications": {"endpoints": [endpoint(
                receiver, headers={"Authorization": ["Bearer s3cret"], "X-Two": ["a", "b"]})]}})
        with httpx.Client(base_url=mirror.url, timeout=30,
                          headers={"User-Agent": "notify-test/1.0"}) as http:
            config, layer, manifest = push_image(http, "team/app", "v1")
            assert http.get("/v2/team/app/manifests/v1",
                            headers={"Accept": OCI_MANIFEST}).content == manifest
            assert http.head("/v2/team/app/manifests/v1").status_code == 200      # no event
            assert http.head(f"/v2/team/app/blobs/{sha(layer)}").status_code == 200  # no event
            assert http.get(f"/v2/team/app/blobs/{sha(layer)}").content == layer
            r = http.post("/v2/team/other/blobs/uploads/",
                          params={"mount": sha(layer), "from": "team/app"})
            assert r.status_code == 201
            assert http.delete("/v2/team/app/manifests/v1").status_code == 202
            assert http.delete(f"/v2/team/app/manifests/{sha(manifest)}").status_code == 202
        found = receiver.wait_for(8)
        time.sleep(0.3)                                 # nothing more comes
        found = receiver.events()
    finally:
        receiver.down()
    summary = [(e["action"], e["target"].get("digest"), e["target"].get("tag"))
               for e in found]
    assert summary == [
        ("push", sha(config), None), ("push", sha(layer), None),
        ("push", sha(manifest), "v1"), ("pull", sha(manifest), "v1"),
        ("pull", sha(layer), None), ("mount", sha(layer), None), ("delete", None, "v1"),
        ("delete", sha(manifest), None)]
    _, headers, _ = receiver.posts[0]
    assert headers["content-type"] == EVENTS_TYPE
    assert headers["authorization"] == "Bearer s3cret"
    assert headers["x-two"] == "a, b"
    push, pull = found[2], found[3]
    base = f"http://{mirror.host}"
    assert push["target"] == {"mediaType": OCI_MANIFEST, "size": len(manifest),
                              "length": len(manifest), "digest": sha(manifest),
                              "repository": "team/app", "tag": "v1",
                              "url": f"{base}/v2/team/app/manifests/{sha(manifest)}"}
    assert pull["target"] == push["target"]
    assert found[4]["target"] == {"mediaType": BLOB, "size": len(layer), "length": len(layer),
                                  "digest": sha(layer), "repository": "team/app",
                                  "url": f"{base}/v2/team/app/blobs/{sha(layer)}"}
    assert found[5]["target"]["fromRepository"] == "team/app"
    assert found[5]["target"]["repository"] == "team/other"
    assert found[6]["target"] == {"repository": "team/app", "tag": "v1"}
    for e in found:
        uuid.UUID(e["id"])
        assert datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).tzinfo
        assert e["actor"] == {}                       # anonymous (no logins configured)
        assert e["source"]["addr"].endswith(f":{mirror.port}")
        assert e["source"]["instanceID"] == found[0]["source"]["instanceID"]
        request = e["request"]
        assert request["host"] == mirror.host and request["useragent"] == "notify-test/1.0"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", request["addr"])
        uuid.UUID(request["id"])
    assert [e["request"]["method"] for e in found] == \
        ["POST", "POST", "PUT", "GET", "GET", "POST", "DELETE", "DELETE"]
    assert len({e["id"] for e in found}) == 8
    assert metric(mirror, 'mirror_notification_events_sent_total{endpoint="listener"}') == 8


def test_cache_fills_and_pulls_through_the_upstream_and_ignore_rules(make_mirror, image_set,
                                                                      upstream):
    receiver = Receiver().up()
    image = image_set.oci
    try:
        mirror = make_mirror({
            "upstreams": {"docker.io": {"url": upstream.url},
                          "local.test": {"url": upstream.url}},
            "notifications": {"endpoints": [
                endpoint(receiver, "all"),
                endpoint(receiver, "manifests", ignoredmediatypes=[BLOB],
                         ignore={"actions": ["pull"]}),
                endpoint(receiver, "off", disabled=True)]}})
        layer = image.blobs[-1]
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            r = http.get("/v2/local.test/org/team/app/manifests/1.0",
                         headers={"Accept": image.media_type})
            assert r.status_code == 200 and r.content == image.manifest
            r = http.get(f"/v2/local.test/org/team/app/blobs/{layer.digest}")
            assert r.status_code == 200 and len(r.content) == layer.size
            r = http.get(f"/v2/local.test/org/team/app/blobs/{layer.digest}")   # a hit
            assert r.status_code == 200
        found = receiver.wait_for(6)
        time.sleep(0.3)
        found = receiver.events()
    finally:
        receiver.down()
    name = "local.test/org/team/app"          # as the client named it
    assert [(e["action"], e["target"]["digest"], e["target"]["mediaType"])
            for e in receiver.events("manifests")] == [("mirror.fetch", image.digest,
                                                         image.media_type)]
    every = receiver.events("all")
    got = [(e["action"], e["target"]["digest"]) for e in every]
    # The miss: the pull's event goes when the last byte has gone, the fetch's when the
    # blob is in the cache: either may be first.
    assert got[:2] == [("mirror.fetch", image.digest), ("pull", image.digest)]
    assert sorted(got[2:4]) == [("mirror.fetch", layer.digest), ("pull", layer.digest)]
    assert got[4:] == [("pull", layer.digest)]
    for e in every:
        assert e["target"]["repository"] == name
        assert e["target"]["url"].startswith(f"http://{mirror.host}/v2/{name}/")
    assert every[1]["target"]["tag"] == "1.0"
    fetch = next(e for e in every[2:4] if e["action"] == "mirror.fetch")
    assert fetch["target"]["size"] == layer.size and fetch["target"]["mediaType"] == BLOB
    assert len(found) == 6


def test_a_receiver_down_for_a_while_gets_the_queue_after_a_restart_up_to_the_bound(
        make_mirror):
    receiver = Receiver()                      # not listening yet
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"]},
                          "notifications": {"endpoints": [endpoint(receiver, queue_limit=6)]}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        config, layer, manifest = push_image(http, "team/app", "v1")      # 3 events
        for _ in range(5):                                                  # 5 more
            assert http.get("/v2/team/app/manifests/v1").status_code == 200
    deadline = time.monotonic() + 20
    key = 'mirror_notification_events_dropped_total{endpoint="listener"}'
    while metric(mirror, key) != 2:
        assert time.monotonic() < deadline, httpx.get(f"{mirror.url}/metrics").text
        time.sleep(0.05)
    # Logged, but not once per event.
    assert 1 <= len(re.findall(r"listener: the queue is full \(queue_limit 6\); dropped \d+ "
                               r"event", mirror.log_text())) <= 2
    assert metric(mirror, 'mirror_notification_deliveries_failed_total{endpoint="listener"}') > 0
    mirror.restart()                          # the queue is on disk
    receiver.up()
    try:
        found = receiver.wait_for(6)
        time.sleep(0.3)
        found = receiver.events()
    finally:
        receiver.down()
    assert [(e["action"], e["target"]["digest"]) for e in found] == [
        ("push", sha(config)), ("push", sha(layer)), ("push", sha(manifest)),
        *[("pull", sha(manifest))] * 3]


def test_two_workers_each_event_is_delivered_once(make_mirror):
    receiver = Receiver().up()
    try:
        mirror = all_ready(make_mirror({
            "workers": 2, "upstreams": {}, "hosted": {"repositories": ["*"]},
            "notifications": {"endpoints": [endpoint(receiver)]}}))
        with httpx.Client(base_url=mirror.url, timeout=30) as http:
            push_image(http, "team/app", "v1")
        pulls = 0
        deadline = time.monotonic() + 30
        while True:
            for _ in range(10):
                r = httpx.get(f"{mirror.url}/v2/team/app/manifests/v1", headers=CLOSE)
                assert r.status_code == 200
                pulls += 1
            found = receiver.wait_for(3 + pulls)
            if len({e["source"]["instanceID"] for e in found}) == 2:
                break
            assert time.monotonic() < deadline, "the pulls never reached both workers"
        time.sleep(0.5)
        found = receiver.events()
    finally:
        receiver.down()
    assert len(found) == 3 + pulls
    assert len({e["id"] for e in found}) == len(found)
    assert len({e["request"]["id"] for e in found}) == len(found)
    assert [e["action"] for e in found].count("pull") == pulls


def test_stale_serves_evictions_and_the_actor(make_mirror, faulty_upstream, image_set,
                                              tmp_path):
    """mirror.stale when upstream fails and the cached copy is served; mirror.evict when
    the budget makes room; ``actor.name`` is the user the request logged in as."""
    from mirror.passwords import hash_password
    from tests.test_cli import closure
    from tests.test_pull_through import fetch_blob, get_manifest

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{hash_password('secret', rounds=4)}\n")
    docker, big = image_set.docker, image_set.big
    receiver = Receiver().up()
    try:
        mirror = make_mirror({
            "upstreams": {"docker.io": {"url": faulty_upstream.url, "tag_ttl": "0s",
                                        "retries": 0}},
            "max_size": closure(big) + closure(docker) // 2, "high_watermark": "100%",
            "low_watermark": "50%", "auth": {"htpasswd": str(htpasswd)},
            "notifications": {"endpoints": [endpoint(receiver, ignore={"actions": ["pull"]})]}})
        with httpx.Client(base_url=mirror.url, timeout=60, auth=("alice", "secret")) as http:
            assert get_manifest(http, docker.repo, "v1").status_code == 200
            for blob in docker.blobs:
                fetch_blob(http, docker.repo, blob)
            fault = faulty_upstream.arm("status", path_contains="/manifests/", status=503)
            r = get_manifest(http, docker.repo, "v1")               # tag expired: revalidate
            assert r.status_code == 200 and r.content == docker.manifest
            assert fault.hits >= 1
            faulty_upstream.clear()
            for blob in big.blobs:                    # over the budget: docker's go
                fetch_blob(http, big.repo, blob)
        deadline = time.monotonic() + 20
        while not any(e["action"] == "mirror.evict" for e in receiver.events()):
            assert time.monotonic() < deadline, receiver.events()
            time.sleep(0.05)
        time.sleep(0.3)
        found = receiver.events()
    finally:
        receiver.down()
    stale = [e for e in found if e["action"] == "mirror.stale"]
    fills = 1 + len(docker.blobs)                  # the manifest, then its blobs
    assert [e["action"] for e in found[:fills + 1]] == ["mirror.fetch"] * fills + ["mirror.stale"]
    assert len(stale) == 1
    assert stale[0]["target"]["digest"] == docker.digest
    assert stale[0]["target"]["tag"] == "v1"
    assert stale[0]["target"]["repository"] == docker.repo
    assert stale[0]["actor"] == {"name": "alice"}
    assert stale[0]["request"]["method"] == "GET"
    evicted = [e for e in found if e["action"] == "mirror.evict"]
    docker_digests = {docker.digest} | {b.digest for b in docker.blobs}
    gone = {e["target"]["digest"] for e in evicted}
    assert gone & docker_digests and gone <= docker_digests | {b.digest for b in big.blobs}
    for e in evicted:
        assert e["target"]["repository"] == "" and e["target"]["size"] > 0
    assert metric(mirror, "mirror_evictions_total") == len(evicted)


@pytest.mark.parametrize("endpoints, message", [
    ([{"name": "a/b", "url": "http://x/e"}], "notifications.endpoints[0].name: expected a name"),
    ([{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}],
     "notifications.endpoints[1].name: 'a' is used by another endpoint"),
    ([{"name": "a"}], "notifications.endpoints[0].url: missing"),
    ([{"name": "a", "url": "ftp://x"}], "notifications.endpoints[0].url: expected an http"),
    ([{"name": "a", "url": "http://x", "headers": {"A": {"b": 1}}}],
     "notifications.endpoints[0].headers.A: expected a list of values"),
    ([{"name": "a", "url": "http://x", "timeout": "soon"}],
     "notifications.endpoints[0].timeout: expected a duration"),
    ([{"name": "a", "url": "http://x", "threshold": 0}],
     "notifications.endpoints[0].threshold: expected a whole number"),
    ([{"name": "a", "url": "http://x", "ignore": {"actions": ["pul"]}}],
     "notifications.endpoints[0].ignore.actions: unknown action 'pul'"),
    ([{"name": "a", "url": "http://x", "queue_limt": 5}],
     "notifications.endpoints[0].queue_limt: unknown key"),
])
def test_a_bad_notifications_section_is_one_line_naming_the_key(tmp_path, endpoints, message):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"notifications": {"endpoints": endpoints}}))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_defaults_are_registry2s(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"notifications": {"endpoints": [
        {"name": "a", "url": "http://x/e", "ignoredmediatypes": [BLOB],
         "ignore": {"mediatypes": ["m"], "actions": ["pull"]}}]}}))
    (e,) = load_config(path, environ={}).notifications.endpoints
    assert (e.timeout, e.threshold, e.backoff, e.queue_limit, e.disabled) == \
        (1.0, 10, 1.0, 10000, False)
    assert e.ignored_media_types == {BLOB, "m"} and e.ignored_actions == {"pull"}


def test_a_receiver_that_comes_back_gets_what_waited_without_a_restart(make_mirror):
    receiver = Receiver()                      # not listening yet
    mirror = make_mirror({"upstreams": {}, "hosted": {"repositories": ["*"]},
                          "notifications": {"endpoints": [endpoint(receiver)]}})
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        config, layer, manifest = push_image(http, "team/app", "v1")
    key = 'mirror_notification_deliveries_failed_total{endpoint="listener"}'
    deadline = time.monotonic() + 20
    while metric(mirror, key) < 4:             # two rounds of threshold (2) failures
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "2 tries failed" in mirror.log_text()
    receiver.up()
    try:
        found = receiver.wait_for(3)
    finally:
        receiver.down()
    assert [e["target"]["digest"] for e in found] == [sha(config), sha(layer), sha(manifest)]
    assert "listener: delivered again after" in mirror.log_text()


def test_a_queue_file_the_mirror_cannot_open_is_one_line_at_start(tmp_path):
    from tests.test_startup_failures import serve

    data = tmp_path / "data"
    (data / "notifications" / "listener.db").mkdir(parents=True)   # not a database
    proc = serve(tmp_path, {"listen": f"127.0.0.1:{free_port()}", "data_dir": str(data),
                            "workers": 1, "upstreams": {}, "hosted": {"repositories": ["*"]},
                            "notifications": {"endpoints": [
                                {"name": "listener", "url": "http://127.0.0.1:9/e"}]}})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"mirror: {data / 'notifications' / 'listener.db'}: cannot open the notification "
        "queue of listener: unable to open database file"), proc.stderr
