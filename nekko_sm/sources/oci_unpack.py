"""Engine-ready OCI images: an image manifest's layers turned into the model's files.

This module owns what happens after a pull chose an image manifest (DESIGN section 8): its
packaging planned (:mod:`nekko_sm.models.formats`), the files of an earlier entry of the same
manifest reused when all their blobs are still there, and otherwise the unpacker run beside
the blob fetch (:class:`Feed` hands it each layer behind its download, or the committed blob),
unpacked again from the verified blobs when a download started over, and the files listed in
a manifest of their own when they are not the layers as they are.  It never talks to a
registry itself (its :class:`~nekko_sm.sources.oci_fetch.Puller` does) and never touches
``index.json``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import BinaryIO, Callable

from nekko_sm.errors import Cancelled, NekkoError
from nekko_sm.models import formats, plans, unpack
from nekko_sm.refs import OCIRef
from nekko_sm.sources.base import (
    A_FORMAT,
    A_MODEL,
    FILES_ARTIFACT_TYPE,
    EitherSet,
    FileItem,
    Job,
    store_artifact,
)
from nekko_sm.sources.oci_fetch import Puller
from nekko_sm.sources.oci_manifests import MAX_MANIFEST, Manifest
from nekko_sm.store import A_FILES, MT_OCI_MANIFEST, TITLE, Descriptor, FollowLost

log = logging.getLogger("nekko_sm.oci")


class Feed:
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


def engine_ready(
    job: Job, ref: OCIRef, puller: Puller, m: Manifest, plain: list, blobs: list
) -> tuple:
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
        done = unpack.materialize(
            job.store, plan, _open_blob(job), job.lease, job.cancel, what=ref.canonical
        )
    else:
        done = _fetch_unpacking(job, ref, puller, plan, blobs, sum(lp.size for lp in read))
    job.spare.extend(done.spare)
    types = {d.get("digest"): d.get("mediaType") for d in m.doc["layers"]}
    files = [
        FileItem(f.name, f.digest, f.size, str(types.get(f.digest) or "application/octet-stream"))
        for f in done.files
    ]
    if sorted((f.name, f.digest) for f in files) == sorted((f.name, f.digest) for f in plain):
        return plain, fmt, done.model, None, []
    listing = store_artifact(job, files, FILES_ARTIFACT_TYPE, {A_FORMAT: fmt})
    log.debug(
        "%s: %s, %d files from %d tar layers", ref.canonical, fmt, len(files), len(done.unpacked)
    )
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
            files = [
                FileItem(
                    str(d["annotations"][TITLE]),
                    str(d["digest"]),
                    int(d["size"]),
                    str(d.get("mediaType") or "application/octet-stream"),
                )
                for d in layers
            ]
        except (OSError, ValueError, KeyError, TypeError, NekkoError):
            continue
        if not all(job.store.has_blob(f.digest, f.size) for f in files):
            continue
        for f in files:
            job.lease.add(f.digest)
        if not all(job.store.has_blob(f.digest, f.size) for f in files):
            continue  # freed between the look and the lease
        desc = Descriptor(
            MT_OCI_MANIFEST,
            listing,
            len(job.store.read_blob(listing)),
            artifact_type=FILES_ARTIFACT_TYPE,
        )
        model = entry.annotations.get(A_MODEL)
        return files, model if isinstance(model, str) else None, desc
    return None


def _fetch_unpacking(
    job: Job, ref: OCIRef, puller: Puller, plan: plans.ModelPlan, blobs: list, unpacking: int
) -> unpack.UnpackResult:
    """``puller.fetch_blobs(blobs)`` with the unpacker of ``plan`` reading alongside."""
    feed = Feed(job)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = unpack.materialize(
                job.store,
                plan,
                feed.open,
                job.lease,
                EitherSet(job.cancel, feed.stop),
                what=ref.canonical,
            )
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
        log.info(
            "%s: a layer was downloaded again (%s); unpacking from the blobs", ref.canonical, error
        )
        return unpack.materialize(
            job.store, plan, _open_blob(job), job.lease, job.cancel, what=ref.canonical
        )
    if error is not None:
        raise error
    return outcome["result"]  # type: ignore[no-any-return]
