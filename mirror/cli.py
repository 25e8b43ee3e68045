"""Command line: ``mirror serve [--config FILE] [--listen HOST:PORT] [--data-dir DIR]``,
the maintenance commands ``stats``, ``ls``, ``pin``, ``unpin``, ``gc``, ``verify``, ``rm``,
``invalidate`` and ``migrate`` (implemented in ``admin.py``; safe to run while the server runs), the
set-up commands ``certs`` and ``htpasswd``, ``config check`` and ``healthcheck``
(healthcheck.py). Every command reads the configuration the same way: ``--config``,
else ``$MIRROR_CONFIG``, else the embedded default, then ``MIRROR_*`` settings from the
environment (config.py). ``serve`` locks the data directory (lock.py) first: one server
per data directory."""

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
    serve.add_argument("--worker", help=argparse.SUPPRESS)   # set by the supervisor (workers.py)
    _admin_commands(sub)
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config, listen=getattr(args, "listen", None),
                             data_dir=args.data_dir)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    if args.command == "certs":
        return certs_command(args, config)
    if args.command == "htpasswd":
        return htpasswd_command(args, config)
    if args.command == "healthcheck":
        from .healthcheck import healthcheck
        return healthcheck(config)
    if args.command == "config":
        return config_command(args, config)
    if args.command in ("warm", "export", "import"):
        from .airgap import export, imports, warm
        return {"warm": warm, "export": export, "import": imports}[args.command].run(args, config)
    if args.command != "serve":
        from .admin import run
        return run(args, config)
    if args.worker:
        return _worker(args.worker, config)
    from .lock import DataDirInUse, hold
    try:
        lock = hold(config.data_dir)     # before anything touches the data directory
    except DataDirInUse as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        from .cache import unusable
        print(f"mirror: {unusable(config.data_dir.resolve(), exc)}", file=sys.stderr)
        return 1
    status = serve_forever(config, lock, sys.argv[1:] if argv is None else argv)
    lock.release()                       # a clean stop
    return status


def _worker(spec: str, config) -> int:
    """One of the supervisor's workers (workers.py): serve on the inherited socket."""
    import socket

    from .server import run
    from .workers import WorkerArgs
    worker = WorkerArgs.decode(spec)
    sock = socket.socket(fileno=worker.sock)
    logging.getLogger("uvicorn.error").addFilter(_QuietAborts())
    return run(config, sock, worker)


def _admin_commands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=os.environ.get("MIRROR_CONFIG"),
                        help="config.yml (default: $MIRROR_CONFIG, else the embedded default)")
    common.add_argument("--data-dir", help="cache directory (overrides the config)")
    stats = sub.add_parser("stats", parents=[common], help="cache size, counts, hit ratio, "
                           "top images")
    stats.add_argument("--json", action="store_true", help="print the report as JSON")
    ls = sub.add_parser("ls", parents=[common], help="cached repositories, or one's tags")
    ls.add_argument("repository", nargs="?", metavar="REPO",
                    help="a name as clients pull it (alpine, ghcr.io/org/app)")
    ls.add_argument("--json", action="store_true", help="print the listing as JSON")
    for name, verb in (("pin", "never evict"), ("unpin", "remove the pin of")):
        cmd = sub.add_parser(name, parents=[common], help=f"{verb} an image")
        cmd.add_argument("ref", metavar="REF", help="NAME[:TAG] or NAME@DIGEST as clients "
                         "write it, NAME meaning NAME:latest (a tag pin keeps whatever the "
                         "tag points at)")
    gc = sub.add_parser("gc", parents=[common], help="evict down to the budget now, and "
                        "remove unreferenced blobs")
    gc.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    gc.add_argument("--delete-untagged", action="store_true", help="also sweep hosted "
                    "manifests no tag reaches (as registry:2's garbage-collect "
                    "--delete-untagged), and then their blobs")
    verify = sub.add_parser("verify", parents=[common], help="re-hash every cached file; "
                            "drop what does not match its digest (exit status 1 if any)")
    verify.add_argument("--quarantine", action="store_true", help="move bad files to "
                        "DATA_DIR/quarantine/ instead of deleting them")
    rm = sub.add_parser("rm", parents=[common], help="remove cached images: tags, their "
                        "manifests, and the blobs nothing else cached uses")
    rm.add_argument("refs", nargs="+", metavar="REF", help="NAME[:TAG] (NAME is NAME:latest), "
                    "NAME@DIGEST, NAME:GLOB ('alpine:*': every tag) or a name glob "
                    "('library/*', 'ghcr.io/org/*': every tag of each match)")
    rm.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    rm.add_argument("--force", action="store_true", help="remove pinned images too, and "
                    "their pins")
    from .airgap import warm
    warm.add_parser(sub, common)
    invalidate = sub.add_parser("invalidate", parents=[common], help="make the next pull of "
                                "a tag ask upstream at once")
    invalidate.add_argument("refs", nargs="+", metavar="REF", help="NAME[:TAG] (NAME is "
                            "NAME:latest), NAME:GLOB or a name glob, as for rm")
    migrate = sub.add_parser("migrate", help="create the index's schema, or bring it up to "
                             "date (SQLite's index.db, or index.postgres and then the "
                             "cluster's tables); the server does this at start-up too")
    migrate.add_argument("-c", "--config", default=os.environ.get("MIRROR_CONFIG"),
                         help="config.yml (default: $MIRROR_CONFIG, else the embedded default)")
    migrate.add_argument("--data-dir", help="cache directory (overrides the config)")
    from .airgap import export, imports
    export.add_parser(sub, common)
    imports.add_parser(sub, common)
    health = sub.add_parser("healthcheck", help="GET /healthz of the mirror the config "
                            "describes (listen, tls): exit 0 if it answers 200 within 3 s")
    health.add_argument("--config", default=os.environ.get("MIRROR_CONFIG"),
                        help="config.yml, as for serve")
    health.set_defaults(data_dir=None)
    certs = sub.add_parser("certs", parents=[common], help="make a private CA and a server "
                           "certificate for TLS")
    certs.add_argument("names", nargs="+", metavar="HOST", help="host names and IP addresses "
                       "clients use to reach the mirror")
    certs.add_argument("--out", default="certs", help="directory for the files (default: certs)")
    users = sub.add_parser("htpasswd", parents=[common], help="add, remove or list the users "
                           "of the mirror (bcrypt, as htpasswd -B)")
    users.add_argument("action", choices=["add", "remove", "list"])
    users.add_argument("user", nargs="?", help="the user to add or remove")
    users.add_argument("--file", help="the htpasswd file (default: auth.htpasswd of the config)")
    conf = sub.add_parser("config", help="check the configuration")
    conf.add_subparsers(dest="config_command", required=True).add_parser(
        "check", parents=[common], help="validate the config file, the MIRROR_* variables and "
        "--data-dir, and print the configuration in effect (passwords as ***)")


