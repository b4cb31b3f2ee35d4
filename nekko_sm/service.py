"""pull / status / remove / list on top of the store and the sources.

Single flight: one download per canonical URL at a time, in this process (callers join
the running :class:`Flight`) and across processes (an flock on ``ingest/pulls/KEY.lock``
held for the whole pull; whoever gets it next finds the entry complete).  While a pull
runs or after it was interrupted, ``ingest/pulls/KEY.json`` says so, which is what
makes an entry "incomplete" (206) rather than absent (404).
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import functools
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from pathlib import Path
from typing import Any, Callable

from nekko_sm import access
from nekko_sm.config import Config
from nekko_sm.credentials import Credentials
from nekko_sm.entries import Catalog, is_single_file, lock_held, pull_paths
from nekko_sm.errors import (
    BadRequest,
    Busy,
    Cancelled,
    Conflict,
    EntryNotFound,
    InsufficientStorage,
    NekkoError,
    PullTooLarge,
    UpstreamTooSlow,
    UpstreamUnavailable,
)
from nekko_sm.models.hfcache import HFCacheView
from nekko_sm.refs import HFRef, HTTPRef, OCIRef, parse
from nekko_sm.sources.base import A_DIGEST, A_FORMAT, A_MODEL, A_PLATFORM, Job, Progress, PullResult
from nekko_sm.store import (
    A_DISCARDED,
    A_FILES,
    INDEX_TYPES,
    REF_NAME,
    Descriptor,
    FileLock,
    GCReport,
    Lease,
    Store,
    check_digest,
    make_dirs,
    read_file,
    unlink,
    write_atomic,
)

log = logging.getLogger("nekko_sm.service")

# Failures remembered for status (a URL's last error), the oldest forgotten first.
_MAX_FAILURES = 1000

# Pulls run on a fixed pool of worker threads (each pull may use up to --jobs more for its
# blobs and ranges); the rest wait in a queue, at most MAX_QUEUED_PULLS, beyond which a new
# pull is refused (503 busy).  500 slow pulls used to be 1,001 threads and 2,506 fds.
PULL_WORKERS = 16
MAX_QUEUED_PULLS = 1000

# Errors after which a partial download is worth keeping (the entry stays "incomplete").
_RESUMABLE = (UpstreamUnavailable, InsufficientStorage, UpstreamTooSlow)


class _Workers:
    """A fixed number of daemon threads that run queued pulls, oldest first.  Threads start
    as work comes and end after a minute idle, or at :meth:`close`."""

    IDLE = 60.0

    def __init__(self, n: int) -> None:
        self._n = n
        self._cond = threading.Condition()
        self._queue: deque[tuple[Callable[..., None], tuple]] = deque()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def __len__(self) -> int:
        """Pulls waiting for a worker."""
        with self._cond:
            return len(self._queue)

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        with self._cond:
            self._queue.append((fn, args))
            if len(self._queue) > self._idle and self._threads < self._n:
                self._threads += 1
                threading.Thread(target=self._loop, daemon=True, name="pull worker").start()
            self._cond.notify()

    def discard(self, first_arg: object) -> bool:
        """Take the queued call whose first argument is ``first_arg`` out of the queue."""
        with self._cond:
            for item in self._queue:
                if item[1] and item[1][0] is first_arg:
                    self._queue.remove(item)
                    return True
        return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._queue and not self._closed:
                    if not self._cond.wait(self.IDLE) and not self._queue:
                        break
                self._idle -= 1
                if not self._queue:
                    self._threads -= 1
                    return
                fn, args = self._queue.popleft()
            try:
                fn(*args)
            except BaseException:  # _run answers its callers itself: this is a bug
                log.exception("pull worker")


class Flight:
    """One pull in progress, shared by every caller who asks for the same URL."""

    def __init__(self, url: str, sink: Callable[[int], None] | None = None,
                 limit: int | None = None) -> None:
        self.url = url
        self.future: Future = Future()
        self.cancel = threading.Event()
        self.progress = Progress(sink, limit, url)
        self.started = time.time()
        self.keep_partial = False  # set when stopping the server: the pull stays resumable
        self.digest: str | None = None  # the digest the pull checks (its first caller's)
        self.cred = "anonymous"  # hash of the credentials the pull uses (access.credential_hash)
        self.protected = False  # the pull uses credentials: its entry will be protected
        self.marks: dict[str, Any] = {}  # pin/hold its callers asked for, set at commit

    def want(self, pin: bool | None, hold: float | None) -> None:
        """A caller's pin and hold, applied when the pull commits (the last pin wins)."""
        if pin is not None:
            self.marks["pin"] = pin
        if hold:
            self.marks["hold"] = max(hold, self.marks.get("hold", 0))

    def joined(self, digest: str | None, confirm: Callable[[], None] | None = None) -> Flight:
        """This flight as another caller sees it: ``confirm()`` proves the caller's access
        (a protected pull, other credentials), then the answer must match ``digest``."""
        if (digest is None or digest == self.digest) and confirm is None:
            return self
        view = copy.copy(self)
        view.future = Future()

        def answer(done: Future) -> None:
            try:
                entry, created = done.result()
                if confirm is not None:
                    confirm()  # first: a refused caller learns nothing, not even the digest
                _check_digest(entry, digest)
            except BaseException as e:  # noqa: BLE001 - the joined caller's answer
                view.future.set_exception(e)
            else:
                view.future.set_result((entry, created))

        def land(done: Future) -> None:
            if confirm is None:
                answer(done)
            else:  # asks the upstream: not on the thread that answers everyone else
                threading.Thread(target=answer, args=(done,), name="access check",
                                 daemon=True).start()

        self.future.add_done_callback(land)
        return view


