"""Property-based fuzz of the URL space and the headers (hypothesis).

Thousands of generated requests go to one real mirror (``hub_config``: the test
upstream, holding the image set, as ``docker.io`` and as ``local.test``) over
real sockets, byte for byte as generated (no client-side normalisation).  Every
answer must be:

* below 500, from the application (``Docker-Distribution-API-Version`` set), or
  the HTTP parser's own plain ``400 Invalid HTTP request received.``.  The one
  5xx let through is a 502/503 passing on the upstream's own 5xx to a request
  that is valid (distribution answers a manifest GET by a layer's digest with
  500); one the grammar refuses means the mirror should have refused it;
* for a 4xx with a body (not HEAD; not /metrics, /healthz, /readyz): OCI error
  JSON, ``errors[0]`` with string ``code`` and ``message``;
* for a 200 blob GET: bytes hashing to the digest in the URL; a 206 the exact
  slice its Content-Range names (checked against the image set's files), for a
  Range that allows it; a 416 only for a Range that is not satisfiable;
* for a 200 manifest GET: bytes hashing to Docker-Content-Digest (== the digest
  in the URL when there is one; one of the image set's manifests when the name
  is one of its repositories).

Around the whole run (the ``test_zz_*`` tests at the end, which need the fuzz
tests before them in the same session):

* every file and directory in the fuzz temp dir outside the data dir (config,
  canary files next to the data dir and in a sibling directory) is unchanged:
  same set, sizes, mtimes and hashes; the data dir holds only the index, temp
  files and content-addressed blobs whose bytes match their names;
* the canaries were not read: their atime is set before their mtime, so even
  with ``relatime`` any read moves it (checked on a probe file first);
* ``strace -f -e trace=%file`` attached to the mirror for the whole run saw no
  path outside the data dir written (created, opened for writing, renamed,
  removed, ...) and no path read or looked up except the Python installation,
  the mirror's own source, /proc, /sys, /dev and a few resolver files;
* every request the mirror sent the upstream is inside the grammar (names of at
  most 255 characters after routing, valid tags and digests);
* the mirror's log has no traceback.

``MIRROR_TEST_FUZZ_SCALE`` multiplies the number of examples (default 1: about 3000
requests). With ``CI=true`` the examples are derandomized (the same every run);
elsewhere every run explores new ones.  A failure prints the request (``Req(...)``) and
the mirror's log lines for it; ``print_blob`` also prints a ``@reproduce_failure`` blob, and
``pytest --hypothesis-seed=N`` replays a whole run.  ``FOUND`` keeps requests this
fuzzer found answered with a 5xx, so that every run checks them again.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import site
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.support import syscalls
from tests.support.mirror import MirrorProcess
from tests.support.registry import _ACCESS_RE
from tests.test_pull_through import hub_config

SCALE = float(os.environ.get("MIRROR_TEST_FUZZ_SCALE", "1"))
BIG_GET_MAX = 16 * 1024 * 1024       # larger blobs are only HEADed (default big layer: 100 MiB)
TEXT_PATHS = ("/metrics", "/healthz", "/readyz")
PARSER_400 = b"Invalid HTTP request received."
SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+prettyjws",
           "application/vnd.docker.distribution.manifest.v1+json")


# In CI (CI=true) the examples are derandomized: the same every run, so a landing never
# hinges on what the dice found that day. Elsewhere each run explores new examples.
DERANDOMIZE = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    print_blob=True, derandomize=DERANDOMIZE,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.large_base_example])


# -- the request, and sending it ----------------------------------------------------------


@dataclass(frozen=True)
class Req:
    """One request, sent exactly as written: ``target`` as UTF-8 (lone surrogates
    ``\\udcXX`` stand for raw bytes), header values as latin-1 where they fit, else UTF-8."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def wire(self, host: str) -> bytes:
        lines = [b"%s %s HTTP/1.1" % (self.method.encode(), _enc(self.target))]
        if not self.header_values("host"):
            lines.append(b"Host: " + host.encode())
        lines += [name.encode() + b": " + _enc(value, "latin-1") for name, value in self.headers]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d" % len(self.body))
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0].split("#", 1)[0]

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def http_clean(self) -> bool:
        """Whether this is well-formed HTTP/1.1 (so the parser has no reason to refuse it)."""
        target_ok = all(0x21 <= b <= 0x7e for b in _enc(self.target))
        values_ok = all(c == "\t" or 0x20 <= ord(c) <= 0x7e or 0x80 <= ord(c) <= 0xff
                        for _, v in self.headers for c in v)
        return target_ok and values_ok


def short(value, keep: int = 100):
    """repr with long strings cut (a 5000-digit Range stays readable in a message)."""
    if isinstance(value, (str, bytes)) and len(value) > keep:
        return f"{value[:keep // 2]!r}...<{len(value)}>...{value[-keep // 4:]!r}"
    if isinstance(value, tuple):
        return "(" + "".join(short(v, keep) + ", " for v in value).rstrip() + ")"
    if isinstance(value, Req):
        return (f"Req({value.method!r}, {short(value.target, keep)}, "
                f"{short(value.headers, keep)}, {short(value.body, keep)})")
    return repr(value)


def _enc(text: str, first: str = "utf-8") -> bytes:
    for encoding, errors in ((first, "surrogateescape"), ("utf-8", "surrogateescape"),
                             ("utf-8", "surrogatepass")):
        try:
            return text.encode(encoding, errors)
        except UnicodeEncodeError:
            pass
    raise AssertionError("unreachable: surrogatepass encodes every str")


