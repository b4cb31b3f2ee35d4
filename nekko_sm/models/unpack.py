"""Turn a model's layers into named files, each regular file its own blob (DESIGN section 8).

:func:`materialize` takes a :class:`~nekko_sm.models.plans.ModelPlan` and a way to open each
layer's bytes, and returns the model's files: ``name -> (digest, size, executable)``.

* A layer that is a file as it is needs no work: its blob is the file.
* A tar layer is streamed (plain; gzip from the standard library; zstd where the interpreter
  has ``compression.zstd``, else :class:`UnsupportedLayer` naming the layer) and every
  regular file in it is committed through the store's writer, hashed while it is written,
  never held whole in memory (files up to :data:`SMALL` bytes are read whole and stored with
  ``put_small``, which skips the write when the blob is already there and needs no ingest
  directory, lock or thread; ``blobs/`` is fsynced once at the end).  The same bytes from
  anywhere (a safetensors shard from the Hub and from a registry) are one blob.
* Image layers (``plan.rootfs``) are applied in order as changesets: whiteouts ``.wh.NAME``
  and opaque ``.wh..wh..opq`` hide what lower layers made; the view is ``models/`` when the
  result has it.  Files outside the view are not stored: when the view turns out to be the
  whole file system, the layers that hold its files are read a second time.

Names are hostile until checked (:func:`nekko_sm.models.paths.check_path`): absolute paths,
``..``, links that leave the model, devices and FIFOs, duplicate names, a name used as a file
and as a directory, components over 255 bytes and names that are not UTF-8 are refused with
:class:`UnsafeLayer` (400).  Nothing is written anywhere but the store's ingest and blobs:
names only ever become entries of the returned list.  A link to another file of the model
becomes that file's blob under the link's name; a link to a directory lists its files again.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import posixpath
import stat
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Protocol

from nekko_sm.errors import BrokenLayer, Cancelled, UnsafeLayer, UnsupportedLayer
from nekko_sm.models.paths import check_path, choose_model
from nekko_sm.models.plans import (
    FILE,
    SKIP,
    SNIFF,
    TAR,
    LayerPlan,
    ModelPlan,
    resolve_sniffed,
    sniff,
)

CHUNK = 1 << 20
COPY = 16 << 20  # bytes of an uncompressed tar's member copied in the kernel at a time
SMALL = 1 << 20  # read whole and stored with put_bytes (no write when already present)
MAX_LINK_HOPS = 40  # as Linux's MAXSYMLINKS
MAX_FILES = 1_000_000  # a link to a directory lists its files again: bound the listing
VIEW = "models"  # an image's model directory (KServe modelcars, RamaLama)

_DIR, _FILE, _LINK, _SPECIAL = "dir", "file", "link", "special"


@dataclass(frozen=True)
class ViewFile:
    """One file of the model: its name in the view, its blob, and whether it is executable."""

    name: str
    digest: str
    size: int
    executable: bool = False


@dataclass
class UnpackResult:
    files: list  # [ViewFile], sorted by name
    model: str | None  # the view name of the GGUF file llama.cpp loads, if there is one
    view_root: str = ""  # the directory of the layers' file system the view shows ("models")
    unpacked: list = field(default_factory=list)  # digests of the tar layers read


Opener = Callable[[LayerPlan], BinaryIO]


class _Cancel:
    def is_set(self) -> bool:
        return False


# --------------------------------------------------------------------------------------------
# the tree of names


class _Content:
    """A regular file's bytes: known once committed; ``member`` finds it again in its layer."""

    __slots__ = ("digest", "layer", "member", "size")

    def __init__(self, size: int, layer: int, member: int, digest: str | None = None) -> None:
        self.digest = digest
        self.size = size
        self.layer = layer
        self.member = member


