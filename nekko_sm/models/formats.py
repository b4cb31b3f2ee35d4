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

This module owns the choice of packaging and the entry point; the per-format rules are in
:mod:`nekko_sm.models.layouts`, the plan records and :func:`~nekko_sm.models.plans.sniff` in
:mod:`nekko_sm.models.plans`, the name checks in :mod:`nekko_sm.models.paths`.  It never reads
blobs: a KitOps config arrives as bytes.
"""

from __future__ import annotations

from nekko_sm.errors import ManifestInvalid
from nekko_sm.models.layouts import (
    DOCKER_CONFIG_PREFIX,
    IMAGE_CONFIGS,
    KITOPS_CONFIG,
    MODELPACK_PREFIXES,
    OLLAMA_PREFIX,
    Desc,
    artifact_layer,
    base_type,
    check_unique,
    docker_layers,
    image_layer,
    kitops_layers,
    modelpack_layer,
    ollama_layers,
)
from nekko_sm.models.plans import (
    ARTIFACT,
    DOCKER_MODEL,
    IMAGE,
    KITOPS,
    MODELPACK,
    OLLAMA,
    ModelPlan,
)


def detect_format(manifest: dict) -> str:
    """The ``format`` of an image manifest (DESIGN section 8's table)."""
    if not isinstance(manifest, dict) or isinstance(manifest.get("manifests"), list):
        raise ManifestInvalid("an index is not one model: pick one of its manifests first")
    artifact_type = base_type(manifest.get("artifactType"))
    config = manifest.get("config")
    config_type = base_type(config.get("mediaType") if isinstance(config, dict) else None)
    layers = [d for d in manifest.get("layers") or [] if isinstance(d, dict)]
    if artifact_type.startswith(MODELPACK_PREFIXES) or config_type.startswith(MODELPACK_PREFIXES):
        return MODELPACK
    if config_type.startswith(DOCKER_CONFIG_PREFIX):
        return DOCKER_MODEL
    if config_type == KITOPS_CONFIG:
        return KITOPS
    if any(base_type(d.get("mediaType")).startswith(OLLAMA_PREFIX) for d in layers):
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
    descs = [Desc.of(i, d) for i, d in enumerate(layers)]
    if fmt == MODELPACK:
        plans = [modelpack_layer(d) for d in descs]
    elif fmt == DOCKER_MODEL:
        plans = docker_layers(descs, base_type((manifest.get("config") or {}).get("mediaType")))
    elif fmt == KITOPS:
        plans = kitops_layers(descs, config)
    elif fmt == OLLAMA:
        plans = ollama_layers(descs)
    elif fmt == IMAGE:
        plans = [image_layer(d) for d in descs]
    else:
        plans = [artifact_layer(d) for d in descs]
    check_unique(plans)
    return ModelPlan(fmt, tuple(plans), rootfs=fmt == IMAGE)
