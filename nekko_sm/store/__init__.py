"""The cache: an OCI image layout used as a content-addressed store.

Layout (DESIGN section 4)::

    CACHE/oci-layout            {"imageLayoutVersion": "1.0.0"}
    CACHE/index.json            one descriptor per cached URL, derived from nekko.db
    CACHE/nekko.db (-wal, -shm) entries, blob reference counts, use, pins, aliases (SQLite)
    CACHE/blobs/sha256/HEX      every byte, read-only, written once
    CACHE/ingest/KEY/           a partial download: data, state.json, lock
    CACHE/ingest/leases/ID      digests a live pull uses but no entry names yet
    CACHE/ingest/trash/         blobs being freed (emptied after the commit, or at open)
    CACHE/views/KEY/NAME        read-only named links to blobs, for multi-file entries
    CACHE/.lock                 serialises index.json rewrites across processes

Safety rules, after containerd's content store:

* bytes reach ``blobs/`` only through :meth:`IngestWriter.commit`: fsync, size and
  digest check, rename, fsync of the directory.  A partial never appears there.
* entries and counts change in short SQLite transactions (WAL, one writer at a time across
  processes); ``index.json`` follows by group commit, replaced atomically (write, fsync,
  rename, fsync dir) under ``.lock``, and is rebuilt at open when a crash left it behind.
* A writer holds an exclusive ``flock`` on its ingest directory: two threads or two
  processes asking for the same blob download it once; the second finds it committed.
* No link planted in the cache is followed: every path below the root is opened component
  by component with O_NOFOLLOW, relative to its directory's descriptor (``fs``); a cache
  directory others could change is refused when the store is opened.
* A pull *leases* every digest before it relies on it; removing an entry frees only the
  blobs its removal took to zero references and no live lease holds, and gc frees only
  blobs that neither an entry nor a live lease reaches.  A lease whose owner died is
  stale (its flock is free) and is ignored and removed.

The package, one concern a module: ``fs`` (file primitives that follow no link, atomic
writes), ``layout`` (paths, constants, committed blobs), ``locks`` (the flock),
``frontier`` (hashing and following a partial download's bytes), ``writer`` (a partial
download and its commit), ``ingest`` (writers, small blobs, partials), ``db`` (the
SQLite database and its schema), ``descriptor`` (the OCI descriptor), ``index``
(entries, counts, aliases), ``indexfile`` (``index.json`` and its group commit),
``views`` (named links), ``leases`` (what live pulls rely on), ``gc`` (reachability,
freeing, sweep) and ``verify`` (re-hashing, checking the counts).  :class:`Store` here
only composes them; what this module exports is the whole public surface.  The store
never talks to the network.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nekko_sm.store.db import require_sqlite
from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.fs import listdir, make_dirs, read_file, unlink, write_atomic
from nekko_sm.store.gc import Collector, GCReport
from nekko_sm.store.index import EntryRecord, Index
from nekko_sm.store.layout import (
    A_DISCARDED,
    A_FILES,
    EMPTY_JSON,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_EMPTY,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    NOT_PARTIALS,
    REF_NAME,
    TITLE,
    Layout,
    check_digest,
    key_for,
    sha256_digest,
)
from nekko_sm.store.leases import Lease, live_leases
from nekko_sm.store.locks import FileLock
from nekko_sm.store.views import Views

if TYPE_CHECKING:  # imported at their first use: the cold status, path and ls write nothing
    from nekko_sm.store.frontier import FollowLost, Hasher
    from nekko_sm.store.ingest import Ingest
    from nekko_sm.store.verify import Verifier
    from nekko_sm.store.writer import IngestWriter

__all__ = [
    "A_DISCARDED",
    "A_FILES",
    "EMPTY_JSON",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MT_DOCKER_LIST",
    "MT_DOCKER_MANIFEST",
    "MT_EMPTY",
    "MT_OCI_INDEX",
    "MT_OCI_MANIFEST",
    "NOT_PARTIALS",
    "REF_NAME",
    "TITLE",
    "Descriptor",
    "EntryRecord",
    "FileLock",
    "FollowLost",
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
    "require_sqlite",
    "sha256_digest",
    "unlink",
    "write_atomic",
]


class Store(Layout):
    """One cache directory: the layout's paths and blobs, plus ingest, index, views, gc."""

    def __init__(self, root: Path | str) -> None:
        super().__init__(root)
        self._ingest_part: Ingest | None = None
        self._index = Index(self)
        self._views = Views(self)
        self._gc = Collector(self, self._index, self._views)
        self._verifier_part: Verifier | None = None
        self._index.reach = self._gc.reachable
        self._index.on_open.append(self._gc.recover_trash)

    # Ingest and Verifier hold nothing but the store: made at first use (two made at once by
    # two threads would do no harm), so opening the store imports neither.
    @property
    def _ingest(self) -> Ingest:
        if self._ingest_part is None:
            from nekko_sm.store.ingest import Ingest

            self._ingest_part = Ingest(self)
        return self._ingest_part

    @property
    def _verifier(self) -> Verifier:
        if self._verifier_part is None:
            from nekko_sm.store.verify import Verifier

            self._verifier_part = Verifier(self, self._index, self._gc.reachable, self.remove_entry)
        return self._verifier_part

    def init(self) -> Store:
        """Create the layout if missing and open the database (index.json made current).

        Raises OSError when the directory is unusable, ConfigError without sqlite3.
        """
        self.create()
        self._index.file.create()  # before the database: a valid layout at every moment
        self._index.db  # noqa: B018 - opening checks index.json and the trash
        return self

    @property
    def describe(self) -> Callable[[str, Descriptor], str | None]:
        """What :meth:`put_entry`'s ``info`` would be for an entry taken over at open."""
        return self._index.describe

    @describe.setter
    def describe(self, fn: Callable[[str, Descriptor], str | None]) -> None:
        self._index.describe = fn

    def flush(self) -> None:
        """Make index.json show every entry committed so far (it follows by group commit)."""
        self._index.flush()

    def close(self) -> None:
        """Leave index.json current and close the database (the store reopens on use)."""
        self._index.close()

    # -- ingest ----------------------------------------------------------------------------
    def writer(
        self,
        ref: str,
        expected_size: int | None = None,
        cancel: threading.Event | None = None,
        extra_hashers: dict[str, Hasher] | None = None,
    ) -> IngestWriter:
        """Open (blocking until no one else holds it) the ingest for ``ref``."""
        return self._ingest.writer(ref, expected_size, cancel, extra_hashers)

    def put_bytes(
        self, data: bytes, lease: Lease | None = None, expected_digest: str | None = None
    ) -> str:
        """Store a small blob (manifest, config) and return its digest."""
        return self._ingest.put_bytes(data, lease, expected_digest)

    def put_small(
        self, data: bytes, lease: Lease | None = None, expected_digest: str | None = None
    ) -> str:
        """Store one of many small files; call :meth:`sync_blobs` once after them all."""
        return self._ingest.put_small(data, lease, expected_digest)

    def partial_size(self, ref: str) -> int:
        return self._ingest.partial_size(ref)

    def partials_size(self) -> int:
        return self._ingest.partials_size()

    def discard_partial(self, ref: str) -> bool:
        return self._ingest.discard_partial(ref)

    # -- entries ---------------------------------------------------------------------------
    def entries(self) -> list[Descriptor]:
        return self._index.entries()

    def count_entries(self) -> int:
        return self._index.count()

    def get_entry(self, url: str) -> Descriptor | None:
        return self._index.get(url)

    def entry_record(self, url: str) -> EntryRecord | None:
        return self._index.record(url)

    def entry_info(self, url: str) -> tuple[str | None, bool, float | None, float] | None:
        """(the ``info`` given with ``url``'s entry, pinned, held until, last used), or None
        when it has none: one small read."""
        return self._index.info(url)

    def entry_records(self) -> Iterator[EntryRecord]:
        """Every entry by URL, with its use, pin and hold, from one snapshot."""
        return self._index.records()

    def entry_infos(self) -> Iterator[tuple[str, str | None, bool, float | None, float]]:
        """(URL, what :meth:`put_entry` was given as ``info``, pinned, held until, last used)
        of every entry, by URL."""
        return self._index.infos()

    def entry_listing(self) -> Iterator[tuple[str, int | None, bool, float | None, float]]:
        """(URL, the ``shown_size`` given with it, pinned, held until, last used) of every
        entry by URL, reading no entry's row; :meth:`unsized_entries` have None."""
        return self._index.listing()

    def unsized_entries(self) -> list[tuple[str, str | None]]:
        """(URL, info) of the entries given no ``shown_size`` (taken over, or older)."""
        return self._index.unsized()

    def set_entry_info(self, rows: Iterable[tuple[str, str, int | None]]) -> None:
        """Give entries their ``info`` and ``shown_size``: (URL, info, shown size) each."""
        self._index.set_info(rows)

    def put_entry(
        self, url: str, desc: Descriptor, info: str | None = None, shown_size: int | None = None
    ) -> None:
        """Point ``url`` at ``desc`` (a manifest or index already in blobs/).

        ``info`` is opaque text the caller gets back with the entry (the service keeps
        its rendered answer there, so listing reads no manifest), and ``shown_size`` the
        size a listing shows for it.
        """
        self._index.put(url, desc, info, shown_size)

    def remove_entry(self, url: str) -> Descriptor | None:
        """Drop the entry for ``url`` and its view, leaving its blobs to gc; None if absent."""
        gone = self._index.remove(url)
        if gone is not None:
            self._views.remove(url)
        return gone

    def free_entry(
        self,
        url: str,
        unused_since: float | None = None,
    ) -> tuple[Descriptor | None, GCReport]:
        """Drop the entry and its view and delete the blobs only it used (no live pull's).

        ``unused_since``: only if it is not pinned, not held, not used after that (eviction).
        """
        return self._gc.free(url, unused_since)

    def generation(self) -> int:
        """Bumped by every change to the set of entries (what index.json shows)."""
        return self._index.generation()

    def revision(self) -> int:
        """Changes whenever any process changed what an entry's answer shows (cheap)."""
        return self._index.revision()

    # -- use, pins, holds (the disk budget builds on these) ---------------------------------
    def touch(self, url: str, when: float | None = None) -> bool:
        """Record a use of ``url`` at ``when`` (default now): one UPDATE, nothing rewritten."""
        return self._index.touch(url, when)

    def set_pin(self, url: str, pinned: bool = True) -> bool:
        return self._index.set_pin(url, pinned)

    def set_hold(self, url: str, until: float | None) -> bool:
        return self._index.set_hold(url, until)

    def set_protected(self, url: str, protected: bool = True) -> bool:
        return self._index.set_protected(url, protected)

    def eviction_candidates(
        self, now: float | None = None, limit: int | None = None
    ) -> list[EntryRecord]:
        """Least recently used first; never a pinned entry or one held past ``now``."""
        return self._index.eviction_candidates(now, limit)

    def unique_size(self, url: str) -> int:
        """Bytes that removing ``url`` alone would free."""
        return self._index.unique_size(url)

    def blob_bytes(self) -> int:
        """Bytes of the blobs entries reach, each once: one read (a running total)."""
        return self._index.blob_bytes()

    def blob_counts(self, digests: Iterable[str]) -> dict[str, tuple[int, int]]:
        """(reference count, size) of those of ``digests`` that some entry reaches."""
        return self._index.blob_counts(digests)

    def reach_of(self, url: str) -> list[str]:
        """Every digest the entry's manifest tree reaches (empty when absent)."""
        return self._index.reach_of(url)

    # -- aliases ---------------------------------------------------------------------------
    def alias(self, kind: str, key: str) -> str | None:
        return self._index.alias(kind, key)

    def set_alias(self, kind: str, key: str, digest: str, durable: bool = True) -> None:
        """``durable=False``: not fsynced (for facts whose loss costs only work)."""
        self._index.set_aliases(kind, [(key, digest)], durable)

    def set_aliases(
        self, kind: str, pairs: Iterable[tuple[str, str]], durable: bool = True
    ) -> None:
        """Many (key, digest) of one kind in one transaction."""
        self._index.set_aliases(kind, pairs, durable)

    def drop_alias(self, kind: str, key: str) -> bool:
        return self._index.drop_alias(kind, key)

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

    def live_leases(self) -> dict[str, tuple[set[str], int]]:
        """Every live pull's lease by name: (digests it holds, bytes it reserved)."""
        return live_leases(self)

    def discard(self, digests: Iterable[str]) -> GCReport:
        """Free those of ``digests`` that no entry reaches and no live pull leases (the tar
        layers of an entry unpacked with --discard-unpacked-layers)."""
        return self._gc.discard(digests)

    def gc(
        self, dry_run: bool = False, partials: bool = True, partial_max_age: float = 7 * 86400
    ) -> GCReport:
        """Mark and sweep: free blobs neither an entry nor a live pull reaches."""
        return self._gc.gc(dry_run, partials, partial_max_age)

    def verify_blob(self, digest: str) -> bool:
        return self._verifier.verify_blob(digest)

    def verify(
        self,
        roots: Iterable[Descriptor] | None = None,
        repair: bool = False,
    ) -> list[tuple[str, str]]:
        """Re-hash blobs (all, or those ``roots`` reach), check the reference counts (all);
        ``(digest, problem)`` pairs."""
        return self._verifier.verify(roots, repair)


def __getattr__(name: str) -> Any:
    """The exports only a pull uses (:data:`__all__` names them), imported at first use."""
    if name in ("FollowLost", "Hasher"):
        from nekko_sm.store.frontier import FollowLost, Hasher

        return FollowLost if name == "FollowLost" else Hasher
    if name == "IngestWriter":
        from nekko_sm.store.writer import IngestWriter

        return IngestWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
