"""Partial downloads: the only way bytes reach ``blobs/``.

This module owns ``ingest/KEY/`` (``data``, ``state.json``, ``lock``) and
:class:`IngestWriter`, a resumable partial download of one blob: bytes appended or
placed at offsets, hashed in the background behind the contiguous frontier, resume
state that survives a crash, and :meth:`IngestWriter.commit` (fsync, size and digest
check, rename into ``blobs/``, fsync of the directory; a mismatch discards the partial).
:class:`Ingest` opens writers, stores small blobs whole and measures or discards
partials.  A writer holds the ingest's flock while open, so one blob is downloaded once.
It never talks to the network and never names a blob in ``index.json``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from nekko_sm.errors import (
    CacheCorrupt,
    Cancelled,
    InsufficientStorage,
    IntegrityError,
    NekkoError,
    SizeMismatch,
)
from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.fs import (
    fsync_dir,
    is_dir,
    listdir,
    lstat,
    make_dirs,
    open_file,
    parent_dir,
    read_file,
    rename,
    unlink,
    write_atomic,
)
from nekko_sm.store.layout import Layout, sha256_digest
from nekko_sm.store.leases import Lease
from nekko_sm.store.locks import FileLock, remove_locked_dir

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this

_HASH_CHUNK = 4 << 20  # bytes read back at a time, for what is no longer held in memory
BUFFER = 4 << 20  # one receive buffer (IngestWriter.buffer): few handovers, few GIL trips
_HOLD = 32 << 20  # received bytes one writer keeps for its hasher ahead of what it hashed
_HOLD_ALL = 64 << 20  # ... and all writers of the process together
_POOL = 4  # spare receive buffers kept for reuse (shared by all writers)
_FLUSH_EVERY = 64 << 20  # appended bytes between background fdatasyncs (early writeback)
_HASH_CHUNK = 4 << 20
_COPY_CHUNK = 16 << 20  # copy_file_range per call: the hasher follows, a cancel is seen

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


class IngestWriter:
    """A resumable partial download of one blob, under ``ingest/KEY/``.

    Holds the ingest lock while open.  Bytes go to ``data`` through an unbuffered file
    descriptor, either appended (:meth:`write`) or placed at an offset (:meth:`pwrite`, for
    ranged downloads, which then :meth:`advance` the contiguous frontier).  A background
    thread hashes behind that frontier, so hashing overlaps the network and the disk
    instead of adding to them.  It hashes the very buffers it was given while they are at
    most ``_HOLD`` bytes ahead of it (a writer at the frontier waits when it runs that far
    ahead, so one stream is never read back), and reads back from the page cache only
    what it no longer holds: bytes of a resumed partial, parts that arrived far ahead.

    ``offset`` is the contiguous frontier: how many leading bytes are present.  A partial
    left by an earlier attempt (even a crashed one) is picked up at open: its bytes are
    re-hashed in the background, so appending the rest and committing verifies the whole.
    ``state`` is free-form resume metadata (URL, validator for If-Range, total size, the
    part map of a ranged download) that survives a crash.
    """

    def __init__(
        self,
        layout: Layout,
        ref: str,
        expected_size: int | None,
        cancel: threading.Event | None,
        extra_hashers: dict[str, Hasher] | None,
    ) -> None:
        self.layout = layout
        self.ref = ref
        self.dir = layout.ingest_path(ref)
        self._lock = FileLock(self.dir / "lock")
        self._lock.acquire()
        self.expected_size = expected_size
        self.cancel = cancel
        self._extra = dict(extra_hashers or {})
        self._data_path = self.dir / "data"
        self._state_path = self.dir / "state.json"
        self.state: dict = {}
        try:
            self.state = json.loads(read_file(self._state_path))
        except (OSError, ValueError):
            self.state = {}
        if not isinstance(self.state, dict) or self.state.get("ref") != ref:
            self.state = {"ref": ref}
        self._fd: int | None = open_file(self._data_path, os.O_RDWR | os.O_CREAT, 0o644,
                                         replace_link=True)
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
        size = os.fstat(self._fd).st_size
        ranged = self.state.get("ranged")
        if ranged:
            # A ranged download: the file has its full size; what is there is the part map.
            self.offset = _contiguous(ranged.get("parts", []), size)
        else:
            self.offset = size
        if self.expected_size is not None and (size > self.expected_size or
                                               (ranged and ranged.get("total") != self.expected_size)):
            self.reset()
        self._kick()

    # -- hashing behind the frontier ---------------------------------------------------
    def _new_hashes(self) -> None:
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
            self._hasher = threading.Thread(target=self._hash_loop, daemon=True,
                                            name=f"hash {self.ref[:40]}")
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
            self._held[end] = data[end - start:]
            data, mine = data[:end - start], False
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
        return self._back[:os.preadv(fd, [self._back[:n]], pos)]

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
                f"disk full after {self.offset} bytes of {self.ref}; the partial is kept for resume")
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

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` at the frontier."""
        self._check_cancel()
        n = len(data)
        if self.expected_size is not None and self.offset + n > self.expected_size:
            raise SizeMismatch(
                f"upstream sent more than the {self.expected_size} bytes promised for {self.ref}")
        self._place(data, self.offset, append=True)

    def copy_from(self, fd: int, offset: int, n: int) -> None:
        """Append ``n`` bytes of the file open at ``fd`` from ``offset`` (a file inside an
        uncompressed tar layer), copied in the kernel where it can be (``copy_file_range``:
        no pass through Python, page cache to page cache); hashed behind, as :meth:`write`."""
        if self.expected_size is not None and self.offset + n > self.expected_size:
            raise SizeMismatch(
                f"more than the {self.expected_size} bytes promised for {self.ref}")
        copy = getattr(os, "copy_file_range", None)
        done = 0
        while done < n:
            self._check_cancel()
            want = min(_COPY_CHUNK, n - done)
            got = 0
            if copy is not None:
                try:
                    got = copy(fd, self._file(), want, offset + done, self.offset)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise self._os_error(e) from e
                    copy = None  # another file system, an old kernel: the plain way
            if copy is None:
                data = os.pread(fd, want, offset + done)
                self._pwrite_all(data, self.offset)
                got = len(data)
            if got <= 0:
                raise CacheCorrupt(f"{self.ref}: the source ended {n - done} bytes early")
            done += got
            with self._cond:
                self.offset += got
            self._kick()

    def pwrite(self, data: bytes | memoryview, pos: int) -> None:
        """Place ``data`` at ``pos`` (a ranged download); call :meth:`advance` as parts finish."""
        self._check_cancel()
        if self.expected_size is not None and pos + len(data) > self.expected_size:
            raise SizeMismatch(f"upstream sent bytes past the {self.expected_size} promised"
                               f" for {self.ref}")
        self._place(data, pos, append=False)

    def _place(self, data: bytes | memoryview, pos: int, append: bool) -> None:
        """Write ``data`` at ``pos`` and hand it to the hasher while it is close enough."""
        view = memoryview(data)
        if pos - self._hashed >= _HOLD and self._held_bytes and pos <= self.offset:
            self._wait_for_hasher(pos)  # far ahead of the hash at the frontier: let it catch up
        self._pwrite_all(view, pos)
        n = len(view)
        owned = isinstance(data, bytes) or isinstance(view.obj, _Buffer)
        with self._cond:
            hold = (self._hashed <= pos < self._hashed + _HOLD and pos not in self._held
                    and _ROOM.take(n))
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
                self._flusher = threading.Thread(target=self._flush, args=(self._file(),),
                                                 daemon=True, name=f"flush {self.ref[:40]}")
                self._flusher.start()

    @staticmethod
    def _flush(fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError:  # the commit's fsync reports what is wrong
            pass

    def _wait_for_hasher(self, pos: int) -> None:
        with self._cond:
            while (pos - self._hashed >= _HOLD and self._held_bytes
                   and self._hashed < self.offset and self._hash_error is None):
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

    def advance(self, frontier: int) -> None:
        """The first ``frontier`` bytes are now all present (ranged downloads)."""
        with self._cond:
            if frontier > self.offset:
                self.offset = frontier
                self._kick_locked()

    def preallocate(self, total: int) -> None:
        """Reserve ``total`` bytes on disk now: a disk that is too small fails here, not later.

        Only where the file system allocates without writing (ext4, xfs, btrfs...): tmpfs
        would zero every page now, and glibc emulates fallocate elsewhere by writing a byte
        per block.  There the free space is checked and the file extended sparsely."""
        fd = self._file()
        if not hasattr(os, "posix_fallocate") or not _allocates_cheaply(fd):
            st = os.fstat(fd)
            vfs = os.fstatvfs(fd)
            if total - st.st_blocks * 512 > vfs.f_bavail * vfs.f_frsize:
                raise self._os_error(OSError(errno.ENOSPC, "no space left"))
            if st.st_size < total:
                os.ftruncate(fd, total)
            return
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(fd, total)
            else:
                raise self._os_error(e) from e

    def reset(self) -> None:
        """Start over: the upstream ignored Range, or the content changed."""
        self._stop_hasher()
        os.ftruncate(self._file(), 0)
        with self._cond:
            self._new_hashes()
            self.offset = 0
            self._hash_error = None
            self._busy = 0.0
            self.resets += 1
            self._cond.notify_all()
        self.state.pop("ranged", None)

    def hexdigest(self, name: str) -> str:
        self._wait_hashed()
        return self._hashers[name].hexdigest()

    @property
    def digest(self) -> str:
        self._wait_hashed()
        return "sha256:" + self._sha.hexdigest()

    def sync(self) -> None:
        """Make what was written durable (before recording it in the state)."""
        try:
            os.fdatasync(self._file())
        except OSError as e:
            raise self._os_error(e) from e

    def save_state(self, **values: object) -> None:
        self.state.update(values)
        write_atomic(self._state_path, json.dumps(self.state, sort_keys=True).encode())

    # -- end -----------------------------------------------------------------------
    def commit(self, expected_digest: str | None = None, lease: Lease | None = None) -> Descriptor:
        """Verify and move the bytes into ``blobs/``.  On mismatch the partial is discarded."""
        if self.state.get("ranged"):
            os.ftruncate(self._file(), self.offset)  # a ranged file was preallocated to its total
        try:
            os.fsync(self._file())
        except OSError as e:
            raise self._os_error(e) from e
        size = self.offset
        if os.fstat(self._file()).st_size != size:
            self.discard()
            raise CacheCorrupt(f"{self.ref}: partial has gaps; nothing was stored")
        if self.expected_size is not None and size != self.expected_size:
            self.discard()
            raise SizeMismatch(
                f"{self.ref}: got {size} bytes, expected {self.expected_size}; nothing was stored")
        digest = self.digest
        if expected_digest is not None and digest != expected_digest:
            self.discard()
            raise IntegrityError(
                f"{self.ref}: content has digest {digest}, expected {expected_digest};"
                " nothing was stored")
        if lease is not None:
            lease.add(digest)
        target = self.layout.blob_path(digest)
        os.fchmod(self._file(), 0o444)  # the descriptor's file: never a link's target
        self._close_fd()
        # A blob of the right size is the same bytes (written once, verified); one of
        # another size (or a link planted there) is replaced with the verified bytes.
        if not self.layout.has_blob(digest, size):
            rename(self._data_path, target)  # both directories reached without links
            fsync_dir(target.parent)
        self._remove_dir()
        return Descriptor("application/octet-stream", digest, size)

    def follow(self, size: int, stop: Callable[[], bool]) -> Follower:
        """A reader of these bytes as they arrive (``size`` in all): it waits behind the
        contiguous frontier, so a tar layer is unpacked while it downloads."""
        return Follower(self, size, stop)

    def _close_fd(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()
        self._stop_hasher()
        if self._flusher is not None:
            self._flusher.join()  # it holds the descriptor
        with self._cond:
            self._drop_held()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _remove_dir(self) -> None:
        # Remove everything while still holding the lock; waiters notice that the lock
        # file they hold is gone and start on a fresh one.
        for name in ("data", "state.json", "lock"):
            unlink(self.dir / name)
        try:
            with parent_dir(self.dir) as (dfd, name):
                os.rmdir(name, dir_fd=dfd)
        except OSError:
            pass
        self._lock.release()

    def discard(self) -> None:
        self._close_fd()
        self._remove_dir()

    def close(self) -> None:
        """Stop writing and keep the partial for a later resume (an empty one goes)."""
        if self._fd is None and not self._lock.held:
            return
        self._close_fd()
        if self.offset == 0 and not self.state.get("ranged") and len(self.state) <= 1:
            self._remove_dir()
        elif self._lock.held:
            self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# statfs magic numbers of file systems whose fallocate reserves blocks without writing them
_CHEAP_FALLOCATE = {
    0xEF53,  # ext2/3/4
    0x58465342,  # xfs
    0x9123683E,  # btrfs
    0xF2F52010,  # f2fs
    0x794C7630,  # overlayfs (its upper layer decides)
    0x7461636F,  # ocfs2
    0xCA451A4E,  # bcachefs
}
_fstatfs: object = None


def _allocates_cheaply(fd: int) -> bool:
    """Whether fallocate on ``fd``'s file system only reserves blocks (Linux statfs f_type);
    True where this cannot be told, as before."""
    global _fstatfs
    if not sys.platform.startswith("linux"):
        return True
    if _fstatfs is None:
        try:
            import ctypes

            _fstatfs = ctypes.CDLL(None, use_errno=True).fstatfs
        except (ImportError, OSError, AttributeError):
            _fstatfs = False
    if not _fstatfs:
        return True
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on 64-bit Linux
    if _fstatfs(fd, buf) != 0:  # type: ignore[operator]
        return True
    magic = ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF  # f_type, the first word
    return magic in _CHEAP_FALLOCATE
def _space(e: OSError, what: str) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"disk full storing {what}")
    return e


class FollowLost(Exception):
    """The bytes a :class:`Follower` read may not be the ones the writer commits (they
    started over, or the writer stopped early): read the committed blob instead."""


class Follower(io.RawIOBase):
    """Reads an :class:`IngestWriter`'s ``data`` behind its frontier, waiting for bytes.

    Seekable, with a real descriptor (``fileno``), so an uncompressed tar can be read by
    offset.  ``stop()`` true, or the writer starting over or ending early, ends the wait
    (:class:`~nekko_sm.errors.Cancelled`, :class:`FollowLost`).
    """

    def __init__(self, writer: IngestWriter, size: int, stop: Callable[[], bool]) -> None:
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
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            os.close(self._fd)
        super().close()


def _contiguous(parts: list, size: int) -> int:
    """How many leading bytes a ranged download's part map says are present."""
    frontier = 0
    for part in sorted(parts):
        try:
            start, end, nxt = (int(x) for x in part)
        except (TypeError, ValueError):
            break
        if start > frontier:
            break
        frontier = max(frontier, min(nxt, size))
        if nxt < end:
            break
    return frontier


class Ingest:
    """The ``ingest/`` directory of one layout: writers, small blobs, partials."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def writer(self, ref: str, expected_size: int | None = None,
               cancel: threading.Event | None = None,
               extra_hashers: dict[str, Hasher] | None = None) -> IngestWriter:
        """Open (blocking until no one else holds it) the ingest for ``ref``.

        ``ref`` names the thing being downloaded: the expected digest when it is known
        (so two pulls of the same blob share one ingest), otherwise something stable
        like the source URL, so an interrupted download resumes.
        """
        make_dirs(self.layout.ingest_dir)
        return IngestWriter(self.layout, ref, expected_size, cancel, extra_hashers)

    def put_bytes(self, data: bytes, lease: Lease | None = None,
                  expected_digest: str | None = None) -> str:
        """Store a small blob (manifest, config) and return its digest."""
        digest = sha256_digest(data)
        if expected_digest is not None and digest != expected_digest:
            raise IntegrityError(f"content has digest {digest}, expected {expected_digest}")
        if lease is not None:
            lease.add(digest)
        if self.layout.has_blob(digest, len(data)):
            return digest
        with self.writer(digest, expected_size=len(data)) as w:
            if self.layout.has_blob(digest, len(data)):
                return digest
            w.reset()
            w.write(data)
            w.commit(digest)
        return digest

    def put_small(self, data: bytes, lease: Lease | None = None) -> str:
        """Store a small blob the cheap way (the many small files of an unpacked layer):
        written to ``ingest/.small-*``, fsynced and renamed into ``blobs/``, without an
        ingest directory, a lock or a hasher thread (about twice as fast as
        :meth:`put_bytes`).  Two writers of the same bytes rename the same content into
        place.  The caller fsyncs ``blobs/`` once when done (:meth:`Layout.sync_blobs`),
        before any entry names what it stored."""
        digest = sha256_digest(data)
        if lease is not None:
            lease.add(digest)  # before the check: gc cannot take it from under us
        if self.layout.has_blob(digest, len(data)):
            return digest
        tmp = self.layout.ingest_dir / (f".small-{digest[7:23]}-{os.getpid()}-"
                                        f"{threading.get_ident()}")
        try:
            # O_EXCL | O_NOFOLLOW (open_file): a link planted at the name is never followed.
            unlink(tmp)  # a stale one of a crashed process with our pid and thread id
            fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444,
                           replace_link=True)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            rename(tmp, self.layout.blob_path(digest))
        except OSError as e:
            unlink(tmp)
            raise _space(e, digest) from e
        return digest

    def partial_size(self, ref: str) -> int:
        """Bytes a partial download holds (for a ranged one, what its saved part map says)."""
        d = self.layout.ingest_path(ref)
        try:
            size = lstat(d / "data").st_size
        except OSError:
            return 0
        try:
            ranged = json.loads(read_file(d / "state.json")).get("ranged")
        except (OSError, ValueError, AttributeError):
            ranged = None
        if ranged:
            try:
                return sum(int(p[2]) - int(p[0]) for p in ranged.get("parts", []))
            except (TypeError, ValueError, IndexError):
                return 0
        return size

    def partials_size(self) -> int:
        """Bytes all partial downloads hold (what a resume will not fetch again)."""
        total = 0
        try:
            names = listdir(self.layout.ingest_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            try:
                state = read_file(self.layout.ingest_dir / name / "state.json")
                total += self.partial_size(json.loads(state)["ref"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return total

    def discard_partial(self, ref: str) -> bool:
        """Remove the partial download for ``ref`` unless someone is writing it."""
        d = self.layout.ingest_path(ref)
        if not is_dir(d):
            return False
        lock = FileLock(d / "lock")
        if not lock.acquire(blocking=False):
            return False
        remove_locked_dir(d, lock)
        return True
