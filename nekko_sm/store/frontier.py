"""The bytes of a partial download behind its contiguous frontier: hashed as they arrive, followed.

This module owns :class:`Frontier`, the part of an ingest writer that handles its bytes:
the data file's descriptor, placing received buffers at offsets (with early writeback of
appended bytes), the contiguous frontier (``offset``), and a background thread that hashes
behind it from the very receive buffers it was handed while they are close enough (at
most ``_HOLD`` bytes ahead for one writer, ``_HOLD_ALL`` for all writers of the process)
and from the page cache otherwise; the pool of receive buffers reused across writers; and
:class:`Follower`, a reader that waits behind the frontier, so a tar layer is unpacked
while it downloads.  It never names a path of the cache layout, never takes the ingest
lock and never commits: :class:`~nekko_sm.store.writer.IngestWriter` builds on it.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nekko_sm.errors import CacheCorrupt, Cancelled, InsufficientStorage, NekkoError
from nekko_sm.store.fs import open_file

_HASH_CHUNK = 4 << 20  # bytes read back at a time, for what is no longer held in memory
BUFFER = 4 << 20  # one receive buffer (IngestWriter.buffer): few handovers, few GIL trips
_HOLD = 32 << 20  # received bytes one writer keeps for its hasher ahead of what it hashed
_HOLD_ALL = 64 << 20  # ... and all writers of the process together
_POOL = 4  # spare receive buffers kept for reuse (shared by all writers)
_FLUSH_EVERY = 64 << 20  # appended bytes between background fdatasyncs (early writeback)

if TYPE_CHECKING:  # hashlib is imported by the first writer: status, path and ls make none
    import hashlib

Hasher = Callable[[], "hashlib._Hash"]


class _Buffer(bytearray):
    """A receive buffer handed out by :meth:`IngestWriter.buffer`."""

    __slots__ = ()


class _Room:
    """Bytes of received buffers held for hashers, counted across every writer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.size:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


_ROOM = _Room(_HOLD_ALL)
_SPARE: list[_Buffer] = []  # receive buffers to reuse


