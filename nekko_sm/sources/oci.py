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
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, Callable
from urllib.parse import urlsplit

from nekko_sm.config import Platform, normalize_arch, parse_platform
from nekko_sm.errors import (
    BadRequest,
    Cancelled,
    InsufficientStorage,
    IntegrityError,
    ManifestInvalid,
    NekkoError,
    NoMatchingPlatform,
    PullTooLarge,
    Unauthorized,
    UnsafeName,
)
from nekko_sm.httpio import sanitise
from nekko_sm.models import formats, plans, unpack
from nekko_sm.refs import OCIRef, safe_name
from nekko_sm.sources.base import (
    A_FORMAT,
    A_MODEL,
    FILES_ARTIFACT_TYPE,
    FileItem,
    Job,
    PullResult,
    check_names,
    shown_name,
    store_artifact,
)
from nekko_sm.sources.registry_auth import Endpoint
from nekko_sm.store import (
    A_FILES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    TITLE,
    Descriptor,
    FollowLost,
    sha256_digest,
)

log = logging.getLogger("nekko_sm.oci")

ACCEPT = f"{MT_OCI_INDEX}, {MT_OCI_MANIFEST}, {MT_DOCKER_LIST}, {MT_DOCKER_MANIFEST}"
MAX_MANIFEST = 4 << 20
# Distinct manifests one pull may fetch: an index of 20 platforms with attestations needs 40.
MAX_MANIFESTS = 256
_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ATTESTATION = "attestation-manifest"
_OTHER_ALGORITHMS = frozenset({"sha384", "sha512", "blake3"})  # named when refused
_MAX_NESTING = 4


