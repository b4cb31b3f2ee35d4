"""The cache's own state: one SQLite database in WAL mode beside the OCI layout.

This module owns ``CACHE/nekko.db``: opening it (checking the interpreter has
:mod:`sqlite3` at all), the versioned schema and its migrations (``PRAGMA user_version``),
and short transactions shared by the threads of one process and by the processes (CLI
and ``serve``) that use one cache.  Blobs stay files under ``blobs/``; what the database
holds is what is *about* them, as containerd keeps its metadata in bbolt beside its
content store: entries (one per canonical URL, with the descriptor, the blobs its
manifest tree reaches, last use, pin, hold), reference counts of blobs, aliases, and two
counters, ``generation`` (bumped whenever the set of entries changes: what ``index.json``
must show) and ``revision`` (bumped when anything an API answer shows changes).

It knows nothing of manifests, leases or ``index.json``; ``index`` and ``gc`` build on it.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nekko_sm.errors import (
    CacheCorrupt,
    ConfigError,
    InsufficientStorage,
    NekkoError,
    UnsafeCachePath,
)

try:
    import sqlite3
except ImportError:  # pragma: no cover - a stripped interpreter; tested by hiding the module
    sqlite3 = None  # type: ignore[assignment]

DB_NAME = "nekko.db"
# How long a writer waits for another process's transaction before giving up.  Every
# transaction here is short (a commit, a removal, a sweep of names); gc's sweep is the
# longest, a listing of blobs/.
BUSY_TIMEOUT = 60.0
# How stale another process's commits may look to watch() (this process's show at once).
WATCH_EVERY = 0.05

# Each step takes the schema from version i to i + 1; later features append steps (new
# columns with defaults, new tables), never edit a released one.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value
    ) WITHOUT ROWID;
    CREATE TABLE entries (
        key        TEXT PRIMARY KEY,   -- the canonical URL
        media_type TEXT NOT NULL,
        digest     TEXT NOT NULL,
        size       INTEGER NOT NULL,
        descriptor TEXT NOT NULL,      -- its index.json descriptor, encoded once
        reach      TEXT NOT NULL,      -- every digest its manifest tree reaches, once
        info       TEXT,               -- the service's rendered entry; NULL until rendered
        created    REAL NOT NULL,
        last_used  REAL NOT NULL,
        pinned     INTEGER NOT NULL DEFAULT 0,
        held_until REAL,
        protected  INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX entries_by_use ON entries (last_used);
    CREATE TABLE blobs (
        digest TEXT PRIMARY KEY,
        refs   INTEGER NOT NULL,       -- entries whose tree reaches it
        size   INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE aliases (
        kind   TEXT NOT NULL,
        key    TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    INSERT INTO meta (name, value) VALUES ('generation', 0), ('revision', 0);
    """,
    # The disk budget (DESIGN 9) asks "how many bytes do the entries' blobs take?" before
    # every pull: a running total of blobs.size, kept by triggers in the same transactions
    # that change the counts, so it is one read whatever the size of the cache.
    """
    INSERT INTO meta (name, value) VALUES ('blob_bytes',
        (SELECT coalesce(sum(size), 0) FROM blobs));
    CREATE TRIGGER blob_bytes_insert AFTER INSERT ON blobs BEGIN
        UPDATE meta SET value = value + coalesce(new.size, 0) WHERE name = 'blob_bytes';
    END;
    CREATE TRIGGER blob_bytes_delete AFTER DELETE ON blobs BEGIN
        UPDATE meta SET value = value - coalesce(old.size, 0) WHERE name = 'blob_bytes';
    END;
    CREATE TRIGGER blob_bytes_update AFTER UPDATE OF size ON blobs
    WHEN old.size IS NOT new.size BEGIN
        UPDATE meta SET value = value - coalesce(old.size, 0) + coalesce(new.size, 0)
        WHERE name = 'blob_bytes';
    END;
    """,
    # ``ls`` of 100,000 entries reads one small index, not the rows: the size the listing
    # shows (the service's, given with ``info``) and what else a line of it needs.  Entries
    # without it (taken over, or from before this step) are found by the partial index.
    """
    ALTER TABLE entries ADD COLUMN shown_size INTEGER;
    CREATE INDEX entries_listing ON entries (key, shown_size, pinned, held_until, last_used);
    CREATE INDEX entries_unsized ON entries (key) WHERE shown_size IS NULL;
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


def require_sqlite() -> None:
    """Fail with one clear line when this interpreter was built without sqlite3."""
    if sqlite3 is None:
        raise ConfigError(
            "this Python has no sqlite3 module (nekko-sm keeps the cache's"
            " state in it): install the interpreter's sqlite3 package"
            " (e.g. python3-libs, libpython3-stdlib) or use a full CPython"
        )


def _translate(e: Exception, path: Path) -> NekkoError:
    text = str(e)
    if "full" in text:
        return InsufficientStorage(f"no space left to update {path.name}: {text}")
    if "locked" in text or "busy" in text:
        return CacheCorrupt(
            f"{path} stayed locked by another process for over {BUSY_TIMEOUT:.0f} s: {text}"
        )
    return CacheCorrupt(f"{path} cannot be used: {text}")


class Database:
    """One cache's database: a small pool of connections, short transactions."""

    def __init__(self, root: Path) -> None:
        require_sqlite()
        self.path = root / DB_NAME
        self._pool: list[Any] = []
        self._pool_lock = threading.Lock()
        # Connections that only watch for changes: [connection, data_version seen, value].
        self._watchers: list[list] = []
        self._commits = 0  # write transactions this process committed (they show at once)
        self._seen: dict[str, tuple[int, float, int]] = {}  # watch: (commits, when, value)
        self.id = ""
        try:
            conn = self._connect()
            try:
                self._migrate(conn)
                self.id = str(
                    conn.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()[0]
                )
            finally:
                conn.close()
        except sqlite3.Error as e:
            raise _translate(e, self.path) from e

    # -- connections ---------------------------------------------------------------------
    def _refuse_links(self) -> None:
        """SQLite opens the database and its ``-wal``, ``-shm`` and ``-journal`` files by
        name, following links: a link planted at any of them (``nekko.db-wal ->
        /etc/shadow``) would have our writes land outside the cache.  Refused instead."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                st = os.lstat(f"{self.path}{suffix}")
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeCachePath(
                    f"the cache's {DB_NAME}{suffix} is a symbolic link or not a regular"
                    " file: refusing to open it (has someone else written to the cache"
                    " directory?)"
                )

    def _connect(self) -> Any:
        self._refuse_links()
        conn = sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        # FULL: one fsync of the log per commit, so an answered pull survives a power cut.
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _migrate(self, conn: Any) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: once per database
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path} has schema version {version}, made by a newer"
                f" nekko-sm; this one knows up to {SCHEMA_VERSION}"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another won?
            for step in range(version, SCHEMA_VERSION):
                for statement in _statements(_MIGRATIONS[step]):
                    conn.execute(statement)
                if step == 0:
                    conn.execute(
                        "INSERT INTO meta (name, value) VALUES ('id', ?)", (os.urandom(8).hex(),)
                    )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            if conn.in_transaction:  # an error left it open: never hand that on
                conn.close()
            else:
                with self._pool_lock:
                    if len(self._pool) < 16:
                        self._pool.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()

    @contextmanager
    def transaction(self, write: bool, durable: bool = True) -> Iterator[Any]:
        """A read snapshot, or (``write``) the database's one writer, until the block ends.

        ``durable=False``: the commit is not fsynced (``synchronous = NORMAL``): it survives
        the process, not a power cut, until the next durable commit or checkpoint.
        """
        try:
            with self._conn() as conn:
                if not durable:
                    conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                self._commits += write
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            raise _translate(e, self.path) from e

    def write(self, durable: bool = True) -> Any:
        return self.transaction(write=True, durable=durable)

    def read(self) -> Any:
        return self.transaction(write=False)

    def query(self, sql: str, args: tuple = ()) -> list:
        """One statement outside any transaction (its own snapshot)."""
        try:
            with self._conn() as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise _translate(e, self.path) from e

    def execute(self, sql: str, args: tuple = ()) -> int:
        """One writing statement, committed on its own; returns the rows it changed."""
        try:
            with self._conn() as conn:
                rows = conn.execute(sql, args).rowcount
                self._commits += 1
                return rows
        except sqlite3.Error as e:
            raise _translate(e, self.path) from e

    def watch(self, name: str) -> int:
        """The ``meta`` counter ``name``: what this process committed shows at once, what
        other processes committed within ``WATCH_EVERY`` seconds.

        A look costs one ``PRAGMA data_version`` (µs; the counter is read again only when
        some connection committed since), and is made at most every ``WATCH_EVERY`` seconds
        unless this process committed since the last.  Its numbers belong to one connection
        and count the commits of the *others*, so the watching connections never write, each
        remembers what it saw, and they are pooled (a connection per API thread would be
        opened and dropped with each client connection, and SQLite keeps the files of a
        dropped connection open while others hold locks on the same database).
        """
        commits, now = self._commits, time.monotonic()
        seen = self._seen.get(name)
        if seen is not None and seen[0] == commits and now - seen[1] < WATCH_EVERY:
            return seen[2]
        with self._pool_lock:
            item = self._watchers.pop() if self._watchers else None
        try:
            if item is None:
                item = [self._connect(), None, 0]
            conn = item[0]
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != item[1]:
                item[2] = int(
                    conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]
                )
                item[1] = version
        except sqlite3.Error as e:
            raise _translate(e, self.path) from e
        with self._pool_lock:
            self._watchers.append(item)
        self._seen[name] = (commits, now, int(item[2]))
        return int(item[2])

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, []
            pool += [w[0] for w in self._watchers]
            self._watchers = []
        for conn in pool:
            conn.close()


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` one by one (executescript would commit first)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if buf.strip():
        yield buf


def bump(conn: Any, *names: str) -> int:
    """Increment counters in ``meta`` inside a write transaction; return the first's value."""
    for name in names:
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = ?", (name,))
    return int(conn.execute("SELECT value FROM meta WHERE name = ?", (names[0],)).fetchone()[0])


def counter(conn: Any, name: str) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])
