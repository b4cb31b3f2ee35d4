"""OCI manifests and indexes as a registry serves them: checks, descriptors, platform choice.

This module owns what a manifest or index must be before anything is stored (its bytes
match the digest asked for and the ``Docker-Content-Digest`` served; JSON; an OCI or Docker
v2 media type, schema 1 refused; every descriptor a sha256 digest and a whole size; layer
titles safe and distinct), the ``Accept`` header and size bounds of a manifest request, and
which image of an index a platform runs (exact variants first, older ARM variants after;
attestations never).  It never sends a request, never stores a byte and never reads a blob:
callers hand it what a registry answered.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from nekko_sm.config import Platform, normalize_arch, parse_platform
from nekko_sm.errors import BadRequest, IntegrityError, ManifestInvalid
from nekko_sm.httpio import sanitise
from nekko_sm.refs import safe_name
from nekko_sm.sources.base import Job, shown_name
from nekko_sm.store import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    TITLE,
    Descriptor,
    sha256_digest,
)

log = logging.getLogger("nekko_sm.oci")

ACCEPT = f"{MT_OCI_INDEX}, {MT_OCI_MANIFEST}, {MT_DOCKER_LIST}, {MT_DOCKER_MANIFEST}"
MAX_MANIFEST = 4 << 20
# Distinct manifests one pull may fetch: an index of 20 platforms with attestations needs 40.
MAX_MANIFESTS = 256
_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ATTESTATION = "attestation-manifest"
_OTHER_ALGORITHMS = frozenset({"sha384", "sha512", "blake3"})  # named when refused


@dataclass
class Manifest:
    media_type: str
    digest: str
    data: bytes
    doc: dict

    @property
    def size(self) -> int:
        return len(self.data)


def check_manifest(what: str, reference: str, data: bytes, headers: Mapping[str, str]) -> Manifest:
    """The manifest or index ``reference`` named, from the ``data`` and ``headers`` a
    registry answered, checked (``what`` names it in messages); nothing is stored."""
    digest = sha256_digest(data)
    if reference.startswith("sha256:") and digest != reference:
        raise IntegrityError(
            f"{what}: the registry sent content with digest {digest}; nothing was stored"
        )
    served = (headers.get("Docker-Content-Digest") or "").strip()
    if served.startswith("sha256:") and served != digest:
        raise IntegrityError(
            f"{what}: the registry's Docker-Content-Digest is not the"
            f" digest of its bytes ({digest}); nothing was stored"
        )
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ManifestInvalid(f"{what} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ManifestInvalid(f"{what} is not a JSON object")
    header_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    body_type = doc.get("mediaType")
    if doc.get("schemaVersion") == 1 or body_type in _SCHEMA1 or header_type in _SCHEMA1:
        raise ManifestInvalid(
            f"{what} is a Docker schema 1 manifest, which is deprecated"
            " and not supported: push the image again with a current"
            " tool"
        )
    media_type = body_type if isinstance(body_type, str) and body_type else None
    if media_type is None:
        if header_type in INDEX_TYPES + MANIFEST_TYPES:
            media_type = header_type
        elif isinstance(doc.get("manifests"), list):
            media_type = MT_OCI_INDEX
        elif isinstance(doc.get("config"), dict):
            media_type = MT_OCI_MANIFEST
    if media_type not in INDEX_TYPES + MANIFEST_TYPES:
        log.debug("%s: media type %s", what, sanitise(repr(media_type or header_type)))
        raise ManifestInvalid(
            f"{what} is not an OCI or Docker v2 manifest or index (its"
            " media type is none of theirs)"
        )
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid(f"{what}: its schemaVersion is not 2")
    m = Manifest(media_type, digest, data, doc)
    if media_type in INDEX_TYPES:
        if not isinstance(doc.get("manifests"), list):
            raise ManifestInvalid(f"{what}: an index without 'manifests'")
        for d in doc["manifests"]:
            descriptor(d, what)
    else:
        descriptor(doc.get("config"), what)
        if not isinstance(doc.get("layers"), list):
            raise ManifestInvalid(f"{what}: a manifest without 'layers'")
        names = set()
        for d in doc["layers"]:
            descriptor(d, what)
            title = (d.get("annotations") or {}).get(TITLE)
            if title is not None:
                name = safe_name(title)  # UnsafeName: 400, nothing indexed
                if name in names:
                    raise ManifestInvalid(f"{what}: two layers are titled {shown_name(name)}")
                names.add(name)
    return m


def descriptor(d: object, what: str) -> Descriptor:
    """``d`` as a :class:`Descriptor`, or ManifestInvalid naming ``what``."""
    if not isinstance(d, dict):
        raise ManifestInvalid(f"{what}: a descriptor is not an object")
    digest, size = d.get("digest"), d.get("size")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        algorithm = digest.split(":", 1)[0] if isinstance(digest, str) else ""
        known = f" ({algorithm})" if algorithm in _OTHER_ALGORITHMS else ""
        raise ManifestInvalid(
            f"{what}: a descriptor's digest is not sha256:<64 hex>{known}; only sha256 is supported"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(
            f"{what}: descriptor {digest} has a size that is not a whole number of bytes"
        )
    mt = d.get("mediaType")
    return Descriptor(
        mt if isinstance(mt, str) else "",
        digest,
        size,
        artifact_type=d.get("artifactType"),
        platform=d.get("platform"),
    )


def platform_str(p: Mapping) -> str:
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))


def platforms_shown(manifests: list) -> list[str]:
    """An index's platforms for a message: those that parse (known os and architecture),
    at most 20, and how many others there are -- never the index's own strings as such."""
    valid: set[str] = set()
    others = 0
    for x in manifests:
        if is_attestation(x):
            continue
        try:
            valid.add(str(parse_platform(platform_str(x.get("platform") or {}))))
        except (BadRequest, TypeError, AttributeError):
            others += 1
    shown = sorted(valid)[:20]
    more = len(valid) - len(shown) + others
    return shown + ([f"{more} other{'s' if more > 1 else ''}"] if more else [])


