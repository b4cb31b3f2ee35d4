"""``index.json`` itself: the OCI image index derived from the database, and its group commit.

This module owns the file: its stamp (the top-level annotation
``io.nekko.index.generation``, ``DBID.N``, which is its first bytes and is read without
parsing the rest), the empty index a new layout starts with, the streamed atomic rewrite
from the entries' descriptors (write, fsync, rename, fsync the directory), the parse of a
foreign index.json into the entries it names, the locks a rewrite holds (one thread at a
time per process, ``.lock`` across processes), and :class:`GroupCommit`, which spaces the
rewrites so that one answers many commits and leaves the file current when a process
closes its store or exits.  It never opens the database and never decides what the
entries are: ``index`` hands it the rows to write and takes in the entries it reads.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from nekko_sm import logs
from nekko_sm.errors import CacheCorrupt, InsufficientStorage
from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.fs import fsync_dir, is_file, open_file, read_file, rename, unlink, write_atomic
from nekko_sm.store.layout import MT_OCI_INDEX, REF_NAME
from nekko_sm.store.locks import FileLock

log = logs.get("nekko_sm.store")  # imports logging at its first use

A_GENERATION = "io.nekko.index.generation"
_HEADER = re.compile(rb'^\{"annotations":\{"io\.nekko\.index\.generation":"([0-9a-f]+)\.(\d+)"\}')
_TAIL = b'],"mediaType":"' + MT_OCI_INDEX.encode() + b'","schemaVersion":2}'


class IndexFile:
    """The ``index.json`` of one layout: read its stamp, write it, read a foreign one."""

    def __init__(self, path: Path, lock_path: Path) -> None:
        self.path = path
        self._lock_path = lock_path
        self._lock = threading.RLock()  # one rewrite of index.json at a time per process

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Held around every rewrite: this process's lock, then ``.lock``."""
        with self._lock, FileLock(self._lock_path):
            yield

    def header(self) -> tuple[str, int] | None:
        """(database id, generation) that index.json says it shows; None if not ours."""
        try:
            fd = open_file(self.path, os.O_RDONLY)  # a link planted there is never followed
            try:
                head = os.read(fd, 160)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return ("", -1)
        m = _HEADER.match(head)
        return (m.group(1).decode(), int(m.group(2))) if m else None

    def create(self) -> None:
        """Write an empty index.json if there is none, so the layout is valid from the start.

        The database does not exist yet, or a crash came before the first rewrite; the file
        is not stamped, so the next open merges it (nothing) and rewrites it from the table.
        """
        if not is_file(self.path):
            with self.locked():
                if not is_file(self.path):
                    write_atomic(
                        self.path,
                        b'{"manifests":[],"mediaType":"'
                        + MT_OCI_INDEX.encode()
                        + b'","schemaVersion":2}',
                    )

    def write(self, db_id: str, generation: int, cur: Any) -> None:
        """Replace index.json with the descriptors ``cur`` yields, stamped ``db_id.generation``
        (under :meth:`locked`)."""
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        head = '{"annotations":{"' + A_GENERATION + f'":"{db_id}.{generation}"}},"manifests":['
        try:
            with os.fdopen(open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
                f.write(head.encode())
                sep = b""
                while True:
                    rows = cur.fetchmany(2000)
                    if not rows:
                        break
                    f.write(sep + ",".join(r[0] for r in rows).encode())
                    sep = b","
                f.write(_TAIL)
                f.flush()
                os.fsync(f.fileno())
            rename(tmp, path)
        except OSError as e:
            unlink(tmp)
            if e.errno in (28, 122):  # ENOSPC, EDQUOT
                raise InsufficientStorage(f"no space left to write {path.name}") from e
            raise
        fsync_dir(path.parent)

    def entries(self, database: str) -> dict[str, Descriptor]:
        """The entries a foreign index.json names, by URL (``database``: the file that the
        error message says it would be rebuilt from)."""
        try:
            doc = json.loads(read_file(self.path))
            manifests = [Descriptor.from_json(d) for d in doc.get("manifests", [])]
        except (ValueError, AttributeError, TypeError) as e:
            raise CacheCorrupt(
                f"{self.path} does not parse: {e}; remove it to rebuild it from {database}"
            ) from e
        named: dict[str, Descriptor] = {}
        for d in manifests:
            if d.annotations.get(REF_NAME):
                named[d.annotations[REF_NAME]] = d
        if len(named) < len(manifests):
            log.warning(
                "%s: %d descriptors without %s are not entries; left out",
                self.path,
                len(manifests) - len(named),
                REF_NAME,
            )
        return named


# The wait before a rewrite of index.json is this many times what the last one took, so
# rewriting takes at most ~1/20 of the time however steadily commits come, within:
_REWRITE_SHARE = 19
_MIN_WAIT, _MAX_WAIT = 0.005, 10.0


class GroupCommit:
    """Group commit of index.json: a commit asks, one rewrite a little later answers many.

    At 100,000 entries a rewrite costs ~0.4 s of CPU; rewriting after every burst of a
    steady trickle of commits would spend a third of a core on it.  Spacing rewrites by 19
    times the last one's cost bounds that to ~5%, at the price of index.json trailing the
    database by up to ~20 rewrites' time under steady commits (5 ms on a small cache,
    seconds on a huge one, 10 s at most); after a quiet spell a rewrite comes at once.  Whoever needs it current calls :meth:`Index.flush`; every process
    does when it closes its store or exits.
    """

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._dirty = False
        self._used = False  # asked at least once since the last stop
        self._thread: threading.Thread | None = None
        self._cost = 0.0  # what the last rewrite took, and when it ended
        self._last = 0.0

    def kick(self) -> None:
        with self._cond:
            self._dirty = self._used = True
            _PENDING.add(self)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="index.json group commit"
                )
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._dirty:
                    self._cond.wait(5.0)
                    if not self._dirty:
                        self._thread = None
                        return
                # spaced from the last rewrite: after a quiet spell, one comes at once
                due = self._last + min(_MAX_WAIT, _REWRITE_SHARE * self._cost)
            time.sleep(max(_MIN_WAIT, due - time.monotonic()))
            with self._cond:
                if not self._dirty:  # stop() flushed meanwhile
                    continue
                self._dirty = False
            started = time.monotonic()
            try:
                self._flush()
            except Exception as e:  # noqa: BLE001 - the next commit or open tries again
                log.warning("could not rewrite index.json: %s", e)
            self._last = time.monotonic()
            self._cost = self._last - started

    def stop(self) -> None:
        """Leave index.json current (waiting for a rewrite under way) if anything changed."""
        with self._cond:
            used, self._used, self._dirty = self._used, False, False
        if used:
            self._flush()
        _PENDING.discard(self)


_PENDING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A one-shot process leaves index.json current, even when nobody closed its store."""
    for group in list(_PENDING):
        try:
            group.stop()
        except Exception as e:  # noqa: BLE001 - the next open rebuilds it
            log.warning("could not rewrite index.json at exit: %s", e)