@dataclass
class Resp:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def send(host: str, port: int, req: Req, timeout: float = 30) -> Resp | str:
    """The response, or a string saying how the connection ended without one."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(req.wire(f"{host}:{port}"))
        except (BrokenPipeError, ConnectionResetError) as exc:
            return f"send failed: {exc!r}"
        resp = http.client.HTTPResponse(sock, method=req.method)
        try:
            resp.begin()
            body = resp.read()
        except (ConnectionResetError, http.client.RemoteDisconnected,
                http.client.IncompleteRead, http.client.BadStatusLine) as exc:
            return f"no complete response: {exc!r}"
        headers: dict[str, list[str]] = {}
        for name, value in resp.getheaders():
            headers.setdefault(name.lower(), []).append(value)
        resp.close()
        return Resp(resp.status, headers, body)


# -- what the upstream holds ----------------------------------------------------------------


@dataclass(repr=False)
class Known:
    repos: list[str]                         # repositories on the upstream
    names: list[str]                         # names clients use for them
    tags: list[str]
    manifest_digests: list[str]
    manifests: dict[str, bytes]              # digest -> bytes
    repo_manifests: dict[str, set[str]]      # repository -> digests of its manifests
    blobs: dict[str, object]                 # digest -> images.Blob (path, size)
    blob_pairs: list[tuple[str, str]]        # (client name, digest) that exist upstream
    manifest_pairs: list[tuple[str, str]]    # (client name, tag or digest)
    canary_paths: list[str]                  # absolute paths of the canaries
    canary_rel: list[str]                    # the same relative to the data dir


def client_names(repo: str) -> list[str]:
    """How a client reaches ``repo`` of the upstream through hub_config."""
    names = [repo, f"docker.io/{repo}", f"local.test/{repo}"]
    if repo.startswith("library/"):
        bare = repo[len("library/"):]
        names += [bare, f"docker.io/{bare}"]
    return names


def build_known(image_set, canaries: list[Path], data_dir: Path) -> Known:
    repos, names, tags, blob_pairs, manifest_pairs = [], [], [], [], []
    manifests: dict[str, bytes] = {}
    repo_manifests: dict[str, set[str]] = {}
    for image in image_set.images:
        repos.append(image.repo)
        names += client_names(image.repo)
        tags += image.tags
        for m in image.manifests():
            manifests[m.digest] = m.manifest
            repo_manifests.setdefault(image.repo, set()).add(m.digest)
            for name in client_names(image.repo):
                manifest_pairs += [(name, m.digest), *((name, t) for t in m.tags)]
    blobs = {}
    for repo, blob in image_set.blobs():
        blobs[blob.digest] = blob
        if blob.size <= BIG_GET_MAX:
            blob_pairs += [(name, blob.digest) for name in client_names(repo)]
    rel = [os.path.relpath(c, data_dir) for c in canaries]
    return Known(repos, sorted(set(names)), sorted(set(tags)), sorted(manifests), manifests,
                 repo_manifests, blobs, blob_pairs, manifest_pairs,
                 [str(c) for c in canaries], rel)


# -- strategies ----------------------------------------------------------------------------

UPSTREAM_NAMES = ["docker.io", "local.test", "nope.example", "DOCKER.IO", "docker.io.", "",
                  "local.test:443", "127.0.0.1", "..", "docker.io%2f..", "é.example"]
SEGMENTS = ["manifests", "blobs", "tags", "list", "tags/list", "uploads", "blobs/uploads",
            "_catalog", "v2", "token", "metrics", "healthz", "readyz"]
HOSTILE = [
    "..", ".", "...", "%2e%2e", "%2E%2E", "%2e", ".%2e", "%2e.", "%2f", "%2F", "..%2f", "%2f..",
    "..%2f..%2f..%2fetc%2fpasswd", "%00", "a%00b", "%0a", "%0d%0a", "%0d", "%09", "%20", "%25",
    "%", "%zz", "%c0%ae%c0%ae", "%c0%af", "%ff", "%C3%A9", "%u002e", "\\", "..\\..", "a\\b",
    "..\\..\\etc\\passwd", "/etc/passwd", "etc/passwd", "/proc/self/environ", "/dev/zero",
    "..;", ";", "~", "~root", "*", "$HOME", "{}", "[]", "'", '"', "<", ">", "|", "`id`",
    "", "//", "///", "./", "../", "../../..", "./.", "a/../b", "a/./b", "UPPER", "a..b",
    "a__b", "a___b", "a--b", "-a", "a-", "_a", ".a", "a.", "__", "é", "ä/ö", "\u202e",
    "\ufeff", "．．", "／", "𝔞", "日本", "\u0000", "\t", " ", "\x7f", "\udcff", "\udcc0\udcae",
    "sha256:", "sha256", ":", "sha256::", "sha512:", "md5:d41d8cd98f00b204e9800998ecf8427e",
    "@", "@sha256:", "#", "#frag", "?", "&", "=",
]
VALID_ACCEPT = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws", "*/*", "application/json",
    "application/vnd.oci.image.manifest.v1+json;q=0.5, */*;q=0.1",
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
]
METHODS = ["GET"] * 8 + ["HEAD"] * 3 + ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
ODD_NUMBERS = ["1e9", "1.5", "0x10", " 1", "1 ", "+1", "-0", "1_000", "0" * 20 + "1",
               "9" * 10, "9" * 9, "9" * 5000, "\u0663", "\u0661\u0662", "\u00b2", "\u2460",
               "\U0001d7d7", "\u00bd", "\uff11", "NaN", "inf", "-inf", "", " ", "1,2", "1;2"]


def _hex(n: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdef", min_size=n, max_size=n)


def bad_digests() -> st.SearchStrategy[str]:
    wrong_len = st.integers(0, 140).filter(lambda n: n not in (64, 128))
    return st.one_of(
        wrong_len.flatmap(lambda n: _hex(n).map(lambda h: "sha256:" + h)),
        wrong_len.flatmap(lambda n: _hex(n).map(lambda h: "sha512:" + h)),
        _hex(64).map(lambda h: "sha256:" + h.upper()),
        _hex(64).map(lambda h: "SHA256:" + h),
        _hex(64).map(lambda h: "sha256:" + h[:-1] + "g"),
        _hex(64).map(lambda h: "sha256:" + h + "%00"),
        _hex(64).map(lambda h: "sha256:" + h + "/.."),
        _hex(64).map(lambda h: "sha384:" + h),
        _hex(64).map(lambda h: "sha256%3a" + h),
        _hex(62).map(lambda h: "sha256:../" + h),
        st.sampled_from(["sha256:..", "sha256:%2e%2e%2f%2e%2e", "sha256:../../../etc/passwd",
                         "sha256:" + "a" * 64 + "\\..\\..", "sha256:/etc/passwd"]),
    )


def good_digests(known: Known) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(known.manifest_digests + sorted(known.blobs)),
                     _hex(64).map(lambda h: "sha256:" + h),
                     _hex(128).map(lambda h: "sha512:" + h))


def hostile_pieces(known: Known) -> st.SearchStrategy[str]:
    long = st.sampled_from([63, 64, 127, 128, 129, 247, 248, 250, 255, 256, 1000, 4096]).flatmap(
        lambda n: st.sampled_from(["a", "A", ".", "%2e", "é", "a/", "../"]).map(
            lambda c: c * n))
    traversal = st.sampled_from(known.canary_rel + known.canary_paths).map(
        lambda p: p.lstrip("/"))
    encoded = traversal.map(lambda p: quote(p, safe=""))
    return st.one_of(st.sampled_from(HOSTILE), long, bad_digests(), traversal, encoded,
                     st.text(max_size=12))


def valid_pieces(known: Known) -> st.SearchStrategy[str]:
    component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
    return st.one_of(st.sampled_from(known.names + known.repos + known.tags + SEGMENTS
                                     + ["docker.io", "local.test", "library"]),
                     good_digests(known), component)


def pieces(known: Known) -> st.SearchStrategy[str]:
    return st.one_of(valid_pieces(known), valid_pieces(known), hostile_pieces(known))


def names(known: Known) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(known.names),
        st.lists(pieces(known), min_size=1, max_size=5).map("/".join),
        st.tuples(st.sampled_from(["docker.io/", "local.test/", "", "docker.io//", "/"]),
                  st.lists(pieces(known), min_size=1, max_size=3).map("/".join)).map("".join),
    )


def refs(known: Known) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(known.tags + ["latest", "nope"]), good_digests(known),
                     bad_digests(), hostile_pieces(known),
                     st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,130}", fullmatch=True))


def endpoints(known: Known) -> st.SearchStrategy[str]:
    return st.one_of(
        refs(known).map(lambda r: "manifests/" + r),
        st.one_of(good_digests(known), bad_digests(), hostile_pieces(known)).map(
            lambda d: "blobs/" + d),
        st.sampled_from(["tags/list", "tags/list/", "tags//list", "tags/list/x", "tags",
                         "blobs/uploads/", "blobs/uploads", "blobs/uploads/1234",
                         "blobs/uploads/../../x", "manifests/", "blobs/", "manifests",
                         "_catalog", ""]),
        st.lists(pieces(known), max_size=4).map("/".join),
    )


_NUMERIC = [chr(c) for c in range(0x80, 0x110000) if chr(c).isnumeric()]
DECIMALS = [c for c in _NUMERIC if c.isdecimal()]                    # int() takes these
DIGITS_NOT_DECIMAL = [c for c in _NUMERIC if c.isdigit() and not c.isdecimal()]   # \u00b2
NUMERIC_ONLY = [c for c in _NUMERIC if not c.isdigit()]              # \u00bd, \u2167


def unicode_numbers() -> st.SearchStrategy[str]:
    """Numbers written with the digits and numeric signs of every script, mixed with ASCII
    digits: the three kinds str.isdecimal/isdigit/isnumeric tell apart."""
    char = st.one_of(st.sampled_from(DECIMALS), st.sampled_from(DIGITS_NOT_DECIMAL),
                     st.sampled_from(NUMERIC_ONLY), st.sampled_from("0123456789"))
    return st.text(char, min_size=1, max_size=3)


def query_values(known: Known) -> st.SearchStrategy[str]:
    return st.one_of(unicode_numbers(),
        st.integers(-10 ** 30, 10 ** 30).map(str), st.integers(0, 2000).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(ODD_NUMBERS),
        st.sampled_from(known.tags + known.names + UPSTREAM_NAMES),
        hostile_pieces(known), st.text(max_size=20))


def queries(known: Known, focused: bool = False) -> st.SearchStrategy[str]:
    """Query strings; ``focused``: mostly n, last and ns, with the oddest values."""
    key = st.sampled_from(["n", "n", "last", "last", "ns", "ns", "N", "NS", "", "x", "n[]",
                           "ns%00", "n%20", "%6e"])
    values = query_values(known)
    if focused:
        key = st.sampled_from(["n", "n", "n", "last", "last", "ns", "ns", "%6e"])
        values = st.one_of(st.sampled_from(ODD_NUMBERS), unicode_numbers(), values)

    def encode(pair) -> st.SearchStrategy[str]:
        k, v = pair
        encoded = quote(v.encode("utf-8", "surrogatepass"), safe="")
        raw_ok = all(0x21 <= ord(c) <= 0x7e and c not in "#&" for c in v)
        return st.sampled_from([f"{k}={encoded}", f"{k}={v}"] if raw_ok else [f"{k}={encoded}"])

    pair = st.tuples(key, values).flatmap(encode)
    several = st.lists(st.one_of(pair, st.sampled_from(["n", "ns", "last", "=", "&", "n=1=2"])),
                       min_size=1, max_size=6).map(lambda ps: "?" + "&".join(ps))
    odd = st.sampled_from(["?", "??", "?&&", "?ns", "?ns=", "?n=", "?last=", "?%zz=%zz"])
    if focused:
        return st.one_of(pair.map(lambda p: "?" + p), several, pair.map(lambda p: "?" + p))
    return st.one_of(st.just(""), several, odd)


def range_values() -> st.SearchStrategy[str]:
    num = st.one_of(st.integers(0, 300_000), st.integers(0, 10 ** 12))
    # hypothesis favours small integers: name the lengths worth trying (19-20 digits
    # overflow 64 bits; Python refuses int() of more than 4300)
    long_digits = st.sampled_from([10, 19, 20, 21, 100, 1000, 4300, 4301, 5000, 8000])
    return st.one_of(
        st.tuples(num, num).map(lambda p: f"bytes={p[0]}-{p[1]}"),
        num.map(lambda a: f"bytes={a}-"),
        num.map(lambda n: f"bytes=-{n}"),
        st.tuples(num, num, num, num).map(lambda p: f"bytes={p[0]}-{p[1]},{p[2]}-{p[3]}"),
        st.tuples(st.sampled_from([" ", "\t", ""]), num, num).map(
            lambda p: f"{p[0]}bytes{p[0]}={p[0]}{p[1]}{p[0]}-{p[0]}{p[2]}{p[0]}"),
        long_digits.map(lambda n: "bytes=" + "9" * n + "-"),
        long_digits.map(lambda n: "bytes=0-" + "9" * n),
        long_digits.map(lambda n: "bytes=-" + "9" * n),
        st.sampled_from(["bytes=zz-", "bytes=-", "bytes=", "bytes", "items=0-1", "bytes=-0",
                         "bytes=0-0", "bytes=1-0", "bytes=-1-2", "bytes=0--1", "bytes=0x10-",
                         "bytes=1.5-2", "bytes=\u00b2-", "bytes=\u00a00-1", "bytes=0-1;x",
                         "BYTES=0-1", "bytes = 0 - 1", "bytes=0-1,", "bytes=,0-1",
                         "bytes=" + ",".join(["0-0"] * 500), "bytes=+1-2", "bytes=1-+2",
                         "bytes=0-\u0661", "", " "]),
        st.text(max_size=30),
    )


def accept_values() -> st.SearchStrategy[str]:
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60)
    return st.one_of(
        st.sampled_from(VALID_ACCEPT),
        st.lists(st.sampled_from(VALID_ACCEPT), min_size=1, max_size=6).map(", ".join),
        printable,
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=60),
        st.sampled_from(["a" * 8000, ",".join(["*/*"] * 3000), ";" * 8000,
                         "application/" + "x" * 7000, ", ".join(VALID_ACCEPT * 60),
                         "\x7f;;;,,,", "text/html, */*;q=0.1, x\ty/z", "a/b;q=" + "9" * 5000,
                         "\u00ff/\u00ff", "*/*;q=nan", "", " "]),
        st.text(max_size=10),                      # anything, incl. controls (parser 400)
    )


def auth_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["Basic", "Basic ", "Basic !!!", "Basic YWxpY2U=", "Basic YWxpY2U6",
                         "Basic /w==", "Basic " + "A" * 6000, "Bearer", "Bearer x.y.z",
                         "Bearer " + "a" * 6000, "Digest x", "basic YWxpY2U6c2VjcmV0"]),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=40))


def host_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["[", "[::1", "[::1]:80", "a b", "", "127.0.0.1:99999", "x:y:z",
                         "evil.example", "%00", "..", "h\u00fcst", "127.0.0.1:-1",
                         "localhost:" + "9" * 100, "a" * 300]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=20))


def headers(known: Known) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    one = st.one_of(
        st.tuples(st.just("Host"), host_values()),
        st.tuples(st.just("Accept"), accept_values()),
        st.tuples(st.just("Range"), range_values()),
        st.tuples(st.just("Authorization"), auth_values()),
        st.tuples(st.sampled_from(["If-None-Match", "If-Range", "X-Forwarded-For",
                                   "X-Forwarded-Proto", "Docker-Distribution-Api-Version",
                                   "Accept-Encoding", "User-Agent", "Cookie"]),
                  st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80)),
    )
    many_accepts = st.integers(30, 60).map(
        lambda n: tuple(("Accept", VALID_ACCEPT[i % len(VALID_ACCEPT)]) for i in range(n)))
    return st.one_of(st.lists(one, max_size=5).map(tuple), many_accepts)


def bodies(method: str) -> st.SearchStrategy[bytes]:
    if method in ("POST", "PUT", "PATCH"):
        return st.one_of(st.just(b""), st.binary(max_size=64),
                         st.just(b'{"schemaVersion": 2}'))
    return st.just(b"")


def requests_for(targets: st.SearchStrategy[str], known: Known,
                 methods=None, header_sets=None) -> st.SearchStrategy[Req]:
    methods = methods if methods is not None else st.sampled_from(METHODS)
    header_sets = header_sets if header_sets is not None else headers(known)

    @st.composite
    def build(draw) -> Req:
        # CR and LF would re-frame the request rather than test the server: the encoded
        # forms (%0d%0a) are among the hostile pieces instead.
        method = draw(methods)
        target = _no_crlf(draw(targets))
        hdrs = tuple((k, _no_crlf(v)) for k, v in draw(header_sets))
        return Req(method, target, hdrs, draw(bodies(method)))
    return build()


def _no_crlf(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


def any_targets(known: Known) -> st.SearchStrategy[str]:
    prefix = st.sampled_from(["/v2/"] * 12 + ["/v2//", "//v2/", "/v2/./", "/v2/../v2/", "/V2/",
                                              "/v2%2f", "/v2/%2e%2e/", "/", "/v2", "",
                                              "/token/", "/metrics/", "/./v2/", "\\v2\\"])
    structured = st.tuples(prefix, names(known), st.just("/"), endpoints(known)).map("".join)
    free = st.tuples(prefix, st.lists(pieces(known), max_size=8).map("/".join)).map("".join)
    roots = st.sampled_from(["/v2/", "/v2", "/v2/_catalog", "/v2/_catalog/", "/metrics",
                             "/healthz", "/readyz", "/token", "/", "*", "/favicon.ico",
                             "/metrics/../v2/", "/healthz%00", "/v2/_catalog/../..",
                             "http://127.0.0.1/v2/", "/../../../../etc/passwd"])
    path = st.one_of(structured, structured, structured, free, roots)
    return st.tuples(path, queries(known)).map("".join)


# -- what the mirror may ask the upstream ----------------------------------------------------

# The OCI distribution grammar, written out here independently of mirror/models.py.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
_UPSTREAM_PATH = re.compile(r"/v2/(.+)/(?:manifests/([^/?]+)|blobs/([^/?]+)|tags/list)(?:\?.*)?")


def invalid_upstream_request(path: str) -> str | None:
    """Why a request the mirror sent upstream is outside the grammar (None if it is not):
    whatever a client sends, the mirror must only ever forward valid names and refs."""
    if path in ("/v2/", "/v2"):
        return None
    m = _UPSTREAM_PATH.fullmatch(path)
    if not m:
        return "not a pull endpoint"
    name, ref = m.group(1), m.group(2) or m.group(3)
    if len(name) > 255 or not _NAME.fullmatch(name):
        return f"repository name invalid upstream ({len(name)} characters)"
    if ref is not None and not _REF.fullmatch(ref):
        return "reference invalid"
    return None


# -- checking one exchange -----------------------------------------------------------------

_BLOB_PATH = re.compile(r"/v2/(.+)/blobs/(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_MANIFEST_PATH = re.compile(r"/v2/(.+)/manifests/([^/]+)")
_RFC_RANGE = re.compile(r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def rfc_single_range(value: str, size: int) -> tuple[str, tuple[int, int] | None] | None:
    """('ok', (first, last)) or ('unsatisfiable', None) for one valid ``bytes=`` range,
    None if the value is not one (a server must then ignore it)."""
    m = _RFC_RANGE.fullmatch(value)
    if not m or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if len(first) > 4000 or len(last) > 4000:
        return None     # Python will not even parse these; either answer is acceptable
    if not first:
        n = int(last)
        return ("ok", (max(0, size - n), size - 1)) if n and size else ("unsatisfiable", None)
    a = int(first)
    if last and int(last) < a:
        return None
    if a >= size:
        return ("unsatisfiable", None)
    return ("ok", (a, min(int(last), size - 1) if last else size - 1))


def _digest_of(data: bytes, digest: str) -> str:
    algorithm = digest.split(":", 1)[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _read_slice(path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


@dataclass(repr=False)
class Fuzz:
    mirror: MirrorProcess
    upstream: object                     # RegistryProcess
    upstream_start: int                  # its access-log position when the run began
    known: Known
    base: Path
    canaries: list[Path]
    trace: syscalls.SyscallTrace | None
    trace_problem: str | None
    snapshot: dict
    canary_atimes: dict
    atime_works: bool
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    upstream_failures: list = field(default_factory=list)   # tolerated upstream 5xx

    def check(self, req: Req) -> Resp | str:
        log_from = self.mirror.log_path.stat().st_size
        upstream_from = self.upstream.log_path.stat().st_size
        started = time.perf_counter()
        resp = send("127.0.0.1", self.mirror.port, req)
        self.seconds += time.perf_counter() - started
        self.requests += 1
        self.statuses[resp.status if isinstance(resp, Resp) else "no response"] += 1

        def context() -> str:
            with open(self.mirror.log_path, "rb") as f:
                f.seek(log_from)
                log = f.read(6000).decode(errors="replace")
            if isinstance(resp, Resp):
                shown = (f"{resp.status} {resp.headers}\n{resp.body[:600]!r}")
            else:
                shown = resp
            return f"\nrequest: {short(req)}\nresponse: {shown}\nmirror log:\n{log}"

        if not isinstance(resp, Resp):
            # A parser may drop a malformed request without an answer; a clean one must
            # get a complete response.
            assert not req.http_clean(), "connection ended without a response" + context()
            return resp
        if resp.status in (502, 503) and self.upstream_failed(req, resp, upstream_from,
                                                              context):
            return resp
        check_response(self.known, req, resp, context)
        return resp

    def upstream_failed(self, req: Req, resp: Resp, upstream_from: int, context) -> bool:
        """Whether a 502/503 only passes on the upstream's own 5xx to a valid request.

        distribution answers some valid requests with a 500 (a manifest GET by the
        digest of a layer, say); the mirror saying so is not its failure.  But if the
        request it sent was one the grammar refuses, the mirror should have refused it."""
        try:
            detail = json.loads(resp.body)["errors"][0]["detail"] if resp.body else None
        except (ValueError, KeyError, IndexError, TypeError):
            return False
        if req.method != "HEAD" and not (isinstance(detail, dict)
                                         and detail.get("status", 0) >= 500):
            return False
        with open(self.upstream.log_path, "rb") as f:
            f.seek(upstream_from)
            lines = f.read().decode(errors="replace").splitlines()
        failed = [m for m in map(_ACCESS_RE.match, lines) if m and int(m["status"]) >= 500]
        if not failed:
            return False          # no upstream 5xx behind this one: the mirror's own
        for m in failed:
            why = invalid_upstream_request(m["path"])
            assert why is None, (f"mirror forwarded a request its grammar refuses ({why}): "
                                 f"{m['method']} {short(m['path'])}" + context())
        self.upstream_failures.append((short(req), failed[-1]["status"],
                                       short(failed[-1]["path"])))
        return True


def check_response(known: Known, req: Req, resp: Resp, context) -> None:
    assert resp.status < 500, "server error" + context()
    from_app = resp.header("docker-distribution-api-version") == "registry/2.0"
    if not from_app:
        # Only the HTTP parser answers without the app: a plain 400.
        assert resp.status == 400 and (resp.body.startswith(PARSER_400)
                                       or req.method == "HEAD" and not resp.body), \
            "answer from outside the application" + context()
        return
    if req.method == "HEAD":
        assert resp.body == b"", "HEAD with a body" + context()
    if 400 <= resp.status < 500 and req.method != "HEAD" and resp.body \
            and req.path not in TEXT_PATHS:
        assert resp.header("content-type") == "application/json", "error not JSON" + context()
        try:
            doc = json.loads(resp.body)
        except ValueError:
            raise AssertionError("error body is not JSON" + context()) from None
        errors = doc.get("errors") if isinstance(doc, dict) else None
        assert isinstance(errors, list) and errors, "no errors list" + context()
        first = errors[0]
        assert isinstance(first, dict) and isinstance(first.get("code"), str) \
            and isinstance(first.get("message"), str), "malformed error entry" + context()
    if req.method == "GET" and (m := _BLOB_PATH.fullmatch(req.path)):
        check_blob(known, req, resp, m.group(2), context)
    if req.method == "HEAD" and (m := _BLOB_PATH.fullmatch(req.path)) and resp.status == 200:
        blob = known.blobs.get(m.group(2))
        if blob is not None and resp.header("content-length") is not None:
            assert int(resp.header("content-length")) == blob.size, "HEAD size" + context()
    if req.method == "GET" and resp.status == 200 and (m := _MANIFEST_PATH.fullmatch(req.path)):
        digest = resp.header("docker-content-digest")
        if resp.header("content-type") in SCHEMA1:
            # A client that only takes schema1 gets the upstream's down-conversion, whose
            # digest covers the payload without the JWS signatures: not checked here.
            assert ":" not in m.group(2) or digest == m.group(2), context()
            return
        assert digest and _digest_of(resp.body, digest) == digest, \
            "manifest bytes do not match Docker-Content-Digest" + context()
        if ":" in m.group(2):
            assert digest == m.group(2), "manifest for another digest" + context()
        name = m.group(1)
        repos = [r for r in known.repos if name in client_names(r)]
        if repos and "ns=" not in req.target:
            assert digest in known.repo_manifests[repos[0]], \
                "a manifest the repository does not have" + context()


def check_blob(known: Known, req: Req, resp: Resp, digest: str, context) -> None:
    ranges = req.header_values("range")
    blob = known.blobs.get(digest)
    if resp.status == 200:
        assert _digest_of(resp.body, digest) == digest, "blob bytes do not match" + context()
        assert resp.header("docker-content-digest") == digest, context()
        if resp.header("content-length") is not None:
            assert int(resp.header("content-length")) == len(resp.body), context()
    elif resp.status == 206:
        assert ranges, "206 without a Range" + context()
        cr = _CONTENT_RANGE.fullmatch(resp.header("content-range") or "")
        assert cr, "206 without a Content-Range" + context()
        first, last, size = map(int, cr.groups())
        assert first <= last < size and len(resp.body) == last - first + 1, \
            "206 body does not fit its Content-Range" + context()
        if blob is not None:
            assert size == blob.size, "Content-Range names the wrong size" + context()
            assert resp.body == _read_slice(blob.path, first, last - first + 1), \
                "206 body is not that slice of the blob" + context()
        parsed = rfc_single_range(ranges[0], size)
        if parsed is not None:
            assert parsed == ("ok", (first, last)), \
                f"206 for another range than asked ({parsed})" + context()
    elif resp.status == 416:
        assert ranges, "416 without a Range" + context()
        if blob is not None and len(ranges) == 1:
            parsed = rfc_single_range(ranges[0], blob.size)
            assert parsed is None or parsed[0] == "unsatisfiable", \
                "416 for a satisfiable range" + context()


# -- the mirror, and what is around it ------------------------------------------------------


def snapshot(root: Path, skip: set[Path]) -> dict:
    """Every directory and file under ``root`` but ``skip``: type, mode, size, mtime, hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in skip]
        out[str(d)] = ("dir", os.lstat(d).st_mode)
        for n in filenames:
            p = d / n
            if p in skip:
                continue
            st_ = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p)] = ("file", st_.st_mode, st_.st_size, st_.st_mtime_ns, digest)
    return out


