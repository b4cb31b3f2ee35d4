"""Where everything lives in the cache, and the file primitives the rest is built on.

This module owns the OCI image layout on disk: the media-type and annotation constants,
digest checks, the path of every file (:class:`Layout`), read-only questions about
committed blobs (present? how big? its bytes), the free-space check, and the durable
file operations: :func:`write_atomic` (write, fsync, rename, fsync the directory),
:func:`fsync_dir` and :func:`unlink`.  It never writes a blob, never takes a lock and
never edits ``index.json``: those belong to ``ingest``, ``locks`` and ``index``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from nekko_sm.errors import CacheCorrupt, InsufficientStorage, InvalidDigest

REF_NAME = "org.opencontainers.image.ref.name"
# On an index.json entry whose files are not its manifest's layers (unpacked tar layers,
# DESIGN section 8): the digest of a manifest listing the files, which the entry reaches
# too, and the tar layers it freed with --discard-unpacked-layers, which it no longer does.
A_FILES = "io.nekko.files"
A_DISCARDED = "io.nekko.discarded"
TITLE = "org.opencontainers.image.title"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Keep this much free beyond what a download needs, so the index can still be written.
SPACE_MARGIN = 16 << 20


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise InvalidDigest."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidDigest(f"not a sha256 digest: {str(digest)[:80]!r} (want sha256:<64 hex>)")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def key_for(text: str) -> str:
    """A file name for ``text`` (a URL, a digest): the hex sha256 of it."""
    return hashlib.sha256(text.encode()).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise InsufficientStorage(f"no space left to write {path.name}") from e
        raise
    fsync_dir(path.parent)


def unlink(path: Path) -> None:
    """Remove ``path`` (read-only files too); a file already gone is fine."""
    try:
        os.chmod(path, 0o600)
    except OSError:
        pass
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class Layout:
    """The paths of one cache directory, and read-only access to its committed blobs."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.ingest_dir = self.root / "ingest"
        self.leases_dir = self.ingest_dir / "leases"
        self.views_dir = self.root / "views"
        self.index_path = self.root / "index.json"
        self.lock_path = self.root / ".lock"

    def create(self) -> None:
        """Make the directories and the ``oci-layout`` file if missing."""
        for d in (self.blobs_dir, self.ingest_dir, self.leases_dir, self.views_dir):
            d.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            write_atomic(layout, b'{"imageLayoutVersion": "1.0.0"}')

    def ingest_path(self, ref: str) -> Path:
        """The directory of the partial download of ``ref``."""
        return self.ingest_dir / key_for(ref)

    # -- committed blobs -------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / check_digest(digest)[len("sha256:") :]

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def read_blob(self, digest: str, limit: int = 16 << 20) -> bytes:
        with open(self.blob_path(digest), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CacheCorrupt(f"blob {digest} is larger than {limit} bytes")
        return data

    def blobs(self) -> Iterator[str]:
        try:
            names = os.listdir(self.blobs_dir)
        except FileNotFoundError:
            return
        for name in names:
            if len(name) == 64 and not name.startswith("."):
                yield "sha256:" + name

    def sync_blobs(self) -> None:
        """Make renames into ``blobs/`` durable (after :meth:`Ingest.put_small`)."""
        fsync_dir(self.blobs_dir)

    def ensure_space(self, nbytes: int, what: str = "download") -> None:
        """Refuse up front when ``nbytes`` more cannot fit (507)."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if nbytes + SPACE_MARGIN > free:
            raise InsufficientStorage(
                f"not enough disk space for {what}: need {nbytes} bytes,"
                f" {free} free in {self.root}"
            )
