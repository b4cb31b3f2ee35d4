"""Link-safe file-system primitives: nothing below a cache root is reached through a link.

This module owns every file operation the store makes below a cache root: the roots this
process registered (:func:`register_root`), opening directories and files component by
component with O_NOFOLLOW relative to their parent's descriptor (:func:`open_dir`,
:func:`parent_dir`, :func:`open_file`, :func:`make_dirs`, :func:`make_missing`), reading
and stating without following links (:func:`read_file`, :func:`lstat`, :func:`is_file`,
:func:`is_dir`, :func:`listdir`), and changing the tree the same way
(:func:`write_atomic`: write, fsync, rename, fsync the directory; :func:`fsync_dir`,
:func:`unlink`, :func:`remove_tree`, :func:`rename`), plus :func:`check_cache_dir`, which
refuses at start-up a cache directory someone else could change.  It knows no cache
layout (no blob, ingest or index path), takes no lock and never follows a symbolic link
below a registered root: a link found there is an UnsafeCachePath, or is removed when the
file is ours to make again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nekko_sm import logs
from nekko_sm.errors import InsufficientStorage, UnsafeCacheDir, UnsafeCachePath

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this

log = logs.get("nekko_sm.store")  # imports logging at its first use


# -- the file-system layer: nothing inside a cache is reached through a link ---------------
#
# Whoever can write the cache (a compromised engine sharing the node's uid in another mount
# namespace; any user when an old version made directories 0777 under umask 000) could plant
# a symbolic link at an ingest file, a blob, ``views/`` or a lock file, and make our next
# pull, gc, rm or verify write, chmod or delete files outside the cache.  So every path
# below a registered cache root is reached component by component from the root's own
# descriptor, each with O_NOFOLLOW, and every operation is made relative to the descriptor
# of its parent directory (``dir_fd``): a link found on the way is an UnsafeCachePath, never
# followed.  Files we create are created O_EXCL or O_NOFOLLOW and get their mode with
# fchmod; directories get DIR_MODE exactly, whatever the umask.  Paths outside any cache
# (none in production) are handled the ordinary way.

DIR_MODE = 0o755
FILE_MODE = 0o644
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | os.O_CLOEXEC
_roots: dict[str, None] = {}  # absolute paths of the cache roots this process uses
_roots_lock = threading.Lock()


def register_root(root: Path | str) -> None:
    """Make ``root`` a cache root: paths below it are opened without following links."""
    with _roots_lock:
        _roots[os.path.abspath(root)] = None


def _below_root(path: Path | str) -> tuple[str, list[str]] | None:
    """(root, components below it) when ``path`` is inside a registered cache root."""
    cur = os.path.abspath(path)
    parts: list[str] = []
    while cur not in _roots:
        head, tail = os.path.split(cur)
        if head == cur:
            return None
        parts.append(tail)
        cur = head
    parts.reverse()
    return cur, parts


def _unsafe(rel: str) -> UnsafeCachePath:
    return UnsafeCachePath(
        f"the cache's {rel} is a symbolic link or not what the cache put"
        " there: refusing to follow it (has someone else written to the"
        " cache directory?)"
    )


def _child_dir(parent: int, name: str, create: bool, rel: str) -> int:
    """Open directory ``name`` in ``parent`` without following a link, making it if asked."""
    try:
        try:
            return os.open(name, _O_DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent)
            made = True
        except FileExistsError:
            made = False
        fd = os.open(name, _O_DIR, dir_fd=parent)
        if made:
            os.fchmod(fd, DIR_MODE)  # exactly, not 0o755 & ~umask
        return fd
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unsafe(rel) from None
        raise


def open_dir(path: Path | str, create: bool = False) -> int:
    """A descriptor of directory ``path`` (the caller closes it).  Below a cache root no
    component is a link; with ``create``, missing directories are made with DIR_MODE."""
    below = _below_root(path)
    root, parts = below if below is not None else (os.fspath(path), [])
    if create:
        make_missing(root)
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            child = _child_dir(fd, name, create, "/".join(parts[: i + 1]))
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_missing(path: str) -> None:
    """``mkdir -p`` of a cache root (or a path outside any cache): DIR_MODE for each."""
    missing = []
    d = os.path.abspath(path)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, DIR_MODE)
            os.chmod(d, DIR_MODE)


@contextmanager
def parent_dir(path: Path | str, create: bool = False) -> Iterator[tuple[int, str]]:
    """``(descriptor of path's directory, path's name)`` for an ``*at`` operation."""
    path = Path(path)
    fd = open_dir(path.parent, create)
    try:
        yield fd, path.name
    finally:
        os.close(fd)


class OpenDirs:
    """Directories opened once each, as :func:`open_dir` opens them, for many ``*at``
    operations in a few of them (the files of one entry); all closed on exit."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def parent(self, path: Path | str, create: bool = False) -> tuple[int, str]:
        """``(descriptor of path's directory, path's name)``, like :func:`parent_dir`."""
        head, name = os.path.split(os.path.abspath(path))
        fd = self._fds.get(head)
        if fd is None:
            fd = self._fds[head] = open_dir(head, create)
        return fd, name

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def make_dirs(path: Path | str) -> None:
    """``mkdir -p`` with DIR_MODE, never through a link below a cache root."""
    os.close(open_dir(path, create=True))


