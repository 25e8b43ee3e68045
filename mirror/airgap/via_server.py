"""Pulling through a mirror server, as a client would: what ``mirror warm`` stands on.

``serving(config)`` yields an HTTP client for the server on the configured data
directory: the one already running (the data-directory lock is held; asked at the
address ``healthcheck.target`` gives, TLS unverified), or else the real app started
here, in this event loop, on 127.0.0.1 and a free port, with the lock held for as
long as it runs (a server starting meanwhile is refused and names this pid). Either
way every request carries the server's local token (local_access.py), so logins and
ACLs let it through, and the server's single-flight fills, digest checks and index
updates do the work: a warm and a client pull never download one blob twice.

``Puller`` reads manifests and streams blobs through that client (never holding a
blob in memory); ``cached(upstream, repository, digest)`` asks the index, read-only,
whether a blob is there and linked to the repository already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .. import index as index_mod
from .. import local_access, lock
from ..cache_files import blob_path
from ..config import Config
from ..config_scale import IndexConfig
from ..healthcheck import target
from ..index import SQLITE
from ..models import MANIFEST_TYPES

log = logging.getLogger("mirror.warm")

ACCEPT = ", ".join(MANIFEST_TYPES)
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CHUNK = 1024 * 1024


class PullFailed(Exception):
    """One manifest or blob could not be had; the message says what the server said."""


@dataclass
class Connection:
    client: httpx.AsyncClient
    url: str
    started_here: bool         # False: a server was already running on the data directory


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Connection]:
    data_dir = Path(config.data_dir).resolve()
    try:
        held: lock.DataDirLock | None = await asyncio.to_thread(lock.hold, data_dir)
    except lock.DataDirInUse:
        held = None
    if held is None:
        scheme, host, port = target(config)
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        async with _client(url, data_dir) as client:
            yield Connection(client, url, started_here=False)
        return
    try:
        async with _in_process(config) as url, _client(url, data_dir) as client:
            yield Connection(client, url, started_here=True)
    finally:
        held.release()


@asynccontextmanager
async def _client(url: str, data_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    secret = local_access.read(data_dir)
    headers = {"User-Agent": "mirror-warm"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    async with httpx.AsyncClient(base_url=url, headers=headers, verify=False,
                                 timeout=TIMEOUT, follow_redirects=False,
                                 limits=httpx.Limits(max_connections=8)) as client:
        yield client


@asynccontextmanager
async def _in_process(config: Config) -> AsyncIterator[str]:
    """The mirror's own app on 127.0.0.1:<free port>, plain HTTP, in this event loop."""
    import uvicorn

    from ..app import Mirror
    from ..server import listen, uvicorn_options

    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    mirror = Mirror(config)
    uv_config = uvicorn.Config(mirror.asgi, log_config=None, log_level="warning",
                               access_log=False, lifespan="off",
                               server_header=False, **uvicorn_options(config.limits))
    server = _quiet_server(uv_config)
    try:
        async with mirror.running():       # opens the cache, writes the local token
            task = asyncio.create_task(server.serve(sockets=[sock]))
            try:
                while not server.started:
                    if task.done():
                        await task
                        raise OSError("the in-process mirror did not start")
                    await asyncio.sleep(0.01)
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
                await task
    finally:
        sock.close()


def _quiet_server(config: Any) -> Any:
    """uvicorn's Server without its signal handlers: ^C stops ``mirror warm`` itself,
    not only the server inside it."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return QuietServer(config)


# -- what is cached ---------------------------------------------------------------------------


class Index:
    """The index, beside whichever server runs (opened once something is cached)."""

    def __init__(self, data_dir: Path, config: IndexConfig = SQLITE, *,
                 files: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.config = config
        self.index: index_mod.Index | None = None
        self._opening = asyncio.Lock()
        self.files = files      # False: blobs are objects (S3); the index row is enough

    async def _open(self) -> index_mod.Index | None:
        async with self._opening:      # blobs are looked up concurrently: one connection
            if self.index is None and (self.config.postgres is not None or await
                                       asyncio.to_thread((self.data_dir / "index.db").exists)):
                self.index = await index_mod.open_index(self.data_dir, self.config,
                                                        flush=False)
            return self.index

    async def cached(self, upstream: str, repository: str, digest: str) -> bool:
        """The blob is in the cache and linked to (upstream, repository)."""
        try:
            index = await self._open()
            if index is None or await index.blob_size(digest) is None \
                    or not await index.is_linked(upstream, repository, digest):
                return False
        except index_mod.IndexUnavailable:
            return False
        if not self.files:
            return True
        return await asyncio.to_thread(os.path.exists, blob_path(self.data_dir, digest))

    async def close(self) -> None:
        if self.index is not None:
            await self.index.close()
            self.index = None


# -- pulling ----------------------------------------------------------------------------------


def _server_error(resp: httpx.Response) -> str:
    """What the server said: its OCI error message, else the status line."""
    try:
        errors = resp.json().get("errors") or []
        messages = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                    for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError):
        messages = []
    text = "; ".join(m for m in messages if m)
    return f"{resp.status_code} {resp.reason_phrase}" + (f": {text}" if text else "")


class Puller:
    def __init__(self, client: httpx.AsyncClient, upstream: str) -> None:
        self.client = client
        self.params = {"ns": upstream}

    async def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest."""
        try:
            resp = await self.client.get(f"/v2/{repository}/manifests/{reference}",
                                         params=self.params, headers={"Accept": ACCEPT})
        except httpx.HTTPError as exc:
            raise PullFailed(f"manifest {reference}: {_transport(exc)}") from None
        if resp.status_code != 200:
            raise PullFailed(f"manifest {reference}: {_server_error(resp)}")
        return (resp.content, resp.headers.get("content-type", "").split(";")[0].strip(),
                resp.headers.get("docker-content-digest", reference))

    async def blob(self, repository: str, digest: str, size: int | None,
                   advance: Callable[[int], None]) -> int:
        """Stream one blob through the server and drop the bytes; the bytes read.
        ``advance`` is told of each chunk; the caller takes them back on failure."""
        got = 0
        try:
            async with self.client.stream("GET", f"/v2/{repository}/blobs/{digest}",
                                          params=self.params) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise PullFailed(f"blob {digest}: {_server_error(resp)}")
                async for chunk in resp.aiter_raw(CHUNK):
                    got += len(chunk)
                    advance(len(chunk))
        except httpx.HTTPError as exc:
            of = f" of {size}" if size is not None else ""
            raise PullFailed(f"blob {digest}: {_transport(exc)} after {got}{of} bytes (the "
                             "server's log says why; run warm again to resume)") from None
        if size is not None and got != size:
            raise PullFailed(f"blob {digest}: {got} bytes, the manifest says {size}")
        return got


def _transport(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
