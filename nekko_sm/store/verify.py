"""Whether what the cache keeps is intact: re-hashing blobs and checking the counts.

This module owns :class:`Verifier`: it re-hashes committed blobs (all of them, or those
some roots reach), reports the missing ones an entry needs and the files at a blob's name
that are not regular files, compares the database's reach and reference counts with the
manifests read again, and with ``repair`` removes damaged blobs, the entries that need
them (so the next pull fetches them again) and puts the counts right.  It never
downloads, never writes a blob and never adds an entry; reachability is the function it
is given (``gc``'s).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from typing import Callable

from nekko_sm.store.descriptor import Descriptor
from nekko_sm.store.fs import lstat, open_file, unlink
from nekko_sm.store.index import Index
from nekko_sm.store.layout import REF_NAME, Layout

_CHUNK = 1 << 20


class Verifier:
    """Verify over one layout and its index.

    ``remove_entry`` is the store's own (index entry and view together), used to repair;
    ``reachable`` gives the digests some descriptors reach.
    """

    def __init__(
        self,
        layout: Layout,
        index: Index,
        reachable: Callable[[Iterable[Descriptor]], set[str]],
        remove_entry: Callable[[str], object],
    ) -> None:
        self.layout = layout
        self.index = index
        self.reachable = reachable
        self._remove_entry = remove_entry

    def verify_blob(self, digest: str) -> bool:
        import hashlib  # here: not imported by every command that opens the store

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

    def verify(
        self,
        roots: Iterable[Descriptor] | None = None,
        repair: bool = False,
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
                    problems.append(
                        (
                            json.loads(desc)["digest"],
                            f"the database's reach of {key} is out of date",
                        )
                    )
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
                    size = (
                        self.layout.blob_path(d).stat().st_size if self.layout.has_blob(d) else None
                    )
                    conn.execute(
                        "INSERT INTO blobs (digest, refs, size) VALUES (?, ?, ?)"
                        " ON CONFLICT (digest) DO UPDATE SET refs = excluded.refs",
                        (d, n, size),
                    )
        return problems
