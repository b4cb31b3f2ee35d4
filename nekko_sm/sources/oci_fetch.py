"""Fetching from one OCI repository: endpoints with mirror fallback, manifests, blobs.

This module owns the :class:`Puller` of one pull: its endpoints (each configured mirror,
plain http where marked insecure, then the registry itself; a failing mirror is dropped for
the rest of the pull), the manifest ``GET`` (asked again once with a fresh token on a 401),
and the parallel download of every blob the store lacks, ``config.jobs`` at a time, each
verified at commit and told to a :class:`BlobWatcher` (the unpacker's feed) as it starts
and lands.  It never judges a manifest's content (:mod:`nekko_sm.sources.oci_manifests`),
never decides what a pull keeps and never authorises by itself: tokens and challenges are
:mod:`nekko_sm.sources.registry_auth`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from typing import Callable, Protocol
from urllib.parse import urlsplit

from nekko_sm.errors import (
    BadRequest,
    Cancelled,
    InsufficientStorage,
    NekkoError,
    Unauthorized,
)
from nekko_sm.refs import OCIRef
from nekko_sm.sources.base import EitherSet, Job
from nekko_sm.sources.oci_manifests import ACCEPT, MAX_MANIFEST, Manifest, check_manifest
from nekko_sm.sources.registry_auth import Endpoint
from nekko_sm.store import Descriptor

log = logging.getLogger("nekko_sm.oci")

# Failures of a mirror that make us try the next endpoint: anything the upstream did.
_LOCAL = (Cancelled, InsufficientStorage, BadRequest)


class BlobWatcher(Protocol):
    """Told of each blob's download (its writer) and of its commit: the unpacker's feed."""

    def started(self, digest: str, writer: object, size: int) -> None: ...

    def committed(self, digest: str) -> None: ...


class Puller:
    def __init__(self, job: Job, ref: OCIRef) -> None:
        self.job = job
        self.ref = ref
        scheme = registry_scheme(job, ref)
        configured = job.config.registry_mirrors.get(ref.registry.lower()) or ()
        # a mirror host marked --insecure-registry is plain http, as a registry is
        mirrors = [
            "http://" + m.split("://", 1)[1] if job.config.is_insecure(urlsplit(m).netloc) else m
            for m in configured
        ]
        self.endpoints = [Endpoint(job, ref, m, mirror=True) for m in mirrors]
        self.endpoints.append(Endpoint(job, ref, f"{scheme}://{ref.api_host}", mirror=False))
        self._dead: set[int] = set()
        self._lock = threading.Lock()
        self.feed: BlobWatcher | None = None  # told of each blob's writer, to unpack as it comes

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
                    log.info("%s: %s failed (%s); falling back", self.ref.canonical, ep, e.message)
        raise AssertionError("the registry itself is always the last endpoint")

    # -- manifests ------------------------------------------------------------------------------
    def manifest(self, reference: str) -> Manifest:
        return self._call(partial(self._manifest, reference))  # type: ignore[return-value]

    def _manifest(self, reference: str, ep: Endpoint) -> Manifest:
        url = ep.url(f"{self.ref.repository}/manifests/{reference}")
        transfer = self.job.transfer
        for attempt in (0, 1):
            used = ep.auth
            resp = transfer.request(
                "GET",
                url,
                headers={"Accept": ACCEPT},
                auth=used,
                limit=MAX_MANIFEST,
                retry=not ep.mirror,
            )
            if resp.status == 401 and attempt == 0 and ep.same_origin(resp.url):
                ep.reauthenticate(resp.headers.get("WWW-Authenticate"), used)
                continue
            break
        if resp.status != 200:
            raise ep.errors(resp.status, resp.url, resp.data, resp.headers)
        return self._check_manifest(reference, resp.data, resp.headers)

    def _check_manifest(self, reference: str, data: bytes, headers: Mapping[str, str]) -> Manifest:
        return check_manifest(
            f"{self.ref.canonical}: manifest {reference}", reference, data, headers
        )

    def store(self, m: Manifest) -> None:
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
                self._call(partial(self._blob, d, EitherSet(job.cancel, stop)))
            except BaseException as e:
                with self._lock:
                    if not (isinstance(e, Cancelled) and stop.is_set() and not job.cancel.is_set()):
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

    def _blob(self, d: Descriptor, cancel: EitherSet, ep: Endpoint) -> None:
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
                    job.transfer.download(
                        url,
                        w,
                        auth=used,
                        immutable=True,
                        expected_size=d.size,
                        errors=ep.errors,
                        progress=job.progress.add,
                    )
                    break
                except Unauthorized as e:
                    if attempt or e.context.get("redirected") or "challenge" not in e.context:
                        raise  # a redirect target's or a DENIED: a new token will not help
                    log.debug(
                        "%s: blob %s: token refused; asking again", self.ref.canonical, d.digest
                    )
                    challenge = e.context["challenge"]  # the WWW-Authenticate value, or None
                    ep.reauthenticate(
                        challenge if isinstance(challenge, str) else None, used
                    )  # resumes from w.offset
            w.commit(d.digest, job.lease)
            if self.feed is not None:
                self.feed.committed(d.digest)


def _skip(job: Job, n: int) -> None:
    """Count bytes the cache already had (progress, and the service's dedup counter)."""
    if n > 0:
        job.progress.skip(n)


def registry_scheme(job: Job, ref: OCIRef) -> str:
    insecure = job.config.is_insecure(ref.api_host) or job.config.is_insecure(ref.registry)
    return "http" if insecure else "https"