class _Either:
    """Looks like a threading.Event: set when either event is (the writer only asks is_set)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


# Failures of a mirror that make us try the next endpoint: anything the upstream did.
_LOCAL = (Cancelled, InsufficientStorage, BadRequest)


# --------------------------------------------------------------------------------------------
# the pull


@dataclass
class _Manifest:
    media_type: str
    digest: str
    data: bytes
    doc: dict

    @property
    def size(self) -> int:
        return len(self.data)


class _Puller:
    def __init__(self, job: Job, ref: OCIRef) -> None:
        self.job = job
        self.ref = ref
        scheme = _scheme(job, ref)
        configured = job.config.registry_mirrors.get(ref.registry.lower()) or ()
        # a mirror host marked --insecure-registry is plain http, as a registry is
        mirrors = ["http://" + m.split("://", 1)[1]
                   if job.config.is_insecure(urlsplit(m).netloc) else m for m in configured]
        self.endpoints = [Endpoint(job, ref, m, mirror=True) for m in mirrors]
        self.endpoints.append(Endpoint(job, ref, f"{scheme}://{ref.api_host}", mirror=False))
        self._dead: set[int] = set()
        self._lock = threading.Lock()
        self.feed: _Feed | None = None  # told of each blob's writer, for unpacking as it comes

    # -- endpoints ----------------------------------------------------------------------------
    def _call(self, fn: Callable[[Endpoint], object]) -> object:
        """``fn(endpoint)`` on the first live endpoint; a failing mirror falls back."""
        for i, ep in enumerate(self.endpoints):
            if i in self._dead:
                continue
            try:
                ep.ready()
                return fn(ep)
            except _LOCAL:
                raise
            except NekkoError as e:
                if not ep.mirror:
                    raise
                with self._lock:
                    first = i not in self._dead  # blobs fail in parallel: say it once
                    self._dead.add(i)
                if first:
                    log.info("%s: %s failed (%s); falling back", self.ref.canonical, ep,
                             e.message)
        raise AssertionError("the registry itself is always the last endpoint")

    # -- manifests ------------------------------------------------------------------------------
    def manifest(self, reference: str) -> _Manifest:
        return self._call(partial(self._manifest, reference))  # type: ignore[return-value]

    def _manifest(self, reference: str, ep: Endpoint) -> _Manifest:
        url = ep.url(f"{self.ref.repository}/manifests/{reference}")
        transfer = self.job.transfer
        for attempt in (0, 1):
            used = ep.auth
            resp = transfer.request("GET", url, headers={"Accept": ACCEPT}, auth=used,
                                    limit=MAX_MANIFEST, retry=not ep.mirror)
            if resp.status == 401 and attempt == 0 and ep.same_origin(resp.url):
                ep.reauthenticate(resp.headers.get("WWW-Authenticate"), used)
                continue
            break
        if resp.status != 200:
            raise ep.errors(resp.status, resp.url, resp.data, resp.headers)
        return self._check_manifest(reference, resp.data, resp.headers)

    def _check_manifest(self, reference: str, data: bytes,
                        headers: Mapping[str, str]) -> _Manifest:
        what = f"{self.ref.canonical}: manifest {reference}"
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{what}: the registry sent content with digest {digest};"
                                 " nothing was stored")
        served = (headers.get("Docker-Content-Digest") or "").strip()
        if served.startswith("sha256:") and served != digest:
            raise IntegrityError(f"{what}: the registry's Docker-Content-Digest is not the"
                                 f" digest of its bytes ({digest}); nothing was stored")
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ManifestInvalid(f"{what} is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ManifestInvalid(f"{what} is not a JSON object")
        header_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body_type = doc.get("mediaType")
        if doc.get("schemaVersion") == 1 or body_type in _SCHEMA1 or header_type in _SCHEMA1:
            raise ManifestInvalid(f"{what} is a Docker schema 1 manifest, which is deprecated"
                                  " and not supported: push the image again with a current"
                                  " tool")
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
            raise ManifestInvalid(f"{what} is not an OCI or Docker v2 manifest or index (its"
                                  " media type is none of theirs)")
        if doc.get("schemaVersion") != 2:
            raise ManifestInvalid(f"{what}: its schemaVersion is not 2")
        m = _Manifest(media_type, digest, data, doc)
        if media_type in INDEX_TYPES:
            if not isinstance(doc.get("manifests"), list):
                raise ManifestInvalid(f"{what}: an index without 'manifests'")
            for d in doc["manifests"]:
                self._descriptor(d, what)
        else:
            self._descriptor(doc.get("config"), what)
            if not isinstance(doc.get("layers"), list):
                raise ManifestInvalid(f"{what}: a manifest without 'layers'")
            names = set()
            for d in doc["layers"]:
                self._descriptor(d, what)
                title = (d.get("annotations") or {}).get(TITLE)
                if title is not None:
                    name = safe_name(title)  # UnsafeName: 400, nothing indexed
                    if name in names:
                        raise ManifestInvalid(f"{what}: two layers are titled"
                                              f" {shown_name(name)}")
                    names.add(name)
        return m

    @staticmethod
    def _descriptor(d: object, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise ManifestInvalid(f"{what}: a descriptor is not an object")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            algorithm = digest.split(":", 1)[0] if isinstance(digest, str) else ""
            known = f" ({algorithm})" if algorithm in _OTHER_ALGORITHMS else ""
            raise ManifestInvalid(f"{what}: a descriptor's digest is not sha256:<64 hex>"
                                  f"{known}; only sha256 is supported")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalid(f"{what}: descriptor {digest} has a size that is not a whole"
                                  " number of bytes")
        mt = d.get("mediaType")
        return Descriptor(mt if isinstance(mt, str) else "", digest, size,
                          artifact_type=d.get("artifactType"), platform=d.get("platform"))

    def store(self, m: _Manifest) -> None:
        self.job.store.put_bytes(m.data, self.job.lease, expected_digest=m.digest)

    # -- blobs ----------------------------------------------------------------------------------
    def fetch_blobs(self, blobs: list[Descriptor], unpacking: int = 0) -> None:
        """Every blob of ``blobs`` the store lacks, ``jobs`` at a time.  ``unpacking``: bytes
        of tar layers about to be unpacked, whose files need room of their own."""
        job = self.job
        unique: dict[str, Descriptor] = {}
        for d in blobs:
            unique.setdefault(d.digest, d)
        missing = []
        present = 0
        for d in unique.values():
            job.lease.add(d.digest)  # before the check: gc cannot take it from under us
            if job.store.has_blob(d.digest, d.size):
                present += d.size
            else:
                missing.append(d)
        job.progress.expect(sum(d.size for d in unique.values()))
        _skip(job, present)
        if not missing:
            return
        job.ensure_space(sum(d.size for d in missing) + unpacking, self.ref.canonical)
        stop = threading.Event()
        errors: list[BaseException] = []

        def one(d: Descriptor) -> None:
            if stop.is_set() or job.cancel.is_set():
                return
            try:
                self._call(partial(self._blob, d, _Either(job.cancel, stop)))
            except BaseException as e:
                with self._lock:
                    if not (isinstance(e, Cancelled) and stop.is_set()
                            and not job.cancel.is_set()):
                        errors.append(e)
                stop.set()
                raise

        workers = max(1, min(job.config.jobs, len(missing)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oci-blob") as pool:
            futures = [pool.submit(one, d) for d in missing]
            wait(futures, return_when=FIRST_EXCEPTION)
            if stop.is_set():
                for f in futures:
                    f.cancel()
        if errors:
            raise errors[0]
        if job.cancel.is_set():
            raise Cancelled(f"pull of {self.ref.canonical} was cancelled")

    def _blob(self, d: Descriptor, cancel: _Either, ep: Endpoint) -> None:
        job = self.job
        job.on_ingest(d.digest)
        with job.store.writer(d.digest, d.size, cancel) as w:  # type: ignore[arg-type]
            if job.store.has_blob(d.digest, d.size):
                _skip(job, d.size)  # another pull committed it while we waited
                if self.feed is not None:
                    self.feed.committed(d.digest)
                return
            if self.feed is not None:
                self.feed.started(d.digest, w, d.size)
            url = ep.url(f"{self.ref.repository}/blobs/{d.digest}")
            for attempt in (0, 1):
                used = ep.auth
                try:
                    job.transfer.download(url, w, auth=used, immutable=True,
                                          expected_size=d.size, errors=ep.errors,
                                          progress=job.progress.add)
                    break
                except Unauthorized as e:
                    if attempt or e.context.get("redirected") or "challenge" not in e.context:
                        raise  # a redirect target's or a DENIED: a new token will not help
                    log.debug("%s: blob %s: token refused; asking again", self.ref.canonical,
                              d.digest)
                    challenge = e.context["challenge"]  # the WWW-Authenticate value, or None
                    ep.reauthenticate(challenge if isinstance(challenge, str) else None,
                                      used)  # resumes from w.offset
            w.commit(d.digest, job.lease)
            if self.feed is not None:
                self.feed.committed(d.digest)


def _skip(job: Job, n: int) -> None:
    """Count bytes the cache already had (progress, and the service's dedup counter)."""
    if n > 0:
        job.progress.skip(n)


# --------------------------------------------------------------------------------------------
# platforms


def _platform_str(p: Mapping) -> str:
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))


