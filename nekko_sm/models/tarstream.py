"""Reading a layer as a tar: decompression by its first bytes, members in order, flat memory.

This module owns how a layer's bytes become tar members: gzip from the standard library,
zstd where the interpreter has ``compression.zstd`` (else
:class:`~nekko_sm.errors.UnsupportedLayer` naming the layer), an uncompressed tar on a
regular file read with seeks so its members' bytes can be copied in the kernel, a layer still
downloading waited for behind its frontier, and every read error reported as
:class:`~nekko_sm.errors.BrokenLayer`.  It never judges names, never keeps members it has
passed and never writes anything.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import stat
import sys
import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO, Callable

from nekko_sm.errors import BrokenLayer, UnsupportedLayer
from nekko_sm.models.plans import sniff

CHUNK = 1 << 20


class Prefixed(io.RawIOBase):
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
        b[: len(data)] = data
        return len(data)


def read_head(raw: BinaryIO, n: int = 512) -> bytes:
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
            " or push the model with gzip or uncompressed layers"
        ) from None
    return zstd.ZstdFile(raw, mode="rb")  # type: ignore[no-any-return]


def _decompressed(raw: BinaryIO, what: str) -> BinaryIO:
    """``raw`` decompressed as its first bytes say (gzip, zstd or none)."""
    head = read_head(raw)
    kind = sniff(head)
    stream = io.BufferedReader(Prefixed(head, raw), CHUNK)
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


class Members:
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
                self.tar = tarfile.open(  # noqa: SIM115 - closed with the members
                    fileobj=raw,
                    mode="r:",
                    encoding="utf-8",
                    errors="surrogateescape",
                )
            else:
                self.tar = tarfile.open(  # noqa: SIM115 - closed with the members
                    fileobj=_decompressed(raw, what),
                    mode="r|",
                    bufsize=CHUNK,
                    encoding="utf-8",
                    errors="surrogateescape",
                )
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