def _age_atime(path: Path) -> int:
    """Put the atime an hour before the mtime, so that (even under relatime) the next
    read of the file moves it; returns the atime set."""
    mtime = os.stat(path).st_mtime_ns
    atime = mtime - 3600 * 10 ** 9
    os.utime(path, ns=(atime, mtime))
    return atime


def _atime_detects_reads(base: Path) -> bool:
    probe = base / "atime-probe"
    probe.write_bytes(b"probe")
    before = _age_atime(probe)
    probe.read_bytes()
    after = os.stat(probe).st_atime_ns
    probe.unlink()
    return after != before


def read_roots(mirror: MirrorProcess) -> tuple[list[str], list[str]]:
    """Where the mirror may look while serving: its interpreter, its source, the kernel's
    pseudo files, and resolver/time-zone files (what the first requests lazily import or
    consult).  Anything else outside the data dir is reported."""
    import mirror as mirror_pkg

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/proc", "/sys", "/dev",
             "/usr/share/zoneinfo", "/usr/lib/locale", "/usr/lib/ssl", "/etc/ssl",
             str(Path(mirror_pkg.__file__).resolve().parent)}
    roots |= {p for p in site.getsitepackages() if Path(p).is_dir()}
    roots = {os.path.realpath(r) for r in roots} | roots
    files = ["/etc/localtime", "/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf",
             "/etc/host.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols",
             "/etc/ld.so.cache", "/etc/mime.types", "/etc/timezone",
             str(mirror.dir.resolve())]     # sys.path[0] of ``python -m``: import lookups stat it
    return sorted(roots), files


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, upstream, image_set):
    # No example database (database=None), and hypothesis's other cache (unicode tables)
    # under the temp dir too: nothing lands in the work tree.
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    base = tmp_path_factory.mktemp("fuzz").resolve()
    (base / "canary").mkdir()
    mirror = MirrorProcess(base / "mirror", hub_config(upstream))
    canaries = [base / "canary" / "secret", base / "mirror" / "canary", base / "canary.txt"]
    for c in canaries:
        c.write_bytes(b"canary: the mirror must never read or change this\n")
    mirror.start()
    known = build_known(image_set, canaries, mirror.data_dir.resolve())
    before = snapshot(base, {mirror.data_dir, mirror.log_path})
    atimes = {c: _age_atime(c) for c in canaries}
    atime_works = _atime_detects_reads(tmp_path_factory.mktemp("atime-probe"))
    trace, problem = None, None
    if not syscalls.available():
        problem = "strace is not installed (apt-get install strace)"
    else:
        try:
            trace = syscalls.SyscallTrace(mirror.proc.pid,
                                          tmp_path_factory.mktemp("strace") / "trace.txt",
                                          cwd=mirror.dir.resolve()).start()
        except RuntimeError as exc:
            problem = str(exc)
    env = Fuzz(mirror, upstream, upstream.mark(), known, base, canaries, trace, problem,
               before, atimes, atime_works)
    try:
        yield env
    finally:
        if trace is not None:
            trace.stop()
        mirror.stop()
        set_hypothesis_home_dir(None)


