"""The one cross-process lock of the store: an exclusive ``flock`` on a file.

This module owns :class:`FileLock` (lock the file now at a path, noticing when whoever held
it removed that file) and :func:`remove_locked_dir`, the order in which a directory guarded
by its own ``lock`` file is taken apart.  Every lock in the cache is one of these: ``.lock``
(index and gc), ``ingest/KEY/lock`` (one writer per blob), ``ingest/leases/ID`` (a live
pull) and the service's ``ingest/pulls/KEY.lock``.  It never decides *what* to lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

from nekko_sm.store.fs import listdir, lstat, open_file, parent_dir, remove_tree, unlink

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only mypy reads this


class FileLock:
    """An exclusive flock on a file, held by one open file description."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        """Lock the file now at ``path``.

        If whoever held it removed the file (an ingest directory that was committed), we
        would hold a lock nobody else can see; so check the inode is still the one at the
        path, and try again on a fresh file when it is not.
        """
        while True:
            try:
                # No link is followed to the lock file or above it (store.fs).
                fd = open_file(
                    self.path, os.O_RDWR | os.O_CREAT, 0o644, create_dirs=True, replace_link=True
                )
            except (FileNotFoundError, FileExistsError):
                # The holder removed the directory while we made it or opened the file.
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_locked_dir(d: Path, lock: FileLock) -> None:
    """Remove a directory whose ``lock`` file we hold; the lock file goes last.

    Nothing is followed: a link inside is removed itself, a subdirectory is removed without
    descending through links (store.fs.remove_tree)."""
    try:
        names = listdir(d)
    except FileNotFoundError:
        names = []
    for name in names:
        if name != "lock":
            remove_tree(d / name)
    unlink(d / "lock")
    try:
        with parent_dir(d) as (dfd, name):
            os.rmdir(name, dir_fd=dfd)
    except OSError:
        pass
    lock.release()
