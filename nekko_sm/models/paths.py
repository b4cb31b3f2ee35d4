"""Names of files inside a model: the checks every name passes, and the names plans give.

This module owns what a file name inside a model may be (:func:`check_path`: a safe relative
POSIX path, valid UTF-8, within the NAME_MAX/PATH_MAX/depth bounds), the names a layer gets
when its packaging gives none (:func:`digest_name`, :func:`numbered`) and which file of a
model an engine loads (:func:`choose_model`).  It only judges strings: it never reads a
manifest, a blob or the file system.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable

from nekko_sm.errors import UnsafeLayer, UnsafeName
from nekko_sm.refs import safe_name

_SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_NOT_WEIGHTS = re.compile(r"^(?:projector|adapter|draft|lora)\b|mmproj", re.IGNORECASE)

MAX_COMPONENT = 255  # bytes in one path component (NAME_MAX)
MAX_PATH = 4096  # bytes in a whole path (PATH_MAX)
MAX_DEPTH = 256  # directories in a path: far beyond any model, well within recursion


def check_path(name: object, what: str = "") -> str:
    """``name`` as a safe relative POSIX path inside the model, or :class:`UnsafeLayer`.

    On top of :func:`nekko_sm.refs.safe_name` (no absolute paths, no ``..``, no control
    characters): valid UTF-8 only, no component over 255 bytes, no path over 4096 bytes or
    256 levels deep.
    ``what`` names where the name came from (a layer) in the message.
    """
    where = f"{what}: " if what else ""
    if not isinstance(name, str):
        raise UnsafeLayer(f"{where}a file name is not a string: {name!r:.80}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeLayer(f"{where}file name {name!r:.120} is not valid UTF-8") from None
    try:
        clean = safe_name(name)
    except UnsafeName as e:
        raise UnsafeLayer(f"{where}{e.message}") from None
    if len(encoded) > MAX_PATH:
        raise UnsafeLayer(f"{where}file name {name[:80]!r}... is longer than {MAX_PATH} bytes")
    parts = clean.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafeLayer(
            f"{where}file name {name[:80]!r}... is nested deeper than {MAX_DEPTH} directories"
        )
    for part in parts:
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            raise UnsafeLayer(
                f"{where}file name component {part[:60]!r}... is longer than {MAX_COMPONENT} bytes"
            )
    return clean


def digest_name(digest: str) -> str:
    """The name a layer with no name of its own gets: ``sha256-HEX`` (as oci.py names them)."""
    return digest.replace(":", "-")


def numbered(name: str, n: int) -> str:
    """The ``n``-th file of one role: ``license``, ``license-2``; ``a.gguf``, ``a-2.gguf``."""
    if n <= 1:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or "/" in ext:
        return f"{name}-{n}"
    return f"{stem}-{n}.{ext}"


def choose_model(names: Iterable[str]) -> str | None:
    """The view name of the file llama.cpp loads, or None when there is not exactly one.

    A ``.gguf`` file that is not a projector, adapter, LoRA or draft model; of a split model
    (``NAME-00001-of-0000N.gguf`` …) its first shard.  Several distinct models (a repository
    of many quantisations) name none.
    """
    models: dict[tuple, str] = {}
    for name in names:
        base = posixpath.basename(name)
        if not base.lower().endswith(".gguf") or _NOT_WEIGHTS.search(base):
            continue
        m = _SPLIT_GGUF.match(base)
        if m:
            key: tuple = (posixpath.dirname(name), m.group("stem"), int(m.group("total")))
            if int(m.group("part")) == 1:
                models[key] = name
            else:
                models.setdefault(key, "")
        else:
            models[(name,)] = name
    found = [n for n in models.values() if n]
    return found[0] if len(found) == 1 and len(models) == 1 else None