# -- the properties -------------------------------------------------------------------------


def test_fuzz_any_request(fuzz):
    """Paths mixing valid and hostile pieces, odd queries, every method, odd headers."""
    @fuzz_settings(1500)
    @given(req=requests_for(any_targets(fuzz.known), fuzz.known))
    def run(req):
        fuzz.check(req)
    run()


def test_fuzz_blob_ranges(fuzz):
    """Real blobs under every name they are reachable by, with valid and broken Ranges."""
    known = fuzz.known
    pair = st.sampled_from(known.blob_pairs)
    ns = st.sampled_from(["", "", "", "?ns=docker.io", "?ns=local.test", "?ns=nope.example"])
    targets = st.tuples(pair, ns).map(lambda p: f"/v2/{p[0][0]}/blobs/{p[0][1]}{p[1]}")
    ranged = st.lists(st.tuples(st.just("Range"), range_values()), min_size=0, max_size=3)
    extra = st.lists(st.tuples(st.just("Accept"), accept_values()), max_size=1)
    header_sets = st.tuples(ranged, extra).map(lambda p: tuple(p[0] + p[1]))
    methods = st.sampled_from(["GET"] * 5 + ["HEAD"])

    @fuzz_settings(600)
    @given(req=requests_for(targets, known, methods, header_sets))
    def run(req):
        resp = fuzz.check(req)
        if (isinstance(resp, Resp) and req.http_clean() and "?" not in req.target
                and not req.headers):
            # plain pulls of what the upstream has must work
            assert resp.status == 200, f"{short(req)} -> {resp.status} {resp.body[:300]!r}"
    run()


