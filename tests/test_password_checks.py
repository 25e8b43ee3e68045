"""Password checks never block the event loop: bcrypt runs on a bounded thread pool,
an unknown user costs as much as a known one, and repeated failures for one user or
one client address are refused for a while (429 with Retry-After)."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mirror.passwords import hash_password
from tests.test_auth import USERS, auth_config, basic, error_code, token
from tests.test_pull_through import hub_config


def slow_users_config(upstream, tmp_path, **auth):
    """Basic logins for USERS hashed with bcrypt cost 11 (a tenth of a second or more per
    check), so a check on the event loop would show in every other request."""
    htpasswd = tmp_path / "htpasswd-slow"
    htpasswd.write_text("".join(f"{u}:{hash_password(p, rounds=11)}\n" for u, p in USERS.items()))
    return {**hub_config(upstream), "auth": {"htpasswd": str(htpasswd), **auth}}


def test_concurrent_bad_logins_leave_healthz_flat(make_mirror, upstream, tmp_path):
    m = make_mirror(slow_users_config(upstream, tmp_path, max_failures=0))   # no refusals
    stop = threading.Event()
    latencies: list[float] = []

    def probe_health() -> None:
        with httpx.Client(base_url=m.url, timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)

    clients = [httpx.Client(base_url=m.url, timeout=60) for _ in range(30)]
    for client in clients:                            # connected, so the logins arrive at once
        assert client.get("/healthz").status_code == 200
    together = threading.Barrier(len(clients))

    def bad_login(i: int) -> int:
        together.wait()
        return clients[i].get("/v2/", headers=basic("alice", f"wrong{i}")).status_code

    prober = threading.Thread(target=probe_health)
    prober.start()
    try:
        time.sleep(0.2)
        with ThreadPoolExecutor(len(clients)) as pool:
            statuses = list(pool.map(bad_login, range(len(clients))))
    finally:
        stop.set()
        prober.join()
        for client in clients:
            client.close()
    assert statuses == [401] * 30                     # every one ran bcrypt and failed
    assert len(latencies) >= 5
    # Each check takes a tenth of a second or more; on the event loop, /healthz would wait
    # for several of them. Off it, /healthz answers at once (generous bound).
    assert max(latencies) < 1.0, sorted(latencies)[-5:]


def test_an_unknown_user_costs_as_much_as_a_known_one(make_mirror, upstream, tmp_path):
    m = make_mirror(slow_users_config(upstream, tmp_path, max_failures=0))

    def seconds(user: str) -> float:
        started = time.monotonic()
        resp = httpx.get(f"{m.url}/v2/", headers=basic(user, "wrong"), timeout=30)
        assert resp.status_code == 401
        return time.monotonic() - started

    known = statistics.median(seconds("alice") for _ in range(3))
    unknown = statistics.median(seconds(f"nobody{i}") for i in range(3))
    assert known > 0.05                                # bcrypt cost 11 really ran
    assert unknown > known / 2, (known, unknown)       # not the microseconds of a dict miss


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_repeated_failures_are_refused_for_a_while(mode, make_mirror, upstream, tmp_path):
    config = auth_config(upstream, tmp_path, token=mode == "token")
    config["auth"].update(max_failures=3, failure_window="2s")
    m = make_mirror(config)
    # A second client address: loopback answers any 127/8 source.
    elsewhere = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                             timeout=30)

    def login(user: str, password: str, client=httpx) -> httpx.Response:
        if mode == "token":
            return client.get(f"{m.url}/token", params={"service": "mirror"},
                              auth=(user, password))
        return client.get(f"{m.url}/v2/", headers=basic(user, password))

    with elsewhere:
        assert login("alice", USERS["alice"], elsewhere).status_code == 200
        for i in range(3):
            assert login("bob", f"wrong{i}").status_code == 401
        refused = login("bob", USERS["bob"])            # the right password, too
        assert refused.status_code == 429 and error_code(refused) == "TOOMANYREQUESTS"
        assert 1 <= int(refused.headers["retry-after"]) <= 2
        # The user is refused from another address, and the address for another user.
        assert login("bob", USERS["bob"], elsewhere).status_code == 429
        assert login("alice", USERS["alice"]).status_code == 429
        assert login("alice", USERS["alice"], elsewhere).status_code == 200
        assert login("nobody", "x", elsewhere).status_code == 401   # counts for the address...
        time.sleep(float(refused.headers["retry-after"]) + 0.2)
        assert login("bob", USERS["bob"]).status_code == 200        # ...and the window slid
        if mode == "token":
            assert token(m).status_code == 200        # anonymous needs no password check
