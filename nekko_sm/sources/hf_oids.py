"""What a regular (git, non-LFS) Hub file's bytes hash to, learned once, so it is not
downloaded again.

The Hub names a git file by its git blob id, ``sha1(b"blob SIZE\\0" + bytes)`` (the tree
listing's ``oid``, the resolve answer's ``ETag``), never by its sha256, which is what the
store keys blobs by.  After a download whose bytes were checked against the git blob id the
Hub gave, :meth:`GitOids.record` remembers ``git id -> (sha256, size)``; the next pull of
the same repository (at another commit, say) finds the blob without asking for the bytes.

Safety: a mapping is written only by :func:`nekko_sm.sources.hf.fetch` after it verified
the downloaded bytes against the Hub's git id, with the sha256 the store computed; a digest
a caller passes never creates or selects one.  Mappings are kept per registry and
repository, so a mirror (or another repository) can never vouch for a file of another:
SHA-1 collisions can be made, and a git id is only as good as the place that gave it.

Kept in the store's database (its ``aliases``, kind ``git-oid:SCOPE``): a lookup is one
indexed read, the records of a pull one transaction that is not fsynced (a fact lost to a power cut
costs a download, never correctness), and nothing is written through a path in the cache
directory.  A mapping whose blob is gone, or whose size differs, selects nothing.
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import TYPE_CHECKING

from nekko_sm.errors import NekkoError

if TYPE_CHECKING:
    from nekko_sm.store import Store

_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class GitOids:
    """The git id -> sha256 map of one repository at one registry."""

    def __init__(self, store: Store, registry: str, repo_type: str, repo_id: str) -> None:
        scope = hashlib.sha256(f"{registry}\0{repo_type}\0{repo_id}".encode()).hexdigest()[:32]
        self.store = store
        self.kind = "git-oid:" + scope
        self._lock = threading.Lock()
        self._new: dict[str, str] = {}  # recorded, not yet written

    def lookup(self, oid: str | None, size: int | None) -> str | None:
        """The sha256 digest the file with git id ``oid`` (and ``size``) had, if known and
        (with a ``size``) that blob is in the store with that size."""
        if not oid or not _SHA1.match(oid):
            return None
        try:
            digest = self.store.alias(self.kind, oid)
        except NekkoError:
            return None
        if digest is None or not _DIGEST.match(digest):
            return None
        if size is not None and not self.store.has_blob(digest, size):
            return None
        return digest

    def record(self, oid: str, digest: str, size: int) -> None:
        """Remember a VERIFIED fact: the bytes whose git blob id is ``oid`` have ``digest``
        (kept by :meth:`flush`, which the pull calls once its files are in)."""
        if not _SHA1.match(oid) or not _DIGEST.match(digest) or size < 0:
            raise ValueError("not a git id, a sha256 digest and a size")
        with self._lock:
            self._new[oid] = digest

    def flush(self) -> None:
        """Write what :meth:`record` learned, in one transaction."""
        with self._lock:
            new, self._new = self._new, {}
        if new:
            try:
                self.store.set_aliases(self.kind, new.items(), durable=False)
            except NekkoError:
                pass  # a cache of facts: failing to write one only costs a download next time