def _platforms_shown(manifests: list) -> list[str]:
    """An index's platforms for a message: those that parse (known os and architecture),
    at most 20, and how many others there are -- never the index's own strings as such."""
    valid: set[str] = set()
    others = 0
    for x in manifests:
        if _is_attestation(x):
            continue
        try:
            valid.add(str(parse_platform(_platform_str(x.get("platform") or {}))))
        except (BadRequest, TypeError, AttributeError):
            others += 1
    shown = sorted(valid)[:20]
    more = len(valid) - len(shown) + others
    return shown + ([f"{more} other{'s' if more > 1 else ''}"] if more else [])


def _is_attestation(d: Mapping) -> bool:
    p = d.get("platform") or {}
    ann = d.get("annotations") or {}
    return ann.get("vnd.docker.reference.type") == _ATTESTATION or (
        p.get("os") == "unknown" and p.get("architecture") == "unknown")


def _variant_rank(want: Platform, arch: str, variant: str | None) -> int | None:
    """How well an image of ``arch/variant`` fits ``want`` (0 best), None when it cannot run."""
    if arch != want.architecture:
        return None
    if want.variant == variant:
        return 0
    if want.variant is None:
        return 1  # any variant will do when none was asked for; exact ones first
    if arch == "arm" and variant and re.fullmatch(r"v\d+", variant) and \
            re.fullmatch(r"v\d+", want.variant):
        have, need = int(variant[1:]), int(want.variant[1:])
        if have <= need:
            return 1 + need - have  # an armv7 host runs v6 and v5 images
    return None


def choose_platform(manifests: list, want: Platform) -> dict | None:
    best: tuple[int, int] | None = None
    chosen = None
    for i, d in enumerate(manifests):
        if _is_attestation(d):
            continue
        p = d.get("platform") or {}
        if str(p.get("os", "")).lower() != want.os:
            continue
        arch, variant = normalize_arch(str(p.get("architecture", "")),
                                       str(p["variant"]).lower() if p.get("variant") else None)
        rank = _variant_rank(want, arch, variant)
        if rank is not None and (best is None or (rank, i) < best):
            best, chosen = (rank, i), d
    return chosen


def _wanted(job: Job) -> Platform | None:
    if job.platform:
        return None if job.platform.strip().lower() == "all" else parse_platform(job.platform)
    return job.config.default_platform


# --------------------------------------------------------------------------------------------
# entry point


