"""A round-robin HTTP front for replicas: the load balancer of a site, on real sockets.

``RoundRobinFront(urls)`` listens on a free 127.0.0.1 port (``.url``, ``.host``) and
hands each request to one of ``urls`` (plain http), streaming the body both ways, one
new upstream connection per request. Requests go to the replicas in turn; a request of
an upload session (``/v2/<name>/blobs/uploads/<id>``) goes to the replica after the one
that served the session's previous request, so the POST, the PATCHes and the PUT of
one upload always reach different replicas (as a balancer that alternates per request
may well do). ``.served`` lists ``(method, path, replica index)`` of every request.
"""

from __future__ import annotations

import http.client
import itertools
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-connection"}
_SESSION = re.compile(r"^/v2/.+/blobs/uploads/([^/?]+)")
CHUNK = 64 * 1024


class _Limited:
    """The next ``n`` bytes of a stream, as a file http.client can send."""

    def __init__(self, stream, n: int) -> None:
        self.stream, self.left = stream, n

    def read(self, size: int = CHUNK) -> bytes:
        if self.left <= 0:
            return b""
        data = self.stream.read(min(size if size > 0 else CHUNK, self.left))
        self.left -= len(data)
        return data


def _chunked(stream):
    """The chunks of a chunked request body."""
    while True:
        size = int(stream.readline().split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while stream.readline() not in (b"\r\n", b"\n", b""):
                pass                       # trailers
            return
        yield stream.read(size)
        stream.readline()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _forward(self) -> None:
        front = self.server.front
        index = front.choose(self.path)
        target = urllib.parse.urlsplit(front.urls[index])
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        body = None
        encode_chunked = False
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body, encode_chunked = _chunked(self.rfile), True
        elif int(self.headers.get("Content-Length", "0") or 0):
            body = _Limited(self.rfile, int(self.headers["Content-Length"]))
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers,
                         encode_chunked=encode_chunked)
            resp = conn.getresponse()
            front.record(self.command, self.path, index, resp.getheader("Location"))
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            bodiless = self.command == "HEAD" or resp.status in (204, 304) \
                or 100 <= resp.status < 200
            if not bodiless and length is None:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if bodiless:
                return
            while chunk := resp.read(CHUNK):
                if length is None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    self.wfile.write(chunk)
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
        except (OSError, http.client.HTTPException):
            self.close_connection = True       # the client sees its connection end
        finally:
            conn.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    front: RoundRobinFront


class RoundRobinFront:
    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self.served: list[tuple[str, str, int]] = []
        self._turn = itertools.cycle(range(len(self.urls)))
        self._sessions: dict[str, int] = {}       # upload id -> replica of its last request
        self._posted: dict[str, int] = {}         # upload id -> replica of its POST
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def choose(self, path: str) -> int:
        with self._lock:
            found = _SESSION.match(path)
            if found and found.group(1) in self._sessions:
                return (self._sessions[found.group(1)] + 1) % len(self.urls)
            return next(self._turn)

    def record(self, method: str, path: str, index: int, location: str | None) -> None:
        with self._lock:
            self.served.append((method, path, index))
            for where in (path, location or ""):
                found = _SESSION.match(urllib.parse.urlsplit(where).path)
                if found:
                    self._sessions[found.group(1)] = index
                    if where is location and method == "POST":
                        self._posted[found.group(1)] = index

    def uploads(self) -> dict[str, list[tuple[str, int]]]:
        """Upload id -> (method, replica) of each of its requests, POST first."""
        with self._lock:
            served = list(self.served)
            out = {upload: [("POST", index)] for upload, index in self._posted.items()}
        for method, path, index in served:
            found = _SESSION.match(path)
            if found and found.group(1) in out:
                out[found.group(1)].append((method, index))
        return out

    def start(self) -> RoundRobinFront:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.front = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> RoundRobinFront:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