def is_attestation(d: Mapping) -> bool:
    p = d.get("platform") or {}
    ann = d.get("annotations") or {}
    return ann.get("vnd.docker.reference.type") == _ATTESTATION or (
        p.get("os") == "unknown" and p.get("architecture") == "unknown"
    )


def _variant_rank(want: Platform, arch: str, variant: str | None) -> int | None:
    """How well an image of ``arch/variant`` fits ``want`` (0 best), None when it cannot run."""
    if arch != want.architecture:
        return None
    if want.variant == variant:
        return 0
    if want.variant is None:
        return 1  # any variant will do when none was asked for; exact ones first
    if (
        arch == "arm"
        and variant
        and re.fullmatch(r"v\d+", variant)
        and re.fullmatch(r"v\d+", want.variant)
    ):
        have, need = int(variant[1:]), int(want.variant[1:])
        if have <= need:
            return 1 + need - have  # an armv7 host runs v6 and v5 images
    return None


def choose_platform(manifests: list, want: Platform) -> dict | None:
    best: tuple[int, int] | None = None
    chosen = None
    for i, d in enumerate(manifests):
        if is_attestation(d):
            continue
        p = d.get("platform") or {}
        if str(p.get("os", "")).lower() != want.os:
            continue
        arch, variant = normalize_arch(
            str(p.get("architecture", "")), str(p["variant"]).lower() if p.get("variant") else None
        )
        rank = _variant_rank(want, arch, variant)
        if rank is not None and (best is None or (rank, i) < best):
            best, chosen = (rank, i), d
    return chosen


def wanted_platform(job: Job) -> Platform | None:
    if job.platform:
        return None if job.platform.strip().lower() == "all" else parse_platform(job.platform)
    return job.config.default_platform
