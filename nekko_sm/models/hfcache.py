"""The Hugging Face cache view: ``CACHE_DIR/huggingface/hub/`` as huggingface_hub lays it out.

With ``HF_HOME=CACHE_DIR/huggingface HF_HUB_OFFLINE=1``, huggingface_hub (and vLLM,
transformers, llama.cpp's ``-hf``) find a pulled model by its repo id::

    hub/models--ORG--NAME/blobs/ETAG                 the file's bytes
    hub/models--ORG--NAME/snapshots/COMMIT/PATH      -> ../../blobs/ETAG (relative symlink)
    hub/models--ORG--NAME/refs/REV                   COMMIT (no newline)

``datasets--`` and ``spaces--`` likewise.  ETAG is what huggingface_hub names a blob after: the
file's sha256 for an LFS file, its git blob id (sha1) for any other; the caller knows which
from the Hub's answers.

``blobs/ETAG`` is a HARD LINK to ``CACHE_DIR/blobs/sha256/HEX``: the same bytes, no copy, and
a regular file as huggingface_hub itself writes it.  Not a symlink, because huggingface_hub
releases before 2.x resolve a snapshot link to its final target, call a blob outside the
repo's ``blobs/`` corrupt, and ``delete-cache`` would unlink the store's own blob.  When a hard
link is impossible (another file system), a relative symlink to the store's blob is made.

Every entry that contributed is recorded under ``huggingface/.nekko/entries/`` (one small JSON
file per entry URL), so :meth:`HFCacheView.remove` takes away only what no other entry still
needs: a file pulled alone and the whole repository at the same commit share the snapshot
link, two revisions share blobs, and ``refs/REV`` goes back to the commit the newest remaining
entry of that revision had.  huggingface_hub's ``trees/`` listings are never written: a
listing says a snapshot is complete, and a single-file entry's snapshot is not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nekko_sm.errors import CacheCorrupt, UnsafeName
from nekko_sm.models.paths import check_path
from nekko_sm.store.fs import (
    OpenDirs,
    listdir,
    lstat,
    make_dirs,
    open_file,
    parent_dir,
    read_file,
    unlink,
    write_atomic,
)

REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ETAG = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class HFFile:
    path: str  # in the repository: "config.json", "text_encoder/model.safetensors"
    digest: str  # the store's blob: "sha256:HEX"
    size: int
    etag: str  # huggingface_hub's blob name: the sha256 (LFS files) or the git blob sha1


@dataclass(frozen=True)
class HFEntry:
    """What one nekko entry of the default Hub endpoint puts in the view."""

    url: str  # the entry's canonical URL: what records it
    repo_type: str  # model, dataset or space
    repo_id: str  # "org/name" (or "name")
    revision: str  # as asked for: "main", a tag, "refs/pr/1", or the commit itself
    commit: str  # the 40-hex commit the files are from
    files: tuple  # (HFFile, ...)


def repo_folder(repo_type: str, repo_id: str) -> str:
    """``models--ORG--NAME``, as huggingface_hub's ``repo_folder_name`` makes it."""
    if repo_type not in REPO_TYPES:
        raise UnsafeName(f"unknown Hugging Face repository type {repo_type!r}")
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(
        _NAME.match(p) and ".." not in p and "--" not in p for p in parts
    ):
        raise UnsafeName(f"not a Hugging Face repository id: {repo_id!r}")
    return "--".join([REPO_TYPES[repo_type], *parts])