def _scheme(job: Job, ref: OCIRef) -> str:
    insecure = job.config.is_insecure(ref.api_host) or job.config.is_insecure(ref.registry)
    return "http" if insecure else "https"


def confirm_access(job: Job, ref: OCIRef, digest: str) -> None:
    """May ``job.credentials`` pull ``digest`` from ``ref``'s repository now?  Raise if not.

    One manifest ``HEAD`` by digest in the repository's pull scope, at the registry itself:
    a mirror answering proves nothing about the caller's access to the registry.
    """
    ep = Endpoint(job, ref, f"{_scheme(job, ref)}://{ref.api_host}", mirror=False)
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
    puller = _Puller(job, ref)
    want = _wanted(job)
    top = puller.manifest(ref.reference)
    chosen: _Manifest = top
    platform: dict | None = None
    if top.media_type in INDEX_TYPES and want is not None:
        d = choose_platform(top.doc["manifests"], want)
        if d is None:
            available = _platforms_shown(top.doc["manifests"])
            raise NoMatchingPlatform(
                f"{ref.canonical} has no image for {want}; available:"
                f" {', '.join(available) or 'none'} (choose one with --platform, or 'all')",
                available=available)
        platform = d.get("platform") or None
        chosen = puller.manifest(d["digest"])
        if chosen.media_type not in MANIFEST_TYPES:
            raise ManifestInvalid(f"{ref.canonical}: the index entry for {want} is not an"
                                  " image manifest")
        if chosen.size != d["size"]:
            raise IntegrityError(f"{ref.canonical}: manifest {d['digest']} has {chosen.size}"
                                 f" bytes, the index says {d['size']}")
    if job.digest and job.digest not in (top.digest, chosen.digest):
        raise IntegrityError(f"{ref.canonical} resolved to {top.digest}, not the expected"
                             f" {job.digest}; nothing was stored")

    # Every manifest to keep (each distinct one once: an index may name one big manifest
    # thousands of times), the blobs they name, once each, and the files of the view.
    limit = job.config.max_pull_files
    manifests: dict[str, _Manifest] = {}  # the manifests fetched, by digest
    blobs: dict[str, Descriptor] = {}
    files: list[FileItem] = []
    named: set[tuple[str, str]] = set()

    def too_many(what: str) -> PullTooLarge:
        return PullTooLarge(f"{ref.canonical} has more than {limit} {what}, the most one pull"
                            " may have on this node (--max-pull-files): refused, nothing"
                            " fetched")

    def walk(m: _Manifest, prefix: str, depth: int, listed: bool = True) -> None:
        manifests.setdefault(m.digest, m)
        if m.media_type in MANIFEST_TYPES:
            if len(m.doc["layers"]) > limit:  # layers per image
                raise PullTooLarge(f"{ref.canonical}: manifest {m.digest} has"
                                   f" {len(m.doc['layers'])} layers, more than the {limit} one"
                                   " pull may have on this node (--max-pull-files): refused,"
                                   " nothing fetched")
            c = puller._descriptor(m.doc["config"], "")
            blobs.setdefault(c.digest, c)
            for layer in m.doc["layers"]:
                d = puller._descriptor(layer, "")
                blobs.setdefault(d.digest, d)
                title = (layer.get("annotations") or {}).get(TITLE)
                name = safe_name(title) if title is not None else d.digest.replace(":", "-")
                if listed and (prefix + name, d.digest) not in named:
                    named.add((prefix + name, d.digest))
                    files.append(FileItem(prefix + name, d.digest, d.size,
                                          d.media_type or "application/octet-stream"))
            if len(blobs) > limit:
                raise too_many("blobs")
            if len(files) > limit:
                raise too_many("files")
            return
        if depth >= _MAX_NESTING:
            raise ManifestInvalid(f"{ref.canonical}: indexes nested too deep")
        children = m.doc["manifests"]
        if len(manifests.keys() | {d["digest"] for d in children}) > MAX_MANIFESTS:
            raise ManifestInvalid(f"{ref.canonical} names more than {MAX_MANIFESTS} manifests:"
                                  " refused, no image needs that many")
        taken: set[str] = set()
        for d in children:
            child = manifests.get(d["digest"]) or puller.manifest(d["digest"])
            if child.size != d["size"]:
                raise IntegrityError(f"{ref.canonical}: manifest {d['digest']} has"
                                     f" {child.size} bytes, the index says {d['size']}")
            p = d.get("platform") or {}
            sub = "-".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))
            try:  # the fields come from the registry: they must name one directory
                sub = safe_name(sub) if sub and "/" not in sub else ""
            except UnsafeName:
                sub = ""
            sub = sub or d["digest"][7:19]
            keep = listed and not _is_attestation(d) and sub not in taken
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
    model = _engine_ready(job, ref, puller, chosen, files, list(blobs.values())) \
        if image else None
    if not image:
        puller.fetch_blobs(list(blobs.values()))

    artifact_type = chosen.doc.get("artifactType") if chosen.media_type in MANIFEST_TYPES \
        else None
    desc = Descriptor(chosen.media_type, chosen.digest, chosen.size,
                      artifact_type=artifact_type if isinstance(artifact_type, str) else None,
                      platform=platform)
    result = PullResult(manifest=desc, digest=top.digest, files=files,
                        platform=_platform_str(platform) if platform else None)
    if model is not None:
        result.files, result.format, result.model, result.files_manifest, result.unpacked = \
            model
    return result


