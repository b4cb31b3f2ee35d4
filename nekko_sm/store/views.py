"""Named views of multi-file entries: ``views/KEY/NAME``, read-only links to blobs.

This module owns the ``views/`` directory: where the view of a URL lives, building one
atomically (a temporary directory of relative symlinks renamed into place, so a reader
sees the old view or the new one), removing one, and sweeping views no entry names any
more.  Names are checked again with :func:`nekko_sm.refs.safe_name` before a link is
made.  It never copies or writes blob bytes and never reads or edits ``index.json``.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from nekko_sm.refs import safe_name
from nekko_sm.store.layout import Layout, fsync_dir, key_for


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
        """
        final = self.path(url)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, digest in files:  # names come from registries and the Hub: checked again
            link = tmp / safe_name(name)
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(self.layout.blob_path(digest), link.parent)
            os.symlink(target, link)
        if final.exists():
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
        return final

    def remove(self, url: str) -> None:
        shutil.rmtree(self.path(url), ignore_errors=True)

    def sweep(self, keep: Iterable[str], dry_run: bool = False) -> list[str]:
        """Remove the views of every URL not in ``keep``; return their directory names."""
        keys = {self.path(url).name for url in keep}
        freed: list[str] = []
        if self.dir.exists():
            for name in os.listdir(self.dir):
                if name not in keys and not name.startswith("."):
                    freed.append(name)
                    if not dry_run:
                        shutil.rmtree(self.dir / name, ignore_errors=True)
        return freed
