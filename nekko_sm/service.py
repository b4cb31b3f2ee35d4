"""The service: pull / status / remove / list on top of the store and the sources.

:class:`Service` is what the API and the CLI call.  At start-up it opens the store
(refusing a cache others could change), takes over what an older version left, and sets
up the catalog of entries, the access checks and the disk budget.  It owns the public
operations: resolving a URL to its canonical key (and the platform it is pulled for),
starting or joining a pull and waiting for it, and the entry operations: status, use,
list, pin, remove, gc, verify.  It writes no bytes of a pull itself: its bases do, the
flight table (:mod:`nekko_sm.flight_table`) and the pull's work (:mod:`nekko_sm.puller`).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable
from functools import partial
from typing import Any, Callable

from nekko_sm import access
from nekko_sm.config import Config
from nekko_sm.credentials import Credentials
from nekko_sm.entries import Catalog
from nekko_sm.errors import BadRequest, Cancelled, EntryNotFound
from nekko_sm.flight_table import Flight
from nekko_sm.puller import Puller
from nekko_sm.record import replace
from nekko_sm.refparse import parse
from nekko_sm.refs import OCIRef
from nekko_sm.store import (
    REF_NAME,
    Descriptor,
    GCReport,
    Store,
    check_digest,
    make_dirs,
    read_file,
    unlink,
)


class Service(Puller):
    def __init__(self, config: Config, store: Store | None = None, transfer=None) -> None:
        self.config = config
        self.store = store or Store(config.cache_dir)
        self._transfer = transfer  # made on first use: status/path need no network stack
        self.pulls_dir = self.store.ingest_dir / "pulls"
        self.store.create()  # first: refuses (UnsafeCacheDir) a cache others could change
        make_dirs(self.pulls_dir)
        super().__init__()  # the flight table
        self.access = access.AccessChecks()
        self.catalog = Catalog(self.store, self.pulls_dir, self._live)
        self.store.describe = self.catalog.template  # entries taken over at open
        self.store.init()
        self.stats: dict[str, Any] = {"pulls": {}, "bytes_downloaded": 0, "errors": {}}

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
        return replace(ref, platform=None if want in (None, native) else want), want

    # -- pulling ------------------------------------------------------------------------
    def pull(
        self,
        url: str,
        credentials: Credentials | None = None,
        digest: str | None = None,
        platform: str | None = None,
        pin: bool | None = None,
        hold: float | None = None,
    ) -> tuple[dict, bool]:
        """Download ``url`` unless cached; returns (entry, created_now)."""
        flight, entry = self.start(url, credentials, digest, platform, pin, hold)
        if entry is not None:
            return entry, False
        assert flight is not None
        return self.finish(flight, pin, hold)

    def start(
        self,
        url: str,
        credentials: Credentials | None = None,
        digest: str | None = None,
        platform: str | None = None,
        pin: bool | None = None,
        hold: float | None = None,
    ) -> tuple[Flight | None, dict | None]:
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
        flight = Flight(key, self._count_bytes, self.config.max_pull_size)
        flight.digest, flight.cred, flight.protected = digest, cred, auth is not None
        confirm = partial(self._confirm_landed, key, ref, credentials)
        return self._fly(
            flight, pin, hold, confirm, self._run, ref, credentials, digest, platform
        ), None

    def _confirm_landed(self, key: str, ref, credentials: Credentials | None) -> None:
        """A caller who joined a protected pull proves access once the entry is there."""
        desc = self.store.get_entry(key)
        if desc is None:
            raise Cancelled(f"{key} was removed while the pull ran")
        self.access.confirm(self, key, ref, desc, credentials)

    def finish(
        self, flight: Flight, pin: bool | None = None, hold: float | None = None
    ) -> tuple[dict, bool]:
        """Wait for ``flight``; (entry, created_now) with this caller's pin and hold applied."""
        entry, created = flight.future.result()
        if pin is not None or hold is not None:  # a caller who joined after the commit
            self.mark(entry["url"], pin, hold)
            entry = self.catalog.entry(entry["url"])
        return entry, created

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

    def status(self, url: str) -> dict:
        """The entry for ``url``: complete, incomplete (with progress), or EntryNotFound."""
        return self.catalog.status(self.canonical(url))

    def answer(self, token: str, decode: Callable[[str], str], render: bool = True) -> bytes | None:
        """The encoded answer for a complete entry asked for as ``token`` (a path's text);
        ``render=False``: None for an entry never rendered (the one case that writes)."""
        return self.catalog.answer(token, lambda t: self.canonical(decode(t)), render)

    def list(self) -> list:
        return self.catalog.list()

    # -- removing -------------------------------------------------------------------------
    def remove(self, url: str, wait: float = 30.0) -> dict:
        """Cancel any pull of ``url``, drop its entry, free blobs no one else uses."""
        key = self.canonical(url)
        flight = self._cancel(key, wait)
        record = self._pull_paths(key)[0]
        had_record = record.exists()
        refs: list = []
        if had_record:
            try:
                refs = json.loads(read_file(record)).get("ingest", [])
            except (OSError, ValueError):
                pass
            unlink(record)
        self._hf_view().remove(key)  # first: its hard links hold the blobs' bytes
        gone, report = self.store.free_entry(key)
        self.access.forget(key)
        self._forget(key)
        if gone is None and not had_record and flight is None:
            raise EntryNotFound(f"{key} is not in the cache")
        for r in refs:
            self.store.discard_partial(r)
        return {
            "url": key,
            "blobs_freed": len(report.blobs_freed),
            "bytes_freed": report.bytes_freed,
        }

    def gc(self, dry_run: bool = False) -> GCReport:
        """``store.gc``, the Hugging Face cache view first pruned of entries no longer
        there (its hard links would keep the freed blobs' bytes on disk)."""
        if not dry_run:
            self._hf_view().prune(d.annotations[REF_NAME] for d in self.store.entries())
        return self.store.gc(dry_run=dry_run)

    def verify(
        self,
        roots: Iterable[Descriptor] | None = None,
        repair: bool = False,
    ) -> builtins.list[tuple[str, str]]:
        """``store.verify``; with ``repair``, the entries it removed leave the Hugging Face
        cache view too (whose hard links would still show the damaged bytes)."""
        problems = self.store.verify(roots, repair=repair)
        if repair and problems:
            self._hf_view().prune(d.annotations[REF_NAME] for d in self.store.entries())
        return problems

    def close(self) -> None:
        self._stop_flights()
        if self._transfer is not None:
            self._transfer.close()
        self.store.close()


# The longest hold one request may ask for (an engine renews its hold while it runs).
MAX_HOLD = 10 * 365 * 86400


def check_hold(hold: object) -> float | None:
    """A hold in seconds from a request: a number from 0 to MAX_HOLD, else BadRequest."""
    if hold is None:
        return None
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= MAX_HOLD:
        raise BadRequest(
            f'"hold" must be a number of seconds from 0 to {MAX_HOLD}, not {str(hold)[:40]!r}'
        )
    return float(hold)
