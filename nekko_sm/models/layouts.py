"""How each packaging names its layers: ModelPack, Docker model-spec, KitOps, Ollama, images.

This module owns the media types and annotations of each packaging and, per format, the rule
that turns a manifest's layer descriptors into :class:`~nekko_sm.models.plans.LayerPlan` s
(the names each packaging's own tools give the files; docs/model-formats.md says where each
rule comes from), plus the check that no two planned files clash.  It never decides which
packaging a manifest is (:mod:`nekko_sm.models.formats` does, and calls the rule) and never
reads a blob: a KitOps config arrives as bytes.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass

from nekko_sm.errors import ManifestInvalid, UnsafeLayer
from nekko_sm.models.paths import check_path, digest_name, numbered
from nekko_sm.models.plans import FILE, SKIP, SNIFF, TAR, LayerPlan

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
IMAGE_CONFIGS = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)

_KITOPS_LAYER = re.compile(r"^application/vnd\.kitops\.modelkit\.(\w+)\.v1\.tar(?:\+(\w+))?$")
_TAR_TYPE = re.compile(r"\.tar(?:$|[+.])")


def base_type(media_type: object) -> str:
    return str(media_type or "").split(";")[0].strip().lower()


def says_tar(media_type: str, annotations: dict | None = None) -> bool:
    """True when the media type or annotations say the layer is a tar: ``….tar``,
    ``….tar+gzip``, ``….tar+zstd``, Docker's ``….tar.gzip`` and ``.dir.tar``, or the ORAS
    unpack annotation.  (ORAS also labels raw files ``…layer.v1.tar``: :func:`artifact_layer`
    names a titled ORAS layer without the unpack annotation a file, whatever its type says.)"""
    if (annotations or {}).get(ORAS_UNPACK) == "true":
        return True
    return bool(_TAR_TYPE.search(base_type(media_type)))


def media_compression(media_type: str) -> str | None:
    """What the media type says the bytes are compressed with: ``gzip``, ``zstd`` or None."""
    mt = base_type(media_type)
    if mt.endswith(("+gzip", ".gzip", ".gz", "+gz")):
        return "gzip"
    if mt.endswith(("+zstd", ".zstd", ".zst")):
        return "zstd"
    return None


@dataclass(frozen=True)
class Desc:
    index: int
    digest: str
    size: int
    media_type: str
    annotations: dict
    raw: dict

    @classmethod
    def of(cls, index: int, d: object) -> Desc:
        if not isinstance(d, dict):
            raise ManifestInvalid(f"layer {index} is not an object")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ManifestInvalid(f"layer {index} has an unsupported digest {str(digest)[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalid(f"layer {index} ({digest}) has a bad size {size!r}")
        ann = d.get("annotations")
        return cls(
            index,
            digest,
            size,
            str(d.get("mediaType") or ""),
            dict(ann) if isinstance(ann, dict) else {},
            d,
        )

    @property
    def what(self) -> str:
        return f"layer {self.index} ({self.digest})"

    def layer(self, kind: str, name: str | None = None, **kw: object) -> LayerPlan:
        if name is not None:
            name = check_path(name, self.what)
        return LayerPlan(self.index, self.digest, self.size, self.media_type, kind, name, **kw)  # type: ignore[arg-type]

    def tar(
        self, prefix: str = "", within: str | None = None, role: str | None = None
    ) -> LayerPlan:
        return self.layer(
            TAR,
            prefix=check_path(prefix, self.what) if prefix else "",
            within=check_path(within, self.what) if within else None,
            compression=media_compression(self.media_type),
            role=role,
        )


def modelpack_layer(d: Desc) -> LayerPlan:
    ann = d.annotations
    name = ann.get(FILEPATH) or ann.get(FILEPATH_LEGACY) or ann.get(TITLE)
    role = _modelpack_role(d.media_type)
    if says_tar(d.media_type, ann):
        return d.tar(role=role)
    if name or base_type(d.media_type).startswith(MODELPACK_PREFIXES):
        return d.layer(FILE, name or digest_name(d.digest), role=role)
    return d.layer(SNIFF, None, role=role)


def _modelpack_role(media_type: str) -> str | None:
    m = re.match(r"^application/vnd\.cn(?:cf|ai)\.model\.([a-z.]+?)\.v\d", base_type(media_type))
    return m.group(1) if m else None


def docker_layers(descs: list, config_type: str) -> list:
    v02 = config_type == DOCKER_CONFIG_V02
    gguf = [d for d in descs if base_type(d.media_type) == DOCKER_GGUF]
    safetensors = [d for d in descs if base_type(d.media_type) == DOCKER_SAFETENSORS]
    seen: dict[str, int] = {}
    out = []
    for d in descs:
        mt = base_type(d.media_type)
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
            name = path or _sharded("model", "safetensors", safetensors.index(d), len(safetensors))
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


def kitops_layers(descs: list, config: bytes | None) -> list:
    kit: dict = {}
    if config:
        try:
            doc = json.loads(config)
            kit = doc if isinstance(doc, dict) else {}
        except ValueError:
            kit = {}
    model = kit.get("model") if isinstance(kit.get("model"), dict) else None
    entries: dict[str, list] = {
        "model": [model]
        if model and model.get("path") and not _kit_reference(model["path"])
        else [],
        "modelpart": _dicts((model or {}).get("parts")),
        "code": _dicts(kit.get("code")),
        "dataset": _dicts(kit.get("datasets")),
        "docs": _dicts(kit.get("docs")),
    }
    used: dict[str, int] = {}
    out = []
    for d in descs:
        m = _KITOPS_LAYER.match(base_type(d.media_type))
        if not m:
            out.append(artifact_layer(d))
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
    return (
        isinstance(path, str)
        and bool(re.match(r"^[\w.-]+(?::\d+)?/[^\s]+[:@][\w.:-]+$", path))
        and not path.startswith(".")
    )


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


def ollama_layers(descs: list) -> list:
    seen: dict[str, int] = {}
    out = []
    for d in descs:
        mt = base_type(d.media_type)
        if not mt.startswith(OLLAMA_PREFIX):
            out.append(artifact_layer(d))
            continue
        role = mt[len(OLLAMA_PREFIX) :]
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


def image_layer(d: Desc) -> LayerPlan:
    if says_tar(d.media_type, d.annotations):
        return d.tar(role="rootfs")
    return d.layer(SNIFF, None, role="rootfs")


def artifact_layer(d: Desc) -> LayerPlan:
    ann = d.annotations
    title = ann.get(TITLE)
    if ann.get(ORAS_UNPACK) == "true":
        return d.tar(within=title or None, role="directory")
    if title:
        return d.layer(FILE, title)
    if says_tar(d.media_type, ann):
        return d.tar()
    return d.layer(SNIFF, None)


def check_unique(plans: list) -> None:
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
