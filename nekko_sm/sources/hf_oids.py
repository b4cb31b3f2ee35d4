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

Layout: one small file per git id, ``CACHE_DIR/gitoids/SCOPE/GITID`` holding
``sha256:HEX SIZE``, written atomically; a lookup is one ``open``.  (Not under ``ingest/``:
``gc`` treats every directory there as a stale partial download.)  Losing the directory
costs downloads, never correctness.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_ENTRY = re.compile(r"^(sha256:[0-9a-f]{64}) ([0-9]+)\n?$")


class GitOids:
    """The git id -> sha256 map of one repository at one registry."""

    def __init__(self, cache_root: Path | str, registry: str, repo_type: str, repo_id: str) -> None:
        scope = hashlib.sha256(f"{registry}\0{repo_type}\0{repo_id}".encode()).hexdigest()[:32]
        self.dir = Path(cache_root) / "gitoids" / scope

    def lookup(self, oid: str | None, size: int | None) -> str | None:
        """The sha256 digest the file with git id ``oid`` (and ``size``) had, if known."""
        if not oid or not _SHA1.match(oid):
            return None
        try:
            text = (self.dir / oid).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return None
        m = _ENTRY.match(text)
        if m is None or (size is not None and int(m.group(2)) != size):
            return None
        return m.group(1)

    def record(self, oid: str, digest: str, size: int) -> None:
        """Remember a VERIFIED fact: the bytes whose git blob id is ``oid`` have ``digest``."""
        if not _SHA1.match(oid) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest) or size < 0:
            raise ValueError("not a git id, a sha256 digest and a size")
        if self.lookup(oid, size) == digest:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(f"{digest} {size}\n")
                os.replace(tmp, self.dir / oid)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError:
            pass  # a cache of facts: failing to write one only costs a download next time
