"""What an unpacked model's view shows: the files under its root, links resolved.

This module owns the listing of a :class:`~nekko_sm.models.tree.Tree` as the model's files
(:class:`ViewFile`: name, blob, executable bit): an image's view is its ``models/``
directory when it has one, else its whole file system; a link to a file shows that file's
blob under the link's name, a link to a directory its files again (at most
:data:`MAX_FILES` in all); links that leave the view, name nothing, loop or name devices are
refused with :class:`~nekko_sm.errors.UnsafeLayer` (left out of an ordinary image's whole
file system instead).  It never reads a layer or writes a byte: it lists what the tree holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from nekko_sm.errors import UnsafeLayer
from nekko_sm.models.paths import check_path
from nekko_sm.models.tree import DIR, LINK, MAX_LINK_HOPS, REGULAR, SPECIAL, Node, Tree, join_path

MAX_FILES = 1_000_000  # a link to a directory lists its files again: bound the listing
VIEW = "models"  # an image's model directory (KServe modelcars, RamaLama)


@dataclass(frozen=True)
class ViewFile:
    """One file of the model: its name in the view, its blob, and whether it is executable."""

    name: str
    digest: str
    size: int
    executable: bool = False


class View:
    """The files ``tree`` shows; ``rootfs``: the tree is an image's file system."""

    def __init__(self, tree: Tree, rootfs: bool, what: str) -> None:
        self.tree = tree
        self.rootfs = rootfs
        self.what = what

    def root(self) -> str:
        if not self.rootfs:
            return ""
        resolved, node = self.tree.resolve(VIEW)
        return resolved if node is not None and node.kind == DIR else ""

    def _in_view(self, path: str, root: str) -> bool:
        return not root or path == root or path.startswith(root + "/")

    def nodes(self, root: str) -> Iterator[tuple[str, str, Node]]:
        """(name in the view, path in the tree, node) of every file the view shows; links
        resolved to what they name."""
        base = self.tree.get(root) if root else self.tree.root
        if base is None:
            return
        count = 0
        for path, node in self.tree.walk(base, root):
            name = path[len(root) + 1 :] if root else path
            if node.kind == DIR:
                continue
            if node.kind == SPECIAL:
                if self._whole_image(root):
                    continue  # /dev/null of an ordinary image: nothing an engine opens
                raise UnsafeLayer(
                    f"{self.what or 'the model'}: {path!r} is {node.target}:"
                    " a model holds files only"
                )
            if node.kind == LINK:
                for sub, spath, snode in self._through_link(path, root, 0):
                    count += 1
                    yield join_path(name, sub) if sub else name, spath, snode
            else:
                count += 1
                yield name, path, node
            if count > MAX_FILES:
                raise UnsafeLayer(
                    f"{self.what or 'the model'} lists more than {MAX_FILES}"
                    " files (links to directories?)"
                )

    def _whole_image(self, root: str) -> bool:
        """The view is an ordinary image's whole file system (no ``models/``): its dangling
        links (``/etc/mtab``), links to devices and looping links (Debian's
        ``/usr/bin/X11 -> .``) are left out of the view instead of refusing the image."""
        return self.rootfs and not root

    def _through_link(self, path: str, root: str, depth: int) -> Iterator[tuple[str, str, Node]]:
        try:
            yield from self._link_files(path, root, depth)
        except UnsafeLayer:
            if not self._whole_image(root):
                raise

    def _link_files(self, path: str, root: str, depth: int) -> Iterator[tuple[str, str, Node]]:
        who = self.what or "the model"
        resolved, node = self.tree.resolve(path)
        link = self.tree.get(path)
        target = link.target if link is not None else None
        if node is None:
            raise UnsafeLayer(f"{who}: link {path!r} -> {target!r} names nothing in the model")
        if not self._in_view(resolved, root):
            raise UnsafeLayer(f"{who}: link {path!r} -> {target!r} leaves the model")
        if node.kind == REGULAR:
            yield "", resolved, node
            return
        if node.kind == SPECIAL:
            raise UnsafeLayer(f"{who}: link {path!r} names {node.target}")
        # a directory: its files again, under the link's name
        if (
            resolved == root
            or path == resolved
            or path.startswith(resolved + "/")
            or depth >= MAX_LINK_HOPS
        ):
            raise UnsafeLayer(f"{who}: link {path!r} -> {target!r} loops")
        for sub, child in self.tree.walk(node, resolved):
            rel = sub[len(resolved) + 1 :]
            if child.kind == REGULAR:
                yield rel, sub, child
            elif child.kind == LINK:
                for sub2, spath, snode in self._through_link(sub, root, depth + 1):
                    yield join_path(rel, sub2) if sub2 else rel, spath, snode
            elif child.kind == SPECIAL:
                raise UnsafeLayer(f"{who}: {sub!r} is {child.target}: a model holds files only")

    def files(self, root: str) -> list:
        out: dict[str, ViewFile] = {}
        for name, _, node in self.nodes(root):
            c = node.content
            assert c is not None and c.digest is not None, name
            name = check_path(name, self.what)
            if name in out:
                raise UnsafeLayer(f"{self.what or 'the model'}: the name {name!r} is used twice")
            out[name] = ViewFile(name, c.digest, c.size, bool(node.mode & 0o111))
        return [out[k] for k in sorted(out)]