def test_fuzz_manifests_and_accept(fuzz):
    """Real manifests by tag and digest under every name, with Accept lines of all kinds."""
    known = fuzz.known
    targets = st.tuples(st.sampled_from(known.manifest_pairs),
                        st.sampled_from(["", "", "?ns=docker.io", "?ns=local.test", "?ns="])
                        ).map(lambda p: f"/v2/{p[0][0]}/manifests/{p[0][1]}{p[1]}")
    header_sets = st.one_of(
        st.lists(st.tuples(st.just("Accept"), accept_values()), max_size=4).map(tuple),
        headers(known))
    methods = st.sampled_from(["GET"] * 3 + ["HEAD"])

    @fuzz_settings(500)
    @given(req=requests_for(targets, known, methods, header_sets))
    def run(req):
        fuzz.check(req)
    run()


def test_fuzz_pagination(fuzz):
    """_catalog and tags/list with n, last and ns of every odd kind, repeated keys too."""
    known = fuzz.known
    paths = st.one_of(st.just("/v2/_catalog"),
                      st.sampled_from(known.names).map(lambda n: f"/v2/{n}/tags/list"),
                      names(known).map(lambda n: f"/v2/{n}/tags/list"))
    targets = st.tuples(paths, queries(known, focused=True)).map("".join)
    methods = st.sampled_from(["GET"] * 4 + ["HEAD"])
    header_sets = st.one_of(st.just(()), headers(known))

    @fuzz_settings(400)
    @given(req=requests_for(targets, known, methods, header_sets))
    def run(req):
        fuzz.check(req)
    run()


