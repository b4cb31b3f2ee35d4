"""A resumable partial download of one blob, and its commit: the only way bytes reach ``blobs/``.

This module owns ``ingest/KEY/`` (``data``, ``state.json``, ``lock``) and
:class:`IngestWriter`: opened under the ingest's flock (so one blob is downloaded once),
it picks up a partial left by an earlier attempt, even a crashed one; it appends or
places bytes (with size checks, copies from a local file, preallocation of a ranged
download), keeps resume state that survives a crash, starts over when the content
changed, and :meth:`IngestWriter.commit` fsyncs, checks size and digest, renames into
``blobs/`` and fsyncs the directory (a mismatch discards the partial).  Hashing and
following the bytes behind the frontier are ``frontier``'s.  It never talks to the
network and never names a blob in ``index.json``.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Callable

from nekko_sm.errors import CacheCorrupt, IntegrityError, SizeMismatch
from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.frontier import Follower, Frontier, Hasher
from nekko_sm.store.fs import (
    fsync_dir,
    open_file,
    parent_dir,
    read_file,
    rename,
    unlink,
    write_atomic,
)
from nekko_sm.store.layout import Layout
from nekko_sm.store.leases import Lease
from nekko_sm.store.locks import FileLock

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this

_COPY_CHUNK = 16 << 20  # copy_file_range per call: the hasher follows, a cancel is seen


class IngestWriter(Frontier):
    """A resumable partial download of one blob, under ``ingest/KEY/``.

    Holds the ingest lock while open.  Bytes are either appended (:meth:`write`) or placed
    at an offset (:meth:`pwrite`, for ranged downloads, which then :meth:`advance` the
    contiguous frontier); :class:`~nekko_sm.store.frontier.Frontier` hashes them behind it.

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
        self._data_path = self.dir / "data"
        self._state_path = self.dir / "state.json"
        self.state: dict = {}
        try:
            self.state = json.loads(read_file(self._state_path))
        except (OSError, ValueError):
            self.state = {}
        if not isinstance(self.state, dict) or self.state.get("ref") != ref:
            self.state = {"ref": ref}
        self._fd = open_file(self._data_path, os.O_RDWR | os.O_CREAT, 0o644, replace_link=True)
        super().__init__(extra_hashers)
        size = os.fstat(self._fd).st_size
        ranged = self.state.get("ranged")
        if ranged:
            # A ranged download: the file has its full size; what is there is the part map.
            self.offset = _contiguous(ranged.get("parts", []), size)
        else:
            self.offset = size
        if self.expected_size is not None and (
            size > self.expected_size or (ranged and ranged.get("total") != self.expected_size)
        ):
            self.reset()
        self._kick()

    # -- bytes ---------------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` at the frontier."""
        self._check_cancel()
        n = len(data)
        if self.expected_size is not None and self.offset + n > self.expected_size:
            raise SizeMismatch(
                f"upstream sent more than the {self.expected_size} bytes promised for {self.ref}"
            )
        self._place(data, self.offset, append=True)

    def copy_from(self, fd: int, offset: int, n: int) -> None:
        """Append ``n`` bytes of the file open at ``fd`` from ``offset`` (a file inside an
        uncompressed tar layer), copied in the kernel where it can be (``copy_file_range``:
        no pass through Python, page cache to page cache); hashed behind, as :meth:`write`."""
        if self.expected_size is not None and self.offset + n > self.expected_size:
            raise SizeMismatch(f"more than the {self.expected_size} bytes promised for {self.ref}")
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
            raise SizeMismatch(
                f"upstream sent bytes past the {self.expected_size} promised for {self.ref}"
            )
        self._place(data, pos, append=False)

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
                f"{self.ref}: got {size} bytes, expected {self.expected_size}; nothing was stored"
            )
        digest = self.digest
        if expected_digest is not None and digest != expected_digest:
            self.discard()
            raise IntegrityError(
                f"{self.ref}: content has digest {digest}, expected {expected_digest};"
                " nothing was stored"
            )
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
