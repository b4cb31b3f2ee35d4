"""What the cache may free, and whether what it keeps is intact.

This module owns leases (the digests a live pull relies on before the index names them),
reachability (which blobs a manifest or index names, transitively), the mark-and-sweep
:meth:`Collector.gc` over blobs, views and stale partial downloads, and
:meth:`Collector.verify`, which re-hashes blobs and can repair by removing damaged blobs
and the entries that need them.  It frees only under the index's exclusive lock and only
what neither the index nor a live lease reaches.  It never downloads, never writes a
blob and never adds an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from nekko_sm.errors import NekkoError
from nekko_sm.store.index import Descriptor, Index
from nekko_sm.store.layout import (
    DIGEST_RE,
    INDEX_TYPES,
    LOW_SPACE,
    MANIFEST_TYPES,
    REF_NAME,
    Layout,
    fsync_dir,
    is_dir,
    is_file,
    key_for,
    listdir,
    lstat,
    make_dirs,
    open_file,
    read_file,
    unlink,
)
from nekko_sm.store.locks import FileLock, remove_locked_dir
from nekko_sm.store.views import Views

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this

log = logging.getLogger("nekko_sm.store")

_CHUNK = 1 << 20


class Lease:
    """Digests a live pull relies on before the index names them (protects them from gc)."""

    def __init__(self, layout: Layout) -> None:
        make_dirs(layout.leases_dir)
        self.path = layout.leases_dir / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        self._lock = FileLock(self.path)
        self._lock.acquire()
        self.digests: set[str] = set()

    def add(self, digest: str) -> None:
        if digest in self.digests:
            return
        fd = open_file(self.path, os.O_WRONLY | os.O_APPEND)  # never through a planted link
        try:
            os.write(fd, (digest + "\n").encode())
        finally:
            os.close(fd)
        self.digests.add(digest)

    def release(self) -> None:
        unlink(self.path)
        self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class GCReport:
    blobs_freed: list = field(default_factory=list)
    bytes_freed: int = 0
    partials_freed: list = field(default_factory=list)
    views_freed: list = field(default_factory=list)


class Collector:
    """Reachability, gc and verify over one layout, its index and its views.

    ``remove_entry`` is the store's own (index entry and view together), which
    :meth:`verify` uses to repair.
    """

    def __init__(self, layout: Layout, index: Index, views: Views,
                 remove_entry: Callable[[str], object]) -> None:
        self.layout = layout
        self.index = index
        self.views = views
        self._remove_entry = remove_entry
        self._children_cache: dict[str, list[Descriptor]] = {}

    # -- references: which blobs does a descriptor reach? -------------------------------------
    def children(self, desc: Descriptor) -> list[Descriptor]:
        """The descriptors a manifest or index names (empty for other blobs or missing ones)."""
        if desc.media_type not in INDEX_TYPES + MANIFEST_TYPES:
            return []
        cached = self._children_cache.get(desc.digest)
        if cached is not None:
            return cached
        try:
            doc = json.loads(self.layout.read_blob(desc.digest))
        except (OSError, ValueError):
            return []
        out = []
        items: list = []
        if isinstance(doc.get("config"), dict):
            items.append(doc["config"])
        for key in ("layers", "manifests"):
            items.extend(x for x in doc.get(key) or [] if isinstance(x, dict))
        for item in items:
            try:
                out.append(Descriptor.from_json(item))
            except (NekkoError, TypeError, ValueError):  # a bad child reaches nothing
                continue
        if len(self._children_cache) > 100_000:
            self._children_cache.clear()
        self._children_cache[desc.digest] = out  # blobs never change: safe to remember
        return out

    def reachable(self, roots: Iterable[Descriptor]) -> set[str]:
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            d = stack.pop()
            if d.digest in seen:
                continue
            seen.add(d.digest)
            stack.extend(self.children(d))
        return seen

    def _live_leases(self, remove_stale: bool) -> set[str]:
        out: set[str] = set()
        leases_dir = self.layout.leases_dir
        try:
            names = listdir(leases_dir)
        except FileNotFoundError:
            return out
        for name in names:
            path = leases_dir / name
            lock = FileLock(path)
            if lock.acquire(blocking=False):  # owner is gone: stale
                try:
                    if remove_stale:
                        unlink(path)
                finally:
                    lock.release()
                continue
            try:
                out.update(x for x in read_file(path).decode("ascii", "replace").split()
                           if DIGEST_RE.match(x))
            except OSError:
                pass
        return out

    # -- sweep ------------------------------------------------------------------------------
    def gc(self, dry_run: bool = False, partials: bool = True,
           partial_max_age: float = 7 * 86400) -> GCReport:
        """Mark and sweep: free blobs neither the index nor a live pull reaches.

        With ``partials``, also remove stale partial downloads: those no live process
        holds and no interrupted pull (``ingest/pulls/*.json``) still wants, or that nobody
        touched for ``partial_max_age`` seconds.
        """
        report = GCReport()
        layout = self.layout
        with self.index.exclusive():
            entries = self.index.entries()
            live = self.reachable(entries) | self._live_leases(remove_stale=not dry_run)
            for digest in list(layout.blobs()):
                if digest in live:
                    continue
                path = layout.blob_path(digest)
                try:
                    size = lstat(path).st_size  # a link planted there is removed, not followed
                except FileNotFoundError:
                    continue
                report.blobs_freed.append(digest)
                report.bytes_freed += size
                if not dry_run:
                    unlink(path)
            report.views_freed.extend(
                self.views.sweep((d.annotations[REF_NAME] for d in entries), dry_run))
            if partials and is_dir(layout.ingest_dir):
                if layout.space_short():  # even those an interrupted pull would resume
                    log.info("less than %.0f%% of the disk is free: removing every partial"
                             " download no one is writing", LOW_SPACE * 100)
                    partial_max_age = 0
                wanted = self._wanted_partials(time.time() - partial_max_age)
                for name in listdir(layout.ingest_dir):
                    d = layout.ingest_dir / name
                    if name in ("leases", "pulls") or name in wanted:
                        continue
                    if not is_dir(d):  # a link or a file: not a partial of ours
                        if not dry_run and not is_file(d):
                            unlink(d)  # the link itself, never what it names
                        continue
                    lock = FileLock(d / "lock")
                    if not lock.acquire(blocking=False):
                        continue  # a live download
                    report.partials_freed.append(name)
                    if dry_run:
                        lock.release()
                    else:
                        remove_locked_dir(d, lock)
            if not dry_run:
                fsync_dir(layout.blobs_dir)
        return report

    def _wanted_partials(self, fresh_after: float) -> set:
        """Ingest keys an interrupted pull will resume, unless they went stale."""
        wanted: set = set()
        ingest_dir = self.layout.ingest_dir
        try:
            records = [n for n in listdir(ingest_dir / "pulls") if n.endswith(".json")]
        except FileNotFoundError:
            records = []
        for record in records:
            try:
                refs = json.loads(read_file(ingest_dir / "pulls" / record)).get("ingest", [])
            except (OSError, ValueError, AttributeError):
                continue
            for ref in refs if isinstance(refs, list) else []:
                key = key_for(str(ref))
                try:
                    touched = max(lstat(ingest_dir / key / p).st_mtime
                                  for p in listdir(ingest_dir / key))
                except (OSError, ValueError):
                    continue
                if touched >= fresh_after:
                    wanted.add(key)
        return wanted

    # -- verify -----------------------------------------------------------------------------
    def verify_blob(self, digest: str) -> bool:
        h = hashlib.sha256()
        try:
            fd = open_file(self.layout.blob_path(digest), os.O_RDONLY)
        except OSError:  # missing, or a link planted there (never followed)
            return False
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
        return "sha256:" + h.hexdigest() == digest

    def verify(self, roots: Iterable[Descriptor] | None = None, repair: bool = False,
               ) -> list[tuple[str, str]]:
        """Re-hash blobs (all, or those ``roots`` reach).  Returns ``(digest, problem)`` pairs.

        Missing blobs that an entry needs are reported too.  With ``repair``, damaged blobs
        are removed and so are the entries that need a damaged or missing blob, so the
        next pull of those URLs fetches them again.
        """
        problems: list[tuple[str, str]] = []
        if roots is None:
            wanted = set(self.layout.blobs()) | self.reachable(self.index.entries())
        else:
            wanted = self.reachable(roots)
        for digest in sorted(wanted):
            path = self.layout.blob_path(digest)
            try:
                regular = stat.S_ISREG(lstat(path).st_mode)
            except FileNotFoundError:
                problems.append((digest, "missing"))
                continue
            if not regular:
                problems.append((digest, "not a regular file"))
                if repair:
                    unlink(path)  # a link planted there: removed, never followed
            elif not self.verify_blob(digest):
                problems.append((digest, "digest mismatch"))
                if repair:
                    unlink(path)
        if repair and problems:
            bad = {d for d, _ in problems}
            for entry in self.index.entries():
                if self.reachable([entry]) & bad:
                    self._remove_entry(entry.annotations[REF_NAME])
        return problems