# Requests this fuzzer found answered with a 5xx, replayed on every run (generation is
# random: it need not hit them again).  "{blob}" is a blob of library/alpinetest.
BLOB = "/v2/library/alpinetest/blobs/{blob}"
FOUND = [
    # "\u00b2".isdigit() but int() refuses it; "\u2460" likewise
    pytest.param(Req("GET", "/v2/_catalog?n=%C2%B2"), id="catalog-n-superscript-two"),
    pytest.param(Req("HEAD", "/v2/alpinetest/tags/list?n=%E2%91%A0"), id="tags-n-circled-one"),
    # Python's int() refuses more than 4300 digits
    pytest.param(Req("GET", BLOB, (("Range", "bytes=0-" + "9" * 4301),)), id="range-last-4301"),
    pytest.param(Req("GET", BLOB, (("Range", "bytes=" + "9" * 4301 + "-"),)),
                 id="range-first-4301"),
    pytest.param(Req("GET", BLOB, (("Range", "bytes=-" + "9" * 4301),)), id="range-suffix-4301"),
    # valid as sent, but library/ + 248 characters is past the 255 limit upstream
    pytest.param(Req("GET", "/v2/" + "a" * 248 + "/tags/list"), id="name-248-plus-library"),
]


@pytest.mark.parametrize("req", FOUND)
def test_fuzz_found_before(fuzz, req):
    blob = next(d for n, d in fuzz.known.blob_pairs if n == "library/alpinetest")
    fuzz.check(Req(req.method, req.target.replace("{blob}", blob), req.headers, req.body))