def open_file(
    path: Path | str,
    flags: int,
    mode: int = FILE_MODE,
    create_dirs: bool = False,
    replace_link: bool = False,
) -> int:
    """``os.open`` without following a link at ``path`` or above it (below a cache root).

    With O_CREAT, a file made now gets ``mode`` exactly (fchmod, whatever the umask).  With
    ``replace_link`` (a file that is ours to make again: a lock, a partial download), a link
    found at ``path`` is removed, never followed, and the file made anew."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    links = 0
    with parent_dir(path, create_dirs) as (dfd, name):
        while True:
            try:
                if flags & os.O_CREAT:
                    try:
                        fd = os.open(name, flags | os.O_EXCL, mode, dir_fd=dfd)
                    except FileExistsError:
                        if flags & os.O_EXCL:
                            raise
                        fd = os.open(name, flags & ~os.O_CREAT, dir_fd=dfd)
                    else:
                        os.fchmod(fd, mode)
                else:
                    fd = os.open(name, flags, dir_fd=dfd)
            except FileNotFoundError:
                # Removed between our two opens, or its directory was (an ingest that was
                # committed): the caller walks the path again (FileLock does).
                raise
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                if not replace_link or links >= 3:
                    raise _unsafe(shown(path)) from None
                links += 1
                log.warning("removing a symbolic link planted at the cache's %s", shown(path))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
                continue
            return fd


def read_file(path: Path | str, limit: int | None = None) -> bytes:
    """The bytes of regular file ``path`` (never a link's target); at most ``limit`` + 1."""
    fd = open_file(path, os.O_RDONLY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _unsafe(shown(path))
        chunks = []
        left = limit + 1 if limit is not None else None
        while left is None or left > 0:
            chunk = os.read(fd, 1 << 20 if left is None else min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            if left is not None:
                left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def lstat(path: Path | str) -> os.stat_result:
    """``os.lstat``, with the directories above ``path`` reached without following links."""
    with parent_dir(path) as (dfd, name):
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)


def is_file(path: Path | str) -> bool:
    """A regular file (not a link to one) is at ``path``."""
    try:
        return stat.S_ISREG(lstat(path).st_mode)
    except OSError:
        return False


def is_dir(path: Path | str) -> bool:
    """A directory (not a link to one) is at ``path``."""
    try:
        return stat.S_ISDIR(lstat(path).st_mode)
    except OSError:
        return False


def listdir(path: Path | str) -> list[str]:
    fd = open_dir(path)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fd = open_dir(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place_at(tfd: int, tmp: str, dfd: int, name: str, data: bytes, mode: int) -> None:
    """Make ``name`` in ``dfd`` hold ``data`` (``mode``, exactly): written and fsynced under
    ``tmp`` in ``tfd``, then renamed.  A file or link left at ``tmp`` (a crash of a thread
    of this pid, or planted) is removed, never written through; on failure ``tmp`` goes."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=tfd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=tfd)
        try:
            os.fchmod(fd, mode)  # exactly, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=tfd, dst_dir_fd=dfd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=tfd)
        raise


def write_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never half.

    The temporary file is made O_EXCL (a link planted at its name is removed, not written
    through) and renamed within its directory's descriptor."""
    tmp = f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    with parent_dir(path) as (dfd, name):
        try:
            place_at(dfd, tmp, dfd, name, data, mode)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise InsufficientStorage(f"no space left to write {path.name}") from e
            raise
        os.fsync(dfd)


def unlink(path: Path | str) -> None:
    """Remove the file (or link) at ``path``, never what a link points to; gone is fine.

    No chmod first: POSIX removes a read-only file as it is, and a chmod would follow a
    link planted at ``path``."""
    try:
        with parent_dir(path) as (dfd, name):
            os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _rmtree_at(dfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        return
    try:
        fd = os.open(name, _O_DIR, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link meanwhile: unlink
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
            return
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        for entry in os.listdir(fd):
            _rmtree_at(fd, entry)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=dfd)


def remove_tree(path: Path | str) -> None:
    """``rm -rf path`` that never descends through a link, at the top or below it (a link
    is removed itself); the directories above ``path`` are reached without links too."""
    try:
        with parent_dir(path) as (dfd, name):
            _rmtree_at(dfd, name)
    except FileNotFoundError:
        pass


def rename(src: Path | str, dst: Path | str) -> None:
    """``os.replace`` between two directories each reached without following links."""
    with parent_dir(src) as (sfd, sname), parent_dir(dst) as (dfd, dname):
        os.replace(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)


def shown(path: Path | str) -> str:
    """``path`` for a message: relative to its cache root, never an absolute path."""
    below = _below_root(path)
    return "/".join(below[1]) if below else Path(path).name


def check_cache_dir(root: Path | str) -> None:
    """Refuse a cache directory someone else could change, as sshd's StrictModes does.

    The directory and every one above it (as given, and after resolving links) must be
    owned by us or by root and not writable by group or others; a directory above it may
    be world-writable when it is sticky (``/tmp``), the cache directory itself never: a
    sticky cache still lets others create names in it.  UnsafeCacheDir otherwise."""
    uid = os.geteuid()
    given = Path(os.path.abspath(root))
    real = given.resolve()
    checked: set[str] = set()
    for chain in (given, real):
        for i, d in enumerate([chain, *chain.parents]):
            if str(d) in checked:
                continue
            checked.add(str(d))
            try:
                st = os.stat(d) if i == 0 else os.lstat(d)
            except OSError:
                continue  # not there (yet): nothing anyone else can do to it
            if stat.S_ISLNK(st.st_mode):
                continue  # its directory is checked; the resolved chain is checked too
            what = "the cache directory" if i == 0 else "a directory above the cache"
            if st.st_uid not in (uid, 0):
                raise UnsafeCacheDir(
                    f"{what} {d} is owned by uid {st.st_uid}, not by us (uid {uid}) or root:"
                    " refusing it (run as its owner, or chown it)"
                )
            writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if writable and (i == 0 or not st.st_mode & stat.S_ISVTX):
                raise UnsafeCacheDir(
                    f"{what} {d} is writable by group or others (mode"
                    f" {stat.S_IMODE(st.st_mode):04o}): refusing it (chmod go-w it)"
                )
