"""Which paths a running process touches: ``strace`` attached to it, file syscalls only.

``SyscallTrace(pid, out_path, cwd, trace="%file")``: ``.start()`` attaches
``strace -f -y -xx`` to every thread of ``pid`` (and threads started later) and returns
once the tracer is in place; ``.stop()`` detaches; ``.calls()`` parses what was recorded
into ``FileCall``s (syscall, absolute path, whether it writes, result).  ``available()``
says whether strace exists.

By default only the ``%file`` class is traced (every syscall that takes a path: open*,
stat*, access, readlink, unlink, rename, mkdir, ...), so a request that makes the process
open, stat, create, rename or delete anything shows up, whichever thread did it.
``trace`` can add others: a call on an fd alone (``fsync``) comes out as a ``FileCall``
on the file the fd is.
Paths are exact: ``-xx`` prints every string byte as ``\\xHH`` and ``-y`` prints the
directory a dirfd (or ``AT_FDCWD``) stands for and the file a returned fd is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

from .ports import stop_process

STRACE = "strace"

WRITE_CALLS = frozenset({
    "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
    "rmdir", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmodat", "fchmodat2",
    "chown", "lchown", "fchownat", "truncate", "utime", "utimes", "utimensat", "futimesat",
    "mknod", "mknodat", "setxattr", "lsetxattr", "removexattr", "lremovexattr", "mount",
    "umount2", "chroot", "pivot_root", "swapon", "swapoff", "acct", "quotactl",
})
OPEN_CALLS = frozenset({"open", "openat", "openat2"})
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND", "O_TMPFILE")

_HEX = r"(?:\\x[0-9a-f]{2})*"
_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|0x[0-9a-f]+|\?)(?:<(" + _HEX + r")>)?"
                   r"(?:\s+(E[A-Z0-9]+))?")
_DIRFD = re.compile(r"(?:AT_FDCWD|-?\d+)<(" + _HEX + r")>")
_STRING = re.compile(r'"(' + _HEX + r')"(\.\.\.)?')
_TOKEN = re.compile(r'(?:AT_FDCWD|-?\d+)<' + _HEX + r'>|"' + _HEX + r'"(?:\.\.\.)?')


class FileCall(NamedTuple):
    pid: int
    syscall: str
    path: str              # absolute, lexically normalised (".." resolved as the kernel would
                           # for a path without symlinks)
    writes: bool           # creates, changes or removes something (or opens for writing)
    result: str            # the return value ("-1" on failure)
    error: str | None      # ENOENT, EACCES, ...
    line: str              # the raw strace line, for the report


def available() -> bool:
    return shutil.which(STRACE) is not None


def _unhex(text: str) -> str:
    return bytes.fromhex(text.replace("\\x", "")).decode("utf-8", "surrogateescape")


class SyscallTrace:
    def __init__(self, pid: int, out_path, cwd: str | os.PathLike, trace: str = "%file",
                 string_limit: int = 65536) -> None:
        self.string_limit = string_limit   # bytes of a string strace prints (0: reads' data)
        self.pid = pid
        self.trace = trace             # strace's -e trace=: "%file,fsync,fdatasync" adds those
        self.out_path = Path(out_path)
        self.cwd = str(cwd)            # the traced process's working directory
        self.proc: subprocess.Popen | None = None
        self.stderr: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 10) -> SyscallTrace:
        self.proc = subprocess.Popen(
            [STRACE, "-f", "-y", "-xx", "-s", str(self.string_limit),
             "-e", f"trace={self.trace}",
             "-e", "signal=none", "-o", str(self.out_path), "-p", str(self.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace")
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._all_threads_traced():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"strace could not attach to pid {self.pid}: "
                                   f"{''.join(self.stderr)[-2000:]}")
            time.sleep(0.02)
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _all_threads_traced(self) -> bool:
        assert self.proc is not None
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except FileNotFoundError:
            return False
        for tid in tasks:
            try:
                status = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
            except FileNotFoundError:
                continue          # thread ended
            m = re.search(r"^TracerPid:\s*(\d+)", status, re.M)
            if not m or int(m.group(1)) != self.proc.pid:
                return False
        return True

    def stop(self) -> None:
        """Detach (the traced process carries on) and flush the output."""
        if self.proc is None:
            return
        stop_process(self.proc)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.proc = None

    def __enter__(self) -> SyscallTrace:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- parsing ------------------------------------------------------------------------

    def calls(self) -> list[FileCall]:
        try:
            text = self.out_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return list(parse(text, self.cwd))


def parse(text: str, cwd: str):
    """FileCalls from ``strace -f -y -xx`` output (unfinished/resumed pairs joined)."""
    pending: dict[str, str] = {}
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        if rest.startswith("<... "):
            head = pending.pop(pid, "")
            rest = head + rest[rest.index("resumed>") + len("resumed>"):]
        call = _CALL.match(rest)
        if not call:
            continue            # signals, exits, "+++ ...", unparsable tails
        name, args, result, result_path, error = call.groups()
        writes = name in WRITE_CALLS or (
            name in OPEN_CALLS and any(flag in args for flag in WRITE_FLAGS))
        for path in _paths(args, cwd):
            yield FileCall(int(pid), name, path, writes, result, error, raw)
        if result_path is not None and name in OPEN_CALLS:
            yield FileCall(int(pid), name, os.path.normpath(_unhex(result_path)), writes,
                           result, error, raw)


def _paths(args: str, cwd: str) -> list[str]:
    """Every path argument made absolute: relative to the dirfd before it, else cwd."""
    base = cwd
    out = []
    saw_string = False
    for token in _TOKEN.finditer(args):
        text = token.group(0)
        if text.startswith('"'):
            saw_string = True
            s = _STRING.fullmatch(text)
            assert s is not None
            path = _unhex(s.group(1))
            if s.group(2):
                path += "\0TRUNCATED"
            out.append(os.path.normpath(os.path.join(base, path)) if path else base)
        else:
            d = _DIRFD.fullmatch(text)
            assert d is not None
            base = _unhex(d.group(1))
    if not saw_string and _DIRFD.match(args):
        out.append(base)           # a call on an fd alone (utimensat(fd, NULL, ...))
    return out


def outside(calls, *, write_roots, read_roots, read_files=()) -> list[FileCall]:
    """Calls that wrote anywhere but under ``write_roots``, or looked at anything not
    under ``write_roots``/``read_roots`` and not one of ``read_files``."""
    def under(path: str, roots) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    write_roots = [os.path.normpath(str(r)) for r in write_roots]
    read_roots = [os.path.normpath(str(r)) for r in read_roots]
    read_files = {os.path.normpath(str(f)) for f in read_files}
    bad = []
    for call in calls:
        if under(call.path, write_roots):
            continue
        if call.writes or not (under(call.path, read_roots) or call.path in read_files):
            bad.append(call)
    return bad