# -- after the run: nothing outside the data dir ---------------------------------------------

_DATA_FILE = re.compile(r"lock|local\.token|ui\.key|index\.db(-wal|-shm|-journal)?|tmp/[^/]+|"
                        r"status/\.?[^/]+\.json(\.tmp)?|"
                        r"blobs/(sha256/[0-9a-f]{2}/[0-9a-f]{64}|sha512/[0-9a-f]{2}/[0-9a-f]{128})")


def summarize_tracebacks(log: str) -> str:
    """Each distinct exception once: the error line before it, its last frames."""
    seen: dict[str, str] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        j = i + 1
        while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("\t")):
            j += 1
        if j >= len(lines):
            continue
        exc = lines[j]
        frames = [f for f in lines[i + 1:j] if f.lstrip().startswith("File ")]
        key = (frames[-1] if frames else "") + exc.split(":", 1)[0]
        if key not in seen:
            seen[key] = "\n".join([lines[i - 1] if i else "", *frames[-3:], exc])
    return "\n\n".join(seen.values())[:6000]


def _needs_run(fuzz: Fuzz) -> None:
    if fuzz.requests == 0:
        pytest.skip("checks what the fuzz tests above did; run them in the same session")


def test_zz_nothing_changed_or_read_outside_the_data_dir(fuzz):
    _needs_run(fuzz)
    mirror = fuzz.mirror
    print(f"\nfuzz: {fuzz.requests} requests in {fuzz.seconds:.1f}s on the wire; "
          f"statuses {dict(fuzz.statuses.most_common())}; atime detects reads: "
          f"{fuzz.atime_works}; syscall trace: {fuzz.trace_problem or 'on'}; "
          f"upstream 5xx passed on: {len(fuzz.upstream_failures)}")
    for failure in fuzz.upstream_failures[:10]:
        print("  upstream 5xx:", *failure)
    if fuzz.atime_works:
        read = [str(c) for c, atime in fuzz.canary_atimes.items()
                if os.stat(c).st_atime_ns != atime]
        assert not read, f"canaries outside the data dir were read: {read}"
    else:
        print("fuzz: atime does not move on reads here (noatime?); canary reads are "
              "checked by the syscall trace only")
    after = snapshot(fuzz.base, {mirror.data_dir, mirror.log_path})
    created = sorted(set(after) - set(fuzz.snapshot))
    deleted = sorted(set(fuzz.snapshot) - set(after))
    changed = sorted(p for p in set(after) & set(fuzz.snapshot) if after[p] != fuzz.snapshot[p])
    assert not (created or deleted or changed), \
        f"outside the data dir: created {created}, deleted {deleted}, changed {changed}"
    data = mirror.data_dir.resolve()
    for path in data.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(data).as_posix()
        assert _DATA_FILE.fullmatch(rel), f"unexpected file in the data dir: {rel}"
        if rel.startswith("blobs/"):
            algorithm, _, hexpart = rel.split("/")[1:]
            digest = f"{algorithm}:{hexpart}"
            assert _digest_of(path.read_bytes(), digest) == digest, f"{rel} has other bytes"