class _Feed:
    """Which layers are downloading (and their writers) or committed, for an unpacker that
    reads each layer as it arrives instead of after every blob is in."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._cond = threading.Condition()
        self._writers: dict[str, tuple] = {}  # digest -> (writer, size, how often started)
        self._done: set[str] = set()
        self.failed = False  # the fetch failed: nobody will bring the rest
        self.stop = threading.Event()  # set by the fetch's end when the unpacker must quit
        self.lost = False  # a writer started over: the unpacker's reading is not to be trusted

    def stopping(self) -> bool:
        return self.stop.is_set() or self.job.cancel.is_set()

    def started(self, digest: str, writer: object, size: int) -> None:
        with self._cond:
            old = self._writers.get(digest)
            if old is not None:
                self.lost = True  # a second attempt (another endpoint): read the blob later
            self._writers[digest] = (writer, size)
            self._cond.notify_all()

    def committed(self, digest: str) -> None:
        with self._cond:
            self._done.add(digest)
            self._cond.notify_all()

    def finish(self, failed: bool) -> None:
        with self._cond:
            self.failed = failed
            if failed:
                self.stop.set()
            self._cond.notify_all()

    def open(self, lp: plans.LayerPlan) -> BinaryIO:
        """The layer's bytes: its blob once committed, else a reader behind its download."""
        store = self.job.store
        with self._cond:
            while True:
                if lp.digest in self._done or store.has_blob(lp.digest, lp.size):
                    return open(store.blob_path(lp.digest), "rb")  # the unpacker closes it
                started = self._writers.get(lp.digest)
                if started is not None and not self.lost:
                    writer, size = started
                    return writer.follow(size, self.stopping)  # type: ignore[no-any-return]
                if self.failed or self.stopping():
                    raise Cancelled(f"{lp.digest} will not arrive")
                if self.lost:
                    raise FollowLost(f"{lp.digest} is downloaded again")
                self._cond.wait(0.5)


def _engine_ready(job: Job, ref: OCIRef, puller: _Puller, m: _Manifest, plain: list,
                  blobs: list) -> tuple:
    """Fetch ``blobs`` and return the files of image manifest ``m`` named as its packaging
    names them (DESIGN section 8): tar layers unpacked into one blob per file, image
    layers applied with whiteouts.

    The unpacker runs beside the fetch, reading each tar layer as it arrives (behind its
    download's contiguous frontier), so unpacking adds little to the pull; what it read is
    only used once every blob is verified, and when a download started over the layers are
    unpacked again from the committed blobs.

    Returns ``(files, format, model, files manifest, unpacked)``.  When the view is the
    layers as they are under their titles (``plain``, an ORAS or nekko artifact), the files
    stay in layer order and need no manifest of their own.
    """
    fmt = formats.detect_format(m.doc)
    config = None
    if fmt == plans.KITOPS:  # the Kitfile says how older ModelKits hold their paths
        config_desc = next(d for d in blobs if d.digest == m.doc["config"]["digest"])
        puller.fetch_blobs([config_desc])
        config = job.store.read_blob(config_desc.digest, MAX_MANIFEST)
    plan = formats.plan(m.doc, config)
    read = [lp for lp in plan.layers if lp.kind in (plans.TAR, plans.SNIFF)]
    known = _unpacked_before(job, m.digest)
    if known is not None:  # another entry of this very manifest: its files, as they are
        files, model, listing = known
        file_digests = {f.digest for f in files}
        tars = [lp.digest for lp in read if lp.digest not in file_digests]
        if job.config.discard_unpacked_layers:  # what would be freed need not come
            blobs = [d for d in blobs if d.digest not in tars]
        puller.fetch_blobs(blobs)
        log.debug("%s: the files of %s are cached already", ref.canonical, m.digest)
        return files, fmt, model, listing, tars
    if not read:
        puller.fetch_blobs(blobs)  # nothing to read: the layers are the files
        done = unpack.materialize(job.store, plan, _open_blob(job), job.lease, job.cancel,
                                  what=ref.canonical)
    else:
        done = _fetch_unpacking(job, ref, puller, plan, blobs, sum(lp.size for lp in read))
    types = {d.get("digest"): d.get("mediaType") for d in m.doc["layers"]}
    files = [FileItem(f.name, f.digest, f.size, str(types.get(f.digest) or
                                                     "application/octet-stream"))
             for f in done.files]
    if sorted((f.name, f.digest) for f in files) == sorted((f.name, f.digest) for f in plain):
        return plain, fmt, done.model, None, []
    listing = store_artifact(job, files, FILES_ARTIFACT_TYPE, {A_FORMAT: fmt})
    log.debug("%s: %s, %d files from %d tar layers", ref.canonical, fmt, len(files),
              len(done.unpacked))
    return files, fmt, done.model, listing, list(done.unpacked)


