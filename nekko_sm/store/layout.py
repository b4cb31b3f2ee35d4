"""Where everything lives in the cache: the OCI image layout's paths, names and blobs.

This module owns the OCI image layout on disk: the media-type and annotation constants,
digest checks and file names for keys (:func:`check_digest`, :func:`sha256_digest`,
:func:`key_for`), and :class:`Layout`: the path of every file and directory of one cache,
making them at start-up, read-only questions about committed blobs (present? how big? its
bytes? which are there?) and the free-space checks.  Every file operation goes through
the link-safe primitives of ``fs``.  It never writes a blob, never takes a lock and never
edits ``index.json``: those belong to ``ingest``, ``locks`` and ``index``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from nekko_sm.errors import (
    CacheCorrupt,
    InsufficientStorage,
    InvalidDigest,
    UnsafeCacheDir,
    UnsafeCachePath,
)
from nekko_sm.store.fs import (
    DIR_MODE,
    check_cache_dir,
    fsync_dir,
    is_file,
    listdir,
    lstat,
    make_missing,
    open_dir,
    read_file,
    register_root,
    shown,
    write_atomic,
)

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
# Below this fraction of its file system free, gc also drops the partial downloads an
# interrupted pull would resume: the space is worth more than the resume.
LOW_SPACE = 0.05
# Directories under ingest/ that are not partial downloads (gc and the budget skip them).
NOT_PARTIALS = frozenset({"leases", "pulls", "trash"})


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise InvalidDigest."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidDigest(f"not a sha256 digest: {str(digest)[:80]!r} (want sha256:<64 hex>)")
    return digest


def sha256_digest(data: bytes) -> str:
    import hashlib  # here, as in key_for: loading OpenSSL is a cost status and ls need not pay

    return "sha256:" + hashlib.sha256(data).hexdigest()


def key_for(text: str) -> str:
    """A file name for ``text`` (a URL, a digest): the hex sha256 of it."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


class Layout:
    """The paths of one cache directory, and read-only access to its committed blobs."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        register_root(self.root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.ingest_dir = self.root / "ingest"
        self.leases_dir = self.ingest_dir / "leases"
        self.views_dir = self.root / "views"
        self.index_path = self.root / "index.json"
        self.lock_path = self.root / ".lock"

    def create(self) -> None:
        """Make the directories and the ``oci-layout`` file if missing.

        Refuses (UnsafeCacheDir) a cache directory others could change, and one whose own
        directories are links, not directories, or another user's; one of ours that is
        writable by group or others (made under umask 000) gets DIR_MODE back."""
        make_missing(os.fspath(self.root))
        check_cache_dir(self.root)
        uid = os.geteuid()
        pulls = self.ingest_dir / "pulls"  # the service's: checked when it is there
        for d in (
            self.blobs_dir.parent,
            self.blobs_dir,
            self.ingest_dir,
            self.leases_dir,
            self.views_dir,
            pulls,
        ):
            try:
                fd = open_dir(d, create=d != pulls)
            except FileNotFoundError:
                continue
            except UnsafeCachePath as e:
                raise UnsafeCacheDir(f"cache directory {self.root}: {e.message}") from None
            try:
                st = os.fstat(fd)
                if st.st_uid not in (uid, 0):
                    raise UnsafeCacheDir(
                        f"cache directory {self.root}: {shown(d)} is owned by uid"
                        f" {st.st_uid}, not by us (uid {uid}) or root: refusing it"
                    )
                if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    os.fchmod(fd, DIR_MODE)
            finally:
                os.close(fd)
        layout = self.root / "oci-layout"
        if not is_file(layout):
            write_atomic(layout, b'{"imageLayoutVersion": "1.0.0"}')

    def ingest_path(self, ref: str) -> Path:
        """The directory of the partial download of ``ref``."""
        return self.ingest_dir / key_for(ref)

    # -- committed blobs -------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / check_digest(digest)[len("sha256:") :]

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """A committed blob: a regular file (a link planted there is not one)."""
        try:
            st = lstat(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)

    def read_blob(self, digest: str, limit: int = 16 << 20) -> bytes:
        data = read_file(self.blob_path(digest), limit)
        if len(data) > limit:
            raise CacheCorrupt(f"blob {digest} is larger than {limit} bytes")
        return data

    def blobs(self) -> Iterator[str]:
        try:
            names = listdir(self.blobs_dir)
        except FileNotFoundError:
            return
        for name in names:
            if len(name) == 64 and not name.startswith("."):
                yield "sha256:" + name

    def sync_blobs(self) -> None:
        """Make renames into ``blobs/`` durable (after :meth:`Ingest.put_small`)."""
        fsync_dir(self.blobs_dir)

    def space_short(self) -> bool:
        """Less than LOW_SPACE (5%) of the cache's file system is free."""
        st = os.statvfs(self.root)
        return st.f_bavail < st.f_blocks * LOW_SPACE

    def ensure_space(self, nbytes: int, what: str = "download") -> None:
        """Refuse up front when ``nbytes`` more cannot fit (507)."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if nbytes + SPACE_MARGIN > free:
            raise InsufficientStorage(
                f"not enough disk space for {what}: need {nbytes} bytes, {free} free in the cache"
            )
