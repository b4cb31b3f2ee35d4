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
  whole file system, the layers that hold its files are read a second time.  Until a layer
  has made ``models/``, every file is stored on that guess (an ordinary image, whose view
  is everything, is then read once); what was stored and the view does not show (the guess
  wrong, a file hidden later) is returned as ``spare``, for the caller to free once its
  lease is gone.

Names are hostile until checked (:func:`nekko_sm.models.paths.check_path`): absolute paths,
``..``, links that leave the model, devices and FIFOs, duplicate names, a name used as a file
and as a directory, components over 255 bytes and names that are not UTF-8 are refused with
:class:`UnsafeLayer` (400).  Nothing is written anywhere but the store's ingest and blobs:
names only ever become entries of the returned list.  A link to another file of the model
becomes that file's blob under the link's name; a link to a directory lists its files again.

This module owns the walk over the layers (each member's name checked and placed, each
regular file in the view committed); reading a layer as a tar is
:mod:`nekko_sm.models.tarstream`, the tree of names :mod:`nekko_sm.models.tree`, and what
the view lists :mod:`nekko_sm.models.view`.  It never writes outside the store's ingest and
blobs, and never talks to the network.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
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
)
from nekko_sm.models.tarstream import CHUNK, Members, Prefixed, read_head
from nekko_sm.models.tree import DIR, LINK, REGULAR, SPECIAL, Content, Node, Tree, join_path
from nekko_sm.models.view import VIEW, View

COPY = 16 << 20  # bytes of an uncompressed tar's member copied in the kernel at a time
SMALL = 1 << 20  # read whole and stored with put_bytes (no write when already present)


@dataclass
class UnpackResult:
    files: list  # [ViewFile], sorted by name
    model: str | None  # the view name of the GGUF file llama.cpp loads, if there is one
    view_root: str = ""  # the directory of the layers' file system the view shows ("models")
    unpacked: list = field(default_factory=list)  # digests of the tar layers read
    spare: list = field(default_factory=list)  # blobs stored on a guess the view does not use


Opener = Callable[[LayerPlan], BinaryIO]


class _Cancel:
    def is_set(self) -> bool:
        return False


