"""Run an ASGI app under uvicorn in a background thread on 127.0.0.1.

Extra keyword arguments go to ``uvicorn.Config`` (e.g. ``ssl_certfile``/``ssl_keyfile``,
which make ``.url`` https)."""

from __future__ import annotations

import threading
import time

import uvicorn

from .ports import free_port


class ServerThread:
    def __init__(self, app, name: str = "server", port: int | None = None,
                 **uvicorn_options) -> None:
        self.app = app
        self.name = name
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.options = uvicorn_options
        self.url = f"{'https' if uvicorn_options.get('ssl_certfile') else 'http'}://{self.host}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self):
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", access_log=False, **self.options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name=f"{self.name}-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} on {self.host} failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
