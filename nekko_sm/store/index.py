"""The cache's table of contents: entries in the database, ``index.json`` kept in step.

This module owns :class:`Index`: the ``entries`` table (one row per canonical URL: the
descriptor, the digests its manifest tree reaches, last use, pin, hold) and the reference
counts of ``blobs``, changed together in one short transaction, so a commit or a removal
costs a few rows whatever the size of the cache.  ``aliases`` (small key -> digest maps)
live here too.

``index.json`` stays a true OCI image index for skopeo and umoci, derived from the table
(the file itself and its group commit are ``indexfile``'s): a commit bumps the database's
``generation``, and one rewrite, soon after, covers every commit before it.  Opening a
cache reads the stamp only: an index.json behind the database (a process died before its
rewrite) is rebuilt; one that is not ours (today's cache before it had a database, or an
edit by another tool) is merged in first, so no entry is lost.  A process leaves
index.json current before it exits (:meth:`Index.flush`, also at interpreter exit).

It never touches blob bytes, views or partial downloads, and it decides reachability only
through the ``reach`` function it is given (``gc``'s).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable

from nekko_sm import logs
from nekko_sm.errors import CacheCorrupt
from nekko_sm.record import dataclass
from nekko_sm.store.db import Database, bump, counter
from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.indexfile import GroupCommit, IndexFile
from nekko_sm.store.layout import REF_NAME, Layout, check_digest

log = logs.get("nekko_sm.store")  # imports logging at its first use

_COLUMNS = "key, descriptor, info, created, last_used, pinned, held_until, protected"


@dataclass
class EntryRecord:
    """One row of ``entries``: the descriptor and what the cache knows about its use."""

    key: str
    descriptor: Descriptor
    info: str | None
    created: float
    last_used: float
    pinned: bool
    held_until: float | None
    protected: bool


def _record(row: tuple) -> EntryRecord:
    key, desc, info, created, last_used, pinned, held, protected = row
    return EntryRecord(
        key,
        Descriptor.from_json(json.loads(desc)),
        info,
        created,
        last_used,
        bool(pinned),
        held,
        bool(protected),
    )


class Index:
    """The entries of one layout, their blobs' reference counts, and ``index.json``."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        # Set by the store: the digests a descriptor's tree reaches (gc's reachable).
        self.reach: Callable[[Iterable[Descriptor]], set[str]] = lambda roots: set()
        # Set by whoever renders entries: their ``info`` for an entry taken over at open.
        self.describe: Callable[[str, Descriptor], str | None] = lambda key, desc: None
        self.on_open: list[Callable[[], None]] = []
        self._db: Database | None = None
        self._ready = False
        self._open_lock = threading.RLock()
        self.file = IndexFile(layout.index_path, layout.lock_path)
        self._flusher = GroupCommit(self.flush)

    # -- the database ---------------------------------------------------------------------
    @property
    def db(self) -> Database:
        """The database, opened on first use: index.json checked, open hooks run."""
        if self._ready:
            return self._db  # type: ignore[return-value]
        with self._open_lock:
            if self._db is None:
                self.layout.root.mkdir(parents=True, exist_ok=True)
                self._db = Database(self.layout.root)
                for hook in self.on_open:
                    hook()
                self.sync_file()
                self._ready = True
        return self._db

    def close(self) -> None:
        """Leave index.json current, stop the group-commit thread, close the database."""
        if self._db is None:
            return
        self._flusher.stop()
        with self._open_lock:
            db, self._db, self._ready = self._db, None, False
        if db is not None:
            db.close()

    def generation(self) -> int:
        return int(self.db.query("SELECT value FROM meta WHERE name = 'generation'")[0][0])

    def revision(self) -> int:
        """Changes whenever anything an answer about an entry shows changed, in any process.

        One ``PRAGMA data_version`` per call (µs); the counter is read only when some
        connection committed since.
        """
        return self.db.watch("revision")

    # -- entries --------------------------------------------------------------------------
    def get(self, url: str) -> Descriptor | None:
        rows = self.db.query("SELECT descriptor FROM entries WHERE key = ?", (url,))
        return Descriptor.from_json(json.loads(rows[0][0])) if rows else None

    def info(self, url: str) -> tuple[str | None, bool, float | None, float] | None:
        """(its info, pinned, held until, last used), or None when there is no entry: one
        small read, no descriptor parsed."""
        rows = self.db.query(
            "SELECT info, pinned, held_until, last_used FROM entries WHERE key = ?", (url,)
        )
        return (rows[0][0], bool(rows[0][1]), rows[0][2], rows[0][3]) if rows else None

    def record(self, url: str) -> EntryRecord | None:
        rows = self.db.query(f"SELECT {_COLUMNS} FROM entries WHERE key = ?", (url,))
        return _record(rows[0]) if rows else None

    def records(self) -> Iterator[EntryRecord]:
        """Every entry by key, streamed from one snapshot."""
        for row in self._stream(f"SELECT {_COLUMNS} FROM entries ORDER BY key"):
            yield _record(row)

    def infos(self) -> Iterator[tuple[str, str | None, bool, float | None, float]]:
        """(key, rendered entry or None, pinned, held until, last used) of every entry by
        key, from one snapshot."""
        yield from self._stream(
            "SELECT key, info, pinned, held_until, last_used FROM entries ORDER BY key"
        )

    def _stream(self, sql: str, args: tuple = ()) -> Iterator[Any]:
        with self.db.read() as conn:
            cur = conn.execute(sql, args)
            while True:
                rows = cur.fetchmany(1000)
                if not rows:
                    return
                yield from rows

    def entries(self) -> list[Descriptor]:
        return [
            Descriptor.from_json(json.loads(d))
            for (d,) in self._stream("SELECT descriptor FROM entries ORDER BY key")
        ]

    def count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM entries")[0][0])

    def reach_of(self, url: str) -> list[str]:
        rows = self.db.query("SELECT reach FROM entries WHERE key = ?", (url,))
        return rows[0][0].split() if rows else []

    def put(
        self, url: str, desc: Descriptor, info: str | None = None, shown_size: int | None = None
    ) -> None:
        """Point ``url`` at ``desc`` (a manifest or index already in blobs/)."""
        if not self.layout.has_blob(desc.digest, desc.size):
            raise CacheCorrupt(f"refusing to index {url}: blob {desc.digest} is not committed")
        desc = Descriptor(
            desc.media_type,
            desc.digest,
            desc.size,
            {**desc.annotations, REF_NAME: url},
            desc.artifact_type,
            desc.platform,
        )
        reach = sorted(self.reach([desc]))
        with self.db.write() as conn:
            # Under the write lock, so no removal frees one of them meanwhile (gc.free).
            sizes = {}
            for digest in reach:
                try:
                    sizes[digest] = self.layout.blob_path(digest).stat().st_size
                except FileNotFoundError:
                    raise CacheCorrupt(
                        f"refusing to index {url}: blob {digest} it needs is"
                        " not in the cache (freed meanwhile?)"
                    ) from None
            self._upsert(conn, url, desc, reach, sizes, (info, shown_size), time.time())
            bump(conn, "generation", "revision")
        self._flusher.kick()

    def _upsert(
        self,
        conn: Any,
        url: str,
        desc: Descriptor,
        reach: list[str],
        sizes: dict,
        info: tuple[str | None, int | None],
        now: float,
    ) -> None:
        self._release(conn, url)
        # A new pull of a known URL keeps its pin, hold and protection.
        conn.execute(
            "INSERT INTO entries (key, media_type, digest, size, descriptor, reach, info,"
            " shown_size, created, last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET media_type = excluded.media_type,"
            " digest = excluded.digest, size = excluded.size,"
            " descriptor = excluded.descriptor, reach = excluded.reach, info = excluded.info,"
            " shown_size = excluded.shown_size, created = excluded.created, last_used = excluded.last_used",
            (
                url,
                desc.media_type,
                desc.digest,
                desc.size,
                desc.encode(),
                " ".join(reach),
                *info,
                now,
                now,
            ),
        )
        conn.executemany(
            "INSERT INTO blobs (digest, refs, size) VALUES (?, 1, ?)"
            " ON CONFLICT (digest) DO UPDATE SET refs = refs + 1,"
            " size = coalesce(excluded.size, size)",
            [(d, sizes.get(d)) for d in reach],
        )

    def _release(self, conn: Any, url: str) -> list[str]:
        """Take the counts of ``url``'s reach back; return the digests no entry reaches now."""
        row = conn.execute("SELECT reach FROM entries WHERE key = ?", (url,)).fetchone()
        if row is None:
            return []
        zero = []
        for digest in row[0].split():
            conn.execute("UPDATE blobs SET refs = refs - 1 WHERE digest = ?", (digest,))
            left = conn.execute("SELECT refs FROM blobs WHERE digest = ?", (digest,)).fetchone()
            if left is not None and left[0] <= 0:
                zero.append(digest)
        conn.executemany("DELETE FROM blobs WHERE digest = ?", [(d,) for d in zero])
        return zero

    def drop(self, conn: Any, url: str) -> tuple[Descriptor, list[str]] | None:
        """Inside a write transaction: remove ``url``; (its descriptor, digests now unused)."""
        row = conn.execute("SELECT descriptor FROM entries WHERE key = ?", (url,)).fetchone()
        if row is None:
            return None
        zero = self._release(conn, url)
        conn.execute("DELETE FROM entries WHERE key = ?", (url,))
        bump(conn, "generation", "revision")
        return Descriptor.from_json(json.loads(row[0])), zero

    def remove(self, url: str) -> Descriptor | None:
        """Drop the entry for ``url`` (its blobs are left to gc); return it, or None."""
        with self.db.write() as conn:
            gone = self.drop(conn, url)
        if gone is None:
            return None
        self._flusher.kick()
        return gone[0]

    def changed(self) -> None:
        """Some transaction outside this module changed the entries: rewrite index.json."""
        self._flusher.kick()

    def set_info(self, rows: Iterable[tuple[str, str, int | None]]) -> None:
        """Remember the service's rendering of entries, (key, info, shown size) each, in
        one transaction that is not a change."""
        args = [(info, size, key) for key, info, size in rows]
        if args:
            with self.db.write() as conn:
                conn.executemany("UPDATE entries SET info = ?, shown_size = ? WHERE key = ?", args)

    def listing(self) -> Iterator[tuple[str, int | None, bool, float | None, float]]:
        """(key, shown size, pinned, held until, last used) of every entry by key: a scan of
        one covering index; ``unsized`` are those whose size is None."""
        yield from self._stream(
            "SELECT key, shown_size, pinned, held_until, last_used FROM entries"
            " INDEXED BY entries_listing ORDER BY key"
        )

    def unsized(self) -> list[tuple[str, str | None]]:
        return self.db.query("SELECT key, info FROM entries WHERE shown_size IS NULL")

    # -- use, pins, holds -----------------------------------------------------------------
    def touch(self, url: str, when: float | None = None) -> bool:
        """Record a use of ``url``: one small transaction, not fsynced (a use lost to a power
        cut only makes an entry look older), that moves ``revision`` (answers show it)."""
        when = time.time() if when is None else when
        with self.db.write(durable=False) as conn:
            changed = (
                conn.execute(
                    "UPDATE entries SET last_used = max(last_used, ?) WHERE key = ?", (when, url)
                ).rowcount
                > 0
            )
            if changed:
                bump(conn, "revision")
        return changed

    def _set(self, url: str, column: str, value: object) -> bool:
        with self.db.write() as conn:
            changed = (
                conn.execute(
                    f"UPDATE entries SET {column} = ? WHERE key = ?", (value, url)
                ).rowcount
                > 0
            )
            if changed:
                bump(conn, "revision")
        return changed

    def set_pin(self, url: str, pinned: bool) -> bool:
        return self._set(url, "pinned", 1 if pinned else 0)

    def set_hold(self, url: str, until: float | None) -> bool:
        return self._set(url, "held_until", until)

    def set_protected(self, url: str, protected: bool) -> bool:
        return self._set(url, "protected", 1 if protected else 0)

    def eviction_candidates(
        self, now: float | None = None, limit: int | None = None
    ) -> list[EntryRecord]:
        """Entries least recently used first, without the pinned and those held past ``now``."""
        now = time.time() if now is None else now
        sql = (
            f"SELECT {_COLUMNS} FROM entries WHERE pinned = 0"
            " AND (held_until IS NULL OR held_until <= ?) ORDER BY last_used, key"
        )
        args: tuple = (now,)
        if limit is not None:
            sql += " LIMIT ?"
            args = (now, int(limit))
        return [_record(r) for r in self.db.query(sql, args)]

    def blob_bytes(self) -> int:
        """Bytes of every blob some entry reaches, each counted once (kept by triggers)."""
        return int(self.db.query("SELECT value FROM meta WHERE name = 'blob_bytes'")[0][0])

    def blob_counts(self, digests: Iterable[str]) -> dict[str, tuple[int, int]]:
        """(reference count, size) of those of ``digests`` some entry reaches."""
        out: dict[str, tuple[int, int]] = {}
        with self.db.read() as conn:
            for d in digests:
                row = conn.execute("SELECT refs, size FROM blobs WHERE digest = ?", (d,)).fetchone()
                if row is not None:
                    out[d] = (int(row[0]), int(row[1] or 0))
        return out

    def unique_size(self, url: str) -> int:
        """Bytes of the blobs only ``url`` reaches: what removing it alone would free."""
        total = 0
        with self.db.read() as conn:
            row = conn.execute("SELECT reach FROM entries WHERE key = ?", (url,)).fetchone()
            for digest in row[0].split() if row else []:
                one = conn.execute(
                    "SELECT size FROM blobs WHERE digest = ? AND refs = 1", (digest,)
                ).fetchone()
                total += (one[0] or 0) if one else 0
        return total

    # -- aliases --------------------------------------------------------------------------
    def alias(self, kind: str, key: str) -> str | None:
        rows = self.db.query("SELECT digest FROM aliases WHERE kind = ? AND key = ?", (kind, key))
        return rows[0][0] if rows else None

    def set_aliases(self, kind: str, pairs: Iterable[tuple[str, str]], durable: bool) -> None:
        rows = [(kind, key, check_digest(digest)) for key, digest in pairs]
        with self.db.write(durable) as conn:
            conn.executemany(
                "INSERT INTO aliases (kind, key, digest) VALUES (?, ?, ?)"
                " ON CONFLICT (kind, key) DO UPDATE SET digest = excluded.digest",
                rows,
            )

    def drop_alias(self, kind: str, key: str) -> bool:
        return self.db.execute("DELETE FROM aliases WHERE kind = ? AND key = ?", (kind, key)) > 0

    # -- index.json -----------------------------------------------------------------------
    def sync_file(self) -> None:
        """Make index.json show the database: merge a foreign one in, rebuild one behind."""
        db = self._db
        assert db is not None
        header = self.file.header()
        if header is not None and header == (db.id, self.generation()):
            return  # the common case: two small reads, no parse
        self.flush()

    def flush(self) -> None:
        """Rewrite index.json now if it is behind the database (under ``.lock``)."""
        db = self.db
        with self.file.locked():
            header = self.file.header()
            if header is None or (header[0] not in ("", db.id)):
                self._merge_file()  # not ours: today's cache, or another tool wrote it
                header = ("", -1)
            with db.read() as conn:
                generation = counter(conn, "generation")
                if header == (db.id, generation):
                    return
                cur = conn.execute("SELECT descriptor FROM entries ORDER BY key")
                self.file.write(db.id, generation, cur)

    def _merge_file(self) -> None:
        """Add the entries of a foreign index.json to the database (none is removed)."""
        named = self.file.entries(self.db.path.name)
        known = dict(self.db.query("SELECT key, descriptor FROM entries"))
        todo = [(k, d) for k, d in named.items() if known.get(k) != d.encode()]
        if not todo:
            return
        log.info("%s: taking %d entries into %s", self.file.path, len(todo), self.db.path.name)
        now = time.time()
        reaches = []
        for key, d in todo:  # read the manifests before the write lock, not under it
            reach = sorted(self.reach([d]))
            sizes = {}
            for digest in reach:
                try:
                    sizes[digest] = self.layout.blob_path(digest).stat().st_size
                except FileNotFoundError:
                    pass  # counted all the same: verify reports what is missing
            d = Descriptor(
                d.media_type, d.digest, d.size, d.annotations, d.artifact_type, d.platform
            )
            reaches.append((key, d, reach, sizes, (self.describe(key, d), None)))
        with self.db.write() as conn:
            for key, d, reach, sizes, info in reaches:
                self._upsert(conn, key, d, reach, sizes, info, now)
            bump(conn, "generation", "revision")