def _check(entry: HFEntry) -> None:
    repo_folder(entry.repo_type, entry.repo_id)
    if not _COMMIT.match(entry.commit):
        raise UnsafeName(f"not a commit hash: {entry.commit!r}")
    if check_path(entry.revision, "revision") != entry.revision:
        raise UnsafeName(f"revision {entry.revision!r} is not a plain name")
    for f in entry.files:
        if check_path(f.path, entry.url) != f.path:
            raise UnsafeName(f"{entry.url}: file name {f.path!r} is not a plain path")
        if not _ETAG.match(f.etag):
            raise UnsafeName(
                f"{entry.url}: {f.path!r} has an ETag that is no blob name: {f.etag!r}"
            )
        if not _DIGEST.match(f.digest):
            raise UnsafeName(f"{entry.url}: {f.path!r} has a bad digest {f.digest!r}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (threads and processes alike)."""
    make_dirs(path.parent)
    fd = open_file(path, os.O_RDWR | os.O_CREAT, 0o644, replace_link=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# Every file-system step below goes through nekko_sm.store.layout: the view lives below the
# cache root, so a link planted in it (``refs -> /etc``) is never followed (issue 9).


def _tmp(name: str) -> str:
    return f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"


def _write_atomic(path: Path, data: bytes) -> None:
    make_dirs(path.parent)
    write_atomic(path, data, 0o644)


def _read_text(path: Path) -> str:
    return read_file(path, 16 << 20).decode()


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(lstat(path).st_mode)
    except OSError:
        return False


def _prune_empty(path: Path, stop: Path) -> None:
    """Remove ``path`` and its parents up to (not including) ``stop`` while they are empty
    (a link is never a directory here: rmdir of one fails, and the walk stops)."""
    while path != stop and stop in path.parents:
        try:
            with parent_dir(path) as (dfd, name):
                os.rmdir(name, dir_fd=dfd)
        except OSError:
            return
        path = path.parent


class HFCacheView:
    """The view under ``store.root/huggingface``; ``HF_HOME`` points there."""

    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self.store = store
        self.home = Path(store.root) / "huggingface"
        self.hub = self.home / "hub"
        self._records = self.home / ".nekko" / "entries"
        self._lock = self.home / ".nekko" / "lock"

    # -- records ---------------------------------------------------------------------------
    def _record_path(self, url: str) -> Path:
        return self._records / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".json")

    def _load(self, path: Path) -> dict | None:
        try:
            doc = json.loads(_read_text(path))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("files"), list) else None

    def _all(self) -> list[dict]:
        try:
            names = sorted(listdir(self._records))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.endswith(".json"):
                doc = self._load(self._records / name)
                if doc is not None:
                    out.append(doc)
        return out

    def urls(self) -> list[str]:
        """The entries the view holds files for."""
        return sorted(str(r.get("url")) for r in self._all())

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.hub / repo_folder(repo_type, repo_id)

    # -- add -------------------------------------------------------------------------------
    def add(self, entry: HFEntry) -> Path:
        """Lay ``entry`` out (again); returns its snapshot directory.  Idempotent."""
        _check(entry)
        for f in entry.files:
            if not self.store.has_blob(f.digest, f.size):
                raise CacheCorrupt(
                    f"{entry.url}: blob {f.digest} of {f.path!r} is not in the cache; pull it again"
                )
        record = {
            "url": entry.url,
            "repo_type": entry.repo_type,
            "repo_id": entry.repo_id,
            "revision": entry.revision,
            "commit": entry.commit,
            "added": time.time(),
            "files": [[f.path, f.digest, f.size, f.etag] for f in entry.files],
        }
        repo = self.repo_dir(entry.repo_type, entry.repo_id)
        snapshot = repo / "snapshots" / entry.commit
        with _locked(self._lock):
            old = self._load(self._record_path(entry.url))
            _write_atomic(self._record_path(entry.url), json.dumps(record, sort_keys=True).encode())
            if old is not None and old.get("url") == entry.url:
                self._drop(old)  # the same URL pulled again (a branch moved): what it left
            with OpenDirs() as dirs:  # each directory walked once, not once per file
                for f in entry.files:
                    blob = repo / "blobs" / f.etag
                    self._link_blob(dirs, self.store.blob_path(f.digest), blob)
                    pointer = snapshot / f.path
                    self._symlink(dirs, os.path.relpath(blob, pointer.parent), pointer)
            if entry.revision != entry.commit:
                self._write_ref(repo, entry.revision, entry.commit)
        return snapshot

    def _link_blob(self, dirs: OpenDirs, source: Path, blob: Path) -> None:
        sfd, sname = dirs.parent(source)
        dfd, name = dirs.parent(blob, create=True)
        src = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
        if not stat.S_ISREG(src.st_mode):
            raise CacheCorrupt(f"the cache's blob {source.name} is not a regular file")
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and (st.st_ino, st.st_dev) == (src.st_ino, src.st_dev):
                return  # already this very file
        except FileNotFoundError:
            try:  # a free name: the link is made whole at once, no temporary needed
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                return
            except OSError:
                pass  # taken meanwhile, or another file system: as below
        tmp = _tmp(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        try:
            os.link(sname, tmp, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (
                errno.EXDEV,
                errno.EPERM,
                errno.EMLINK,
                errno.EOPNOTSUPP,
                errno.ENOTSUP,
            ):
                raise
            # another file system: a relative link to the store's blob
            os.symlink(os.path.relpath(source, blob.parent), tmp, dir_fd=dfd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def _symlink(self, dirs: OpenDirs, target: str, link: Path) -> None:
        dfd, name = dirs.parent(link, create=True)
        try:
            if os.readlink(name, dir_fd=dfd) == target:
                return
        except FileNotFoundError:
            try:  # a free name: made whole at once, no temporary needed
                os.symlink(target, name, dir_fd=dfd)
                return
            except FileExistsError:
                pass  # taken meanwhile: replaced as below
        except OSError:
            pass
        tmp = _tmp(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        os.symlink(target, tmp, dir_fd=dfd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def _write_ref(self, repo: Path, revision: str, commit: str) -> None:
        ref = repo / "refs" / revision
        try:
            if _read_text(ref) == commit:
                return
        except OSError:
            pass
        _write_atomic(ref, commit.encode())

    # -- remove ----------------------------------------------------------------------------
    def remove(self, url: str) -> bool:
        """Take ``url``'s files out of the view, keeping what other entries still need.
        Returns False when the view held nothing for it."""
        path = self._record_path(url)
        with _locked(self._lock):
            record = self._load(path)
            if record is None or record.get("url") != url:
                return False
            unlink(path)
            self._drop(record)
        return True

    def _drop(self, record: dict) -> None:
        """Remove what ``record`` (no longer among the records) made and no record needs."""
        try:
            repo = self.repo_dir(str(record["repo_type"]), str(record["repo_id"]))
        except UnsafeName:
            return  # a record we would not have written: nothing of it to remove
        others = [
            r
            for r in self._all()
            if (r.get("repo_type"), r.get("repo_id")) == (record["repo_type"], record["repo_id"])
        ]
        pointers = {(r["commit"], f[0]) for r in others for f in r["files"]}
        etags = {f[3] for r in others for f in r["files"]}
        commit = str(record["commit"])
        snapshots = repo / "snapshots"
        for name, digest, size, etag in record["files"]:
            if (commit, name) not in pointers:
                pointer = snapshots / commit / name
                if _is_link(pointer):
                    unlink(pointer)
                _prune_empty(pointer.parent, snapshots)
            if etag not in etags:
                self._unlink_blob(repo / "blobs" / etag, digest, size)
        self._reset_ref(repo, str(record["revision"]), commit, others)
        if not others:
            for sub in ("snapshots", "blobs", "refs"):
                _prune_empty(repo / sub, repo)
            _prune_empty(repo, self.hub)

    def _unlink_blob(self, blob: Path, digest: str, size: int) -> None:
        """Remove ``blob`` if it is ours: a link to the store's blob (or, the store's blob
        gone, a file of its size); a file huggingface_hub wrote itself stays."""
        try:
            st = lstat(blob)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            unlink(blob)
            return
        try:
            src = lstat(self.store.blob_path(digest))
            ours = (st.st_ino, st.st_dev) == (src.st_ino, src.st_dev)
        except FileNotFoundError:
            ours = st.st_size == size
        if ours:
            unlink(blob)

    def _reset_ref(self, repo: Path, revision: str, commit: str, others: list) -> None:
        if revision == commit:
            return
        same = [r for r in others if r.get("revision") == revision]
        ref = repo / "refs" / revision
        if same:
            newest = max(same, key=lambda r: float(r.get("added") or 0))
            self._write_ref(repo, revision, str(newest["commit"]))
            return
        try:
            if _read_text(ref) == commit:
                unlink(ref)
        except OSError:
            return
        _prune_empty(ref.parent, repo / "refs")

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove every entry not in ``keep`` (the URLs the index still has); for ``gc``."""
        wanted = set(keep)
        gone = [u for u in self.urls() if u not in wanted]
        for url in gone:
            self.remove(url)
        return gone
