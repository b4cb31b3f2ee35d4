"""What one pull does, on its worker: under its lock, from the source to a committed entry.

:class:`Puller`, a base of the service over :class:`~nekko_sm.flight_table.FlightTable`,
takes the flock of ``ingest/pulls/KEY.lock`` for the whole pull (another process pulling
the same URL makes it wait, and then finds the entry complete), writes
``ingest/pulls/KEY.json`` (what makes an entry "incomplete" rather than absent) and a
lease, hands a :class:`~nekko_sm.sources.base.Job` to the source of the URL's scheme,
commits the entry (its view, the index, the Hugging Face view), applies the pins and
holds its callers asked for, and turns any failure into the callers' answer, keeping what
is worth a resume.  It also answers from the cache when the entry is there.  It never
parses a request and never decides who joins a flight (that is the flight table's).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nekko_sm import access, logs
from nekko_sm.access import AccessChecks
from nekko_sm.config import Config
from nekko_sm.credentials import Credentials
from nekko_sm.entries import Catalog, is_single_file, lock_held, pull_paths, shown_size
from nekko_sm.errors import (
    Cancelled,
    EntryNotFound,
    InsufficientStorage,
    NekkoError,
    PullTooLarge,
    UpstreamTooSlow,
    UpstreamUnavailable,
)
from nekko_sm.flight_table import Flight, FlightTable, check_entry_digest
from nekko_sm.refs import HFRef, HTTPRef, OCIRef
from nekko_sm.sources.base import A_DIGEST, A_FORMAT, A_MODEL, A_PLATFORM, Job, PullResult
from nekko_sm.store import (
    A_DISCARDED,
    A_FILES,
    INDEX_TYPES,
    Descriptor,
    FileLock,
    Lease,
    Store,
    read_file,
    unlink,
    write_atomic,
)

if TYPE_CHECKING:
    from nekko_sm.budget import Budget
    from nekko_sm.models.hfcache import HFCacheView

log = logs.get("nekko_sm.service")  # imports logging at its first use

# Errors after which a partial download is worth keeping (the entry stays "incomplete").
_RESUMABLE = (UpstreamUnavailable, InsufficientStorage, UpstreamTooSlow)


class Puller(FlightTable):
    """The pull itself; the service sets what it works with at start-up."""

    config: Config
    store: Store
    pulls_dir: Path
    catalog: Catalog
    access: AccessChecks
    stats: dict[str, Any]
    _transfer: Any  # made on first use: status/path need no network stack

    _budget: Budget | None = None

    @property
    def budget(self) -> Budget:
        """The disk budget (DESIGN 9), made on first use: `status` and `path` need none."""
        if self._budget is None:
            from nekko_sm.budget import Budget

            with self._lock:  # one budget (its counters) whichever thread asks first
                if self._budget is None:
                    self._budget = Budget(self.store, self.config, self.busy)
        return self._budget

    def busy(self, key: str) -> bool:
        """Is ``key`` being pulled, by this process or another?"""
        with self._lock:
            if key in self._flights:
                return True
        return lock_held(self._pull_paths(key)[1])

    def _hf_view(self) -> HFCacheView:
        from nekko_sm.models.hfcache import HFCacheView  # not at start-up: `status` needs none

        return HFCacheView(self.store)

    @property
    def transfer(self):
        if self._transfer is None:
            with self._lock:
                if self._transfer is None:
                    from nekko_sm.transfer import Transfer

                    self._transfer = Transfer(self.config)
        return self._transfer

    def _pull_paths(self, key: str) -> tuple[Path, Path]:
        return pull_paths(self.pulls_dir, key)

    def _cached(
        self,
        key: str,
        platform: str | None,
        digest: str | None,
        ref,
        credentials: Credentials | None,
        pin: bool | None = None,
        hold: float | None = None,
    ) -> dict | None:
        """The complete entry for ``key`` if it answers this request: a protected one only
        once this caller's access is confirmed (first: a refused caller learns nothing, not
        even the digest), then 409 if it is not the digest asked for.  Answering it is a
        use (and applies ``pin``, ``hold``)."""
        desc = self.store.get_entry(key)
        if desc is None or not _platform_matches(desc, platform):
            return None
        self.access.confirm(self, key, ref, desc, credentials)
        try:
            if digest is not None:
                check_entry_digest(self.catalog.entry(key), digest)
            self.mark(key, pin, hold)
            return self.catalog.entry(key)
        except EntryNotFound:
            return None  # evicted or removed just now: pull it again

    # -- use, pins, holds ------------------------------------------------------------------
    def mark(
        self, key: str, pin: bool | None = None, hold: float | None = None, use: bool = True
    ) -> bool:
        """Record a use of ``key``, and pin/unpin and hold it as asked; False if absent."""
        found = True
        if use:
            found = self.store.touch(key)
        if pin is not None:
            found = self.store.set_pin(key, pin)
        if hold:
            rec = self.store.entry_record(key)
            if rec is None:
                return False
            until = time.time() + hold
            if rec.held_until is None or rec.held_until < until:
                found = self.store.set_hold(key, until)
        return found

    def _run(self, flight: Flight, ref, credentials, digest, platform) -> None:
        key = flight.url
        outcome: dict = {"error": Cancelled(f"pull of {key} ended without an answer")}
        if flight.cancel.is_set():  # cancelled while it waited for a worker
            self._land(flight, error=Cancelled(f"pull of {key} was cancelled"))
            return
        try:
            record, lock_path = self._pull_paths(key)
            lock = FileLock(lock_path)
            lock.acquire()  # another process pulling the same URL: wait for it
            try:
                outcome = self._pull_locked(flight, ref, credentials, digest, platform)
            finally:
                if not record.exists():  # nothing to resume: leave no file per URL behind
                    unlink(lock_path)  # waiters re-check the inode
                lock.release()  # before answering: a caller told "failed" must not see it busy
        except BaseException as e:  # noqa: BLE001 - every failure is the callers' answer
            outcome = {"error": e if isinstance(e, NekkoError) else _internal(e)}
        finally:
            self._land(flight, **outcome)

    def _pull_locked(self, flight: Flight, ref, credentials, digest, platform) -> dict:
        key = flight.url
        record = self._pull_paths(key)[0]
        with self._lock:
            marks = dict(flight.marks)
        entry = self._cached(
            key, platform, digest, ref, credentials, marks.get("pin"), marks.get("hold")
        )
        if entry is not None:  # another process did it
            return {"result": (entry, False)}
        log.info("pulling %s", key)
        state: dict[str, Any] = {"url": key, "started": time.time(), "ingest": []}
        try:
            old = json.loads(read_file(record))
            state["ingest"] = [r for r in old.get("ingest", []) if isinstance(r, str)]
        except (OSError, ValueError):
            pass
        try:
            write_atomic(record, json.dumps(state).encode())

            def on_ingest(ref_name: str) -> None:
                if ref_name not in state["ingest"]:
                    state["ingest"].append(ref_name)
                    write_atomic(record, json.dumps(state).encode())

            with Lease(self.store) as lease:
                job = Job(
                    self.config,
                    self.store,
                    self.transfer,
                    lease,
                    credentials,
                    digest,
                    platform,
                    flight.cancel,
                    flight.progress,
                    on_ingest,
                    functools.partial(self.budget.make_room, lease),
                )
                result = self._source_pull(job, ref)
                if flight.cancel.is_set():
                    raise Cancelled(f"pull of {key} was cancelled")
                auth = access.pull_auth(self, ref, credentials)
                self._commit(key, result, auth[0] if auth else None)
                if auth is not None:  # this caller just proved its access
                    self.access.remember(key, access.credential_hash(auth))
                with self._lock:
                    marks = dict(flight.marks)
                if marks:  # still under the pull's lock: never evictable in between
                    self.mark(key, marks.get("pin"), marks.get("hold"), use=False)
            if job.spare:  # stored on a guess while unpacking; after the lease: ours no more
                self.store.discard(job.spare)
            if self.config.discard_unpacked_layers and result.unpacked:
                freed = self.store.discard(result.unpacked)  # after the lease: ours no more
                log.info(
                    "%s: freed %d unpacked tar layers (%d bytes)",
                    key,
                    len(freed.blobs_freed),
                    freed.bytes_freed,
                )
            unlink(record)
            self.budget.settle()
            entry = self.catalog.entry(key)
            self._count("complete", ref)
            took = max(time.time() - flight.started, 1e-6)
            got = flight.progress.done - flight.progress.deduplicated
            log.info(
                "pulled %s: %d bytes in %.1f s (%.0f MiB/s), %d already cached",
                key,
                got,
                took,
                got / took / (1 << 20),
                flight.progress.deduplicated,
            )
            with self._lock:  # bytes the cache already had (/metrics)
                self.stats["bytes_deduplicated"] = (
                    self.stats.get("bytes_deduplicated", 0) + flight.progress.deduplicated
                )
            return {"result": (entry, True)}
        except BaseException as e:  # noqa: BLE001 - every failure is the callers' answer
            err = e if isinstance(e, NekkoError) else _internal(e)
            keep = isinstance(err, _RESUMABLE) or (
                isinstance(err, Cancelled) and flight.keep_partial
            )
            if err.context.get("up_front") and not any(
                self.store.partial_size(r) for r in state["ingest"]
            ):
                keep = False  # refused before a byte was written: nothing to resume
            if not keep:
                unlink(record)
            if isinstance(err, PullTooLarge):  # what arrived of it is not worth a resume
                for r in state["ingest"]:
                    self.store.discard_partial(r)
            self._count(err.code, ref)
            log.info("pull %s failed: %s", key, err.message)
            return {"error": err}

    def _source_pull(self, job: Job, ref) -> PullResult:
        if isinstance(ref, HTTPRef):
            from nekko_sm.sources import http

            return http.pull(job, ref)
        if isinstance(ref, OCIRef):
            from nekko_sm.sources import oci

            return oci.pull(job, ref)
        if isinstance(ref, HFRef):
            from nekko_sm.sources import hf

            return hf.pull(job, ref)
        raise AssertionError(f"no source for {ref!r}")

    def _commit(self, key: str, result: PullResult, protected: str | None = None) -> None:
        m = result.manifest
        ann = dict(m.annotations)
        ann[A_DIGEST] = result.digest
        if protected:
            ann[access.A_PROTECTED] = protected  # what kind of credential, never the secret
        if result.platform:
            ann[A_PLATFORM] = result.platform
        if result.format:
            ann[A_FORMAT] = result.format
        if result.model:
            ann[A_MODEL] = result.model
        if result.files_manifest is not None:
            ann[A_FILES] = result.files_manifest.digest
            if self.config.discard_unpacked_layers and result.unpacked:
                ann[A_DISCARDED] = " ".join(sorted(result.unpacked))
        desc = Descriptor(m.media_type, m.digest, m.size, ann, m.artifact_type, m.platform)
        files = self.catalog.files_of(desc)
        if is_single_file(desc, files) is None:
            self.store.make_view(key, [(f["name"], f["digest"]) for f in files])
        info = self.catalog.template(key, desc)
        self.store.put_entry(key, desc, info, shown_size(info))
        if result.hf_view is not None:
            try:  # CACHE_DIR/huggingface/hub, for engines that know the repo id (DESIGN 8)
                self._hf_view().add(result.hf_view)
            except (NekkoError, OSError) as e:
                log.warning("%s: not in the Hugging Face cache view: %s", key, e)

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self.stats["bytes_downloaded"] += n

    def _count(self, result: str, ref) -> None:
        with self._lock:
            k = (ref.scheme, result)
            self.stats["pulls"][k] = self.stats["pulls"].get(k, 0) + 1


def _platform_matches(desc: Descriptor, wanted: str | None) -> bool:
    """Is the cached image one for ``wanted`` (None: the host's)?

    Keys name the platform unless it is the host's, so a mismatch is only an entry that an
    older version cached under the plain URL for another platform: it is pulled again.
    """
    have = desc.annotations.get(A_PLATFORM)
    if desc.media_type in INDEX_TYPES or not have:
        return True  # every platform is there, or not a platform's image from an index
    if wanted is None:
        from nekko_sm.config import host_platform

        wanted = str(host_platform())
    return wanted == have


def _internal(e: BaseException) -> NekkoError:
    if isinstance(e, OSError):
        import errno

        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return InsufficientStorage(f"disk full: {e.strerror}")
        # The message says what failed, not where: str(e) holds absolute paths (the log
        # has them, for whoever runs the node).
        log.warning("file system error: %s", e)
        err = NekkoError(f"{type(e).__name__}: {e.strerror or 'failed'}")
    else:
        log.exception("unexpected error")
        err = NekkoError(f"internal error: {type(e).__name__}: {e}")
    return err
