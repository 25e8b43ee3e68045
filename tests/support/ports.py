"""Free loopback ports, waiting for servers to come up, and stopping them."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 15, alive=None, verify=True) -> httpx.Response:
    """Poll ``url`` until it answers with any HTTP response (any status).

    ``alive`` is an optional callable; when it returns False (e.g. the
    server process has exited) we give up at once.  Raises TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server for {url} died while starting")
        try:
            return httpx.get(url, timeout=2, verify=verify)
        except httpx.TransportError as exc:
            last_error = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last_error!r}")


def stop_process(proc: subprocess.Popen, kill: bool = False, timeout: float = 10) -> None:
    """SIGTERM (or SIGKILL) a process we started, and reap it; SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