class _Unpacker:
    def __init__(
        self,
        store,
        plan: ModelPlan,
        open_layer: Opener,
        lease,
        cancel,  # type: ignore[no-untyped-def]
        what: str,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.open_layer = open_layer
        self.lease = lease
        self.cancel = cancel or _Cancel()
        self.what = what
        self.on_bytes = on_bytes
        self.tree = Tree(plan.rootfs, what)
        self.view = View(self.tree, plan.rootfs, what)
        self.unpacked: list[str] = []
        self.small = False  # small files were stored: blobs/ wants one fsync at the end
        self.stored: list[str] = []  # image layers: what was stored, in the view or not

    def layer_what(self, lp: LayerPlan) -> str:
        lead = f"{self.what}: " if self.what else ""
        return f"{lead}layer {lp.index} ({lp.digest})"

    def run(self) -> UnpackResult:
        for lp in self.plan.layers:
            self._check_cancel()
            self.add_layer(lp)
        view_root = self.view.root()
        self._fill_pending(view_root)
        files = self.view.files(view_root)
        if self.small:
            self.store.sync_blobs()  # their renames, once for all, before anyone names them
        spare = sorted(set(self.stored) - {f.digest for f in files})
        model = choose_model(f.name for f in files)
        return UnpackResult(files, model, view_root, self.unpacked, spare)

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
                head = read_head(raw)
                lp = resolve_sniffed(lp, head)
                if lp.kind == FILE:
                    self._add_file_layer(lp, what)
                    return
                raw = io.BufferedReader(Prefixed(head, raw), CHUNK)  # type: ignore[assignment]
            if lp.kind != TAR:  # pragma: no cover - plans only make the kinds above
                raise AssertionError(lp.kind)
            self._add_tar(lp, raw, what)
            self.unpacked.append(lp.digest)
        finally:
            source.close()

    def _add_file_layer(self, lp: LayerPlan, what: str) -> None:
        if self.plan.rootfs:
            raise UnsupportedLayer(
                f"{what} ({lp.media_type or 'no media type'}) is not a tar:"
                " an image layer must be one"
            )
        content = Content(lp.size, lp.index, -1, lp.digest)
        self.tree.put(lp.name or "", Node(REGULAR, lp.index, 0o644, content), what)

    def _add_tar(self, lp: LayerPlan, raw: BinaryIO, what: str) -> None:
        members = Members(raw, what)
        rootfs = self.plan.rootfs
        guess = rootfs and not self.view.root()  # no models/ yet: the view may be everything
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
            in_view = where == VIEW or where.startswith(VIEW + "/")
            guess = guess and not in_view  # models/ now exists: the view is it
            if m.isreg() and (not rootfs or in_view or guess):
                assert node.content is not None
                node.content.digest = self._commit(members, m, lp, i)
                if rootfs:
                    self.stored.append(node.content.digest)

    def _name(self, m: tarfile.TarInfo, lp: LayerPlan, what: str) -> str | None:
        raw = m.name
        if raw.strip("/") in ("", ".") or raw in ("./",):
            if m.isdir():
                return None  # the root directory itself
            raise UnsafeLayer(f"{what}: an entry of type {m.type!r} has no name")
        name = check_path(raw, what)
        if lp.within and name != lp.within and not name.startswith(lp.within + "/"):
            raise UnsafeLayer(f"{what}: {name!r} is outside the layer's directory {lp.within!r}")
        return join_path(lp.prefix, name) if lp.prefix else name

    def _whiteout(self, name: str, layer: int, what: str) -> None:
        parent, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            self.tree.opaque(parent, layer)
        elif base.startswith(".wh..wh."):
            pass  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not a whiteout
        elif base == ".wh.":
            raise BrokenLayer(f"{what}: a whiteout {name!r} without a name to hide")
        else:
            self.tree.whiteout(join_path(parent, base[len(".wh.") :]), layer, what)

    def _node(self, m: tarfile.TarInfo, i: int, lp: LayerPlan, name: str, what: str) -> Node:
        mode = m.mode & 0o7777
        if m.isdir():
            return Node(DIR, lp.index, mode)
        if m.issym():
            target = m.linkname
            if not self.plan.rootfs:
                self._check_link_target(name, target, lp, what)
            return Node(LINK, lp.index, mode, target=target)
        if m.islnk():
            return self._hardlink(m, lp, name, what)
        if m.isreg():
            if m.issparse():
                raise UnsafeLayer(f"{what}: {name!r} is a sparse file, which is not supported")
            return Node(REGULAR, lp.index, mode, Content(m.size, lp.index, i))
        kind = (
            "a device"
            if (m.ischr() or m.isblk())
            else "a FIFO"
            if m.isfifo()
            else f"of unknown type {m.type!r}"
        )
        if not self.plan.rootfs:
            raise UnsafeLayer(f"{what}: {name!r} is {kind}: a model holds files only")
        return Node(SPECIAL, lp.index, mode, target=kind)

    def _check_link_target(self, name: str, target: str, lp: LayerPlan, what: str) -> None:
        if not target or "\x00" in target:
            raise UnsafeLayer(f"{what}: link {name!r} has no target")
        if target.startswith("/"):
            raise UnsafeLayer(
                f"{what}: link {name!r} -> {target!r} leaves the model (absolute target)"
            )
        joined = posixpath.normpath(join_path(posixpath.dirname(name), target))
        if joined == ".." or joined.startswith("../"):
            raise UnsafeLayer(f"{what}: link {name!r} -> {target!r} leaves the model")
        top = join_path(lp.prefix, lp.within) if lp.within and lp.prefix else lp.within
        if top and joined != top and not joined.startswith(top + "/"):
            raise UnsafeLayer(
                f"{what}: link {name!r} -> {target!r} leaves the layer's directory {top!r}"
            )

    def _hardlink(self, m: tarfile.TarInfo, lp: LayerPlan, name: str, what: str) -> Node:
        raw = m.linkname
        if self.plan.rootfs:
            target = check_path(raw.lstrip("/"), what)  # inside an image, "/" is its root
        else:
            target = check_path(raw, what)
            if lp.within and target != lp.within and not target.startswith(lp.within + "/"):
                raise UnsafeLayer(
                    f"{what}: hard link {name!r} -> {raw!r} leaves the layer's"
                    f" directory {lp.within!r}"
                )
            if lp.prefix:
                target = join_path(lp.prefix, target)
        _, node = self.tree.resolve(target, follow_last=False)
        if node is None or node.kind == DIR:
            raise UnsafeLayer(
                f"{what}: hard link {name!r} -> {raw!r} names no file of the model before it"
            )
        return Node(node.kind, lp.index, m.mode & 0o7777, node.content, node.target)

    def _commit(self, members: Members, m: tarfile.TarInfo, lp: LayerPlan, i: int) -> str:
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
                    raise BrokenLayer(f"{members.what}: {m.name!r} is shorter than its header says")
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
    def _fill_pending(self, root: str) -> None:
        """Image layers: store the files of the view that the first reading left out."""
        if not self.plan.rootfs:
            return
        wanted: dict[int, dict[int, Content]] = {}
        for _, path, node in self.view.nodes(root):
            c = node.content
            if node.kind == REGULAR and c is not None and c.digest is None:
                wanted.setdefault(c.layer, {})[c.member] = c
        for lp in self.plan.layers:
            if wanted.get(lp.index):
                self._fill_layer(lp, wanted[lp.index])

    def _fill_layer(self, lp: LayerPlan, todo: dict[int, Content]) -> None:
        what = self.layer_what(lp)
        raw = self.open_layer(lp)
        try:
            members = Members(raw, what)
            for i, m in members:
                c = todo.pop(i, None)
                if c is not None:
                    self._check_cancel()
                    if not m.isreg() or m.size != c.size:
                        raise BrokenLayer(f"{what} changed between two readings")
                    c.digest = self._commit(members, m, lp, i)
                if not todo:
                    break
        finally:
            raw.close()
        if todo:
            raise BrokenLayer(f"{what} changed between two readings")


class Stop(Protocol):
    """What a cancel signal must do: a threading.Event, or anything that says so."""

    def is_set(self) -> bool: ...


def materialize(
    store,
    plan: ModelPlan,
    open_layer: Opener,
    lease,  # type: ignore[no-untyped-def]
    cancel: Stop | None = None,
    what: str = "",
    on_bytes: Callable[[int], None] | None = None,
) -> UnpackResult:
    """The files of the model ``plan`` describes, every one a committed blob.

    ``open_layer(layer_plan)`` returns a binary file object of that layer's bytes (already
    verified: normally ``open(store.blob_path(digest), "rb")``); it is called once per tar
    layer (twice for an image whose view needs files the first reading left out).  Every
    digest committed is added to ``lease``.  ``what`` (the entry's URL) prefixes messages;
    ``on_bytes(n)`` counts bytes unpacked.
    """
    return _Unpacker(store, plan, open_layer, lease, cancel, what, on_bytes).run()
