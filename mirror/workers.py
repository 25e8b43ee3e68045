"""``workers: N``: one server on one port and one data directory, in N processes.

``mirror serve`` with ``workers`` above 1 becomes a small supervisor. It holds the
data directory's lock and the listening socket, and starts N workers: fresh
interpreters running ``mirror serve`` again with ``--worker`` naming what they
inherit (their index, the listening socket, the lock's descriptor, a pipe to say
they are ready and a lifeline pipe). Each worker runs the whole application under
uvicorn on the shared socket; the kernel hands each new connection to one of them.

- **The lock is shared:** every worker inherits the descriptor of the supervisor's
  ``flock`` on ``data_dir/lock``, so a second server on the directory is refused
  while any of them lives.
- **Worker 0 starts first and alone:** it clears ``tmp/``, reconciles the index with
  the files and writes the local token (what one server does at start-up), and it is
  the leader: the evictor, hosted gc, the upload sweep and index checkpoints run there
  only. The others start once it is ready and only serve. (Several replicas sharing
  PostgreSQL: worker 0 of each is its replica's candidate for leading the site's
  eviction, hosted gc and pruning; mirror/cluster/leader.py.)
- **A worker that dies is replaced** (same index, so a dead leader's successor leads;
  it does not prepare again, since the others' downloads are in ``tmp/``): its temp
  files are removed and a line says how it ended. A worker that fails before it is
  ready stops the server with its status: its own line already said why.
- **Signals:** SIGTERM and SIGINT go to every worker (each drains for
  ``shutdown_grace``), then the supervisor releases the lock (a clean stop) and exits 0;
  SIGHUP goes to every worker (TLS and htpasswd reload). Workers watch the lifeline:
  when the supervisor is gone (killed), they stop too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import Config
from .lock import DataDirLock

log = logging.getLogger("mirror")

RESTART_BACKOFF = 1.0        # seconds before a dead worker is replaced (doubles per death)
STOP_WAIT = 10.0             # seconds past shutdown_grace before stuck workers are killed


@dataclass(frozen=True)
class WorkerArgs:
    """What ``--worker`` says: this process is worker ``index`` of ``count``; the
    descriptors it inherited; whether it prepares the data directory."""

    index: int
    count: int
    sock: int
    lock: int
    ready: int
    lifeline: int
    prepare: bool
    previous_pid: int | None = None     # the server before did not stop cleanly

    def encode(self) -> str:
        return ",".join(str(v) for v in (self.index, self.count, self.sock, self.lock,
                                         self.ready, self.lifeline, int(self.prepare),
                                         self.previous_pid or 0))

    @classmethod
    def decode(cls, text: str) -> WorkerArgs:
        index, count, sock, lock, ready, lifeline, prepare, previous = \
            (int(v) for v in text.split(","))
        return cls(index, count, sock, lock, ready, lifeline, bool(prepare), previous or None)


def worker_command(argv: list[str], spec: WorkerArgs) -> list[str]:
    return [sys.executable, "-m", "mirror", *argv, "--worker", spec.encode()]


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_fd = -1
        self.ready = False
        self.started_at = 0.0
        self.failures = 0


class Supervisor:
    def __init__(self, config: Config, sock: socket.socket, lock: DataDirLock,
                 argv: list[str]) -> None:
        self.config = config
        self.sock = sock
        self.lock = lock
        self.argv = argv
        self.workers = [_Worker(i) for i in range(config.workers)]
        self.stopping: int | None = None
        self._life_r, self._life_w = os.pipe()
        self._wake = asyncio.Event()
        self._exit_status = 0

    # -- starting -------------------------------------------------------------------------

    def _start(self, worker: _Worker, prepare: bool) -> None:
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        spec = WorkerArgs(worker.index, len(self.workers), self.sock.fileno(), self.lock.fd,
                          ready_w, self._life_r, prepare,
                          self.lock.previous_pid if prepare else None)
        env = dict(os.environ)
        metrics_dir = self.config.data_dir.resolve() / "run" / "metrics"
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        try:
            worker.proc = subprocess.Popen(
                worker_command(self.argv, spec), env=env,
                pass_fds=(self.sock.fileno(), self.lock.fd, ready_w, self._life_r))
        finally:
            os.close(ready_w)
        worker.ready_fd = ready_r
        worker.ready = False
        worker.started_at = time.monotonic()
        asyncio.get_running_loop().add_reader(ready_r, self._on_ready, worker)

    def _on_ready(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.ready_fd, 64)
        except BlockingIOError:
            return
        if data:
            worker.ready = True
            worker.failures = 0
        self._forget_pipe(worker)
        self._wake.set()

    def _forget_pipe(self, worker: _Worker) -> None:
        if worker.ready_fd >= 0:
            asyncio.get_running_loop().remove_reader(worker.ready_fd)
            os.close(worker.ready_fd)
            worker.ready_fd = -1

    async def _until_ready(self, workers: list[_Worker]) -> bool:
        """Wait until each of ``workers`` is ready; False if one ended first (or a
        stop signal came)."""
        while True:
            if self.stopping is not None:
                return False
            for w in workers:
                if w.proc is not None and w.proc.poll() is not None and not w.ready:
                    self._exit_status = w.proc.returncode or 1
                    return False
            if all(w.ready for w in workers):
                return True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.2)
            except TimeoutError:
                pass

    # -- running --------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        _prepare_run_dir(self.config.data_dir.resolve())
        try:
            leader, rest = self.workers[0], self.workers[1:]
            self._start(leader, prepare=True)
            if await self._until_ready([leader]):
                for w in rest:
                    self._start(w, prepare=False)
                if await self._until_ready(rest):
                    log.info("%s", self.ready_line())
                    await self._watch()
            return await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def ready_line(self) -> str:
        from .app import Mirror
        host, port = self.sock.getsockname()[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return (f"mirror {__version__} ready on {'https' if self.config.tls else 'http'}://"
                f"{address} ({Mirror(self.config).summary()}; {len(self.workers)} workers)")

    async def _watch(self) -> None:
        """Replace workers that die, until a stop signal."""
        while self.stopping is None:
            for w in self.workers:
                if w.proc is None or w.proc.poll() is None:
                    continue
                status = w.proc.returncode
                self._forget_pipe(w)
                self._reap(w)
                w.failures += 1
                delay = min(30.0, RESTART_BACKOFF * 2 ** (w.failures - 1)) \
                    if time.monotonic() - w.started_at < 10 else 0.0
                log.error("worker %d (pid %d) %s; starting another%s", w.index, w.proc.pid,
                          _ended(status), f" in {delay:g}s" if delay else "")
                w.proc = None
                if delay:
                    asyncio.get_running_loop().call_later(delay, self._restart, w)
                else:
                    self._restart(w)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.2)
            except TimeoutError:
                pass

    def _restart(self, worker: _Worker) -> None:
        if self.stopping is None and worker.proc is None:
            self._start(worker, prepare=False)

    def _reap(self, worker: _Worker) -> None:
        """A dead worker's leftovers: its temp files (named after its PID) and its
        live metrics."""
        assert worker.proc is not None
        pid = worker.proc.pid
        tmp = self.config.data_dir.resolve() / "tmp"
        try:
            for entry in os.scandir(tmp):
                if entry.name.startswith(f"{pid}-"):
                    Path(entry.path).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the temp files of worker pid %d: %s", pid, exc)
        from . import metrics
        metrics.worker_exited(pid, self.config.data_dir.resolve() / "run" / "metrics")

    def _stop(self, sig: int) -> None:
        if self.stopping is None:
            self.stopping = sig
            log.info("%s: stopping %d workers: no new connections; running responses get up "
                     "to %gs", signal.Signals(sig).name, len(self.workers),
                     self.config.shutdown_grace)
        self._forward(signal.SIGTERM)
        self._wake.set()

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def _shutdown(self) -> int:
        if self.stopping is None:               # a worker failed to start
            self.stopping = signal.SIGTERM
            self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + STOP_WAIT
        while any(w.proc is not None and w.proc.poll() is None for w in self.workers):
            if time.monotonic() > deadline:
                for w in self.workers:
                    if w.proc is not None and w.proc.poll() is None:
                        log.error("worker %d (pid %d) did not stop; killing it", w.index,
                                  w.proc.pid)
                        w.proc.kill()
                deadline = float("inf")
            await asyncio.sleep(0.1)
        for w in self.workers:
            self._forget_pipe(w)
        os.close(self._life_w)
        os.close(self._life_r)
        if self._exit_status == 0:
            log.info("mirror stopped")
        return self._exit_status


def _ended(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _prepare_run_dir(data_dir: Path) -> None:
    """``data_dir/run/``: what the workers share while this server runs (the metrics
    files of prometheus_client's multiprocess mode), emptied at each start."""
    metrics_dir = data_dir / "run" / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(metrics_dir):
        if entry.is_file():
            os.unlink(entry.path)


def supervise(config: Config, sock: socket.socket, lock: DataDirLock, argv: list[str]) -> int:
    """Run ``config.workers`` workers until SIGTERM or SIGINT; the exit status."""
    from .logs import setup
    setup(config.log_level, config.log_format)
    os.set_inheritable(sock.fileno(), True)
    os.set_inheritable(lock.fd, True)
    try:
        return asyncio.run(Supervisor(config, sock, lock, argv).run())
    except OSError as exc:
        print(f"mirror: cannot start the workers: {exc.strerror or exc}", file=sys.stderr)
        return 1
