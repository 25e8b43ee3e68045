"""The log: one format, with timestamps, for every line the server writes (the
mirror's, uvicorn's and the libraries'), on stderr.

``log_format: text`` (the default)::

    2024-05-01T12:00:00.123Z INFO mirror: mirror ready on http://0.0.0.0:5000 (...)

With ``workers`` above 1, each worker's lines name it after the level (``INFO [w1]
mirror.access: ...``; in JSON a ``worker`` key).

``log_format: json``: one JSON object per line with ``time``, ``level``, ``logger``
and ``message``; lines that carry structured fields (the access log's, passed as
``extra={"fields": {...}}``) have them as keys of their own, and a traceback is
``exc``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("text", "json")

# uvicorn's own loggers, as a reader knows them.
_NAMES = {"uvicorn.error": "uvicorn"}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = int(record.created)
    millis = int((record.created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = "" if worker is None else f"[w{worker}] "

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_timestamp(record)} {record.levelname} {self.worker}"
                f"{_NAMES.get(record.name, record.name)}: {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"time": _timestamp(record),
                                    "level": record.levelname.lower(),
                                    "logger": _NAMES.get(record.name, record.name),
                                    "message": record.getMessage()}
        if self.worker is not None:
            entry["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup(level: str = "info", fmt: str = "text", worker: int | None = None) -> None:
    """Send every logger's records through one handler on stderr, in ``fmt``; a
    ``worker``'s lines say which one it is."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)     # uvicorn's own handlers, if any: gone
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("httpx").setLevel(logging.WARNING)      # one line per upstream request
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.INFO)     # a line per statement at debug
    logging.getLogger("asyncio").setLevel(logging.WARNING)
