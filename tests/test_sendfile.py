"""Cached blobs go out by zero-copy send (the ASGI ``http.response.zerocopysend``
extension our uvicorn protocol offers on plain HTTP, mirror/zerocopy.py), exactly as
the streamed path served them: byte-exact, Range, HEAD, keep-alive and pipelined
requests after a body, clients that leave or stop reading, the access log's bytes,
and TLS still streamed. ``mirror_sendfile_bytes_total`` shows which path was taken."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time

import httpx
import pytest

from tests.support.s3 import using_s3
from tests.test_observability import scrape, value
from tests.test_pull_through import hub_config
from tests.test_tls import certs  # noqa: F401  (a fixture)

SENT = "mirror_sendfile_bytes_total"

pytestmark = pytest.mark.skipif(
    using_s3(), reason="zero-copy send is of cached files in the data dir; blobs on S3 are "
                       "streamed from the bucket (tests/test_s3_storage.py)")


def big_layer(image_set):
    image = image_set.big
    return image.repo, max(image.blobs, key=lambda b: b.size)


def blob_path(repo, blob) -> str:
    return f"/v2/{repo}/blobs/{blob.digest}"


def file_bytes(blob, start=0, end=None) -> bytes:
    with open(blob.path, "rb") as f:
        f.seek(start)
        return f.read((end if end is not None else blob.size) - start)


@pytest.fixture
def warm(make_mirror, upstream, image_set):
    """A mirror with the big layer cached (fetched once, streamed as it downloaded)."""
    mirror = make_mirror(hub_config(upstream))
    repo, blob = big_layer(image_set)
    resp = httpx.get(mirror.url + blob_path(repo, blob), timeout=60)
    assert resp.status_code == 200 and len(resp.content) == blob.size
    return mirror, repo, blob


def sendfile_bytes(mirror) -> float:
    return value(scrape(mirror), SENT)


def request(sock: socket.socket, method: str, path: str, headers: str = "") -> None:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: mirror\r\n{headers}\r\n".encode())


class Reader:
    """Responses read off one raw connection (Content-Length bodies only)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, bytearray()

    def _more(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        end = self.buf.index(b"\r\n\r\n")
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._more()
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return status, headers, body


def connect(mirror) -> socket.socket:
    return socket.create_connection(("127.0.0.1", mirror.port), timeout=30)


def open_fds(mirror, path) -> int:
    """How many of the server's descriptors are open on ``path``."""
    fd_dir = f"/proc/{mirror.proc.pid}/fd"
    n = 0
    for name in os.listdir(fd_dir):
        try:
            n += os.readlink(f"{fd_dir}/{name}") == str(path)
        except FileNotFoundError:
            pass
    return n


def no_tracebacks(mirror) -> None:
    text = mirror.log_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


def test_warm_blob_goes_zero_copy_byte_exact_and_logged(warm):
    mirror, repo, blob = warm
    before = sendfile_bytes(mirror)
    h = hashlib.sha256()
    with httpx.stream("GET", mirror.url + blob_path(repo, blob), timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-length"] == str(blob.size)
        for chunk in resp.iter_raw():
            h.update(chunk)
    assert f"sha256:{h.hexdigest()}" == blob.digest
    assert sendfile_bytes(mirror) - before == blob.size
    line = [x for x in mirror.log_text().splitlines() if blob.digest in x and " hit " in x][-1]
    assert f'" 200 {blob.size} ' in line
    no_tracebacks(mirror)


def test_ranges_zero_copy(warm):
    mirror, repo, blob = warm
    size = blob.size
    cases = [("bytes=0-0", 0, 1), (f"bytes={size // 3}-{size // 2}", size // 3, size // 2 + 1),
             ("bytes=-500", size - 500, size), (f"bytes={size - 1}-", size - 1, size),
             (f"bytes={size // 2}-", size // 2, size)]
    before = sendfile_bytes(mirror)
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        for header, start, end in cases:
            resp = client.get(blob_path(repo, blob), headers={"Range": header})
            assert resp.status_code == 206, header
            assert resp.headers["content-range"] == f"bytes {start}-{end - 1}/{size}", header
            assert resp.headers["content-length"] == str(end - start)
            assert resp.content == file_bytes(blob, start, end), header
        resp = client.get(blob_path(repo, blob), headers={"Range": f"bytes={size}-"})
        assert resp.status_code == 416
    assert sendfile_bytes(mirror) - before == sum(end - start for _, start, end in cases)
    no_tracebacks(mirror)


def test_keepalive_and_pipelined_requests_after_a_zero_copy_body(warm):
    mirror, repo, blob = warm
    path = blob_path(repo, blob)
    with connect(mirror) as sock:
        reader = Reader(sock)
        request(sock, "GET", path)
        status, headers, body = reader.response()
        assert status == 200 and hashlib.sha256(body).hexdigest() == blob.digest[7:]
        request(sock, "HEAD", path)
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and headers["content-length"] == str(blob.size)
        # Three at once: a range, the whole blob, and a small JSON answer.
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: m\r\nRange: bytes=10-19\r\n\r\n"
                     f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n"
                     f"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        status, _, body = reader.response()
        assert status == 206 and body == file_bytes(blob, 10, 20)
        status, _, body = reader.response()
        assert status == 200 and body == file_bytes(blob)
        status, _, body = reader.response()
        assert status == 200 and body.startswith(b"{")
        request(sock, "GET", "/healthz")
        assert reader.response()[0] == 200
    no_tracebacks(mirror)


def test_offered_on_httptools_only():
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from mirror.server import protocol_class
    from mirror.zerocopy import ZeroCopySend
    assert ZeroCopySend in protocol_class(10, HttpToolsProtocol).__mro__
    assert ZeroCopySend not in protocol_class(10, H11Protocol).__mro__


def test_streamed_and_zero_copy_bodies_pipelined_keep_their_order(warm, image_set):
    """A slow reader's pipelined requests: a download streamed through uvicorn, then a
    cached blob's zero-copy body, then a streamed manifest, then zero-copy again."""
    mirror, repo, big = warm
    cold = max(image_set.oci.blobs, key=lambda b: b.size)
    manifest = f"/v2/{repo}/manifests/{image_set.big.digest}"
    before = sendfile_bytes(mirror)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", mirror.port))
    with sock:
        sock.settimeout(30)
        sock.sendall("".join(f"GET {path} HTTP/1.1\r\nHost: m\r\nAccept: */*\r\n\r\n" for path in
                             (blob_path(image_set.oci.repo, cold), blob_path(repo, big), manifest,
                              blob_path(repo, big))).encode())
        time.sleep(0.3)
        reader = Reader(sock)
        status, _, body = reader.response()
        assert status == 200 and body == file_bytes(cold)
        status, _, body = reader.response()
        assert status == 200 and body == file_bytes(big)
        status, _, body = reader.response()
        assert status == 200 and body == image_set.big.manifest
        status, _, body = reader.response()
        assert status == 200 and body == file_bytes(big)
    assert sendfile_bytes(mirror) - before == 2 * big.size
    no_tracebacks(mirror)


@pytest.mark.parametrize("how", ["close", "reset", "at once"])
def test_client_leaving_mid_body(warm, how):
    mirror, repo, blob = warm
    cached = mirror.cached_path(blob.digest)
    for _ in range(3):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)   # it cannot take it all
        sock.connect(("127.0.0.1", mirror.port))
        request(sock, "GET", blob_path(repo, blob))
        if how != "at once":
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.close()
    deadline = time.monotonic() + 10
    while open_fds(mirror, cached) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(mirror, cached) == 0          # every response let go of its file
    with connect(mirror) as sock:
        request(sock, "GET", blob_path(repo, blob), "Range: bytes=0-99\r\n")
        status, _, body = Reader(sock).response()
        assert status == 206 and body == file_bytes(blob, 0, 100)
    no_tracebacks(mirror)


def test_a_client_that_stops_reading_holds_only_itself(warm):
    mirror, repo, blob = warm
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    stuck.connect(("127.0.0.1", mirror.port))
    try:
        request(stuck, "GET", blob_path(repo, blob))
        time.sleep(0.5)                      # the server's socket buffer fills up
        started = time.monotonic()
        with httpx.Client(base_url=mirror.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            resp = client.get(blob_path(repo, blob))
            assert resp.status_code == 200 and resp.content == file_bytes(blob)
        assert time.monotonic() - started < 8
        stuck.settimeout(30)                 # read at last, it still gets every byte
        status, _, body = Reader(stuck).response()
        assert status == 200 and body == file_bytes(blob)
    finally:
        stuck.close()
    no_tracebacks(mirror)


def test_a_cached_file_cut_short_aborts_the_connection(warm):
    mirror, repo, blob = warm
    cached = mirror.cached_path(blob.digest)
    os.truncate(cached, blob.size // 2)
    with connect(mirror) as sock:
        request(sock, "GET", blob_path(repo, blob))
        reader = Reader(sock)
        with pytest.raises(ConnectionError):
            reader.response()                   # never a short body that looks complete


def test_tls_still_streams_byte_exact(make_mirror, upstream, image_set, certs):  # noqa: F811
    config = hub_config(upstream)
    config["tls"] = {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}
    mirror = make_mirror(config)
    repo, blob = big_layer(image_set)
    verify = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with httpx.Client(base_url=mirror.url, timeout=60, verify=verify) as client:
        for _ in range(2):                      # a miss, then from the cache
            resp = client.get(blob_path(repo, blob))
            assert resp.status_code == 200
            assert hashlib.sha256(resp.content).hexdigest() == blob.digest[7:]
        resp = client.get(blob_path(repo, blob), headers={"Range": "bytes=-100"})
        assert resp.status_code == 206 and resp.content == file_bytes(blob, blob.size - 100)
        metrics = client.get("/metrics").text
    assert f"{SENT} 0.0" in metrics             # offered only on plain HTTP
    no_tracebacks(mirror)


def test_a_blob_not_in_the_page_cache_is_read_off_the_loop(warm):
    mirror, repo, blob = warm
    cached = mirror.cached_path(blob.digest)
    fd = os.open(cached, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # out of the page cache
    finally:
        os.close(fd)
    before = sendfile_bytes(mirror)
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        assert client.get(blob_path(repo, blob)).content == file_bytes(blob)
    assert sendfile_bytes(mirror) - before == blob.size
    no_tracebacks(mirror)


@pytest.mark.parametrize("how", ["cachestat", "mincore"])
def test_page_cache_residency(tmp_path, monkeypatch, how):
    from mirror import zerocopy
    if how == "mincore":
        monkeypatch.setattr(zerocopy, "_CACHESTAT", None)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        assert zerocopy._resident(fd, 0, 3 << 20)
        assert not zerocopy._resident(fd, 100, 3 << 20)        # past the end of the file
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not zerocopy._resident(fd, 0, 3 << 20)
        assert not zerocopy._resident(fd, 5000, 10)
        os.pread(fd, 1 << 20, 1 << 20)
        assert zerocopy._resident(fd, 1 << 20, 1 << 20)
        assert not zerocopy._resident(fd, 0, 3 << 20)
    finally:
        os.close(fd)
