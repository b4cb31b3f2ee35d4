"""OCI registries: manifests, platform choice, blobs, mirrors (DESIGN section 3).

A pull resolves ``oci://REGISTRY/REPO:TAG`` (or ``@sha256:…``) to a manifest, picks the
platform's image from an index (or keeps the whole index with ``--platform all``), then
fetches every config and layer blob the cache does not have yet, ``config.jobs`` at a time.
Manifests are stored byte for byte as served; every blob is verified at commit.

Endpoints: each configured mirror of the registry first (``MIRROR/v2/…?ns=REGISTRY``, as
containerd does), then the registry itself.  Any failure of a mirror falls back to the next
endpoint for the rest of the pull.  The caller's credentials go to the registry and to the
token server its challenge names, never to a mirror or a blob redirect target; how an
endpoint authorises (challenges, tokens) is :mod:`nekko_sm.sources.registry_auth`.

This module owns the pull's plan: the platform's manifest chosen from an index, every
manifest and blob it keeps (bounded by ``--max-pull-files``), the names of the view checked
before a byte is fetched, and the :class:`PullResult`.  Manifests are checked by
:mod:`~nekko_sm.sources.oci_manifests`, fetched with the blobs by
:mod:`~nekko_sm.sources.oci_fetch`, and an image's layers become its files in
:mod:`~nekko_sm.sources.oci_unpack`; this module never sends a request of its own beyond
:func:`confirm_access`'s ``HEAD``, and never touches ``index.json``.
"""

from __future__ import annotations

from nekko_sm.errors import (
    IntegrityError,
    ManifestInvalid,
    NoMatchingPlatform,
    PullTooLarge,
    UnsafeName,
)
from nekko_sm.models import formats
from nekko_sm.refs import OCIRef, safe_name
from nekko_sm.sources.base import FileItem, Job, PullResult, check_names
from nekko_sm.sources.oci_fetch import Puller, registry_scheme
from nekko_sm.sources.oci_manifests import (
    ACCEPT,
    MAX_MANIFESTS,
    Manifest,
    choose_platform,
    descriptor,
    is_attestation,
    platform_str,
    platforms_shown,
    wanted_platform,
)
from nekko_sm.sources.oci_unpack import engine_ready
from nekko_sm.sources.registry_auth import Endpoint
from nekko_sm.store import INDEX_TYPES, MANIFEST_TYPES, TITLE, Descriptor

_MAX_NESTING = 4


def confirm_access(job: Job, ref: OCIRef, digest: str) -> None:
    """May ``job.credentials`` pull ``digest`` from ``ref``'s repository now?  Raise if not.

    One manifest ``HEAD`` by digest in the repository's pull scope, at the registry itself:
    a mirror answering proves nothing about the caller's access to the registry.
    """
    ep = Endpoint(job, ref, f"{registry_scheme(job, ref)}://{ref.api_host}", mirror=False)
    ep.ready()
    url = ep.url(f"{ref.repository}/manifests/{digest}")
    for attempt in (0, 1):
        used = ep.auth
        resp = job.transfer.request("HEAD", url, headers={"Accept": ACCEPT}, auth=used)
        if resp.status == 401 and attempt == 0 and ep.same_origin(resp.url):
            ep.reauthenticate(resp.headers.get("WWW-Authenticate"), used)
            continue
        break
    if resp.status != 200:
        raise ep.errors(resp.status, resp.url, b"", resp.headers)


