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
import json
import os
import threading
from typing import TYPE_CHECKING, Callable

from nekko_sm.errors import (
    CacheCorrupt,
    Cancelled,
    InsufficientStorage,
    IntegrityError,
    NekkoError,
    SizeMismatch,
)
from nekko_sm.store.index import Descriptor
from nekko_sm.store.layout import (
    Layout,
    fsync_dir,
    is_dir,
    listdir,
    lstat,
    make_dirs,
    open_file,
    parent_dir,
    read_file,
    rename,
    sha256_digest,
    unlink,
    write_atomic,
)
from nekko_sm.store.locks import FileLock, remove_locked_dir

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this

    from nekko_sm.store.gc import Lease

_HASH_CHUNK = 4 << 20

Hasher = Callable[[], "hashlib._Hash"]


class IngestWriter:
    """A resumable partial download of one blob, under ``ingest/KEY/``.

    Holds the ingest lock while open.  Bytes go to ``data`` through an unbuffered file
    descriptor, either appended (:meth:`write`) or placed at an offset (:meth:`pwrite`, for
    ranged downloads, which then :meth:`advance` the contiguous frontier).  A background
    thread hashes ``data`` from the page cache behind that frontier, so hashing overlaps
    the network and the disk instead of adding to them.

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

    def _kick(self) -> None:
        with self._cond:
            if self._hasher is None and self._hashed < self.offset:
                self._stop_hashing = False
                self._hasher = threading.Thread(target=self._hash_loop, daemon=True,
                                                name=f"hash {self.ref[:40]}")
                self._hasher.start()
            self._cond.notify_all()

    def _hash_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._hashed >= self.offset and not self._stop_hashing:
                        self._cond.wait()
                    if self._stop_hashing:
                        return
                    start, end, fd = self._hashed, self.offset, self._file()
                    sha, extra = self._sha, list(self._hashers.values())
                while start < end:
                    n = min(_HASH_CHUNK, end - start)
                    chunk = os.pread(fd, n, start)
                    if not chunk:
                        raise OSError(f"the partial of {self.ref} is shorter than expected")
                    sha.update(chunk)
                    for h in extra:
                        h.update(chunk)
                    start += len(chunk)
                    with self._cond:
                        if self._stop_hashing:
                            return
                        if self._sha is not sha:  # reset meanwhile: start over
                            break
                        self._hashed = start
                        self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - any failure is surfaced by digest/commit
            with self._cond:
                self._hash_error = e
                self._cond.notify_all()
        finally:
            with self._cond:
                if self._hasher is threading.current_thread():
                    self._hasher = None
                self._cond.notify_all()

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

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` at the frontier."""
        self._check_cancel()
        n = len(data)
        if self.expected_size is not None and self.offset + n > self.expected_size:
            raise SizeMismatch(
                f"upstream sent more than the {self.expected_size} bytes promised for {self.ref}")
        self._pwrite_all(data, self.offset)
        with self._cond:
            self.offset += n
        self._kick()

    def pwrite(self, data: bytes | memoryview, pos: int) -> None:
        """Place ``data`` at ``pos`` (a ranged download); call :meth:`advance` as parts finish."""
        self._check_cancel()
        if self.expected_size is not None and pos + len(data) > self.expected_size:
            raise SizeMismatch(f"upstream sent bytes past the {self.expected_size} promised"
                               f" for {self.ref}")
        self._pwrite_all(data, pos)

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
            self.offset = max(self.offset, frontier)
        self._kick()

    def preallocate(self, total: int) -> None:
        """Reserve ``total`` bytes on disk now: a disk that is too small fails here, not later."""
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file(), 0, total)
            else:  # pragma: no cover - macOS
                os.ftruncate(self._file(), total)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(self._file(), total)
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

    def _close_fd(self) -> None:
        self._stop_hasher()
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
