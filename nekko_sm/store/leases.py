"""Leases: the digests a live pull relies on before an entry names them.

This module owns ``ingest/leases/``: :class:`Lease`, one file per pull, flocked while
its owner lives, listing each digest the pull leased (before it checks the blob is there)
and the bytes the disk budget reserved for it; and reading every live lease back
(:func:`leased_digests`, :func:`live_leases`), where a lease whose flock is free belongs
to a process that died: stale, skipped, and removed when asked.  It never frees a blob
and never reads the database: ``gc`` decides what a lease keeps.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from nekko_sm.store.fs import listdir, make_dirs, open_file, read_file, unlink
from nekko_sm.store.layout import DIGEST_RE, Layout
from nekko_sm.store.locks import FileLock

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this

# A lease file's line for the bytes its pull reserved (not a digest: gc reads past it).
_RESERVE = "reserve "


class Lease:
    """Digests a live pull relies on before the index names them (protects them from gc)."""

    def __init__(self, layout: Layout) -> None:
        make_dirs(layout.leases_dir)
        self.path = (
            layout.leases_dir / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        )
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


def _lease_texts(layout: Layout, remove_stale: bool) -> Iterator[tuple[str, str]]:
    """(name, text) of every live lease; a stale one (its owner died) is skipped."""
    leases_dir = layout.leases_dir
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


def leased_digests(layout: Layout, remove_stale: bool) -> set[str]:
    """Every digest a live lease holds; with ``remove_stale``, stale leases are removed."""
    out: set[str] = set()
    for _, text in _lease_texts(layout, remove_stale):
        out.update(x for x in text.split() if DIGEST_RE.match(x))
    return out


def live_leases(layout: Layout) -> dict[str, tuple[set[str], int]]:
    """Every live pull's lease by name: (digests it holds, bytes it reserved)."""
    out: dict[str, tuple[set[str], int]] = {}
    for name, text in _lease_texts(layout, remove_stale=False):
        digests: set[str] = set()
        reserved = 0
        for line in text.splitlines():
            if line.startswith(_RESERVE):
                try:
                    reserved = int(line[len(_RESERVE) :])
                except ValueError:
                    pass
            elif DIGEST_RE.match(line):
                digests.add(line)
        out[name] = (digests, reserved)
    return out