class Service:
    def __init__(self, config: Config, store: Store | None = None,
                 transfer=None) -> None:
        self.config = config
        self.store = store or Store(config.cache_dir)
        self._transfer = transfer  # made on first use: status/path need no network stack
        self.pulls_dir = self.store.ingest_dir / "pulls"
        self.store.create()  # first: refuses (UnsafeCacheDir) a cache others could change
        make_dirs(self.pulls_dir)
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        # The last failure of each URL, as its JSON error only (never the exception: its
        # traceback holds frames and buffers), the oldest forgotten past _MAX_FAILURES.
        self._failures: OrderedDict[str, dict] = OrderedDict()
        self._workers = _Workers(PULL_WORKERS)
        self.access = access.AccessChecks()
        self.catalog = Catalog(self.store, self.pulls_dir, self._live)
        self.store.describe = self.catalog.template  # entries taken over at open
        self.store.init()
        self.stats: dict[str, Any] = {"pulls": {}, "bytes_downloaded": 0, "errors": {}}
        from nekko_sm.budget import Budget

        self.budget = Budget(self.store, config, self.busy)

    @property
    def transfer(self):
        if self._transfer is None:
            with self._lock:
                if self._transfer is None:
                    from nekko_sm.transfer import Transfer

                    self._transfer = Transfer(self.config)
        return self._transfer

    # -- references ---------------------------------------------------------------------
    def canonical(self, url: str, platform: str | None = None) -> str:
        return self.resolve(url, platform)[0].canonical

    def resolve(self, url: str, platform: str | None = None) -> tuple:
        """(ref, platform to pull): an image for another platform than the host's is keyed so.

        The platform is the caller's, else the URL's ``?platform=``, else the configured
        one; when it is not the host's own, it becomes part of the key, so a caller who asks
        for linux/arm64 never decides what an amd64 node's callers get (issue 9, finding 7).
        """
        ref = parse(url, self.config.hf_endpoint)
        if not isinstance(ref, OCIRef):
            return ref, platform
        from nekko_sm.config import host_platform, parse_platform

        want = platform or ref.platform or self.config.platform or None
        if want is not None:
            want = "all" if want.strip().lower() == "all" else str(parse_platform(want))
        native = str(host_platform())
        return dataclasses.replace(ref, platform=None if want in (None, native) else want), want

    # -- pulling ------------------------------------------------------------------------
    def pull(self, url: str, credentials: Credentials | None = None, digest: str | None = None,
             platform: str | None = None, pin: bool | None = None,
             hold: float | None = None) -> tuple[dict, bool]:
        """Download ``url`` unless cached; returns (entry, created_now)."""
        flight, entry = self.start(url, credentials, digest, platform, pin, hold)
        if entry is not None:
            return entry, False
        assert flight is not None
        return self.finish(flight, pin, hold)

    def start(self, url: str, credentials: Credentials | None = None, digest: str | None = None,
              platform: str | None = None, pin: bool | None = None,
              hold: float | None = None) -> tuple[Flight | None, dict | None]:
        """Begin (or join) a pull.  Returns (flight, None), or (None, entry) when cached.

        ``pin`` (True/False) pins or unpins the entry, ``hold`` (seconds) keeps it from
        eviction that long from now; both also for an entry already cached, and both, like
        the request itself, count as a use of it (DESIGN 9).
        """
        if digest is not None:
            check_digest(digest)
        hold = check_hold(hold)
        ref, platform = self.resolve(url, platform or None)
        key = ref.canonical
        auth = access.pull_auth(self, ref, credentials)
        cred = access.credential_hash(auth)
        entry = self._cached(key, platform, digest, ref, credentials, pin, hold)
        if entry is not None:
            return None, entry
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.want(pin, hold)
                confirm = None
                if flight.protected and cred != flight.cred:
                    confirm = partial(self._confirm_landed, key, ref, credentials)
                return flight.joined(digest, confirm), None
            if len(self._workers) >= MAX_QUEUED_PULLS:
                raise Busy(f"{MAX_QUEUED_PULLS} pulls are waiting already: try again later")
            flight = Flight(key, self._count_bytes, self.config.max_pull_size)
            flight.digest, flight.cred, flight.protected = digest, cred, auth is not None
            flight.want(pin, hold)
            self._flights[key] = flight
            self._failures.pop(key, None)
            self._workers.submit(self._run, flight, ref, credentials, digest, platform)
        return flight, None

    def _confirm_landed(self, key: str, ref, credentials: Credentials | None) -> None:
        """A caller who joined a protected pull proves access once the entry is there."""
        desc = self.store.get_entry(key)
        if desc is None:
            raise Cancelled(f"{key} was removed while the pull ran")
        self.access.confirm(self, key, ref, desc, credentials)

    def _cached(self, key: str, platform: str | None, digest: str | None, ref,
                credentials: Credentials | None, pin: bool | None = None,
                hold: float | None = None) -> dict | None:
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
                _check_digest(self.catalog.entry(key), digest)
            self.mark(key, pin, hold)
            return self.catalog.entry(key)
        except EntryNotFound:
            return None  # evicted or removed just now: pull it again

    def finish(self, flight: Flight, pin: bool | None = None,
               hold: float | None = None) -> tuple[dict, bool]:
        """Wait for ``flight``; (entry, created_now) with this caller's pin and hold applied."""
        entry, created = flight.future.result()
        if pin is not None or hold is not None:  # a caller who joined after the commit
            self.mark(entry["url"], pin, hold)
            entry = self.catalog.entry(entry["url"])
        return entry, created

    # -- use, pins, holds ------------------------------------------------------------------
    def mark(self, key: str, pin: bool | None = None, hold: float | None = None,
             use: bool = True) -> bool:
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

    def use(self, url: str) -> dict:
        """The complete entry for ``url``, recorded as used (``path``); EntryNotFound if not."""
        entry = self.status(url)
        if entry.get("state") == "complete" and self.store.touch(entry["url"]):
            entry = self.status(url)
        return entry

    def pin(self, url: str, pinned: bool = True) -> dict:
        """Pin (or unpin) a cached entry: it is never evicted.  EntryNotFound if absent."""
        key = self.canonical(url)
        if not self.store.set_pin(key, pinned):
            raise EntryNotFound(f"{key} is not in the cache")
        return self.catalog.entry(key)

    def busy(self, key: str) -> bool:
        """Is ``key`` being pulled, by this process or another?"""
        with self._lock:
            if key in self._flights:
                return True
        return lock_held(self._pull_paths(key)[1])

    def _pull_paths(self, key: str) -> tuple[Path, Path]:
        return pull_paths(self.pulls_dir, key)

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
        entry = self._cached(key, platform, digest, ref, credentials, marks.get("pin"),
                             marks.get("hold"))
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
                job = Job(self.config, self.store, self.transfer, lease, credentials, digest,
                          platform, flight.cancel, flight.progress, on_ingest,
                          functools.partial(self.budget.make_room, lease))
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
            if self.config.discard_unpacked_layers and result.unpacked:
                freed = self.store.discard(result.unpacked)  # after the lease: ours no more
                log.info("%s: freed %d unpacked tar layers (%d bytes)", key,
                         len(freed.blobs_freed), freed.bytes_freed)
            unlink(record)
            self.budget.settle()
            entry = self.catalog.entry(key)
            self._count("complete", ref)
            took = max(time.time() - flight.started, 1e-6)
            got = flight.progress.done - flight.progress.deduplicated
            log.info("pulled %s: %d bytes in %.1f s (%.0f MiB/s), %d already cached",
                     key, got, took, got / took / (1 << 20), flight.progress.deduplicated)
            with self._lock:  # bytes the cache already had (/metrics)
                self.stats["bytes_deduplicated"] = (self.stats.get("bytes_deduplicated", 0)
                                                    + flight.progress.deduplicated)
            return {"result": (entry, True)}
        except BaseException as e:  # noqa: BLE001 - every failure is the callers' answer
            err = e if isinstance(e, NekkoError) else _internal(e)
            keep = isinstance(err, _RESUMABLE) or (isinstance(err, Cancelled) and flight.keep_partial)
            if err.context.get("up_front") and not any(
                    self.store.partial_size(r) for r in state["ingest"]):
                keep = False  # refused before a byte was written: nothing to resume
            if not keep:
                unlink(record)
            if isinstance(err, PullTooLarge):  # what arrived of it is not worth a resume
                for r in state["ingest"]:
                    self.store.discard_partial(r)
            self._count(err.code, ref)
            log.info("pull %s failed: %s", key, err.message)
            return {"error": err}

    def _land(self, flight: Flight, result=None, error: NekkoError | None = None) -> None:
        """Forget the flight first, then answer: a woken caller never joins a finished one."""
        with self._lock:
            if self._flights.get(flight.url) is flight:
                del self._flights[flight.url]
            if error is not None and not flight.future.done():
                self._failures[flight.url] = error.to_json()["error"]
                self._failures.move_to_end(flight.url)
                while len(self._failures) > _MAX_FAILURES:
                    self._failures.popitem(last=False)
        if flight.future.done():
            return
        if error is not None:
            flight.future.set_exception(error)
        else:
            flight.future.set_result(result)

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
        self.store.put_entry(key, desc, self.catalog.template(key, desc))
        if result.hf_view is not None:
            try:  # CACHE_DIR/huggingface/hub, for engines that know the repo id (DESIGN 8)
                HFCacheView(self.store).add(result.hf_view)
            except (NekkoError, OSError) as e:
                log.warning("%s: not in the Hugging Face cache view: %s", key, e)

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self.stats["bytes_downloaded"] += n

    def _count(self, result: str, ref) -> None:
        with self._lock:
            k = (ref.scheme, result)
            self.stats["pulls"][k] = self.stats["pulls"].get(k, 0) + 1

    # -- reading entries ----------------------------------------------------------------
    def _live(self, key: str) -> tuple[Progress | None, dict | None]:
        with self._lock:
            flight = self._flights.get(key)
            failure = self._failures.get(key)
        return (flight.progress if flight is not None else None), failure

    def status(self, url: str) -> dict:
        """The entry for ``url``: complete, incomplete (with progress), or EntryNotFound."""
        return self.catalog.status(self.canonical(url))

    def answer(self, token: str, decode: Callable[[str], str]) -> bytes | None:
        """The encoded answer for a complete entry asked for as ``token`` (a path's text)."""
        return self.catalog.answer(token, lambda t: self.canonical(decode(t)))

    def list(self) -> list:
        return self.catalog.list()

    # -- removing -------------------------------------------------------------------------
    def remove(self, url: str, wait: float = 30.0) -> dict:
        """Cancel any pull of ``url``, drop its entry, free blobs no one else uses."""
        key = self.canonical(url)
        with self._lock:
            flight = self._flights.get(key)
        if flight is not None:
            flight.cancel.set()
            if self._workers.discard(flight):  # still waiting for a worker: it ends now
                self._land(flight, error=Cancelled(f"pull of {key} was cancelled"))
            try:
                flight.future.result(timeout=wait)
            except (NekkoError, FutureTimeout):  # its failure is its caller's; we only wait
                pass
        record = self._pull_paths(key)[0]
        had_record = record.exists()
        refs: list = []
        if had_record:
            try:
                refs = json.loads(read_file(record)).get("ingest", [])
            except (OSError, ValueError):
                pass
            unlink(record)
        HFCacheView(self.store).remove(key)  # first: its hard links hold the blobs' bytes
        gone, report = self.store.free_entry(key)
        self.access.forget(key)
        with self._lock:
            self._failures.pop(key, None)
        if gone is None and not had_record and flight is None:
            raise EntryNotFound(f"{key} is not in the cache")
        for r in refs:
            self.store.discard_partial(r)
        return {"url": key, "blobs_freed": len(report.blobs_freed),
                "bytes_freed": report.bytes_freed}

    def gc(self, dry_run: bool = False) -> GCReport:
        """``store.gc``, the Hugging Face cache view first pruned of entries no longer
        there (its hard links would keep the freed blobs' bytes on disk)."""
        if not dry_run:
            HFCacheView(self.store).prune(d.annotations[REF_NAME] for d in self.store.entries())
        return self.store.gc(dry_run=dry_run)

    def verify(self, roots: Iterable[Descriptor] | None = None, repair: bool = False,
               ) -> builtins.list[tuple[str, str]]:
        """``store.verify``; with ``repair``, the entries it removed leave the Hugging Face
        cache view too (whose hard links would still show the damaged bytes)."""
        problems = self.store.verify(roots, repair=repair)
        if repair and problems:
            HFCacheView(self.store).prune(d.annotations[REF_NAME] for d in self.store.entries())
        return problems

    def close(self) -> None:
        with self._lock:
            flights = list(self._flights.values())
        for f in flights:
            f.keep_partial = True
            f.cancel.set()
            if self._workers.discard(f):
                self._land(f, error=Cancelled(f"pull of {f.url} was cancelled: stopping"))
        self._workers.close()
        for f in flights:
            try:
                f.future.result(timeout=10)
            except (NekkoError, FutureTimeout):  # its failure is its caller's; we only wait
                pass
        if self._transfer is not None:
            self._transfer.close()
        self.store.close()


# The longest hold one request may ask for (an engine renews its hold while it runs).
MAX_HOLD = 10 * 365 * 86400


def check_hold(hold: object) -> float | None:
    """A hold in seconds from a request: a number from 0 to MAX_HOLD, else BadRequest."""
    if hold is None:
        return None
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) \
            or not 0 <= hold <= MAX_HOLD:
        raise BadRequest(f'"hold" must be a number of seconds from 0 to {MAX_HOLD},'
                         f" not {str(hold)[:40]!r}")
    return float(hold)


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


def _check_digest(entry: dict, wanted: str | None) -> None:
    """A caller's digest selects and checks: a cached entry with other bytes is a 409.

    Images answer to the digest the reference resolved to and to the chosen manifest's.
    """
    if wanted is None or wanted in (entry.get("digest"), entry.get("manifest")):
        return
    raise Conflict(f"{entry['url']} is cached with digest {entry.get('digest')}, not the"
                   f" {wanted} asked for: remove it first (rm, or DELETE) to pull it again")


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
