"""The tree of names a model's layers make: directories, files, links, and image changesets.

This module owns the in-memory tree the unpacker builds from tar members and file layers:
which name is a directory, a regular file (its :class:`Content`: size, and its blob once
committed), a link or a special file; links followed as inside a container (at most
:data:`MAX_LINK_HOPS`); the rules that a model makes each name once while an image layer
replaces what lower layers made, with whiteouts and opaque directories.  It never reads a
layer, writes a byte or decides what the view shows: it refuses clashing names with
:class:`~nekko_sm.errors.UnsafeLayer` and otherwise only records.
"""

from __future__ import annotations

from collections.abc import Iterator

from nekko_sm.errors import UnsafeLayer

MAX_LINK_HOPS = 40  # as Linux's MAXSYMLINKS

DIR, REGULAR, LINK, SPECIAL = "dir", "file", "link", "special"


class Content:
    """A regular file's bytes: known once committed; ``member`` finds it again in its layer."""

    __slots__ = ("digest", "layer", "member", "size")

    def __init__(self, size: int, layer: int, member: int, digest: str | None = None) -> None:
        self.digest = digest
        self.size = size
        self.layer = layer
        self.member = member


class Node:
    __slots__ = ("children", "content", "kind", "layer", "mode", "target")

    def __init__(
        self,
        kind: str,
        layer: int,
        mode: int = 0o644,
        content: Content | None = None,
        target: str | None = None,
    ) -> None:
        self.kind = kind
        self.layer = layer
        self.mode = mode
        self.content = content
        self.target = target
        self.children: dict[str, Node] = {}  # a directory's; empty for the rest


def join_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Tree:
    """Names -> nodes.  ``rootfs``: image semantics (later layers replace, links in parents
    are followed inside the file system); otherwise every name is made once."""

    def __init__(self, rootfs: bool, what: str = "") -> None:
        self.root = Node(DIR, -1, 0o755)
        self.rootfs = rootfs
        self.what = what or "the model"

    # -- lookups -------------------------------------------------------------------------
    def get(self, path: str) -> Node | None:
        node: Node | None = self.root
        for part in path.split("/") if path else []:
            if node is None or node.kind != DIR:
                return None
            node = node.children.get(part)
        return node

    def resolve(
        self, path: str, follow_last: bool = True, hops: int = 0
    ) -> tuple[str, Node | None]:
        """``path`` with every link followed (absolute targets from the root, ``..`` stopping
        at the root, as inside a container).  Returns (resolved path, node or None)."""
        parts = [p for p in path.split("/") if p]
        done: list[str] = []
        node = self.root
        while parts:
            part = parts.pop(0)
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                node = self.get("/".join(done)) or self.root
                continue
            if node.kind != DIR:
                return "/".join(done + [part] + parts), None
            child = node.children.get(part)
            if child is None:
                return "/".join(done + [part] + parts), None
            if child.kind == LINK and (parts or follow_last):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise UnsafeLayer(
                        f"{self.what}: too many levels of links at {'/'.join(done + [part])!r}"
                    )
                target = child.target or ""
                base: list[str] = [] if target.startswith("/") else list(done)
                parts = [p for p in target.split("/") if p] + parts
                done = base
                node = self.get("/".join(done)) or self.root
                continue
            done.append(part)
            node = child
        return "/".join(done), node

    # -- changes -------------------------------------------------------------------------
    def parent_dir(self, path: str, layer: int, what: str) -> tuple[str, Node]:
        """The directory node ``path`` goes in (made when missing), and its resolved path."""
        parent, _, _ = path.rpartition("/")
        node = self.root
        done = ""
        for part in parent.split("/") if parent else []:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = Node(DIR, layer, 0o755)
            elif child.kind == LINK and self.rootfs:
                resolved, target = self.resolve(join_path(done, part))
                if target is None or target.kind != DIR:
                    raise UnsafeLayer(
                        f"{what}: {path!r} is under {join_path(done, part)!r}, a link"
                        " to no directory"
                    )
                done, node = resolved, target
                continue
            elif child.kind != DIR:
                kind = {LINK: "a link", SPECIAL: "a special file"}.get(child.kind, "a file")
                raise UnsafeLayer(
                    f"{what}: {join_path(done, part)!r} is {kind} and the directory of {path!r}"
                )
            done = join_path(done, part)
            node = child
        return done, node

    def put(self, path: str, new: Node, what: str) -> str:
        """Add ``new`` at ``path``; returns where it went (links in parents followed)."""
        parent_path, parent = self.parent_dir(path, new.layer, what)
        leaf = path.rpartition("/")[2]
        where = join_path(parent_path, leaf)
        old = parent.children.get(leaf)
        if old is None:
            parent.children[leaf] = new
        elif old.kind == DIR and new.kind == DIR:
            old.mode = new.mode  # a directory entry again: its attributes, its children kept
            if self.rootfs:
                old.layer = new.layer
        elif not self.rootfs or self._made_in(old, new.layer):
            # Model layers make every name once; an image layer, once per layer.
            if old.kind == DIR or new.kind == DIR:
                raise UnsafeLayer(f"{what}: {where!r} is both a file and a directory")
            raise UnsafeLayer(
                f"{what}: the name {where!r} is used twice"
                + (" in one layer" if self.rootfs else "")
            )
        else:
            parent.children[leaf] = new  # replaces a lower layer's
        return where

    def _made_in(self, node: Node, layer: int) -> bool:
        """Whether ``node`` or anything under it was made by ``layer``."""
        if node.layer == layer:
            return True
        return any(self._made_in(c, layer) for c in node.children.values())

    def _hide(self, node: Node, layer: int) -> Node | None:
        """``node`` without what lower layers made (None when nothing of ``layer`` is left)."""
        if node.kind != DIR:
            return node if node.layer == layer else None
        kept = {}
        for name, child in node.children.items():
            c = self._hide(child, layer)
            if c is not None:
                kept[name] = c
        if node.layer != layer and not kept:
            return None
        node.children = kept
        return node

    def whiteout(self, path: str, layer: int, what: str) -> None:
        """``.wh.NAME``: hide ``path`` as lower layers made it."""
        parent_path, _, leaf = path.rpartition("/")
        _, parent = self.resolve(parent_path)
        if parent is None or parent.kind != DIR or leaf not in parent.children:
            return  # nothing to hide: valid, and common
        kept = self._hide(parent.children[leaf], layer)
        if kept is None:
            del parent.children[leaf]
        else:
            parent.children[leaf] = kept

    def opaque(self, path: str, layer: int) -> None:
        """``DIR/.wh..wh..opq``: hide every child of ``path`` that lower layers made."""
        _, node = self.resolve(path)
        if node is None or node.kind != DIR:
            return
        for name in list(node.children):
            kept = self._hide(node.children[name], layer)
            if kept is None:
                del node.children[name]
            else:
                node.children[name] = kept

    def walk(self, node: Node | None = None, prefix: str = "") -> Iterator[tuple[str, Node]]:
        node = node or self.root
        for name in sorted(node.children):
            child = node.children[name]
            path = join_path(prefix, name)
            yield path, child
            if child.kind == DIR:
                yield from self.walk(child, path)