def _open_blob(job: Job) -> Callable[[plans.LayerPlan], BinaryIO]:
    def open_layer(lp: plans.LayerPlan) -> BinaryIO:
        return open(job.store.blob_path(lp.digest), "rb")  # the unpacker closes it
    return open_layer


def _unpacked_before(job: Job, manifest: str) -> tuple | None:
    """``(files, model, listing)`` of an entry of the same image manifest whose files are
    all still in the store (unpacking it again would make the same blobs), else None."""
    for entry in job.store.entries():
        listing = entry.annotations.get(A_FILES)
        if entry.digest != manifest or not isinstance(listing, str):
            continue
        job.lease.add(listing)  # before reading it: gc cannot take it meanwhile
        try:
            doc = json.loads(job.store.read_blob(listing))
            layers = doc["layers"]
            files = [FileItem(str(d["annotations"][TITLE]), str(d["digest"]), int(d["size"]),
                              str(d.get("mediaType") or "application/octet-stream"))
                     for d in layers]
        except (OSError, ValueError, KeyError, TypeError, NekkoError):
            continue
        if not all(job.store.has_blob(f.digest, f.size) for f in files):
            continue
        for f in files:
            job.lease.add(f.digest)
        if not all(job.store.has_blob(f.digest, f.size) for f in files):
            continue  # freed between the look and the lease
        desc = Descriptor(MT_OCI_MANIFEST, listing, len(job.store.read_blob(listing)),
                          artifact_type=FILES_ARTIFACT_TYPE)
        model = entry.annotations.get(A_MODEL)
        return files, model if isinstance(model, str) else None, desc
    return None


def _fetch_unpacking(job: Job, ref: OCIRef, puller: _Puller, plan: plans.ModelPlan,
                     blobs: list, unpacking: int) -> unpack.UnpackResult:
    """``puller.fetch_blobs(blobs)`` with the unpacker of ``plan`` reading alongside."""
    feed = _Feed(job)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = unpack.materialize(
                job.store, plan, feed.open, job.lease, _Either(job.cancel, feed.stop),
                what=ref.canonical)
        except BaseException as e:  # noqa: BLE001 - handed to the pull below
            outcome["error"] = e

    unpacker = threading.Thread(target=run, name=f"unpack {ref.canonical[:40]}", daemon=True)
    puller.feed = feed
    unpacker.start()
    try:
        puller.fetch_blobs(blobs, unpacking)
    except BaseException:
        feed.finish(failed=True)
        unpacker.join()
        raise
    finally:
        puller.feed = None
    feed.finish(failed=False)
    unpacker.join()
    error = outcome.get("error")
    if isinstance(error, (FollowLost, Cancelled, OSError)) and not job.cancel.is_set():
        # A download started over, moved to another endpoint, or its partial went: what
        # was read alongside is not to be trusted; the verified blobs are all there now.
        log.info("%s: a layer was downloaded again (%s); unpacking from the blobs",
                 ref.canonical, error)
        return unpack.materialize(job.store, plan, _open_blob(job), job.lease, job.cancel,
                                  what=ref.canonical)
    if error is not None:
        raise error
    return outcome["result"]  # type: ignore[no-any-return]


__all__ = ["ACCEPT", "choose_platform", "confirm_access", "pull"]
