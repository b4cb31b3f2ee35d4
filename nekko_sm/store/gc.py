"""What the cache may free, and freeing it.

This module owns reachability (which blobs a manifest or index names, transitively,
including the file listing an entry names and minus the tar layers it discarded),
:meth:`Collector.free` (remove one entry and delete exactly the blobs whose reference
count drops to zero and that no live lease holds, through ``ingest/trash/``, repaired at
open after a crash), :meth:`Collector.discard` (unpacked tar layers no entry counts) and
the full mark-and-sweep :meth:`Collector.gc` over blobs, views and stale partial downloads
(the safety net).  It frees only inside the database's write transaction, so no commit
names a blob while it goes.  It never downloads, never writes a blob, never adds an
entry and never writes a lease (``leases`` does; it only reads them).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nekko_sm import logs
from nekko_sm.errors import NekkoError
from nekko_sm.record import dataclass, field
from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.fs import (
    fsync_dir,
    is_dir,
    is_file,
    listdir,
    lstat,
    make_dirs,
    read_file,
    rename,
    unlink,
)
from nekko_sm.store.index import Index
from nekko_sm.store.layout import (
    A_DISCARDED,
    A_FILES,
    DIGEST_RE,
    INDEX_TYPES,
    LOW_SPACE,
    MANIFEST_TYPES,
    MT_OCI_MANIFEST,
    NOT_PARTIALS,
    Layout,
    key_for,
)
from nekko_sm.store.leases import leased_digests
from nekko_sm.store.locks import FileLock, remove_locked_dir
from nekko_sm.store.views import Views

log = logs.get("nekko_sm.store")  # imports logging at its first use


@dataclass
class GCReport:
    blobs_freed: list = field(default_factory=list)
    bytes_freed: int = 0
    partials_freed: list = field(default_factory=list)
    views_freed: list = field(default_factory=list)


class Collector:
    """Reachability, freeing and gc over one layout, its index and its views."""

    def __init__(self, layout: Layout, index: Index, views: Views) -> None:
        self.layout = layout
        self.index = index
        self.views = views
        self._children_cache: dict[str, list[Descriptor]] = {}
        self.trash_dir = layout.ingest_dir / "trash"

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
        """Every digest ``roots`` reach: their manifest trees, the file listing an entry
        names (``io.nekko.files``), minus the tar layers it discarded once unpacked
        (``io.nekko.discarded``; another entry that needs one still reaches it)."""
        seen: set[str] = set()
        for root in roots:
            ann = root.annotations or {}
            skip = set(str(ann.get(A_DISCARDED) or "").split())
            stack = [root]
            listing = ann.get(A_FILES)
            if isinstance(listing, str) and DIGEST_RE.match(listing):
                stack.append(Descriptor(MT_OCI_MANIFEST, listing, 0))
            while stack:
                d = stack.pop()
                if d.digest in seen or d.digest in skip:
                    continue
                seen.add(d.digest)
                stack.extend(self.children(d))
        return seen

    # -- freeing one entry -----------------------------------------------------------------
    def free(
        self,
        url: str,
        unused_since: float | None = None,
    ) -> tuple[Descriptor | None, GCReport]:
        """Remove ``url`` and delete exactly the blobs no other entry and no live pull needs.

        In one write transaction: the entry goes, the counts of what it reached go down,
        and each blob left at zero is moved to ``ingest/trash/``; then the leases are read
        and a blob a live pull has leased meanwhile is put back.  A pull leases a digest
        before it checks the blob is there, so it either sees the lease kept the blob or
        finds it gone and fetches it again; a commit checks, under the same lock, that all
        it names is present.  The trash is emptied after the commit; a crash in between
        is repaired at the next open (:meth:`recover_trash`).

        With ``unused_since`` (an eviction), nothing happens unless, in that same
        transaction, the entry is still unpinned, not held past now and not used after
        ``unused_since``: a use, pin or hold that came after the eviction was planned wins.
        """
        report = GCReport()
        index = self.index
        moved: list[tuple[str, Path, int]] = []
        try:
            with index.db.write() as conn:
                if unused_since is not None:
                    row = conn.execute(
                        "SELECT last_used, pinned, held_until FROM entries WHERE key = ?", (url,)
                    ).fetchone()
                    if (
                        row is None
                        or row[0] > unused_since
                        or row[1]
                        or (row[2] is not None and row[2] > time.time())
                    ):
                        return None, report
                gone = index.drop(conn, url)
                if gone is None:
                    return None, report
                desc, zero = gone
                for digest in zero:
                    make_dirs(self.trash_dir)
                    src = self.layout.blob_path(digest)
                    dst = self.trash_dir / f"{digest[7:]}.{os.getpid()}.{time.monotonic_ns()}"
                    try:
                        size = lstat(src).st_size
                        rename(src, dst)
                    except FileNotFoundError:
                        continue
                    moved.append((digest, dst, size))
                if moved:
                    leased = leased_digests(self.layout, remove_stale=False)
                    for digest, dst, _ in moved:
                        if digest in leased:
                            rename(dst, self.layout.blob_path(digest))
                    moved = [m for m in moved if m[0] not in leased]
        except BaseException:
            self._put_back(moved)
            raise
        for digest, dst, size in moved:
            unlink(dst)
            report.blobs_freed.append(digest)
            report.bytes_freed += size
        if moved:
            fsync_dir(self.layout.blobs_dir)
        self.views.remove(url)
        index.changed()
        return desc, report

    def _put_back(self, moved: list[tuple[str, Path, int]]) -> None:
        for digest, dst, _ in moved:
            target = self.layout.blob_path(digest)
            try:
                if is_file(target):
                    unlink(dst)
                else:
                    rename(dst, target)
            except FileNotFoundError:
                pass

    def recover_trash(self) -> None:
        """After a crash: put back what an entry or a lease still needs, delete the rest."""
        try:
            if not listdir(self.trash_dir):
                return
        except FileNotFoundError:
            return
        with self.index.db.write() as conn:  # no removal is half-way through meanwhile
            self._empty_trash(conn, leased_digests(self.layout, remove_stale=False))

    def _empty_trash(self, conn: Any, keep: set[str]) -> None:
        try:
            names = listdir(self.trash_dir)
        except FileNotFoundError:
            return
        for name in names:
            digest = "sha256:" + name.split(".", 1)[0]
            path = self.trash_dir / name
            if not DIGEST_RE.match(digest):
                unlink(path)
                continue
            row = conn.execute("SELECT refs FROM blobs WHERE digest = ?", (digest,)).fetchone()
            if (row is not None and row[0] > 0) or digest in keep:
                self._put_back([(digest, path, 0)])
            else:
                unlink(path)

    def discard(self, digests: Iterable[str]) -> GCReport:
        """Free those of ``digests`` that no entry counts and no live lease holds (the tar
        layers an entry listed as discarded are not in its reach, so not in its counts)."""
        report = GCReport()
        wanted = {d for d in digests if DIGEST_RE.match(d)}
        if not wanted:
            return report
        with self.index.db.write() as conn:  # no commit counts one of them meanwhile
            leased = leased_digests(self.layout, remove_stale=False)
            for digest in sorted(wanted - leased):
                row = conn.execute("SELECT refs FROM blobs WHERE digest = ?", (digest,)).fetchone()
                if row is not None and row[0] > 0:
                    continue  # another entry needs it whole
                path = self.layout.blob_path(digest)
                try:
                    size = lstat(path).st_size
                except FileNotFoundError:
                    continue
                unlink(path)
                report.blobs_freed.append(digest)
                report.bytes_freed += size
        if report.blobs_freed:
            fsync_dir(self.layout.blobs_dir)
        return report

    # -- sweep ------------------------------------------------------------------------------
    def gc(
        self, dry_run: bool = False, partials: bool = True, partial_max_age: float = 7 * 86400
    ) -> GCReport:
        """Mark and sweep: free blobs neither the entries nor a live pull reaches.

        The safety net behind :meth:`free`: the mark is the union of every entry's
        manifest tree read again from the blobs, the reach and counts the database keeps,
        and the leases, so it frees nothing any of them would keep.  With ``partials``,
        also remove stale partial downloads: those no live process holds and no
        interrupted pull (``ingest/pulls/*.json``) still wants, or that nobody touched for
        ``partial_max_age`` seconds.
        """
        report = GCReport()
        layout = self.layout
        traced = self.reachable(self.index.entries())  # the slow part, before the lock
        with self.index.db.write() as conn:
            live = set(traced)
            live.update(d for (d,) in conn.execute("SELECT digest FROM blobs"))
            for (reach,) in conn.execute("SELECT reach FROM entries"):
                live.update(reach.split())
            live |= leased_digests(self.layout, remove_stale=not dry_run)
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
            if not dry_run:
                self._empty_trash(conn, live)
            keys = [k for (k,) in conn.execute("SELECT key FROM entries")]
            report.views_freed.extend(self.views.sweep(keys, dry_run))
        if not dry_run:
            fsync_dir(layout.blobs_dir)
        if partials and is_dir(layout.ingest_dir):
            if layout.space_short():  # even those an interrupted pull would resume
                log.info(
                    "less than %.0f%% of the disk is free: removing every partial"
                    " download no one is writing",
                    LOW_SPACE * 100,
                )
                partial_max_age = 0
            wanted = self._wanted_partials(time.time() - partial_max_age)
            stale = time.time() - 3600
            for name in listdir(layout.ingest_dir):
                d = layout.ingest_dir / name
                if name.startswith(".small-"):  # left by a crash between write and rename
                    with contextlib.suppress(OSError):
                        if os.lstat(d).st_mtime < stale and not dry_run:
                            unlink(d)
                    continue
                if name in NOT_PARTIALS or name in wanted:
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
                    touched = max(
                        lstat(ingest_dir / key / p).st_mtime for p in listdir(ingest_dir / key)
                    )
                except (OSError, ValueError):
                    continue
                if touched >= fresh_after:
                    wanted.add(key)
        return wanted