class Frontier:
    """The bytes of one partial download, hashed in the background behind the frontier.

    Bytes go to ``data`` through an unbuffered file descriptor, placed at an offset
    (:meth:`_place`; the writer appends at the frontier or, for ranged downloads, places
    parts and then advances the frontier).  A background thread hashes behind that
    frontier, so hashing overlaps the network and the disk instead of adding to them.  It
    hashes the very buffers it was given while they are at most ``_HOLD`` bytes ahead of it
    (a writer at the frontier waits when it runs that far ahead, so one stream is never
    read back), and reads back from the page cache only what it no longer holds: bytes of
    a resumed partial, parts that arrived far ahead.  The writer sets ``ref``, ``cancel``,
    ``_data_path`` and ``_fd`` before it calls ``__init__``, and ``offset`` (the contiguous
    frontier: how many leading bytes are present) right after.
    """

    ref: str
    offset: int
    cancel: threading.Event | None
    _data_path: Path
    _fd: int | None

    def __init__(self, extra_hashers: dict[str, Hasher] | None) -> None:
        self._extra = dict(extra_hashers or {})
        self._cond = threading.Condition()
        self._hasher: threading.Thread | None = None
        self._hash_error: BaseException | None = None
        self._stop_hashing = False
        self._held: dict[int, memoryview] = {}  # offset -> received bytes not hashed yet
        self._held_bytes = 0
        self._busy = 0.0  # seconds the hasher spent hashing
        self._back: memoryview | None = None  # the hasher's buffer for reading back
        self._unflushed = 0
        self._flusher: threading.Thread | None = None
        self.resets = 0  # how often the bytes started over (a follower cannot go on then)
        self.ended = False  # committed, discarded or closed: no more bytes from this writer
        self._new_hashes()

    # -- hashing behind the frontier ---------------------------------------------------
    def _new_hashes(self) -> None:
        import hashlib

        self._sha = hashlib.sha256()
        self._hashers = {name: make() for name, make in self._extra.items()}
        self._hashed = 0
        self._drop_held()

    def _drop_held(self) -> None:
        self._held.clear()
        _ROOM.give(self._held_bytes)
        self._held_bytes = 0

    def _kick(self) -> None:
        with self._cond:
            self._kick_locked()

    def _kick_locked(self) -> None:
        if self._hasher is None and self._hashed < self.offset:
            self._stop_hashing = False
            self._hasher = threading.Thread(
                target=self._hash_loop, daemon=True, name=f"hash {self.ref[:40]}"
            )
            self._hasher.start()
        self._cond.notify_all()

    def _next_piece(self) -> tuple | None:
        """(start, held bytes or None, end of a read-back, hashes) to hash next; under the lock."""
        while self._hashed >= self.offset and not self._stop_hashing:
            self._cond.wait()
        if self._stop_hashing:
            return None
        start, end = self._hashed, self.offset
        data = self._held.pop(start, None)
        mine = data is not None
        if data is not None and start + len(data) > end:
            # Only its head is behind the frontier yet: hash that, keep the rest held.
            self._held[end] = data[end - start :]
            data, mine = data[: end - start], False
        if data is None:
            for k in [k for k in self._held if k < start]:  # passed by a read-back
                n = len(self._held.pop(k))
                self._held_bytes -= n
                _ROOM.give(n)
            # Read back up to the next held buffer (or the frontier), a chunk at a time.
            end = min([k for k in self._held if k < end] + [end, start + _HASH_CHUNK])
        return start, data, mine, end, self._sha, list(self._hashers.values())

    def _hash_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    piece = self._next_piece()
                    if piece is None:
                        return
                    fd = self._file()
                start, data, mine, end, sha, extra = piece
                t = time.perf_counter()
                if data is None:
                    data = self._read_back(fd, start, end - start)
                    if not data:
                        raise OSError(f"the partial of {self.ref} is shorter than expected")
                    held = 0
                else:
                    held = len(data)
                sha.update(data)
                for h in extra:
                    h.update(data)
                self._busy += time.perf_counter() - t
                with self._cond:
                    if self._stop_hashing:
                        return
                    if self._sha is not sha:  # reset meanwhile: start over
                        continue
                    self._hashed = start + len(data)
                    self._held_bytes -= held
                    _ROOM.give(held)
                    self._cond.notify_all()
                if mine:
                    self._recycle(data)
        except BaseException as e:  # noqa: BLE001 - any failure is surfaced by digest/commit
            with self._cond:
                self._hash_error = e
                self._cond.notify_all()
        finally:
            with self._cond:
                if self._hasher is threading.current_thread():
                    self._hasher = None
                self._cond.notify_all()

    def _read_back(self, fd: int, pos: int, n: int) -> memoryview:
        """``n`` bytes at ``pos`` from the file, into one buffer reused (no allocation)."""
        if not hasattr(os, "preadv"):  # pragma: no cover - not Linux/BSD
            return memoryview(os.pread(fd, n, pos))
        if self._back is None:
            self._back = memoryview(bytearray(_HASH_CHUNK))
        return self._back[: os.preadv(fd, [self._back[:n]], pos)]

    def hash_stats(self) -> tuple[int, float]:
        """(bytes hashed so far, seconds the hasher has been busy): is hashing the limit?"""
        return self._hashed, self._busy

    def _wait_hashed(self) -> None:
        with self._cond:
            while self._hashed < self.offset and self._hash_error is None:
                if self._hasher is None:
                    break
                self._cond.wait(1.0)
            err = self._hash_error
        if err is not None:
            raise CacheCorrupt(f"could not hash the partial download of {self.ref}: {err}")
        if self._hashed < self.offset:
            self._kick()
            self._wait_hashed()

    def _stop_hasher(self) -> None:
        with self._cond:
            self._stop_hashing = True
            self._cond.notify_all()
            t = self._hasher
        if t is not None and t is not threading.current_thread():
            t.join()
        with self._cond:
            self._stop_hashing = False

    def hexdigest(self, name: str) -> str:
        self._wait_hashed()
        return self._hashers[name].hexdigest()

    @property
    def digest(self) -> str:
        self._wait_hashed()
        return "sha256:" + self._sha.hexdigest()

    # -- bytes ---------------------------------------------------------------------
    def _file(self) -> int:
        """The descriptor of ``data``; using a closed writer is a programming error."""
        fd = self._fd
        if fd is None:
            raise ValueError(f"the ingest of {self.ref} is closed")
        return fd

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"download of {self.ref} was cancelled")

    def _os_error(self, e: OSError) -> NekkoError | OSError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return InsufficientStorage(
                f"disk full after {self.offset} bytes of {self.ref}; the partial is kept for resume"
            )
        return e

    def buffer(self) -> memoryview:
        """A buffer of ``BUFFER`` bytes to receive into.  Once (a slice of) it is passed to
        :meth:`write` or :meth:`pwrite` it belongs to the writer: the hasher reads it
        instead of the file, and reuses it afterwards.  Do not touch it again."""
        try:
            return memoryview(_SPARE.pop())
        except IndexError:
            return memoryview(_Buffer(BUFFER))

    def _recycle(self, data: memoryview) -> None:
        buf = data.obj
        if isinstance(buf, _Buffer) and len(buf) == BUFFER and len(_SPARE) < _POOL:
            _SPARE.append(buf)

    def _place(self, data: bytes | memoryview, pos: int, append: bool) -> None:
        """Write ``data`` at ``pos`` and hand it to the hasher while it is close enough."""
        view = memoryview(data)
        if pos - self._hashed >= _HOLD and self._held_bytes and pos <= self.offset:
            self._wait_for_hasher(pos)  # far ahead of the hash at the frontier: let it catch up
        self._pwrite_all(view, pos)
        n = len(view)
        owned = isinstance(data, bytes) or isinstance(view.obj, _Buffer)
        with self._cond:
            hold = (
                self._hashed <= pos < self._hashed + _HOLD
                and pos not in self._held
                and _ROOM.take(n)
            )
            if hold:
                self._held[pos] = view if owned else memoryview(bytes(view))
                self._held_bytes += n
            if append:
                self.offset += n
            self._kick_locked()
        if not hold:
            self._recycle(view)
        if append:
            self._unflushed += n
            if self._unflushed >= _FLUSH_EVERY and not (self._flusher and self._flusher.is_alive()):
                # Start writing back now, beside the download, so the fsync of the commit
                # has little left to do.  (Ranged downloads sync with every save already.)
                self._unflushed = 0
                self._flusher = threading.Thread(
                    target=self._flush,
                    args=(self._file(),),
                    daemon=True,
                    name=f"flush {self.ref[:40]}",
                )
                self._flusher.start()

    @staticmethod
    def _flush(fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError:  # the commit's fsync reports what is wrong
            pass

    def _wait_for_hasher(self, pos: int) -> None:
        with self._cond:
            while (
                pos - self._hashed >= _HOLD
                and self._held_bytes
                and self._hashed < self.offset
                and self._hash_error is None
            ):
                self._kick_locked()
                self._cond.wait(0.25)
                self._check_cancel()

    def _pwrite_all(self, data: bytes | memoryview, pos: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._file(), view, pos)
                view = view[n:]
                pos += n
        except OSError as e:
            raise self._os_error(e) from e


class FollowLost(Exception):
    """The bytes a :class:`Follower` read may not be the ones the writer commits (they
    started over, or the writer stopped early): read the committed blob instead."""


class Follower(io.RawIOBase):
    """Reads an :class:`IngestWriter`'s ``data`` behind its frontier, waiting for bytes.

    Seekable, with a real descriptor (``fileno``), so an uncompressed tar can be read by
    offset.  ``stop()`` true, or the writer starting over or ending early, ends the wait
    (:class:`~nekko_sm.errors.Cancelled`, :class:`FollowLost`).
    """

    def __init__(self, writer: Frontier, size: int, stop: Callable[[], bool]) -> None:
        super().__init__()
        self._w = writer
        self._size = size
        self._stop = stop
        self._resets = writer.resets
        self._pos = 0
        try:
            if writer.ended:
                raise FileNotFoundError(writer._data_path)
            self._fd = open_file(writer._data_path, os.O_RDONLY)  # the same inode after commit
        except FileNotFoundError:
            self._fd = -1
            self.close()
            raise FollowLost(f"{writer.ref} stopped before it could be read") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def wait_for(self, end: int) -> None:
        """Until the first ``end`` bytes (at most all of them) are there."""
        end = min(end, self._size)
        w = self._w
        with w._cond:
            while w.offset < end:
                if w.resets != self._resets or w.ended:
                    raise FollowLost(f"{w.ref} started over or stopped")
                if self._stop():
                    raise Cancelled(f"reading {w.ref} was cancelled")
                w._cond.wait(0.5)
            if w.resets != self._resets:
                raise FollowLost(f"{w.ref} started over")

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def,override]
        """All of ``b`` (up to the end), as a file would: tarfile wants whole headers."""
        want = min(len(b), self._size - self._pos)
        if want <= 0:
            return 0
        self.wait_for(self._pos + want)
        data = os.pread(self._fd, want, self._pos)
        if self._w.resets != self._resets:
            raise FollowLost(f"{self._w.ref} started over")
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            os.close(self._fd)
        super().close()
