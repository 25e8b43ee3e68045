"""Slow clients cannot exhaust the server: headers must arrive within
``limits.header_timeout``, idle keep-alive connections close after
``limits.keepalive_timeout``, and past ``limits.max_connections`` open connections
requests get 503. Raw sockets, so the client really is slow."""

from __future__ import annotations

import select
import socket
import time

import httpx

from tests.test_pull_through import hub_config


def connect(m) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", m.port), timeout=10)
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed (or reset) the connection; never blocks."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def request(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One complete GET on ``sock``; the response head and body."""
    sock.setblocking(True)
    sock.settimeout(10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    sock.setblocking(False)
    return head + b"\r\n\r\n" + body


def test_dripping_headers_are_cut_off_and_others_are_served(make_mirror, upstream):
    m = make_mirror(hub_config(upstream, limits={"header_timeout": "1s"}))
    started = time.monotonic()
    drippers = [connect(m) for _ in range(20)]
    silent = connect(m)                                # connects and never sends a byte
    for sock in drippers:
        sock.send(b"GET /healthz HTTP/1.1\r\n")
    closed_at: dict[int, float] = {}
    line = 0
    while len(closed_at) < len(drippers) + 1 and time.monotonic() - started < 6:
        line += 1
        for i, sock in enumerate(drippers + [silent]):
            if i in closed_at:
                continue
            if closed_by_server(sock):
                closed_at[i] = time.monotonic() - started
            elif sock is not silent:
                try:
                    sock.send(f"X-Slow-{line}: one line at a time\r\n".encode())
                except (BrokenPipeError, ConnectionResetError):
                    closed_at[i] = time.monotonic() - started
        # Meanwhile a normal client is served at once.
        assert httpx.get(f"{m.url}/healthz", timeout=5).status_code == 200
        time.sleep(0.25)
    for sock in drippers + [silent]:
        sock.close()
    assert len(closed_at) == len(drippers) + 1, \
        f"{len(drippers) + 1 - len(closed_at)} slow connections still open after 6 s"
    assert max(closed_at.values()) < 4, closed_at     # 1 s, with room for a busy machine


def test_idle_keepalive_connections_close_but_not_before_their_time(make_mirror, upstream):
    m = make_mirror(hub_config(upstream, limits={"header_timeout": "1s",
                                                 "keepalive_timeout": "2s"}))
    sock = connect(m)
    try:
        assert request(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1.3)                  # past header_timeout, within keepalive_timeout
        assert request(sock).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        while not closed_by_server(sock) and time.monotonic() - answered < 6:
            time.sleep(0.1)
        waited = time.monotonic() - answered
        assert 1.5 < waited < 4.5, waited             # about 2 s (uvicorn's default is 5)
    finally:
        sock.close()


def test_past_max_connections_requests_get_503(make_mirror, upstream):
    m = make_mirror(hub_config(upstream, limits={"max_connections": 3, "header_timeout": "2s"}))
    held = [connect(m) for _ in range(3)]
    try:
        time.sleep(0.5)                                # the server has accepted them
        resp = httpx.get(f"{m.url}/healthz", timeout=5)
        assert resp.status_code == 503
        # The held connections send nothing: header_timeout closes them, freeing room.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if httpx.get(f"{m.url}/healthz", timeout=5).status_code == 200:
                break
            time.sleep(0.25)
        else:
            raise AssertionError("still refused after the idle connections should have closed")
        assert all(closed_by_server(s) for s in held)
    finally:
        for sock in held:
            sock.close()
