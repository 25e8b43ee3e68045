"""Command line: ``mirror serve [--config FILE] [--listen HOST:PORT] [--data-dir DIR]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirror", description="A pull-through caching "
                                     "registry for container images.")
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", default=os.environ.get("MIRROR_CONFIG"),
                       help="config.yml (default: $MIRROR_CONFIG, else the embedded default: "
                            "a Docker Hub mirror on 0.0.0.0:5000 caching under ./data)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (overrides the config)")
    serve.add_argument("--data-dir", help="cache directory (overrides the config)")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config, listen=args.listen, data_dir=args.data_dir)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    return serve_forever(config)


class _QuietAborts(logging.Filter):
    """uvicorn logs a traceback for every response the app aborts on purpose (a
    broken fill); the mirror has logged those already, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .api import AbortResponse
        return not (record.exc_info and isinstance(record.exc_info[1], AbortResponse))


def serve_forever(config) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.error").addFilter(_QuietAborts())
    logging.getLogger("httpx").setLevel(logging.WARNING)     # one line per upstream request
    uvicorn.run(create_app(config), host=config.host, port=config.port,
                log_level=config.log_level, access_log=False,   # mirror.access logs instead
                lifespan="on", timeout_graceful_shutdown=5, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
