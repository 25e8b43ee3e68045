"""A server whose every answer is a function of the request, recording what reached it.

``Scripted(answer)`` runs ``answer(request) -> Response`` (a plain function of a
Starlette ``Request``; it may read ``request.url``, ``.headers``, ``.method``) for
every path and method, under uvicorn on a 127.0.0.1 free port (extra keyword
arguments go to uvicorn, e.g. ``ssl_certfile``/``ssl_keyfile`` for https).  ``.requests``
holds one ``Seen(method, path, headers)`` per request (path with query, headers
lower-cased), so a test can assert that credentials never reached it::

    with Scripted(lambda r: Response(status_code=401)) as cdn:
        ...
        assert not any("authorization" in s.headers for s in cdn.requests)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

from starlette.requests import Request
from starlette.responses import Response

from .server_thread import ServerThread


class Seen(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]


class Scripted(ServerThread):
    def __init__(self, answer: Callable[[Request], Response], name: str = "scripted",
                 **uvicorn_options) -> None:
        self.answer = answer
        self._lock = threading.Lock()
        self._requests: list[Seen] = []

        async def app(scope, receive, send) -> None:    # a function: see faulty._asgi3
            await self._app(scope, receive, send)
        super().__init__(app, name, **uvicorn_options)

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._requests)

    async def _app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        with self._lock:
            self._requests.append(Seen(request.method, path,
                                       {k.lower(): v for k, v in request.headers.items()}))
        await self.answer(request)(scope, receive, send)
