"""Less CPU per byte (issue 11): hashing from the received buffers, bounded memory, reading
straight into them, and no preallocation that writes pages."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading

import pytest
import urllib3

from nekko_sm import httpio
from nekko_sm.errors import InsufficientStorage
from nekko_sm.store import Store, frontier


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def preads(monkeypatch):
    """Every (offset, length) the hasher reads back from the file."""
    seen: list[tuple[int, int]] = []
    real, realv = os.pread, getattr(os, "preadv", None)

    def counting(fd, n, pos):
        data = real(fd, n, pos)
        seen.append((pos, len(data)))
        return data

    def countingv(fd, buffers, pos):
        n = realv(fd, buffers, pos)
        seen.append((pos, n))
        return n

    monkeypatch.setattr(frontier.os, "pread", counting)
    if realv is not None:
        monkeypatch.setattr(frontier.os, "preadv", countingv)
    return seen


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "cache").init()


def test_one_stream_is_hashed_from_its_buffers_not_read_back(store, preads, monkeypatch):
    monkeypatch.setattr(frontier, "_HOLD", 2 * frontier.BUFFER)
    data = os.urandom(12 * frontier.BUFFER)
    seen = set()
    with store.writer("one", expected_size=len(data)) as w:
        pos = 0
        while pos < len(data):
            buf = w.buffer()
            seen.add(id(buf.obj))
            n = min(len(buf), len(data) - pos)
            buf[:n] = data[pos : pos + n]
            w.write(buf[:n])
            pos += n
        desc = w.commit(sha(data))
    assert desc.digest == sha(data)
    assert preads == []  # every byte hashed from the buffer it arrived in
    assert len(seen) < 12  # and the buffers were reused, not one per write


def test_bytes_are_hashed_without_reading_back_too(store, preads):
    data = os.urandom(5 << 20)
    with store.writer("b") as w:
        for i in range(0, len(data), 300_000):
            w.write(data[i : i + 300_000])
        assert w.commit(sha(data)).digest == sha(data)
    assert preads == []


def test_a_writer_far_ahead_of_the_hasher_waits_and_memory_stays_bounded(
    store, preads, monkeypatch
):
    monkeypatch.setattr(frontier, "_HOLD", 4 << 20)
    data = os.urandom(20 << 20)
    peak = [0]
    writer = []

    class Slow:
        """An extra hasher slower than the writer: the held bytes would pile up."""

        def __init__(self):
            self.h = hashlib.sha1()

        def update(self, b):
            peak[0] = max(peak[0], writer[0]._held_bytes)
            threading.Event().wait(0.01)
            self.h.update(b)

        def hexdigest(self):
            return self.h.hexdigest()

    with store.writer("slow", extra_hashers={"slow": Slow}) as w:
        writer.append(w)
        for i in range(0, len(data), 1 << 20):
            w.write(data[i : i + (1 << 20)])
        assert w.hexdigest("slow") == hashlib.sha1(data).hexdigest()
        assert w.commit(sha(data)).digest == sha(data)
    assert 0 < peak[0] <= (4 << 20) + frontier.BUFFER
    assert preads == []  # it waited instead of dropping buffers


def test_ranged_parts_far_ahead_are_read_back_near_ones_are_not(store, preads, monkeypatch):
    monkeypatch.setattr(frontier, "_HOLD", 2 << 20)
    mib = 1 << 20
    data = os.urandom(8 * mib)
    with store.writer("r", expected_size=len(data)) as w:
        w.preallocate(len(data))
        w.save_state(ranged={"total": len(data), "parts": []})
        w.pwrite(data[6 * mib :], 6 * mib)  # far ahead of the hash: not held
        w.pwrite(data[mib : 2 * mib], mib)  # near: held until the frontier reaches it
        w.pwrite(data[:mib], 0)
        w.advance(2 * mib)
        for i in range(2, 6):
            w.pwrite(data[i * mib : (i + 1) * mib], i * mib)
            w.advance((i + 1) * mib)
        w.advance(len(data))
        assert w.commit(sha(data)).digest == sha(data)
    assert sum(n for _, n in preads) == 2 * mib  # exactly the part that came far ahead
    assert min(pos for pos, _ in preads) == 6 * mib


def test_resumed_bytes_are_read_back_once(store, preads):
    data = os.urandom(3 << 20)
    with store.writer("again") as w:
        w.write(data[: 2 << 20])
    with store.writer("again") as w:
        w.write(data[2 << 20 :])
        assert w.commit(sha(data)).digest == sha(data)
    assert sum(n for _, n in preads) == 2 << 20  # the old partial, nothing written now


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MiB tmpfs (root only, as tests/test_crash.py's tiny disk)."""
    if os.geteuid() != 0:
        pytest.skip("PEER MISSING: a tmpfs mount needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_preallocate_on_tmpfs_zeroes_no_pages_and_still_refuses_too_much(small_tmpfs):
    store = Store(small_tmpfs / "cache").init()
    free = os.statvfs(small_tmpfs).f_bavail
    data = os.urandom(1 << 20)
    with store.writer("t", expected_size=32 << 20) as w:
        w.preallocate(32 << 20)
        assert os.statvfs(small_tmpfs).f_bavail >= free - 8  # no 32 MiB of zeroed pages
        assert os.fstat(w._file()).st_size == 32 << 20
        w.pwrite(data, 0)
        w.sync()
    with store.writer("huge") as w, pytest.raises(InsufficientStorage):
        w.preallocate(128 << 20)


class _Chunks:
    """A response without an http.client inside: read1 hands out chunks, then fails."""

    def __init__(self, chunks, error):
        self.chunks = list(chunks)
        self.error = error

    def read1(self, n):
        if not self.chunks:
            raise self.error
        return self.chunks.pop(0)


def test_fill_keeps_the_bytes_that_arrived_before_an_error():
    err = ConnectionResetError("reset")
    buf = memoryview(bytearray(1 << 20))
    n, got = httpio.fill(_Chunks([b"a" * 1000, b"b" * 500], err), buf)
    assert (n, got) == (1500, err)
    assert bytes(buf[:n]) == b"a" * 1000 + b"b" * 500
    assert httpio.is_stall(socket.timeout("timed out"))


def test_fill_reads_an_http_client_body_in_place_and_the_connection_is_reused(nginx):
    data = os.urandom(3 << 20)
    url = nginx.put("fill.bin", data)
    pool = urllib3.PoolManager(maxsize=1, retries=False)
    nginx.clear_log()
    for _ in range(2):
        resp = pool.urlopen("GET", url, preload_content=False, redirect=False)
        out = bytearray()
        while True:
            buf = memoryview(bytearray(1 << 20))
            n, err = httpio.fill(resp, buf)
            assert err is None
            if not n:
                break
            out += buf[:n]
        resp.release_conn()
        assert bytes(out) == data
    log = nginx.requests_for("fill.bin")
    assert len(log) == 2 and log[0]["connection"] == log[1]["connection"]


def test_a_long_stream_is_written_back_while_it_arrives(store, monkeypatch):
    monkeypatch.setattr(frontier, "_FLUSH_EVERY", 1 << 20)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(frontier.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    data = os.urandom(4 << 20)
    with store.writer("wb") as w:
        for i in range(0, len(data), 256 << 10):
            w.write(data[i : i + (256 << 10)])
        w._flusher.join()
        assert synced  # before the commit's fsync, not instead of it
        assert w.commit(sha(data)).digest == sha(data)


def test_held_buffers_are_bounded_across_writers_and_all_given_back(store, monkeypatch):
    """Many blobs at once (an image's layers) share one budget of held bytes."""
    mib = 1 << 20
    monkeypatch.setattr(frontier, "_HOLD_ALL", 3 * mib)
    monkeypatch.setattr(frontier, "_ROOM", frontier._Room(3 * mib))
    blobs = [os.urandom(8 * mib) for _ in range(2)]
    writers = [store.writer(f"w{i}", expected_size=8 * mib) for i in range(2)]
    try:
        for w, data in zip(writers, blobs):
            w.preallocate(len(data))
            w.save_state(ranged={"total": len(data), "parts": []})
            for i in range(1, 4):  # ahead of the frontier: held, while there is room
                w.pwrite(data[i * mib : (i + 1) * mib], i * mib)
        assert frontier._ROOM.used <= 3 * mib
        for w, data in zip(writers, blobs):
            w.pwrite(data[:mib], 0)
            w.pwrite(data[4 * mib :], 4 * mib)
            w.advance(len(data))
        assert [w.commit(sha(d)).digest for w, d in zip(writers, blobs)] == [sha(d) for d in blobs]
    finally:
        for w in writers:
            w.close()
    assert frontier._ROOM.used == 0  # every held byte was given back


def test_a_reset_gives_its_held_buffers_back(store):
    used = frontier._ROOM.used
    with store.writer("reset") as w:
        w.preallocate(8 << 20)
        w.save_state(ranged={"total": 8 << 20, "parts": []})
        w.pwrite(os.urandom(1 << 20), 1 << 20)  # held: not behind the frontier yet
        assert frontier._ROOM.used > used
        w.reset()
        assert frontier._ROOM.used == used
