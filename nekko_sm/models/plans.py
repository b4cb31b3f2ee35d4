"""The vocabulary of a model's plan: what each layer of a manifest becomes.

This module owns the format names, the four kinds a layer plan can be (:data:`FILE`,
:data:`TAR`, :data:`SNIFF`, :data:`SKIP`), the :class:`LayerPlan` and :class:`ModelPlan`
records the unpacker follows, and the judgement of a blob's first bytes (:func:`sniff`,
:func:`resolve_sniffed`).  It never reads a manifest or a blob itself: callers hand it the
bytes they read, and which packaging a manifest is lives in :mod:`nekko_sm.models.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nekko_sm.models.paths import digest_name

MODELPACK = "modelpack"
DOCKER_MODEL = "docker-model"
KITOPS = "kitops"
OLLAMA = "ollama"
IMAGE = "image"
ARTIFACT = "artifact"
FORMATS = (MODELPACK, DOCKER_MODEL, KITOPS, OLLAMA, IMAGE, ARTIFACT)

# What a layer plan asks the unpacker to do.
FILE = "file"  # the layer's bytes are one file of the model, as they are
TAR = "tar"  # the layer is a tar (maybe compressed): its regular files are the model's
SNIFF = "sniff"  # the manifest does not say: the first bytes decide (see resolve_sniffed)
SKIP = "skip"  # not part of the model (e.g. Ollama's deprecated embeddings)


def sniff(head: bytes) -> str:
    """What the first bytes of a blob are (512 suffice): ``gguf``, ``gzip``, ``zstd``, ``tar``
    (``ustar`` at offset 257, or an all-zero end-of-archive block) or ``unknown``."""
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 512 and not head[:512].strip(b"\0"):
        return "tar"  # an empty archive: its end-of-archive blocks
    return "unknown"


@dataclass(frozen=True)
class LayerPlan:
    """What one layer becomes.

    ``kind`` is :data:`FILE` (``name`` is its view name), :data:`TAR` (its paths go under
    ``prefix``, "" = the model's root; with ``within`` set every path must be that one or
    under it), :data:`SNIFF` (``name``: its name should it be a plain file) or :data:`SKIP`.
    ``compression`` is what the media type says; for tars the bytes have the last word.
    """

    index: int
    digest: str
    size: int
    media_type: str
    kind: str
    name: str | None = None
    prefix: str = ""
    within: str | None = None
    compression: str | None = None
    role: str | None = None


@dataclass(frozen=True)
class ModelPlan:
    """A manifest's ``format`` and the plan for each of its layers, in manifest order.

    ``rootfs``: the layers are image changesets, applied in order with whiteouts; the view is
    the ``models`` directory of the result when it has one, else the whole file system.
    """

    format: str
    layers: tuple
    rootfs: bool = False

    @property
    def files(self) -> list:
        """The layers that are files as they are."""
        return [lp for lp in self.layers if lp.kind == FILE]

    @property
    def tars(self) -> list:
        return [lp for lp in self.layers if lp.kind == TAR]


def resolve_sniffed(layer: LayerPlan, head: bytes) -> LayerPlan:
    """A :data:`SNIFF` layer made definite by its first bytes: a tar (compressed or not) is
    unpacked at the model's root, anything else is a file (``layer.name`` or ``sha256-HEX``)."""
    if layer.kind != SNIFF:
        return layer
    kind = sniff(head)
    if kind in ("gzip", "zstd", "tar"):
        return replace(layer, kind=TAR, compression=None if kind == "tar" else kind)
    return replace(layer, kind=FILE, name=layer.name or digest_name(layer.digest))
