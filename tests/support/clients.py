"""The real container clients our users run, driven against the mirror.

Everything talks to 127.0.0.1 only and keeps its state under test-owned
directories; daemons are started by hand (no systemd) and stopped by the PID
we started them with.

run
    ``run(cmd, env=None, timeout=180, check=True) -> CompletedProcess`` (text);
    a non-zero exit raises ``ClientError`` carrying the command's output.

skopeo / registries.conf
    ``registries_conf(path, mirror_host, prefix="docker.io")`` writes a
    containers-registries.conf(5) that sends ``prefix`` to the mirror (plain
    HTTP, ``insecure = true``).  ``read_dir_image(dest) -> DirImage`` reads a
    ``skopeo copy ... dir:DEST`` result; ``check_dir_image(dest, image)``
    asserts it holds exactly ``image`` (byte-identical manifests, every blob's
    sha256 equal to its name, the same set of digests).

podman
    ``Podman(tmpdir, registries_conf)``: root podman with its own ``--root`` /
    ``--runroot`` / ``--tmpdir``, vfs, cgroupfs, file events, and its own
    containers.conf and storage.conf; ``.run(*args)``, ``.inspect(ref) -> dict``;
    context manager (``.close()`` removes the short runroot under /tmp).

containerd
    ``ContainerdProcess(tmpdir)``: ``containerd`` with its own config, root,
    state and socket (cri and the storage plugins that cannot work here
    disabled); ``.start()`` / ``.stop()`` / context manager; ``.socket``,
    ``.ctr(*args, debug=False)``, ``.log_text()``.  ``hosts_dir(dir,
    {"docker.io": ("https://registry-1.docker.io", mirror_url)})`` writes
    containerd's certs.d ``hosts.toml`` files.

dockerd
    ``DockerdProcess(tmpdir, mirror_url, containerd_socket=None)``: ``dockerd``
    on its own unix socket with vfs, no iptables and no bridge,
    ``--registry-mirror mirror_url``; it starts its own containerd unless
    ``containerd_socket`` is given.  ``.docker(*args)``, ``.inspect(ref)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (dockerd, runc)."""
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def daemon_env(**extra: str) -> dict[str, str]:
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{path}:{SBIN_PATH}" if path else SBIN_PATH, **extra}


class ClientError(AssertionError):
    pass