class _Node:
    __slots__ = ("children", "content", "kind", "layer", "mode", "target")

    def __init__(self, kind: str, layer: int, mode: int = 0o644,
                 content: _Content | None = None, target: str | None = None) -> None:
        self.kind = kind
        self.layer = layer
        self.mode = mode
        self.content = content
        self.target = target
        self.children: dict[str, _Node] = {}  # a directory's; empty for the rest


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class _Tree:
    """Names -> nodes.  ``rootfs``: image semantics (later layers replace, links in parents
    are followed inside the file system); otherwise every name is made once."""

    def __init__(self, rootfs: bool, what: str = "") -> None:
        self.root = _Node(_DIR, -1, 0o755)
        self.rootfs = rootfs
        self.what = what or "the model"

    # -- lookups -------------------------------------------------------------------------
    def get(self, path: str) -> _Node | None:
        node: _Node | None = self.root
        for part in path.split("/") if path else []:
            if node is None or node.kind != _DIR:
                return None
            node = node.children.get(part)
        return node

    def resolve(self, path: str, follow_last: bool = True, hops: int = 0
                ) -> tuple[str, _Node | None]:
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
            if node.kind != _DIR:
                return "/".join(done + [part] + parts), None
            child = node.children.get(part)
            if child is None:
                return "/".join(done + [part] + parts), None
            if child.kind == _LINK and (parts or follow_last):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise UnsafeLayer(f"{self.what}: too many levels of links at"
                                      f" {'/'.join(done + [part])!r}")
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
    def parent_dir(self, path: str, layer: int, what: str) -> tuple[str, _Node]:
        """The directory node ``path`` goes in (made when missing), and its resolved path."""
        parent, _, _ = path.rpartition("/")
        node = self.root
        done = ""
        for part in parent.split("/") if parent else []:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Node(_DIR, layer, 0o755)
            elif child.kind == _LINK and self.rootfs:
                resolved, target = self.resolve(_join(done, part))
                if target is None or target.kind != _DIR:
                    raise UnsafeLayer(f"{what}: {path!r} is under {_join(done, part)!r}, a link"
                                      " to no directory")
                done, node = resolved, target
                continue
            elif child.kind != _DIR:
                kind = {_LINK: "a link", _SPECIAL: "a special file"}.get(child.kind, "a file")
                raise UnsafeLayer(f"{what}: {_join(done, part)!r} is {kind} and the directory"
                                  f" of {path!r}")
            done = _join(done, part)
            node = child
        return done, node

    def put(self, path: str, new: _Node, what: str) -> str:
        """Add ``new`` at ``path``; returns where it went (links in parents followed)."""
        parent_path, parent = self.parent_dir(path, new.layer, what)
        leaf = path.rpartition("/")[2]
        where = _join(parent_path, leaf)
        old = parent.children.get(leaf)
        if old is None:
            parent.children[leaf] = new
        elif old.kind == _DIR and new.kind == _DIR:
            old.mode = new.mode  # a directory entry again: its attributes, its children kept
            if self.rootfs:
                old.layer = new.layer
        elif not self.rootfs or self._made_in(old, new.layer):
            # Model layers make every name once; an image layer, once per layer.
            if old.kind == _DIR or new.kind == _DIR:
                raise UnsafeLayer(f"{what}: {where!r} is both a file and a directory")
            raise UnsafeLayer(f"{what}: the name {where!r} is used twice"
                              + (" in one layer" if self.rootfs else ""))
        else:
            parent.children[leaf] = new  # replaces a lower layer's
        return where

    def _made_in(self, node: _Node, layer: int) -> bool:
        """Whether ``node`` or anything under it was made by ``layer``."""
        if node.layer == layer:
            return True
        return any(self._made_in(c, layer) for c in node.children.values())

    def _hide(self, node: _Node, layer: int) -> _Node | None:
        """``node`` without what lower layers made (None when nothing of ``layer`` is left)."""
        if node.kind != _DIR:
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
        if parent is None or parent.kind != _DIR or leaf not in parent.children:
            return  # nothing to hide: valid, and common
        kept = self._hide(parent.children[leaf], layer)
        if kept is None:
            del parent.children[leaf]
        else:
            parent.children[leaf] = kept

    def opaque(self, path: str, layer: int) -> None:
        """``DIR/.wh..wh..opq``: hide every child of ``path`` that lower layers made."""
        _, node = self.resolve(path)
        if node is None or node.kind != _DIR:
            return
        for name in list(node.children):
            kept = self._hide(node.children[name], layer)
            if kept is None:
                del node.children[name]
            else:
                node.children[name] = kept

    def walk(self, node: _Node | None = None, prefix: str = "") -> Iterator[tuple[str, _Node]]:
        node = node or self.root
        for name in sorted(node.children):
            child = node.children[name]
            path = _join(prefix, name)
            yield path, child
            if child.kind == _DIR:
                yield from self.walk(child, path)


# --------------------------------------------------------------------------------------------
# reading tars


