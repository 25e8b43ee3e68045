"""An httpx client that speaks registry auth: Basic and the Bearer token dance.

``RegistryClient(url, username, password)`` is an ``httpx.Client`` with
``base_url=url``.  On a 401 it reads ``WWW-Authenticate``:

* ``Basic``: retries with the credentials, then sends them up front;
* ``Bearer realm=...,service=...``: GETs a token from the realm with
  ``scope=repository:<repo>:pull,push`` (repo taken from the request path),
  caches it per repo and retries.

A request is retried at most once.  Streamed bodies cannot be replayed, so
make a body-less request to the repo first (``push_blob`` starts with HEAD
and POST) and the streamed one will carry the cached credentials.
"""

from __future__ import annotations

import base64
import hashlib
import re

import httpx

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST_V2 = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# distribution 2.8 picks the linux/amd64 child of a list, or 404s an OCI
# manifest, when the Accept header does not name the stored type.
MANIFEST_ACCEPT = ", ".join([MANIFEST_V2, MANIFEST_LIST_V2, OCI_MANIFEST, OCI_INDEX])

_REPO_RE = re.compile(r"^/v2/(?P<repo>.+?)/(?:blobs|manifests|tags)/")
_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


def repo_from_path(path: str) -> str | None:
    m = _REPO_RE.match(path)
    return m["repo"] if m else None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", ...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM_RE.findall(rest))


class RegistryAuth(httpx.Auth):
    def __init__(self, username: str | None = None, password: str | None = None):
        self.username = username
        self.password = password
        self.use_basic = False
        self.tokens: dict[str | None, str] = {}  # repo (None for /v2/) -> token
        self.token_fetches = 0

    def _basic(self) -> str:
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _apply(self, request: httpx.Request, repo: str | None) -> None:
        if repo in self.tokens:
            request.headers["Authorization"] = f"Bearer {self.tokens[repo]}"
        elif self.use_basic and self.username is not None:
            request.headers["Authorization"] = self._basic()

    def auth_flow(self, request: httpx.Request):
        if "Authorization" in request.headers:  # caller chose; leave it alone
            yield request
            return
        repo = repo_from_path(request.url.path)
        self._apply(request, repo)
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.username is not None:
            self.use_basic = True
        elif scheme == "bearer" and "realm" in params:
            query = {"service": params.get("service", "")}
            if repo is not None:
                query["scope"] = f"repository:{repo}:pull,push"
            elif "scope" in params:
                query["scope"] = params["scope"]
            token_request = httpx.Request("GET", params["realm"], params=query)
            if self.username is not None:
                token_request.headers["Authorization"] = self._basic()
            token_response = yield token_request
            token_response.read()
            self.token_fetches += 1
            if token_response.status_code != 200:
                return
            body = token_response.json()
            self.tokens[repo] = body.get("token") or body["access_token"]
        else:
            return
        request.headers.pop("Authorization", None)
        self._apply(request, repo)
        yield request


class RegistryClient(httpx.Client):
    """``httpx.Client`` bound to one registry, with registry auth."""

    def __init__(self, url: str, username: str | None = None,
                 password: str | None = None, **kwargs):
        kwargs.setdefault("timeout", 60)
        super().__init__(base_url=url, auth=RegistryAuth(username, password), **kwargs)
        self.url = url.rstrip("/")

    @property
    def registry_auth(self) -> RegistryAuth:
        return self.auth  # type: ignore[return-value]

    def get_manifest(self, repo: str, ref: str, accept: str = MANIFEST_ACCEPT) -> httpx.Response:
        return self.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept})

    def get_blob(self, repo: str, digest: str) -> httpx.Response:
        """GET a blob, following redirects; the whole body is read (small blobs)."""
        return self.get(f"/v2/{repo}/blobs/{digest}", follow_redirects=True)


def read_blob(mirror, repo, blob, headers=None):
    """(bytes received, sha256 digest, error or None) of one GET of ``blob`` through
    ``mirror`` (anything with ``.url``): a broken response is reported, not raised."""
    h, n = hashlib.sha256(), 0
    try:
        with httpx.stream("GET", f"{mirror.url}/v2/{repo}/blobs/{blob.digest}", timeout=60,
                          headers=headers) as resp:
            if resp.status_code >= 400:
                return 0, None, resp.read()
            for chunk in resp.iter_raw():
                h.update(chunk)
                n += len(chunk)
    except httpx.HTTPError as exc:
        return n, f"sha256:{h.hexdigest()}", exc
    return n, f"sha256:{h.hexdigest()}", None
