"""The cache: an OCI image layout used as a content-addressed store.

Layout (DESIGN section 4)::

    CACHE/oci-layout            {"imageLayoutVersion": "1.0.0"}
    CACHE/index.json            one descriptor per cached URL (complete entries only)
    CACHE/blobs/sha256/HEX      every byte, read-only, written once
    CACHE/ingest/KEY/           a partial download: data, state.json, lock
    CACHE/ingest/leases/ID      digests a live pull uses but the index does not name yet
    CACHE/views/KEY/NAME        read-only named links to blobs, for multi-file entries
    CACHE/.lock                 serialises index.json updates and gc across processes

Safety rules, after containerd's content store:

* bytes reach ``blobs/`` only through :meth:`IngestWriter.commit`: fsync, size and
  digest check, rename, fsync of the directory.  A partial never appears there.
* ``index.json`` is replaced atomically (write, fsync, rename, fsync dir) under ``.lock``.
* A writer holds an exclusive ``flock`` on its ingest directory: two threads or two
  processes asking for the same blob download it once; the second finds it committed.
* No link planted in the cache is followed: every path below the root is opened component
  by component with O_NOFOLLOW, relative to its directory's descriptor (``layout``); a cache
  directory others could change is refused when the store is opened.
* A pull *leases* every digest before it relies on it; gc, under ``.lock``, frees only
  blobs that neither the index nor a live lease reaches.  A lease whose owner died is
  stale (its flock is free) and is ignored and removed.

The package, one concern a module: ``layout`` (paths, constants, atomic writes),
``locks`` (the flock), ``ingest`` (partial downloads and commit), ``index``
(``index.json``), ``views`` (named links) and ``gc`` (leases, reachability, sweep,
verify).  :class:`Store` here only composes them; what this module exports is the whole
public surface.  The store never talks to the network.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from nekko_sm.store.gc import Collector, GCReport, Lease
from nekko_sm.store.index import Descriptor, Index
from nekko_sm.store.ingest import Hasher, Ingest, IngestWriter
from nekko_sm.store.layout import (
    EMPTY_JSON,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_EMPTY,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    REF_NAME,
    TITLE,
    Layout,
    check_digest,
    key_for,
    listdir,
    make_dirs,
    read_file,
    sha256_digest,
    unlink,
    write_atomic,
)
from nekko_sm.store.locks import FileLock
from nekko_sm.store.views import Views

__all__ = [
    "EMPTY_JSON",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MT_DOCKER_LIST",
    "MT_DOCKER_MANIFEST",
    "MT_EMPTY",
    "MT_OCI_INDEX",
    "MT_OCI_MANIFEST",
    "REF_NAME",
    "TITLE",
    "Descriptor",
    "FileLock",
    "GCReport",
    "Hasher",
    "IngestWriter",
    "Lease",
    "Store",
    "check_digest",
    "key_for",
    "listdir",
    "make_dirs",
    "read_file",
    "sha256_digest",
    "unlink",
    "write_atomic",
]


class Store(Layout):
    """One cache directory: the layout's paths and blobs, plus ingest, index, views, gc."""

    def __init__(self, root: Path | str) -> None:
        super().__init__(root)
        self._ingest = Ingest(self)
        self._index = Index(self)
        self._views = Views(self)
        self._gc = Collector(self, self._index, self._views, self.remove_entry)

    def init(self) -> Store:
        """Create the layout if missing.  Raises OSError when the directory is unusable."""
        self.create()
        self._index.create()
        return self

    # -- ingest ----------------------------------------------------------------------------
    def writer(self, ref: str, expected_size: int | None = None,
               cancel: threading.Event | None = None,
               extra_hashers: dict[str, Hasher] | None = None) -> IngestWriter:
        """Open (blocking until no one else holds it) the ingest for ``ref``."""
        return self._ingest.writer(ref, expected_size, cancel, extra_hashers)

    def put_bytes(self, data: bytes, lease: Lease | None = None,
                  expected_digest: str | None = None) -> str:
        """Store a small blob (manifest, config) and return its digest."""
        return self._ingest.put_bytes(data, lease, expected_digest)

    def partial_size(self, ref: str) -> int:
        return self._ingest.partial_size(ref)

    def partials_size(self) -> int:
        return self._ingest.partials_size()

    def discard_partial(self, ref: str) -> bool:
        return self._ingest.discard_partial(ref)

    # -- index -----------------------------------------------------------------------------
    def entries(self) -> list[Descriptor]:
        return self._index.entries()

    def get_entry(self, url: str) -> Descriptor | None:
        return self._index.get(url)

    def put_entry(self, url: str, desc: Descriptor) -> None:
        """Point ``url`` at ``desc`` (a manifest or index already in blobs/)."""
        self._index.put(url, desc)

    def remove_entry(self, url: str) -> Descriptor | None:
        """Drop the entry for ``url`` and its view; return the entry (None if absent)."""
        gone = self._index.remove(url)
        if gone is not None:
            self._views.remove(url)
        return gone

    # -- views -----------------------------------------------------------------------------
    def view_path(self, url: str) -> Path:
        return self._views.path(url)

    def make_view(self, url: str, files: Iterable[tuple[str, str]]) -> Path:
        """Build ``views/KEY/`` with a read-only link ``NAME -> blob`` per file, atomically."""
        return self._views.make(url, files)

    def remove_view(self, url: str) -> None:
        self._views.remove(url)

    # -- references, gc, verify ------------------------------------------------------------
    def children(self, desc: Descriptor) -> list[Descriptor]:
        return self._gc.children(desc)

    def reachable(self, roots: Iterable[Descriptor]) -> set[str]:
        return self._gc.reachable(roots)

    def gc(self, dry_run: bool = False, partials: bool = True,
           partial_max_age: float = 7 * 86400) -> GCReport:
        """Mark and sweep: free blobs neither the index nor a live pull reaches."""
        return self._gc.gc(dry_run, partials, partial_max_age)

    def verify_blob(self, digest: str) -> bool:
        return self._gc.verify_blob(digest)

    def verify(self, roots: Iterable[Descriptor] | None = None, repair: bool = False,
               ) -> list[tuple[str, str]]:
        """Re-hash blobs (all, or those ``roots`` reach); ``(digest, problem)`` pairs."""
        return self._gc.verify(roots, repair)
