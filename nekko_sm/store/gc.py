"""What the cache may free, and whether what it keeps is intact.

This module owns leases (the digests a live pull relies on before an entry names them),
reachability (which blobs a manifest or index names, transitively), :meth:`Collector.free`
(remove one entry and delete exactly the blobs whose reference count drops to zero and
that no live lease holds, through ``ingest/trash/``), the full mark-and-sweep
:meth:`Collector.gc` over blobs, views and stale partial downloads (the safety net), and
:meth:`Collector.verify`, which re-hashes blobs, checks the database's counts against the
manifests and can repair both.  It frees only inside the database's write transaction, so
no commit names a blob while it goes.  It never downloads, never writes a blob and never
adds an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nekko_sm.errors import NekkoError
from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.fs import (
    fsync_dir,
    is_dir,
    is_file,
    listdir,
    lstat,
    make_dirs,
    open_file,
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
    REF_NAME,
    Layout,
    key_for,
)
from nekko_sm.store.locks import FileLock, remove_locked_dir
from nekko_sm.store.views import Views

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this

log = logging.getLogger("nekko_sm.store")

_CHUNK = 1 << 20
# Directories under ingest/ that are not partial downloads.
_NOT_PARTIALS = ("leases", "pulls", "trash")
# A lease file's line for the bytes its pull reserved (not a digest: gc reads past it).
_RESERVE = "reserve "


class Lease:
    """Digests a live pull relies on before the index names them (protects them from gc)."""

    def __init__(self, layout: Layout) -> None:
        make_dirs(layout.leases_dir)
        self.path = layout.leases_dir / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        self._lock = FileLock(self.path)
        self._lock.acquire()
        self.digests: set[str] = set()
        self.reserved = 0  # bytes the disk budget set aside for this pull

    def add(self, digest: str) -> None:
        if digest in self.digests:
            return
        self._append(digest)
        self.digests.add(digest)

    def reserve(self, nbytes: int) -> None:
        """Record that this pull may take up to ``nbytes`` in the cache (the last one holds)."""
        self._append(f"{_RESERVE}{int(nbytes)}")
        self.reserved = int(nbytes)

    def _append(self, line: str) -> None:
        fd = open_file(self.path, os.O_WRONLY | os.O_APPEND)  # never through a planted link
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

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

    def _lease_texts(self, remove_stale: bool) -> Iterator[tuple[str, str]]:
        """(name, text) of every live lease; a stale one (its owner died) is skipped."""
        leases_dir = self.layout.leases_dir
        try:
            names = listdir(leases_dir)
        except FileNotFoundError:
            return
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
                yield name, read_file(path).decode("ascii", "replace")
            except OSError:
                pass

    def _live_leases(self, remove_stale: bool) -> set[str]:
        out: set[str] = set()
        for _, text in self._lease_texts(remove_stale):
            out.update(x for x in text.split() if DIGEST_RE.match(x))
        return out

    def live_leases(self) -> dict[str, tuple[set[str], int]]:
        """Every live pull's lease by name: (digests it holds, bytes it reserved)."""
        out: dict[str, tuple[set[str], int]] = {}
        for name, text in self._lease_texts(remove_stale=False):
            digests: set[str] = set()
            reserved = 0
            for line in text.splitlines():
                if line.startswith(_RESERVE):
                    try:
                        reserved = int(line[len(_RESERVE):])
                    except ValueError:
                        pass
                elif DIGEST_RE.match(line):
                    digests.add(line)
            out[name] = (digests, reserved)
        return out

    # -- freeing one entry -----------------------------------------------------------------
    def free(self, url: str, unused_since: float | None = None,
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
                    row = conn.execute("SELECT last_used, pinned, held_until FROM entries"
                                       " WHERE key = ?", (url,)).fetchone()
                    if row is None or row[0] > unused_since or row[1] \
                            or (row[2] is not None and row[2] > time.time()):
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
                    leased = self._live_leases(remove_stale=False)
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
            self._empty_trash(conn, self._live_leases(remove_stale=False))

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
            leased = self._live_leases(remove_stale=False)
            for digest in sorted(wanted - leased):
                row = conn.execute("SELECT refs FROM blobs WHERE digest = ?",
                                   (digest,)).fetchone()
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
    def gc(self, dry_run: bool = False, partials: bool = True,
           partial_max_age: float = 7 * 86400) -> GCReport:
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
            live |= self._live_leases(remove_stale=not dry_run)
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
                log.info("less than %.0f%% of the disk is free: removing every partial"
                         " download no one is writing", LOW_SPACE * 100)
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
                if name in _NOT_PARTIALS or name in wanted:
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

        Missing blobs that an entry needs are reported too, and (for the whole cache) any
        reference count or entry reach that differs from the manifests read again.  With
        ``repair``, damaged blobs are removed and so are the entries that need a damaged or
        missing blob, so the next pull of those URLs fetches them again; then the counts
        are recomputed.
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
        if roots is None:
            counts = self._check_counts(repair)
            problems.extend(counts)
        return problems

    def _check_counts(self, repair: bool) -> list[tuple[str, str]]:
        """Compare the database's reach and counts with the manifests; fix them if asked."""
        with self.index.db.transaction(write=repair) as conn:
            rows = conn.execute("SELECT key, descriptor, reach FROM entries").fetchall()
            have = dict(conn.execute("SELECT digest, refs FROM blobs").fetchall())
            problems: list[tuple[str, str]] = []
            want: dict[str, int] = {}
            fixed = []
            for key, desc, reach in rows:
                traced = self.reachable([Descriptor.from_json(json.loads(desc))])
                for d in traced:
                    want[d] = want.get(d, 0) + 1
                if set(reach.split()) != traced:
                    problems.append((json.loads(desc)["digest"],
                                     f"the database's reach of {key} is out of date"))
                    fixed.append((" ".join(sorted(traced)), key))
            for d in sorted(set(have) | set(want)):
                if have.get(d, 0) != want.get(d, 0):
                    problem = f"reference count {have.get(d, 0)}, {want.get(d, 0)} entries reach it"
                    problems.append((d, problem))
            if repair and problems:
                conn.executemany("UPDATE entries SET reach = ? WHERE key = ?", fixed)
                for d in set(have) - set(want):
                    conn.execute("DELETE FROM blobs WHERE digest = ?", (d,))
                for d, n in want.items():
                    size = self.layout.blob_path(d).stat().st_size \
                        if self.layout.has_blob(d) else None
                    conn.execute("INSERT INTO blobs (digest, refs, size) VALUES (?, ?, ?)"
                                 " ON CONFLICT (digest) DO UPDATE SET refs = excluded.refs",
                                 (d, n, size))
        return problems