def run(cmd: list[str], env: dict | None = None, timeout: float = 180,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a client command; on failure raise with its full output."""
    started = time.monotonic()
    try:
        proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:  # run() has killed it already
        raise ClientError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n"
                          f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}") from None
    if check and proc.returncode != 0:
        raise ClientError(f"exit {proc.returncode} after {time.monotonic() - started:.1f}s: "
                          f"{' '.join(map(str, cmd))}\nstdout:\n{proc.stdout[-5000:]}\n"
                          f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process we started, SIGKILL it if it will not go."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_pid(pid: int, marker: str, timeout: float = 10) -> None:
    """Stop a process a daemon of ours started (not our child), by PID, but only
    if its command line still mentions ``marker`` (our private directory)."""
    def ours() -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return marker.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"

    if not ours():
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not ours():
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def short_tmpdir(prefix: str) -> Path:
    """A directory with a short path for unix sockets (108-byte limit)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


# -- skopeo and registries.conf ------------------------------------------------------------

def registries_conf(path, mirror_host: str, prefix: str = "docker.io") -> Path:
    """registries.conf sending ``prefix`` (docker.io) to the mirror over plain HTTP."""
    path = Path(path)
    path.write_text(
        "unqualified-search-registries = []\n\n"
        "[[registry]]\n"
        f'prefix = "{prefix}"\n'
        f'location = "{prefix}"\n\n'
        "[[registry.mirror]]\n"
        f'location = "{mirror_host}"\n'
        "insecure = true\n")
    return path


@dataclass
class DirImage:
    """What ``skopeo copy ... dir:DEST`` wrote."""
    manifest: bytes
    children: dict[str, bytes] = field(default_factory=dict)  # digest -> manifest bytes
    blobs: dict[str, str] = field(default_factory=dict)       # name digest -> content digest
    other: list[str] = field(default_factory=list)


_HEX = re.compile(r"^[0-9a-f]{64}$")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_dir_image(dest) -> DirImage:
    dest = Path(dest)
    out = DirImage(manifest=(dest / "manifest.json").read_bytes())
    for entry in sorted(dest.iterdir()):
        name = entry.name
        if name in ("manifest.json", "version"):
            continue
        if name.endswith(".manifest.json") and _HEX.match(name.split(".", 1)[0]):
            out.children["sha256:" + name.split(".", 1)[0]] = entry.read_bytes()
        elif _HEX.match(name):
            out.blobs["sha256:" + name] = _sha256_file(entry)
        else:
            out.other.append(name)
    return out


def check_dir_image(dest, image) -> DirImage:
    """Assert that ``dest`` (a skopeo ``dir:``) holds exactly ``image``."""
    got = read_dir_image(dest)
    assert (Path(dest) / "version").read_text().startswith("Directory Transport Version")
    assert got.other == [], f"unexpected files in {dest}: {got.other}"
    assert got.manifest == image.manifest, "manifest.json differs from the upstream manifest"
    assert set(got.children) == {c.digest for c in image.children}
    for child in image.children:
        assert got.children[child.digest] == child.manifest, f"child {child.digest} differs"
    bad = {name: content for name, content in got.blobs.items() if name != content}
    assert bad == {}, f"blob files whose sha256 is not their name: {bad}"
    assert set(got.blobs) == {b.digest for b in image.blobs}
    return got


# -- podman ----------------------------------------------------------------------------------

class Podman:
    """Root podman with all of its state under ``tmpdir``; nothing runs a container."""

    def __init__(self, tmpdir, registries_conf_path) -> None:
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = which("podman")
        # podman refuses a runroot longer than 50 characters
        self.run_dir: Path | None = short_tmpdir("pod-")
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.containers_conf = self.dir / "containers.conf"
        self.containers_conf.write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.dir / "events.log"}"\n'
            f'image_copy_tmp_dir = "{self.dir / "tmp"}"\n')
        self.storage_conf = self.dir / "storage.conf"
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f'graphroot = "{self.dir / "root"}"\n'
            f'runroot = "{self.run_dir}"\n')
        self.env = daemon_env(CONTAINERS_REGISTRIES_CONF=str(registries_conf_path),
                              CONTAINERS_CONF=str(self.containers_conf),
                              CONTAINERS_STORAGE_CONF=str(self.storage_conf),
                              TMPDIR=str(self.dir / "tmp"))

    def run(self, *args, timeout: float = 180) -> subprocess.CompletedProcess:
        return run([self.bin, "--root", self.dir / "root", "--runroot", self.run_dir,
                    "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                    "--events-backend", "file", "--tmpdir", self.run_dir / "libpod", *args],
                   env=self.env, timeout=timeout)

    def close(self) -> None:
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def inspect(self, ref: str) -> dict:
        return json.loads(self.run("image", "inspect", ref).stdout)[0]


# -- containerd ------------------------------------------------------------------------------

def hosts_dir(dir, mirrors: dict[str, tuple[str, str]]) -> Path:
    """containerd certs.d: ``{"docker.io": (server, mirror_url)}`` -> ``dir``."""
    dir = Path(dir)
    for host, (server, mirror_url) in mirrors.items():
        (dir / host).mkdir(parents=True, exist_ok=True)
        (dir / host / "hosts.toml").write_text(
            f'server = "{server}"\n\n'
            f'[host."{mirror_url}"]\n'
            '  capabilities = ["pull", "resolve"]\n')
    return dir


class ContainerdProcess:
    """A private containerd: root under ``tmpdir``, state and socket in a short /tmp dir."""

    def __init__(self, tmpdir) -> None:
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = which("containerd")
        self.ctr_bin = which("ctr")
        self.run_dir: Path | None = None
        self.socket: Path | None = None
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> ContainerdProcess:
        self.run_dir = short_tmpdir("ctd-")
        self.socket = self.run_dir / "containerd.sock"
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{self.dir / "root"}"\n'
            f'state = "{self.run_dir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",'
            ' "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",'
            ' "io.containerd.snapshotter.v1.devmapper"]\n\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n\n'
            "[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n\n'
            "[debug]\n"
            '  address = ""\n\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.dir / "opt"}"\n')
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.bin, "--config", str(self.config_path)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env=daemon_env())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"containerd exited ({rc}) while starting:\n"
                                   f"{_tail(self.log_path)}")
            if self.socket.exists() and run([self.ctr_bin, "--address", self.socket, "version"],
                                            check=False, timeout=10).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not start in {timeout}s:\n"
                                   f"{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def ctr(self, *args, debug: bool = False, timeout: float = 180) -> subprocess.CompletedProcess:
        return run([self.ctr_bin, "--address", self.socket, *(["--debug"] if debug else []),
                    *args], env=daemon_env(), timeout=timeout)

    def log_text(self) -> str:
        return _tail(self.log_path, 1 << 30)

    def __enter__(self) -> ContainerdProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- dockerd ---------------------------------------------------------------------------------

