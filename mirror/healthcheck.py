"""``mirror healthcheck``: is the mirror the config describes answering?

GETs ``/healthz`` on the configured ``listen`` address (a wildcard address, 0.0.0.0
or ::, is asked on the loopback of its family), over HTTPS when ``tls`` is set, with
certificate checks off: the certificate names the public host, not the loopback, and
this only asks whether the process answers. Exit status 0 on a 200 within
``TIMEOUT`` seconds, else one line on stderr and 1: what a container HEALTHCHECK or
a probe needs. Standard library only, so it starts fast.
"""

from __future__ import annotations

import http.client
import ssl
import sys
import time

from .config import Config

TIMEOUT = 3.0
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def target(config: Config) -> tuple[str, str, int]:
    """(scheme, host, port) to ask."""
    host = WILDCARDS.get(config.host, config.host)
    return ("https" if config.tls else "http"), host, config.port


def url(config: Config) -> str:
    scheme, host, port = target(config)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/healthz"


def probe(config: Config, timeout: float = TIMEOUT) -> str | None:
    """None if /healthz answered 200 within ``timeout``; else why not, in a few words."""
    scheme, host, port = target(config)
    deadline = time.monotonic() + timeout
    conn: http.client.HTTPConnection
    if scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
        conn.request("GET", "/healthz", headers={"User-Agent": "mirror-healthcheck"})
        resp = conn.getresponse()
        resp.read(1024)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused (is the mirror running, on this address?)"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except (OSError, http.client.HTTPException) as exc:
        return str(exc) or type(exc).__name__
    finally:
        conn.close()
    if time.monotonic() > deadline:
        return f"no answer within {timeout:g} s"
    if resp.status != 200:
        return f"answered {resp.status} {resp.reason}"
    return None


def healthcheck(config: Config) -> int:
    problem = probe(config)
    if problem is not None:
        print(f"mirror: healthcheck: {url(config)}: {problem}", file=sys.stderr)
        return 1
    print(f"healthy: {url(config)} answered 200")
    return 0