def pull(job: Job, ref: OCIRef) -> PullResult:
    puller = Puller(job, ref)
    want = wanted_platform(job)
    top = puller.manifest(ref.reference)
    chosen: Manifest = top
    platform: dict | None = None
    if top.media_type in INDEX_TYPES and want is not None:
        d = choose_platform(top.doc["manifests"], want)
        if d is None:
            available = platforms_shown(top.doc["manifests"])
            raise NoMatchingPlatform(
                f"{ref.canonical} has no image for {want}; available:"
                f" {', '.join(available) or 'none'} (choose one with --platform, or 'all')",
                available=available,
            )
        platform = d.get("platform") or None
        chosen = puller.manifest(d["digest"])
        if chosen.media_type not in MANIFEST_TYPES:
            raise ManifestInvalid(
                f"{ref.canonical}: the index entry for {want} is not an image manifest"
            )
        if chosen.size != d["size"]:
            raise IntegrityError(
                f"{ref.canonical}: manifest {d['digest']} has {chosen.size}"
                f" bytes, the index says {d['size']}"
            )
    if job.digest and job.digest not in (top.digest, chosen.digest):
        raise IntegrityError(
            f"{ref.canonical} resolved to {top.digest}, not the expected"
            f" {job.digest}; nothing was stored"
        )

    # Every manifest to keep (each distinct one once: an index may name one big manifest
    # thousands of times), the blobs they name, once each, and the files of the view.
    limit = job.config.max_pull_files
    manifests: dict[str, Manifest] = {}  # the manifests fetched, by digest
    blobs: dict[str, Descriptor] = {}
    files: list[FileItem] = []
    named: set[tuple[str, str]] = set()
    walked: set[tuple[str, int]] = set()  # (digest, depth) of the manifests walked

    def too_many(what: str) -> PullTooLarge:
        return PullTooLarge(
            f"{ref.canonical} has more than {limit} {what}, the most one pull"
            " may have on this node (--max-pull-files): refused, nothing"
            " fetched"
        )

    def walk(m: Manifest, prefix: str, depth: int, listed: bool = True) -> None:
        if not listed and (m.digest, depth) in walked:
            return  # checked and counted already; it lists no file: nothing new to learn
        walked.add((m.digest, depth))
        manifests.setdefault(m.digest, m)
        if m.media_type in MANIFEST_TYPES:
            if len(m.doc["layers"]) > limit:  # layers per image
                raise PullTooLarge(
                    f"{ref.canonical}: manifest {m.digest} has"
                    f" {len(m.doc['layers'])} layers, more than the {limit} one"
                    " pull may have on this node (--max-pull-files): refused,"
                    " nothing fetched"
                )
            c = descriptor(m.doc["config"], "")
            blobs.setdefault(c.digest, c)
            for layer in m.doc["layers"]:
                d = descriptor(layer, "")
                blobs.setdefault(d.digest, d)
                title = (layer.get("annotations") or {}).get(TITLE)
                name = safe_name(title) if title is not None else d.digest.replace(":", "-")
                if listed and (prefix + name, d.digest) not in named:
                    named.add((prefix + name, d.digest))
                    files.append(
                        FileItem(
                            prefix + name,
                            d.digest,
                            d.size,
                            d.media_type or "application/octet-stream",
                        )
                    )
            if len(blobs) > limit:
                raise too_many("blobs")
            if len(files) > limit:
                raise too_many("files")
            return
        if depth >= _MAX_NESTING:
            raise ManifestInvalid(f"{ref.canonical}: indexes nested too deep")
        children = m.doc["manifests"]
        if len(manifests.keys() | {d["digest"] for d in children}) > MAX_MANIFESTS:
            raise ManifestInvalid(
                f"{ref.canonical} names more than {MAX_MANIFESTS} manifests:"
                " refused, no image needs that many"
            )
        taken: set[str] = set()
        for d in children:
            child = manifests.get(d["digest"]) or puller.manifest(d["digest"])
            if child.size != d["size"]:
                raise IntegrityError(
                    f"{ref.canonical}: manifest {d['digest']} has"
                    f" {child.size} bytes, the index says {d['size']}"
                )
            p = d.get("platform") or {}
            sub = "-".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))
            try:  # the fields come from the registry: they must name one directory
                sub = safe_name(sub) if sub and "/" not in sub else ""
            except UnsafeName:
                sub = ""
            sub = sub or d["digest"][7:19]
            keep = listed and not is_attestation(d) and sub not in taken
            if keep:
                taken.add(sub)  # two images of one platform: the first is the view's
            walk(child, prefix + sub + "/", depth + 1, keep)

    walk(chosen, "", 0)
    # The names the view will get, checked before a single blob byte is fetched.
    check_names((f.name for f in files), ref.canonical)
    image = chosen.media_type in MANIFEST_TYPES
    if image:
        formats.plan(chosen.doc)  # hostile names are refused before a byte is fetched
    # Manifests first (small), leased as they go in; then the blobs, in parallel.
    for m in manifests.values():
        puller.store(m)
    model = engine_ready(job, ref, puller, chosen, files, list(blobs.values())) if image else None
    if not image:
        puller.fetch_blobs(list(blobs.values()))

    artifact_type = chosen.doc.get("artifactType") if chosen.media_type in MANIFEST_TYPES else None
    desc = Descriptor(
        chosen.media_type,
        chosen.digest,
        chosen.size,
        artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        platform=platform,
    )
    result = PullResult(
        manifest=desc,
        digest=top.digest,
        files=files,
        platform=platform_str(platform) if platform else None,
    )
    if model is not None:
        result.files, result.format, result.model, result.files_manifest, result.unpacked = model
    return result


__all__ = ["confirm_access", "pull"]