class DockerdProcess:
    """A private dockerd (vfs, no networking set-up) using ``mirror_url`` as Hub mirror."""

    def __init__(self, tmpdir, mirror_url: str, containerd_socket=None,
                 extra_args: tuple = ()) -> None:
        self.extra_args = tuple(extra_args)
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = which("dockerd")
        # The docker.io package's CLI matches its daemon; any other docker CLI negotiates.
        self.cli = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else which("docker")
        self.mirror_url = mirror_url
        self.containerd_socket = containerd_socket
        self.config_path = self.dir / "daemon.json"
        self.log_path = self.dir / "dockerd.log"
        self.cli_config = self.dir / "cli-config"
        self.run_dir: Path | None = None
        self.socket: Path | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> DockerdProcess:
        self.run_dir = short_tmpdir("dkd-")
        self.socket = self.run_dir / "docker.sock"
        self.config_path.write_text("{}\n")
        self.cli_config.mkdir(exist_ok=True)
        cmd = [self.bin, "--config-file", self.config_path,
               "--data-root", self.dir / "data", "--exec-root", self.run_dir / "exec",
               "--pidfile", self.run_dir / "docker.pid", "-H", f"unix://{self.socket}",
               "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
               "--storage-driver=vfs", "--exec-opt", "native.cgroupdriver=cgroupfs",
               "--registry-mirror", self.mirror_url]
        if self.containerd_socket:
            cmd += ["--containerd", self.containerd_socket]
        cmd += list(self.extra_args)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=daemon_env())
        deadline = time.monotonic() + timeout
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://docker", timeout=5) as api:
            while True:
                if self.proc.poll() is not None:
                    rc = self.proc.returncode
                    self.stop()
                    raise RuntimeError(f"dockerd exited ({rc}) while starting:\n"
                                       f"{_tail(self.log_path)}")
                if self.socket.exists():
                    try:
                        if api.get("/_ping").status_code == 200:
                            return self
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"dockerd did not answer in {timeout}s:\n"
                                       f"{_tail(self.log_path)}")
                time.sleep(0.05)

    def stop(self) -> None:
        managed = None
        if self.run_dir is not None:
            pidfile = self.run_dir / "exec" / "containerd" / "containerd.pid"
            try:
                managed = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                managed = None
        stop_process(self.proc, timeout=30)
        self.proc = None
        if self.run_dir is not None:
            if managed:  # dockerd stops its containerd; make sure of it
                stop_pid(managed, str(self.run_dir))
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def docker(self, *args, timeout: float = 180) -> subprocess.CompletedProcess:
        return run([self.cli, "-H", f"unix://{self.socket}", *args],
                   env=daemon_env(DOCKER_CONFIG=str(self.cli_config)), timeout=timeout)

    def inspect(self, ref: str) -> dict:
        return json.loads(self.docker("image", "inspect", ref).stdout)[0]

    def log_text(self) -> str:
        return _tail(self.log_path, 1 << 30)

    def __enter__(self) -> DockerdProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def needs(*binaries: str):
    """Skip a test whose client binaries are not installed."""
    import pytest
    missing = [b for b in binaries if which(b) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed "
                              "(scripts/test apt-installs podman, containerd and docker.io)")
