"""Named views of multi-file entries: ``views/KEY/NAME``, read-only links to blobs.

This module owns the ``views/`` directory: where the view of a URL lives, building one
atomically (a temporary directory of relative symlinks renamed into place, so a reader
sees the old view or the new one), removing one, and sweeping views no entry names any
more, and temporary directories a failed or killed build left behind.  Names are checked
again with :func:`nekko_sm.refs.safe_name` before a link is made.  Every step goes through
the descriptor of ``views/`` (reached without following links, see ``fs``): a link
planted at ``views`` or in it is never followed.  It never copies or writes blob bytes and
never reads or edits ``index.json``.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from nekko_sm import logs
from nekko_sm.errors import UnsafeCachePath
from nekko_sm.refs import safe_name
from nekko_sm.store.fs import DIR_MODE, open_dir, remove_tree
from nekko_sm.store.layout import Layout, key_for

log = logs.get("nekko_sm.store")  # imports logging at its first use

# views/.KEY.PID.TID.tmp (a build under way) and views/.KEY.PID.old (a view being replaced)
_TEMP = re.compile(r"^\.[0-9a-f]{32}\.\d+(?:\.\d+\.tmp|\.old)$")
# A build takes seconds; a temporary directory this old was left by a failure or a kill.
TEMP_MAX_AGE = 3600.0


class Views:
    """The ``views/`` directory of one layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.dir = layout.views_dir

    def path(self, url: str) -> Path:
        return self.dir / key_for(url)[:32]

    def make(self, url: str, files: Iterable[tuple[str, str]]) -> Path:
        """Build ``views/KEY/`` with a read-only link ``NAME -> blob`` per file, atomically.

        Names must already be safe relative paths (see :func:`nekko_sm.refs.safe_name`).
        A build that fails leaves no temporary directory behind.
        """
        final = self.path(url)
        tmp = f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        vfd = open_dir(self.dir, create=True)
        try:
            remove_tree(self.dir / tmp)
            os.mkdir(tmp, DIR_MODE, dir_fd=vfd)
            try:
                self._fill(vfd, tmp, files)
                try:
                    os.stat(final.name, dir_fd=vfd, follow_symlinks=False)
                    exists = True
                except FileNotFoundError:
                    exists = False
                if exists:
                    old = f".{final.name}.{os.getpid()}.old"
                    remove_tree(self.dir / old)
                    os.replace(final.name, old, src_dir_fd=vfd, dst_dir_fd=vfd)
                    os.replace(tmp, final.name, src_dir_fd=vfd, dst_dir_fd=vfd)
                    remove_tree(self.dir / old)
                else:
                    os.replace(tmp, final.name, src_dir_fd=vfd, dst_dir_fd=vfd)
            except BaseException:
                remove_tree(self.dir / tmp)
                raise
            os.fsync(vfd)
        finally:
            os.close(vfd)
        return final

    def _fill(self, vfd: int, tmp: str, files: Iterable[tuple[str, str]]) -> None:
        """One relative symlink per file in ``views/tmp``, its directories made as needed."""
        top = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=vfd)
        dirs = {"": top}  # each directory of the view made and opened once
        try:
            for name, digest in files:  # names come from registries and the Hub: checked again
                parts = safe_name(name).split("/")
                dfd, at = top, ""
                for p in parts[:-1]:
                    below = f"{at}/{p}" if at else p
                    if below not in dirs:
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(p, DIR_MODE, dir_fd=dfd)
                        dirs[below] = os.open(
                            p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd
                        )
                    dfd, at = dirs[below], below
                # views/tmp/a/b/NAME -> ../../../../blobs/sha256/HEX
                up = "../" * (len(parts) + 1)  # out of the view's dirs and views/
                rel = self.layout.blob_path(digest).relative_to(self.layout.root)
                os.symlink(up + rel.as_posix(), parts[-1], dir_fd=dfd)
        finally:
            for fd in dirs.values():
                os.close(fd)

    def remove(self, url: str) -> None:
        try:
            remove_tree(self.path(url))
        except UnsafeCachePath as e:  # views/ is a link: the entry goes, nothing is followed
            log.warning("not removing the view of %s: %s", url, e.message)

    def sweep(self, keep: Iterable[str], dry_run: bool = False) -> list[str]:
        """Remove the views of every URL not in ``keep``, and temporary directories older
        than TEMP_MAX_AGE; return their directory names."""
        keys = {self.path(url).name for url in keep}
        freed: list[str] = []
        try:
            vfd = open_dir(self.dir)
        except FileNotFoundError:
            return freed
        except UnsafeCachePath as e:  # views/ is a link: nothing in it is ours to free
            log.warning("not sweeping views: %s", e.message)
            return freed
        try:
            now = time.time()
            for name in os.listdir(vfd):
                if name.startswith("."):
                    if not _TEMP.match(name):
                        continue
                    try:
                        st = os.stat(name, dir_fd=vfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if now - st.st_mtime < TEMP_MAX_AGE:
                        continue  # perhaps a build under way in another process
                elif name in keys:
                    continue
                freed.append(name)
                if not dry_run:
                    remove_tree(self.dir / name)
        finally:
            os.close(vfd)
        return freed