def test_zz_no_traceback_in_the_log(fuzz):
    _needs_run(fuzz)
    log = fuzz.mirror.log_text()
    if "Traceback" in log:
        pytest.fail("tracebacks in the mirror's log:\n" + summarize_tracebacks(log))


def test_zz_the_upstream_only_got_valid_requests(fuzz):
    """Whatever clients send, what reaches the upstream is inside the grammar."""
    _needs_run(fuzz)
    sent = fuzz.upstream.requests(since=fuzz.upstream_start)
    assert sent, "the mirror asked the upstream nothing at all"
    bad = [(r, why) for r in sent if (why := invalid_upstream_request(r.path))]
    shown = "\n".join(f"{r.method} {short(r.path, 200)} -> {r.status}: {why}"
                      for r, why in bad[:20])
    assert not bad, f"{len(bad)} invalid requests sent upstream:\n{shown}"


def test_zz_no_syscall_touched_a_path_outside_the_data_dir(fuzz):
    _needs_run(fuzz)
    if fuzz.trace is None:
        pytest.skip(f"no syscall trace: {fuzz.trace_problem}")
    fuzz.trace.stop()
    calls = fuzz.trace.calls()
    data = str(fuzz.mirror.data_dir.resolve())
    assert any(c.path.startswith(data + "/") for c in calls), \
        "the trace saw no access to the data dir at all; is strace working?"
    roots, files = read_roots(fuzz.mirror)
    bad = syscalls.outside(calls, write_roots=[fuzz.mirror.data_dir.resolve()],
                           read_roots=roots, read_files=files)
    shown = "\n".join(f"{c.syscall} {c.path!r} = {c.result} {c.error or ''}" for c in bad[:40])
    assert not bad, f"{len(bad)} file syscalls outside the data dir:\n{shown}"