def config_command(args, config) -> int:
    import yaml

    from .config import describe, env_settings
    source = args.config or "the embedded default"
    variables = env_settings(os.environ)
    print(f"# mirror {__version__}: {source}"
          + (f", with {', '.join(variables)} from the environment" if variables else ""))
    print(yaml.safe_dump(describe(config), sort_keys=False), end="")
    return 0


def certs_command(args, config) -> int:
    from pathlib import Path

    from .certs import instructions, make_certs
    try:
        files = make_certs(Path(args.out), args.names)
    except (ValueError, OSError) as exc:
        print(f"mirror: certs: {exc}", file=sys.stderr)
        return 2
    print(instructions(files, args.names[0], config.port), end="")
    return 0


def htpasswd_command(args, config) -> int:
    import getpass
    from pathlib import Path

    from .passwords import hash_password, read_htpasswd, write_htpasswd
    path = Path(args.file) if args.file else (config.auth.htpasswd if config.auth else None)
    if path is None:
        print("mirror: htpasswd: no file: give --file or set auth.htpasswd in the config",
              file=sys.stderr)
        return 2
    if args.action == "list":
        return htpasswd_list(path)
    if args.user is None:
        print(f"mirror: htpasswd: {args.action} needs a USER", file=sys.stderr)
        return 2
    user = args.user
    if not user or len(user) > 64 or ":" in user or not user.isprintable() or " " in user:
        print(f"mirror: htpasswd: {user[:64]!r} is not a valid user name (no spaces or colons)",
              file=sys.stderr)
        return 2
    users = read_htpasswd(path) if path.exists() else {}
    if args.action == "remove":
        if users.pop(user, None) is None:
            print(f"mirror: htpasswd: no user {user} in {path}", file=sys.stderr)
            return 1
        write_htpasswd(path, users)
        print(f"removed {user} from {path}")
        return 0
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if getpass.getpass("again: ") != password:
            print("mirror: htpasswd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("mirror: htpasswd: empty password", file=sys.stderr)
        return 2
    verb = "updated" if user in users else "added"
    users[user] = hash_password(password)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_htpasswd(path, users)
    print(f"{verb} {user} in {path}")
    return 0


def htpasswd_list(path) -> int:
    """The users of an htpasswd file, and whether each can log in (bcrypt only)."""
    from .passwords import read_htpasswd
    try:
        users = read_htpasswd(path)
    except OSError as exc:
        print(f"mirror: htpasswd: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    if not users:
        print(f"no users in {path}")
        return 0
    width = max(len(u) for u in users)
    for user, hashed in sorted(users.items()):
        kind = f"bcrypt, cost {hashed[4:6]}" if hashed[:4] in ("$2y$", "$2b$", "$2a$") \
            else "not bcrypt: cannot log in (add the user again)"
        print(f"{user:<{width}}  {kind}")
    return 0


class _QuietAborts(logging.Filter):
    """uvicorn logs a traceback for every response the app aborts on purpose (a
    broken fill), and for each one cut at the end of ``shutdown_grace``; the mirror,
    or uvicorn itself ("Cancel N running task(s)"), has said so already in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        from .api import AbortResponse
        return not (record.exc_info and isinstance(record.exc_info[1],
                                                   (AbortResponse, asyncio.CancelledError)))


def serve_forever(config, lock, argv: list[str]) -> int:
    """Bind the socket (a port in use: one line, exit 1, before anything else), then
    run the server until SIGTERM or SIGINT (server.py), in ``workers`` processes when
    that is more than 1 (workers.py; ``argv`` is how they are started)."""
    from .server import ListenError, listen, run

    try:
        sock = listen(config.host, config.port)
    except ListenError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    from .signing_keys import TOKEN_FILE, issues_tokens, on_site
    if issues_tokens(config) and not on_site(config):   # a site's key is in its PostgreSQL
        from .tokens import WeakKey, load_key
        try:
            load_key(config.data_dir / TOKEN_FILE)       # made now, or refused if weak
        except WeakKey as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"mirror: {config.data_dir / TOKEN_FILE}: cannot make the token signing "
                  f"key: {exc.strerror}", file=sys.stderr)
            return 2
    if config.workers > 1:
        from .workers import supervise
        return supervise(config, sock, lock, argv)
    logging.getLogger("uvicorn.error").addFilter(_QuietAborts())
    return run(config, sock)


if __name__ == "__main__":
    sys.exit(main())
