"""The ``ingest/`` directory of a layout: writers opened, small blobs stored, partials measured.

This module owns :class:`Ingest`, what the store asks of ``ingest/``: open an
:class:`~nekko_sm.store.writer.IngestWriter` for a ref (blocking while another thread or
process holds it), store a small blob whole (:meth:`Ingest.put_bytes` through a writer;
:meth:`Ingest.put_small`, for the many small files of an unpacked layer, written, fsynced
and renamed into place without an ingest directory, a lock or a hasher thread), and
measure or discard partial downloads.  Every byte still reaches ``blobs/`` verified and
renamed into place.  It never talks to the network and never names a blob in
``index.json``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading

from nekko_sm.errors import InsufficientStorage, IntegrityError
from nekko_sm.store.frontier import Hasher
from nekko_sm.store.fs import (
    OpenDirs,
    is_dir,
    listdir,
    lstat,
    make_dirs,
    place_at,
    read_file,
)
from nekko_sm.store.layout import Layout, sha256_digest
from nekko_sm.store.leases import Lease
from nekko_sm.store.locks import FileLock, remove_locked_dir
from nekko_sm.store.writer import IngestWriter


def _space(e: OSError, what: str) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"disk full storing {what}")
    return e


class Ingest:
    """The ``ingest/`` directory of one layout: writers, small blobs, partials."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def writer(
        self,
        ref: str,
        expected_size: int | None = None,
        cancel: threading.Event | None = None,
        extra_hashers: dict[str, Hasher] | None = None,
    ) -> IngestWriter:
        """Open (blocking until no one else holds it) the ingest for ``ref``.

        ``ref`` names the thing being downloaded: the expected digest when it is known
        (so two pulls of the same blob share one ingest), otherwise something stable
        like the source URL, so an interrupted download resumes.
        """
        make_dirs(self.layout.ingest_dir)
        return IngestWriter(self.layout, ref, expected_size, cancel, extra_hashers)

    def put_bytes(
        self, data: bytes, lease: Lease | None = None, expected_digest: str | None = None
    ) -> str:
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

    def put_small(
        self, data: bytes, lease: Lease | None = None, expected_digest: str | None = None
    ) -> str:
        """Store a small blob the cheap way (the many small files of an unpacked layer or
        of a repository): written to ``ingest/.small-*``, fsynced and renamed into
        ``blobs/``, without an ingest directory, a lock or a hasher thread (about twice as
        fast as :meth:`put_bytes`).  Two writers of the same bytes rename the same content
        into place.  The caller fsyncs ``blobs/`` once when done
        (:meth:`Layout.sync_blobs`), before any entry names what it stored."""
        digest = sha256_digest(data)
        if expected_digest is not None and digest != expected_digest:
            raise IntegrityError(f"content has digest {digest}, expected {expected_digest}")
        if lease is not None:
            lease.add(digest)  # before the check: gc cannot take it from under us
        tmp = self.layout.ingest_dir / (
            f".small-{digest[7:23]}-{os.getpid()}-{threading.get_ident()}"
        )
        with OpenDirs() as dirs:  # blobs/sha256 and ingest/, each reached once, no link
            bfd, bname = dirs.parent(self.layout.blob_path(digest))
            try:
                st = os.stat(bname, dir_fd=bfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size == len(data):
                    return digest  # a link planted there is no blob: replaced below
            except FileNotFoundError:
                pass
            ifd, tname = dirs.parent(tmp)
            try:  # a stale one of a crashed process with our pid and thread id is replaced
                place_at(ifd, tname, bfd, bname, data, 0o444)
            except OSError as e:
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
