"""A cold blob's readers close behind the download take its bytes from memory (the
chunks just written, fill.py ``_recent``), not by reading them back from the temp
file; slower or later readers still follow the file, and every one gets the same
bytes, the last one only once the blob is verified."""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.support import syscalls
from tests.support.client import read_blob

READS = re.compile(r"(?:pread64|preadv2?)\((\d+)<([^>]*)>.*= (\d+)$")


def read_back(trace_text: str, tmp_dir: str) -> int:
    """Bytes the traced process read from files under ``tmp_dir`` (the fills' temp files)."""
    total = 0
    for line in trace_text.splitlines():
        m = READS.search(line)
        if m and syscalls._unhex(m.group(2)).startswith(tmp_dir + "/"):
            total += int(m.group(3))
    return total


@pytest.mark.skipif(not syscalls.available(), reason="needs strace")
def test_the_first_reader_is_served_from_memory(make_mirror, faulty_upstream, image_set,
                                               tmp_path):
    image = image_set.big
    blob = image.largest_blob
    mirror = make_mirror({"upstreams": {"docker.io": {"url": faulty_upstream.url}},
                          "default": "docker.io"})
    # Upstream slower than the client (2 s for the blob, any size): the reader keeps up
    # with the download. (A client slower than upstream falls behind what is kept in
    # memory and follows the file, as every reader did before.)
    faulty_upstream.arm("drip", path_contains=blob.digest, method="GET", times=1,
                        chunk=max(64 * 1024, blob.size // 40), delay=0.05)
    trace = syscalls.SyscallTrace(mirror.proc.pid, tmp_path / "strace.out", mirror.dir,
                                  trace="pread64,preadv,preadv2", string_limit=0)
    with trace:
        assert read_blob(mirror, image.repo, blob) == (blob.size, blob.digest, None)
    back = read_back(trace.out_path.read_text(errors="replace"),
                     str(mirror.data_dir / "tmp"))
    # Before: every byte went through the file (back == blob.size). Now at most the
    # held-back last byte and what the reader had to catch up on when it fell behind.
    assert back < blob.size // 4, (back, blob.size)


def test_readers_near_and_far_behind_get_the_same_bytes(make_mirror, faulty_upstream,
                                                        image_set):
    """One reader from the start while the blob drips in, one joining midway (its first
    bytes are long out of memory), one slow: all byte-exact."""
    image = image_set.big
    blob = image.largest_blob
    mirror = make_mirror({"upstreams": {"docker.io": {"url": faulty_upstream.url}},
                          "default": "docker.io"})
    faulty_upstream.arm("drip", path_contains=blob.digest, method="GET", times=1,
                        chunk=max(64 * 1024, blob.size // 40), delay=0.02)    # ~1 s in all
    results = {}

    def pull(name):
        results[name] = read_blob(mirror, image.repo, blob)

    first = threading.Thread(target=pull, args=("first",))
    first.start()
    deadline = time.monotonic() + 30
    while faulty_upstream.count("GET", blob.digest) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.4)                 # about half of it is in: the late reader starts behind
    late = threading.Thread(target=pull, args=("late",))
    late.start()
    first.join(120)
    late.join(120)
    pull("after")
    assert results == {k: (blob.size, blob.digest, None) for k in ("first", "late", "after")}
    assert faulty_upstream.count("GET", f"/blobs/{blob.digest}") == 1