class _Prefixed(io.RawIOBase):
    """The first bytes already read, then the rest of ``raw``."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = memoryview(head)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def,override]
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._raw.read(len(b))
        b[:len(data)] = data
        return len(data)


def _read_head(raw: BinaryIO, n: int = 512) -> bytes:
    parts = []
    got = 0
    while got < n:
        chunk = raw.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def zstd_reader(raw: BinaryIO, what: str) -> BinaryIO:
    """A decompressing reader of zstd ``raw``, or :class:`UnsupportedLayer` naming ``what``."""
    try:
        zstd = importlib.import_module("compression.zstd")  # the standard library from 3.14
    except ImportError:
        raise UnsupportedLayer(
            f"{what} is compressed with zstd, which this Python"
            f" ({sys.version.split()[0]}) cannot read: run nekko-sm with Python 3.14 or later,"
            " or push the model with gzip or uncompressed layers") from None
    return zstd.ZstdFile(raw, mode="rb")  # type: ignore[no-any-return]


def _decompressed(raw: BinaryIO, what: str) -> BinaryIO:
    """``raw`` decompressed as its first bytes say (gzip, zstd or none)."""
    head = _read_head(raw)
    kind = sniff(head)
    stream = io.BufferedReader(_Prefixed(head, raw), CHUNK)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        return zstd_reader(stream, what)  # type: ignore[arg-type]
    return stream  # type: ignore[return-value]


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _plain_file(raw: BinaryIO) -> int | None:
    """The descriptor of ``raw`` when it is a regular file at its start holding an
    uncompressed tar (whose members' bytes can then be copied in the kernel), else None."""
    try:
        fd = raw.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not raw.seekable() or raw.tell() != 0:
            return None
    except (AttributeError, OSError, ValueError):
        return None
    wait = getattr(raw, "wait_for", None)  # a layer still downloading (store.ingest.Follower)
    if wait is not None:
        wait(512)
    return fd if sniff(os.pread(fd, 512, 0)) in ("tar", "unknown") else None


class _Members:
    """The members of a tar stream, in order, each with its index; memory stays flat.

    ``direct`` is the descriptor of an uncompressed tar on a file (read with seeks, its
    members' bytes copied by offset), else None (a stream, decompressed as it is read).
    """

    def __init__(self, raw: BinaryIO, what: str) -> None:
        self.what = what
        self.direct = _plain_file(raw)
        self.wait_for: Callable[[int], None] = getattr(raw, "wait_for", lambda end: None)
        try:
            if self.direct is not None:
                self.tar = tarfile.open(fileobj=raw, mode="r:",  # noqa: SIM115
                                        encoding="utf-8", errors="surrogateescape")
            else:
                self.tar = tarfile.open(fileobj=_decompressed(raw, what), mode="r|",  # noqa: SIM115
                                        bufsize=CHUNK, encoding="utf-8",
                                        errors="surrogateescape")
        except _READ_ERRORS as e:
            raise BrokenLayer(f"{what} is not a readable tar: {e}") from None

    def __iter__(self) -> Iterator[tuple[int, tarfile.TarInfo]]:
        i = 0
        while True:
            try:
                member = self.tar.next()
            except _READ_ERRORS as e:
                raise BrokenLayer(f"{self.what} is not a readable tar: {e}") from None
            if member is None:
                return
            self.tar.members = []  # type: ignore[attr-defined]  # it keeps every one it saw
            yield i, member
            i += 1

    def reader(self, member: tarfile.TarInfo) -> BinaryIO:
        f = self.tar.extractfile(member)
        assert f is not None
        return f  # type: ignore[return-value]

    def read(self, f: BinaryIO, n: int) -> bytes:
        try:
            return f.read(n)
        except _READ_ERRORS as e:
            raise BrokenLayer(f"{self.what} is not a readable tar: {e}") from None


# --------------------------------------------------------------------------------------------
# the unpacker


class _Unpacker:
    def __init__(self, store, plan: ModelPlan, open_layer: Opener, lease, cancel,  # type: ignore[no-untyped-def]
                 what: str, on_bytes: Callable[[int], None] | None) -> None:
        self.store = store
        self.plan = plan
        self.open_layer = open_layer
        self.lease = lease
        self.cancel = cancel or _Cancel()
        self.what = what
        self.on_bytes = on_bytes
        self.tree = _Tree(plan.rootfs, what)
        self.unpacked: list[str] = []
        self.small = False  # small files were stored: blobs/ wants one fsync at the end

    def layer_what(self, lp: LayerPlan) -> str:
        lead = f"{self.what}: " if self.what else ""
        return f"{lead}layer {lp.index} ({lp.digest})"

    def run(self) -> UnpackResult:
        for lp in self.plan.layers:
            self._check_cancel()
            self.add_layer(lp)
        view_root = self._view_root()
        self._fill_pending(view_root)
        files = self._files(view_root)
        if self.small:
            self.store.sync_blobs()  # their renames, once for all, before anyone names them
        return UnpackResult(files, choose_model(f.name for f in files), view_root,
                            self.unpacked)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"unpacking {self.what or 'the model'} was cancelled")

    # -- layers --------------------------------------------------------------------------
    def add_layer(self, lp: LayerPlan) -> None:
        what = self.layer_what(lp)
        if lp.kind == SKIP:
            return
        if lp.kind == FILE:
            self._add_file_layer(lp, what)
            return
        source = raw = self.open_layer(lp)
        try:
            if lp.kind == SNIFF:
                head = _read_head(raw)
                lp = resolve_sniffed(lp, head)
                if lp.kind == FILE:
                    self._add_file_layer(lp, what)
                    return
                raw = io.BufferedReader(_Prefixed(head, raw), CHUNK)  # type: ignore[assignment]
            if lp.kind != TAR:  # pragma: no cover - plans only make the kinds above
                raise AssertionError(lp.kind)
            self._add_tar(lp, raw, what)
            self.unpacked.append(lp.digest)
        finally:
            source.close()

    def _add_file_layer(self, lp: LayerPlan, what: str) -> None:
        if self.plan.rootfs:
            raise UnsupportedLayer(f"{what} ({lp.media_type or 'no media type'}) is not a tar:"
                                   " an image layer must be one")
        content = _Content(lp.size, lp.index, -1, lp.digest)
        self.tree.put(lp.name or "", _Node(_FILE, lp.index, 0o644, content), what)

    def _add_tar(self, lp: LayerPlan, raw: BinaryIO, what: str) -> None:
        members = _Members(raw, what)
        rootfs = self.plan.rootfs
        for i, m in members:
            self._check_cancel()
            name = self._name(m, lp, what)
            if name is None:
                continue
            if rootfs:
                base = posixpath.basename(name)
                if base.startswith(".wh."):
                    self._whiteout(name, lp.index, what)
                    continue
            node = self._node(m, i, lp, name, what)
            where = self.tree.put(name, node, what)
            if m.isreg() and (not rootfs or where == VIEW or where.startswith(VIEW + "/")):
                assert node.content is not None
                node.content.digest = self._commit(members, m, lp, i)

    def _name(self, m: tarfile.TarInfo, lp: LayerPlan, what: str) -> str | None:
        raw = m.name
        if raw.strip("/") in ("", ".") or raw in ("./",):
            if m.isdir():
                return None  # the root directory itself
            raise UnsafeLayer(f"{what}: an entry of type {m.type!r} has no name")
        name = check_path(raw, what)
        if lp.within and name != lp.within and not name.startswith(lp.within + "/"):
            raise UnsafeLayer(f"{what}: {name!r} is outside the layer's directory"
                              f" {lp.within!r}")
        return _join(lp.prefix, name) if lp.prefix else name

    def _whiteout(self, name: str, layer: int, what: str) -> None:
        parent, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            self.tree.opaque(parent, layer)
        elif base.startswith(".wh..wh."):
            pass  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not a whiteout
        elif base == ".wh.":
            raise BrokenLayer(f"{what}: a whiteout {name!r} without a name to hide")
        else:
            self.tree.whiteout(_join(parent, base[len(".wh."):]), layer, what)

    def _node(self, m: tarfile.TarInfo, i: int, lp: LayerPlan, name: str, what: str) -> _Node:
        mode = m.mode & 0o7777
        if m.isdir():
            return _Node(_DIR, lp.index, mode)
        if m.issym():
            target = m.linkname
            if not self.plan.rootfs:
                self._check_link_target(name, target, lp, what)
            return _Node(_LINK, lp.index, mode, target=target)
        if m.islnk():
            return self._hardlink(m, lp, name, what)
        if m.isreg():
            if m.issparse():
                raise UnsafeLayer(f"{what}: {name!r} is a sparse file, which is not supported")
            return _Node(_FILE, lp.index, mode, _Content(m.size, lp.index, i))
        kind = "a device" if (m.ischr() or m.isblk()) else "a FIFO" if m.isfifo() else \
            f"of unknown type {m.type!r}"
        if not self.plan.rootfs:
            raise UnsafeLayer(f"{what}: {name!r} is {kind}: a model holds files only")
        return _Node(_SPECIAL, lp.index, mode, target=kind)

    def _check_link_target(self, name: str, target: str, lp: LayerPlan, what: str) -> None:
        if not target or "\x00" in target:
            raise UnsafeLayer(f"{what}: link {name!r} has no target")
        if target.startswith("/"):
            raise UnsafeLayer(f"{what}: link {name!r} -> {target!r} leaves the model"
                              " (absolute target)")
        joined = posixpath.normpath(_join(posixpath.dirname(name), target))
        if joined == ".." or joined.startswith("../"):
            raise UnsafeLayer(f"{what}: link {name!r} -> {target!r} leaves the model")
        top = _join(lp.prefix, lp.within) if lp.within and lp.prefix else lp.within
        if top and joined != top and not joined.startswith(top + "/"):
            raise UnsafeLayer(f"{what}: link {name!r} -> {target!r} leaves the layer's"
                              f" directory {top!r}")

    def _hardlink(self, m: tarfile.TarInfo, lp: LayerPlan, name: str, what: str) -> _Node:
        raw = m.linkname
        if self.plan.rootfs:
            target = check_path(raw.lstrip("/"), what)  # inside an image, "/" is its root
        else:
            target = check_path(raw, what)
            if lp.within and target != lp.within and not target.startswith(lp.within + "/"):
                raise UnsafeLayer(f"{what}: hard link {name!r} -> {raw!r} leaves the layer's"
                                  f" directory {lp.within!r}")
            if lp.prefix:
                target = _join(lp.prefix, target)
        _, node = self.tree.resolve(target, follow_last=False)
        if node is None or node.kind == _DIR:
            raise UnsafeLayer(f"{what}: hard link {name!r} -> {raw!r} names no file of the"
                              " model before it")
        return _Node(node.kind, lp.index, m.mode & 0o7777, node.content, node.target)

    def _commit(self, members: _Members, m: tarfile.TarInfo, lp: LayerPlan, i: int) -> str:
        f = members.reader(m)
        if m.size <= SMALL:
            data = members.read(f, m.size + 1)
            if len(data) != m.size:
                raise BrokenLayer(f"{members.what}: {m.name!r} is shorter than its header says")
            digest = self.store.put_small(data, self.lease)
            self.small = True
            self._count(len(data))
            return digest  # type: ignore[no-any-return]
        with self.store.writer(f"unpack:{lp.digest}:{i}", m.size, self.cancel) as w:
            if w.offset:
                w.reset()  # a partial from an interrupted unpack: the tar is read again anyway
            if members.direct is not None:  # an uncompressed tar on disk: by offset
                if m.offset_data + m.size > lp.size:
                    raise BrokenLayer(f"{members.what}: {m.name!r} is shorter than its"
                                      " header says")
                done = 0
                while done < m.size:
                    n = min(COPY, m.size - done)
                    members.wait_for(m.offset_data + done + n)  # still downloading
                    w.copy_from(members.direct, m.offset_data + done, n)
                    self._count(n)
                    done += n
                return w.commit(None, self.lease).digest  # type: ignore[no-any-return]
            while True:
                chunk = members.read(f, CHUNK)
                if not chunk:
                    break
                w.write(chunk)
                self._count(len(chunk))
            return w.commit(None, self.lease).digest  # type: ignore[no-any-return]

    def _count(self, n: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(n)

    # -- the view -----------------------------------------------------------------------
    def _view_root(self) -> str:
        if not self.plan.rootfs:
            return ""
        resolved, node = self.tree.resolve(VIEW)
        return resolved if node is not None and node.kind == _DIR else ""

    def _in_view(self, path: str, root: str) -> bool:
        return not root or path == root or path.startswith(root + "/")

    def _fill_pending(self, root: str) -> None:
        """Image layers: store the files of the view that the first reading left out."""
        if not self.plan.rootfs:
            return
        wanted: dict[int, dict[int, _Content]] = {}
        for _, path, node in self._view_nodes(root):
            c = node.content
            if node.kind == _FILE and c is not None and c.digest is None:
                wanted.setdefault(c.layer, {})[c.member] = c
        for lp in self.plan.layers:
            todo = wanted.get(lp.index)
            if not todo:
                continue
            what = self.layer_what(lp)
            raw = self.open_layer(lp)
            try:
                members = _Members(raw, what)
                for i, m in members:
                    c = todo.pop(i, None)
                    if c is not None:
                        self._check_cancel()
                        c.digest = self._commit(members, m, lp, i)
                    if not todo:
                        break
            finally:
                raw.close()
            if todo:
                raise BrokenLayer(f"{what} changed between two readings")

    def _view_nodes(self, root: str) -> Iterator[tuple[str, str, _Node]]:
        """(name in the view, path in the tree, node) of every file the view shows; links
        resolved to what they name."""
        base = self.tree.get(root) if root else self.tree.root
        if base is None:
            return
        count = 0
        for path, node in self.tree.walk(base, root):
            name = path[len(root) + 1:] if root else path
            if node.kind == _DIR:
                continue
            if node.kind == _SPECIAL:
                if self._whole_image(root):
                    continue  # /dev/null of an ordinary image: nothing an engine opens
                raise UnsafeLayer(f"{self.what or 'the model'}: {path!r} is {node.target}:"
                                  " a model holds files only")
            if node.kind == _LINK:
                for sub, spath, snode in self._through_link(path, root, 0):
                    count += 1
                    yield _join(name, sub) if sub else name, spath, snode
            else:
                count += 1
                yield name, path, node
            if count > MAX_FILES:
                raise UnsafeLayer(f"{self.what or 'the model'} lists more than {MAX_FILES}"
                                  " files (links to directories?)")

    def _whole_image(self, root: str) -> bool:
        """The view is an ordinary image's whole file system (no ``models/``): its dangling
        links (``/etc/mtab``), links to devices and looping links (Debian's
        ``/usr/bin/X11 -> .``) are left out of the view instead of refusing the image."""
        return self.plan.rootfs and not root

    def _through_link(self, path: str, root: str, depth: int
                      ) -> Iterator[tuple[str, str, _Node]]:
        try:
            yield from self._link_files(path, root, depth)
        except UnsafeLayer:
            if not self._whole_image(root):
                raise

    def _link_files(self, path: str, root: str, depth: int
                    ) -> Iterator[tuple[str, str, _Node]]:
        who = self.what or "the model"
        resolved, node = self.tree.resolve(path)
        link = self.tree.get(path)
        target = link.target if link is not None else None
        if node is None:
            raise UnsafeLayer(f"{who}: link {path!r} -> {target!r} names nothing in the model")
        if not self._in_view(resolved, root):
            raise UnsafeLayer(f"{who}: link {path!r} -> {target!r} leaves the model")
        if node.kind == _FILE:
            yield "", resolved, node
            return
        if node.kind == _SPECIAL:
            raise UnsafeLayer(f"{who}: link {path!r} names {node.target}")
        # a directory: its files again, under the link's name
        if resolved == root or path == resolved or path.startswith(resolved + "/") or \
                depth >= MAX_LINK_HOPS:
            raise UnsafeLayer(f"{who}: link {path!r} -> {target!r} loops")
        for sub, child in self.tree.walk(node, resolved):
            rel = sub[len(resolved) + 1:]
            if child.kind == _FILE:
                yield rel, sub, child
            elif child.kind == _LINK:
                for sub2, spath, snode in self._through_link(sub, root, depth + 1):
                    yield _join(rel, sub2) if sub2 else rel, spath, snode
            elif child.kind == _SPECIAL:
                raise UnsafeLayer(f"{who}: {sub!r} is {child.target}: a model holds files only")

    def _files(self, root: str) -> list:
        out: dict[str, ViewFile] = {}
        for name, _, node in self._view_nodes(root):
            c = node.content
            assert c is not None and c.digest is not None, name
            name = check_path(name, self.what)
            if name in out:
                raise UnsafeLayer(f"{self.what or 'the model'}: the name {name!r} is used twice")
            out[name] = ViewFile(name, c.digest, c.size, bool(node.mode & 0o111))
        return [out[k] for k in sorted(out)]


class Stop(Protocol):
    """What a cancel signal must do: a threading.Event, or anything that says so."""

    def is_set(self) -> bool: ...


def materialize(store, plan: ModelPlan, open_layer: Opener, lease,  # type: ignore[no-untyped-def]
                cancel: Stop | None = None, what: str = "",
                on_bytes: Callable[[int], None] | None = None) -> UnpackResult:
    """The files of the model ``plan`` describes, every one a committed blob.

    ``open_layer(layer_plan)`` returns a binary file object of that layer's bytes (already
    verified: normally ``open(store.blob_path(digest), "rb")``); it is called once per tar
    layer (twice for an image whose view needs files the first reading left out).  Every
    digest committed is added to ``lease``.  ``what`` (the entry's URL) prefixes messages;
    ``on_bytes(n)`` counts bytes unpacked.
    """
    return _Unpacker(store, plan, open_layer, lease, cancel, what, on_bytes).run()
