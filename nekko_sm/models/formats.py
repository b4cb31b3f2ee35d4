"""Which packaging a manifest is, and what each of its layers becomes (DESIGN section 8).

:func:`plan` reads an image manifest (and, for KitOps, its config) and returns a
:class:`ModelPlan`: the entry's ``format`` and, per layer, one :class:`LayerPlan` saying
whether the layer IS a file of the model (and its name in the view), is a tar to unpack (and
where its paths go), must be sniffed from its first bytes, or is not part of the model.

The names are the ones each packaging's own tools give the files (docs/model-formats.md says
where each rule comes from):

* ``modelpack``: ``org.cncf.model.filepath`` (older ``org.cnai.model.filepath``), else the
  title; tar layers hold paths relative to the model's root, as modctl writes them.
* ``docker-model``: v0.2 by ``org.cncf.model.filepath``; v0.1 by media type and order, as
  Docker Model Runner's bundle names them (``model.gguf`` or ``model-00001-of-0000N.gguf``,
  ``model.mmproj``, ``template.jinja``, ``LICENSE``); ``.dir.tar`` layers unpack at the root.
* ``kitops``: the paths inside its tar layers (relative to the Kitfile's directory; a ModelKit
  made before the Kitfile recorded layer digests holds paths relative to the layer path's
  parent, which :func:`plan` puts back).
* ``ollama``: by role (``model.gguf``, ``projector.gguf``, ``adapter.gguf``, ``template``, …).
* ``image``: the root file system after the layers, in order, with whiteouts; the view is its
  ``models/`` directory when it has one (KServe modelcars).
* ``artifact``: the title; an ORAS directory layer (``io.deis.oras.content.unpack``) is a tar
  whose paths already start with the title.

Nothing here reads blobs; :func:`sniff` judges the first bytes a caller hands it.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from nekko_sm.errors import ManifestInvalid, UnsafeLayer, UnsafeName
from nekko_sm.refs import safe_name

MODELPACK = "modelpack"
DOCKER_MODEL = "docker-model"
KITOPS = "kitops"
OLLAMA = "ollama"
IMAGE = "image"
ARTIFACT = "artifact"
FORMATS = (MODELPACK, DOCKER_MODEL, KITOPS, OLLAMA, IMAGE, ARTIFACT)

# What a layer plan asks the unpacker to do.
FILE = "file"    # the layer's bytes are one file of the model, as they are
TAR = "tar"      # the layer is a tar (maybe compressed): its regular files are the model's
SNIFF = "sniff"  # the manifest does not say: the first bytes decide (see resolve_sniffed)
SKIP = "skip"    # not part of the model (e.g. Ollama's deprecated embeddings)

# Annotations.
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"
FILEPATH_LEGACY = "org.cnai.model.filepath"
ORAS_UNPACK = "io.deis.oras.content.unpack"

# Media types.
MODELPACK_PREFIXES = ("application/vnd.cncf.model.", "application/vnd.cnai.model.")
DOCKER_CONFIG_PREFIX = "application/vnd.docker.ai.model.config.v0."
DOCKER_CONFIG_V02 = "application/vnd.docker.ai.model.config.v0.2+json"
DOCKER_GGUF = "application/vnd.docker.ai.gguf.v3"
DOCKER_LORA = "application/vnd.docker.ai.gguf.v3.lora"
DOCKER_MMPROJ = ("application/vnd.docker.ai.mmproj", "application/vnd.docker.ai.gguf.v3.mmproj")
DOCKER_SAFETENSORS = "application/vnd.docker.ai.safetensors"
DOCKER_DDUF = "application/vnd.docker.ai.dduf"
DOCKER_LICENSE = "application/vnd.docker.ai.license"
DOCKER_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"
DOCKER_FILE = "application/vnd.docker.ai.model.file"
DOCKER_DIR_TAR = "application/vnd.docker.ai.dir.tar"
DOCKER_VLLM_TAR = "application/vnd.docker.ai.vllm.config.tar"
KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
OLLAMA_PREFIX = "application/vnd.ollama.image."
IMAGE_CONFIGS = ("application/vnd.oci.image.config.v1+json",
                 "application/vnd.docker.container.image.v1+json")

_KITOPS_LAYER = re.compile(r"^application/vnd\.kitops\.modelkit\.(\w+)\.v1\.tar(?:\+(\w+))?$")
_TAR_TYPE = re.compile(r"\.tar(?:$|[+.])")
_SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_NOT_WEIGHTS = re.compile(r"^(?:projector|adapter|draft|lora)\b|mmproj", re.IGNORECASE)

MAX_COMPONENT = 255   # bytes in one path component (NAME_MAX)
MAX_PATH = 4096       # bytes in a whole path (PATH_MAX)
MAX_DEPTH = 256       # directories in a path: far beyond any model, well within recursion


# --------------------------------------------------------------------------------------------
# names


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
        raise UnsafeLayer(f"{where}file name {name[:80]!r}... is nested deeper than {MAX_DEPTH}"
                          " directories")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            raise UnsafeLayer(f"{where}file name component {part[:60]!r}... is longer than"
                              f" {MAX_COMPONENT} bytes")
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


# --------------------------------------------------------------------------------------------
# is this a tar?


def _base(media_type: object) -> str:
    return str(media_type or "").split(";")[0].strip().lower()


def says_tar(media_type: str, annotations: dict | None = None) -> bool:
    """True when the media type or annotations say the layer is a tar: ``….tar``,
    ``….tar+gzip``, ``….tar+zstd``, Docker's ``….tar.gzip`` and ``.dir.tar``, or the ORAS
    unpack annotation.  (ORAS also labels raw files ``…layer.v1.tar``: :func:`plan` names a
    titled ORAS layer without the unpack annotation a file, whatever its type says.)"""
    if (annotations or {}).get(ORAS_UNPACK) == "true":
        return True
    return bool(_TAR_TYPE.search(_base(media_type)))


def media_compression(media_type: str) -> str | None:
    """What the media type says the bytes are compressed with: ``gzip``, ``zstd`` or None."""
    mt = _base(media_type)
    if mt.endswith(("+gzip", ".gzip", ".gz", "+gz")):
        return "gzip"
    if mt.endswith(("+zstd", ".zstd", ".zst")):
        return "zstd"
    return None


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


# --------------------------------------------------------------------------------------------
# plans


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


def detect_format(manifest: dict) -> str:
    """The ``format`` of an image manifest (DESIGN section 8's table)."""
    if not isinstance(manifest, dict) or isinstance(manifest.get("manifests"), list):
        raise ManifestInvalid("an index is not one model: pick one of its manifests first")
    artifact_type = _base(manifest.get("artifactType"))
    config = manifest.get("config")
    config_type = _base(config.get("mediaType") if isinstance(config, dict) else None)
    layers = [d for d in manifest.get("layers") or [] if isinstance(d, dict)]
    if artifact_type.startswith(MODELPACK_PREFIXES) or config_type.startswith(MODELPACK_PREFIXES):
        return MODELPACK
    if config_type.startswith(DOCKER_CONFIG_PREFIX):
        return DOCKER_MODEL
    if config_type == KITOPS_CONFIG:
        return KITOPS
    if any(_base(d.get("mediaType")).startswith(OLLAMA_PREFIX) for d in layers):
        return OLLAMA
    if config_type in IMAGE_CONFIGS and not artifact_type:
        return IMAGE
    return ARTIFACT


def plan(manifest: dict, config: bytes | None = None) -> ModelPlan:
    """The :class:`ModelPlan` for ``manifest``.  ``config`` (the config blob's bytes) is read
    only for KitOps, whose Kitfile says which layers predate layer paths in the tar."""
    fmt = detect_format(manifest)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ManifestInvalid("a manifest without 'layers'")
    descs = [_Desc.of(i, d) for i, d in enumerate(layers)]
    if fmt == MODELPACK:
        plans = [_modelpack(d) for d in descs]
    elif fmt == DOCKER_MODEL:
        plans = _docker(descs, _base((manifest.get("config") or {}).get("mediaType")))
    elif fmt == KITOPS:
        plans = _kitops(descs, config)
    elif fmt == OLLAMA:
        plans = _ollama(descs)
    elif fmt == IMAGE:
        plans = [_image(d) for d in descs]
    else:
        plans = [_artifact(d) for d in descs]
    _check_unique(plans)
    return ModelPlan(fmt, tuple(plans), rootfs=fmt == IMAGE)


def resolve_sniffed(layer: LayerPlan, head: bytes) -> LayerPlan:
    """A :data:`SNIFF` layer made definite by its first bytes: a tar (compressed or not) is
    unpacked at the model's root, anything else is a file (``layer.name`` or ``sha256-HEX``)."""
    if layer.kind != SNIFF:
        return layer
    kind = sniff(head)
    if kind in ("gzip", "zstd", "tar"):
        return replace(layer, kind=TAR, compression=None if kind == "tar" else kind)
    return replace(layer, kind=FILE, name=layer.name or digest_name(layer.digest))


# --------------------------------------------------------------------------------------------
# per format


@dataclass(frozen=True)
class _Desc:
    index: int
    digest: str
    size: int
    media_type: str
    annotations: dict
    raw: dict

    @classmethod
    def of(cls, index: int, d: object) -> _Desc:
        if not isinstance(d, dict):
            raise ManifestInvalid(f"layer {index} is not an object")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ManifestInvalid(f"layer {index} has an unsupported digest {str(digest)[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalid(f"layer {index} ({digest}) has a bad size {size!r}")
        ann = d.get("annotations")
        return cls(index, digest, size, str(d.get("mediaType") or ""),
                   dict(ann) if isinstance(ann, dict) else {}, d)

    @property
    def what(self) -> str:
        return f"layer {self.index} ({self.digest})"

    def layer(self, kind: str, name: str | None = None, **kw: object) -> LayerPlan:
        if name is not None:
            name = check_path(name, self.what)
        return LayerPlan(self.index, self.digest, self.size, self.media_type, kind, name,
                         **kw)  # type: ignore[arg-type]

    def tar(self, prefix: str = "", within: str | None = None, role: str | None = None
            ) -> LayerPlan:
        return self.layer(TAR, prefix=check_path(prefix, self.what) if prefix else "",
                          within=check_path(within, self.what) if within else None,
                          compression=media_compression(self.media_type), role=role)


def _modelpack(d: _Desc) -> LayerPlan:
    ann = d.annotations
    name = ann.get(FILEPATH) or ann.get(FILEPATH_LEGACY) or ann.get(TITLE)
    role = _modelpack_role(d.media_type)
    if says_tar(d.media_type, ann):
        return d.tar(role=role)
    if name or _base(d.media_type).startswith(MODELPACK_PREFIXES):
        return d.layer(FILE, name or digest_name(d.digest), role=role)
    return d.layer(SNIFF, None, role=role)


def _modelpack_role(media_type: str) -> str | None:
    m = re.match(r"^application/vnd\.cn(?:cf|ai)\.model\.([a-z.]+?)\.v\d", _base(media_type))
    return m.group(1) if m else None


def _docker(descs: list, config_type: str) -> list:
    v02 = config_type == DOCKER_CONFIG_V02
    gguf = [d for d in descs if _base(d.media_type) == DOCKER_GGUF]
    safetensors = [d for d in descs if _base(d.media_type) == DOCKER_SAFETENSORS]
    seen: dict[str, int] = {}
    out = []
    for d in descs:
        mt = _base(d.media_type)
        path = d.annotations.get(FILEPATH)
        if mt in (DOCKER_DIR_TAR, DOCKER_VLLM_TAR) or says_tar(mt, d.annotations):
            out.append(d.tar(role="dir" if mt == DOCKER_DIR_TAR else "config"))
            continue
        if v02 and path:
            out.append(d.layer(FILE, path, role=_docker_role(mt)))
            continue
        if mt == DOCKER_GGUF:
            name = _sharded("model", "gguf", gguf.index(d), len(gguf))
        elif mt == DOCKER_SAFETENSORS:
            name = path or _sharded("model", "safetensors", safetensors.index(d),
                                    len(safetensors))
        elif mt in DOCKER_MMPROJ:
            name = "model.mmproj"
        elif mt == DOCKER_TEMPLATE:
            name = "template.jinja"
        elif mt == DOCKER_LICENSE:
            name = "LICENSE"
        elif mt == DOCKER_LORA:
            name = "adapter.gguf"
        elif mt == DOCKER_DDUF:
            name = path or "model.dduf"
        elif path or d.annotations.get(TITLE):
            name = path or d.annotations[TITLE]
        else:
            out.append(d.layer(SNIFF, None))
            continue
        seen[name] = seen.get(name, 0) + 1
        out.append(d.layer(FILE, numbered(name, seen[name]), role=_docker_role(mt)))
    return out


def _docker_role(mt: str) -> str | None:
    return mt.rsplit(".", 1)[-1] if mt.startswith("application/vnd.docker.ai.") else None


def _sharded(stem: str, ext: str, i: int, n: int) -> str:
    return f"{stem}.{ext}" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"


def _kitops(descs: list, config: bytes | None) -> list:
    kit: dict = {}
    if config:
        try:
            doc = json.loads(config)
            kit = doc if isinstance(doc, dict) else {}
        except ValueError:
            kit = {}
    model = kit.get("model") if isinstance(kit.get("model"), dict) else None
    entries: dict[str, list] = {
        "model": [model] if model and model.get("path") and not _kit_reference(model["path"])
        else [],
        "modelpart": _dicts((model or {}).get("parts")),
        "code": _dicts(kit.get("code")),
        "dataset": _dicts(kit.get("datasets")),
        "docs": _dicts(kit.get("docs")),
    }
    used: dict[str, int] = {}
    out = []
    for d in descs:
        m = _KITOPS_LAYER.match(_base(d.media_type))
        if not m:
            out.append(_artifact(d))
            continue
        base = m.group(1)
        i = used.get(base, 0)
        used[base] = i + 1
        listed = entries.get(base, [])
        entry = listed[i] if i < len(listed) else None
        prefix = ""
        if entry is not None and not entry.get("digest"):
            # Older ModelKits: the tar holds paths relative to the layer path's parent.
            path = entry.get("path")
            if isinstance(path, str) and path.strip("./"):
                prefix = posixpath.dirname(check_path(path, d.what))
        out.append(d.tar(prefix=prefix, role=base))
    return out


def _dicts(value: object) -> list:
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _kit_reference(path: object) -> bool:
    """A Kitfile model path that names another ModelKit (registry/repo:tag), not a file."""
    return isinstance(path, str) and bool(re.match(r"^[\w.-]+(?::\d+)?/[^\s]+[:@][\w.:-]+$", path)) \
        and not path.startswith(".")


_OLLAMA_ROLES = {
    "model": "model.gguf",
    "projector": "projector.gguf",
    "adapter": "adapter.gguf",
    "draft": "draft.gguf",
    "template": "template",
    "prompt": "template",
    "system": "system",
    "params": "params",
    "license": "license",
    "messages": "messages",
}
_OLLAMA_SKIP = {"embed"}  # deprecated since 0.1.2; ollama ignores them


def _ollama(descs: list) -> list:
    seen: dict[str, int] = {}
    out = []
    for d in descs:
        mt = _base(d.media_type)
        if not mt.startswith(OLLAMA_PREFIX):
            out.append(_artifact(d))
            continue
        role = mt[len(OLLAMA_PREFIX):]
        named = d.raw.get("name")
        if isinstance(named, str) and named:
            out.append(d.layer(FILE, named, role=role))  # tensor/json layers name themselves
            continue
        if role in _OLLAMA_SKIP:
            out.append(d.layer(SKIP, role=role))
            continue
        name = _OLLAMA_ROLES.get(role, role)
        seen[name] = seen.get(name, 0) + 1
        out.append(d.layer(FILE, numbered(name, seen[name]), role=role))
    return out


def _image(d: _Desc) -> LayerPlan:
    if says_tar(d.media_type, d.annotations):
        return d.tar(role="rootfs")
    return d.layer(SNIFF, None, role="rootfs")


def _artifact(d: _Desc) -> LayerPlan:
    ann = d.annotations
    title = ann.get(TITLE)
    if ann.get(ORAS_UNPACK) == "true":
        return d.tar(within=title or None, role="directory")
    if title:
        return d.layer(FILE, title)
    if says_tar(d.media_type, ann):
        return d.tar()
    return d.layer(SNIFF, None)


def _check_unique(plans: list) -> None:
    names: dict[str, LayerPlan] = {}
    for lp in plans:
        if lp.kind != FILE:
            continue
        other = names.get(lp.name)
        if other is not None:
            raise UnsafeLayer(f"layers {other.index} and {lp.index} are both named {lp.name!r}")
        names[lp.name] = lp
    for name in names:
        parent = posixpath.dirname(name)
        while parent:
            if parent in names:
                raise UnsafeLayer(f"{parent!r} is both a file and the directory of {name!r}")
            parent = posixpath.dirname(parent)
