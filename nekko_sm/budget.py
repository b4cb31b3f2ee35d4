"""The disk budget (DESIGN section 9): make room before a pull writes, evicting LRU entries.

With ``--max-cache-size`` and/or ``--min-free-space``, every pull says what it is about to
fetch (a ``Content-Length``, an image's descriptors, the Hub's sizes) through
:meth:`Budget.make_room` before it writes a byte.  Under one cross-process lock
(``CACHE/.budget.lock``: the CLI and ``serve`` decide one at a time, and each decision
sees every other's reservations) it

1. measures the cache (:mod:`nekko_sm.budget_usage`): the bytes of the blobs entries reach
   (a running total kept by the database, one read), the reservations of the pulls in
   flight (their lease files; a dead process's lease is stale and counts nothing), what
   those pulls have written so far, the partial downloads no live pull holds or will
   resume, and the free space of the file system;
2. if the pull fits, records its reservation in its lease and returns;
3. otherwise plans evictions -- stale partials first (oldest first), then whole entries
   least recently used first, never a pinned entry, one held past now, one being pulled
   (here or in another process), and counting only the blobs whose last reference goes
   and that no live pull has leased (what :meth:`Store.free_entry` will really delete);
4. when the plan cannot make the room, refuses with ``507`` saying how much is pinned,
   held, in flight and free, having evicted nothing; else evicts the plan (each eviction
   logged and counted) and reserves.

A pull's reservation is the largest footprint it declared (an HF repository first asks
for all its missing files at once, then for each file: the later asks are inside the
first); it ends with the pull's lease.  :meth:`Budget.enforce` brings a cache that is over
its budget (the budget was lowered, a size was unknown up front) back within it, for
``serve`` at start, ``gc`` and after every pull.

Orphaned blobs (no entry, no live lease: a crash between a commit and its entry) are not
counted until ``gc`` sweeps them; the count would otherwise be a walk of ``blobs/``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nekko_sm.budget_usage import Usage, measure
from nekko_sm.config import Config
from nekko_sm.errors import InsufficientStorage
from nekko_sm.store import FileLock, Lease, Store
from nekko_sm.store.layout import SPACE_MARGIN
from nekko_sm.store.locks import remove_locked_dir

log = logging.getLogger("nekko_sm.budget")

LOCK_NAME = ".budget.lock"
# Rounds of evict-and-measure when a concurrent pull leased a planned blob meanwhile.
_ROUNDS = 3


def human(n: float) -> str:
    """``1.5 GiB``: sizes in messages, powers of 1024 as the options read them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


@dataclass
class Eviction:
    kind: str  # "entry" or "partial"
    name: str  # the URL, or the ingest directory
    nbytes: int  # what the plan expects it to free
    last_used: float
    reach: list[str] = field(default_factory=list)  # an entry's digests (for the plan)


@dataclass
class Report:
    evicted: list[Eviction] = field(default_factory=list)
    bytes_freed: int = 0
    over: int = 0  # bytes still over the budget afterwards (pinned, held, in flight)


class Budget:
    """The budget of one process on one cache; ``busy(url)`` says a pull of it is under way."""

    def __init__(
        self, store: Store, config: Config, busy: Callable[[str], bool] = lambda url: False
    ) -> None:
        self.store = store
        self.max_size = config.max_cache_size
        self.min_free = config.min_free_space
        self.min_free_percent = config.min_free_percent
        self._busy = busy
        self._lock_path = store.root / LOCK_NAME
        self._stats_lock = threading.Lock()
        self.evictions = 0  # entries and partials evicted by this process
        self.bytes_evicted = 0
        self.on_evict: Callable[[Eviction, float | None], None] | None = None  # for bench/

    @property
    def enabled(self) -> bool:
        return (
            self.max_size is not None
            or self.min_free is not None
            or self.min_free_percent is not None
        )

    def floor(self, disk: int) -> int:
        """Bytes to leave free on the file system (at least the store's own margin)."""
        floor = SPACE_MARGIN
        if self.min_free is not None:
            floor = max(floor, self.min_free)
        if self.min_free_percent is not None:
            floor = max(floor, int(disk * self.min_free_percent / 100))
        return floor

    def describe(self) -> str:
        parts = []
        if self.max_size is not None:
            parts.append(f"--max-cache-size {human(self.max_size)}")
        if self.min_free is not None:
            parts.append(f"--min-free-space {human(self.min_free)}")
        if self.min_free_percent is not None:
            parts.append(f"--min-free-space {self.min_free_percent:g}%")
        return ", ".join(parts) or "no budget"

    # -- measuring --------------------------------------------------------------------------
    def usage(self) -> Usage:
        """Measure now (a read of the total, the leases, ingest/ and statvfs)."""
        return measure(self.store)

    def over(self, u: Usage, extra: int = 0, write: int = 0) -> int:
        """Bytes to free so that ``extra`` more bytes (``write`` of them not yet on disk) fit."""
        need = 0
        if self.max_size is not None:
            need = max(need, u.used + extra - self.max_size)
        pending = max(0, u.reserved - u.written)  # what pulls in flight will still write
        need = max(need, self.floor(u.disk) + pending + write - u.free)
        return need

    # -- the decision -----------------------------------------------------------------------
    def make_room(self, lease: Lease, nbytes: int, what: str, resumed: int = 0) -> None:
        """Before a pull writes ``nbytes`` more (``resumed`` already in its partial): make room.

        Raises InsufficientStorage (507) when the room cannot be made; then nothing was
        evicted.  Without a budget this is the plain free-space check.
        """
        if not self.enabled:
            self.store.ensure_space(nbytes, what)
            return
        footprint = max(0, nbytes) + max(0, resumed)
        if footprint <= lease.reserved:
            return  # declared already (a repository's file after the repository)
        extra = footprint - lease.reserved
        with FileLock(self._lock_path):
            for _ in range(_ROUNDS):
                u = self.usage()
                need = self.over(u, extra, min(extra, max(0, nbytes)))
                log.debug(
                    "budget for %s: %d more; entries %d, reserved %d, written %d,"
                    " stale partials %d, free %d: %d to free",
                    what,
                    extra,
                    u.entries,
                    u.reserved,
                    u.written,
                    sum(p.nbytes for p in u.stale),
                    u.free,
                    max(0, need),
                )
                if need <= 0:
                    lease.reserve(footprint)
                    return
                plan, others = self._plan(u, need)
                if sum(e.nbytes for e in plan) < need:
                    raise InsufficientStorage(
                        self._refusal(u, need, what, footprint, plan), up_front=True
                    )
                self._evict(plan, others, f"to make room for {what}")
            u = self.usage()
            need = self.over(u, extra, min(extra, max(0, nbytes)))
            if need > 0:  # live pulls kept leasing what we planned to free
                raise InsufficientStorage(
                    self._refusal(u, need, what, footprint, []), up_front=True
                )
            lease.reserve(footprint)

    def enforce(self, why: str = "the cache is over its budget") -> Report:
        """Evict (stale partials, then LRU entries) until the cache is within its budget."""
        report = Report()
        if not self.enabled:
            return report
        with FileLock(self._lock_path):
            for _ in range(_ROUNDS):
                u = self.usage()
                need = self.over(u)
                if need <= 0:
                    return report
                plan, others = self._plan(u, need)
                if not plan:
                    break
                self._evict(plan, others, why, report)
            u = self.usage()
            report.over = max(0, self.over(u))
        if report.over:
            log.warning(
                "the cache stays %s over its budget (%s): the rest is pinned, held or in flight",
                human(report.over),
                self.describe(),
            )
        return report

    def settle(self) -> None:
        """After a pull: cheap when within budget; evicts when an unknown size overshot."""
        if self.enabled:
            try:
                if self.over(self.usage()) > 0:
                    self.enforce("a pull of unknown size took the cache over its budget")
            except OSError as e:  # the pull is done; the next one tries again
                log.warning("could not bring the cache within its budget: %s", e)

    # -- planning and evicting --------------------------------------------------------------
    def _candidates(self, now: float) -> Iterable:
        """Evictable entries, least recently used first, fetched in growing batches."""
        limit = 64
        seen = 0
        while True:
            batch = self.store.eviction_candidates(now, limit)
            yield from batch[seen:]
            if len(batch) < limit:
                return
            seen, limit = len(batch), limit * 4

    def _plan(self, u: Usage, need: int) -> tuple[list[Eviction], float | None]:
        """What to evict, in order, to free ``need`` bytes; and the oldest use kept after it.

        Greedy in LRU order, counting what each eviction really frees: blobs whose last
        reference goes and that no live pull leased.  An entry that frees nothing itself
        (its blobs are shared with newer entries, or leased) stays in the plan only when a
        later eviction in it frees one of its blobs -- which needed its reference gone too;
        otherwise evicting it would be in vain, and it is kept.  Nothing is evicted unless
        the whole plan reaches ``need`` (the caller checks).
        """
        plan: list[Eviction] = []
        total = 0
        for p in u.stale:
            if total >= need:
                break
            plan.append(Eviction("partial", p.name, p.nbytes, p.mtime))
            total += p.nbytes
        counts: dict[str, tuple[int, int]] = {}
        oldest_kept: float | None = None
        now = time.time()
        for rec in self._candidates(now):
            if rec.protected or self._busy(rec.key):
                continue
            if total >= need:
                oldest_kept = rec.last_used
                break
            reach = self.store.reach_of(rec.key)
            fresh = [d for d in reach if d not in counts]
            if fresh:
                counts.update(self.store.blob_counts(fresh))
            freed = 0
            for d in reach:
                refs, size = counts.get(d, (0, 0))
                if refs <= 0:
                    continue
                counts[d] = (refs - 1, size)
                if refs == 1 and d not in u.leased:
                    freed += size
            plan.append(Eviction("entry", rec.key, freed, rec.last_used, reach))
            total += freed
        plan = [
            e
            for e in plan
            if e.kind == "partial"
            or e.nbytes > 0
            or any(counts.get(d, (1, 0))[0] == 0 and d not in u.leased for d in e.reach)
        ]
        return plan, oldest_kept

    def _evict(
        self,
        plan: list[Eviction],
        oldest_kept: float | None,
        why: str,
        report: Report | None = None,
    ) -> None:
        for ev in plan:
            if ev.kind == "partial":
                d = self.store.ingest_dir / ev.name
                lock = FileLock(d / "lock")
                if not lock.acquire(blocking=False):
                    continue  # someone started writing it meanwhile
                remove_locked_dir(d, lock)
                freed = ev.nbytes
            else:
                if self._busy(ev.name):
                    continue
                gone, gc_report = self.store.free_entry(ev.name, unused_since=ev.last_used)
                if gone is None:
                    continue  # removed, used, pinned or held since the plan: the next round sees
                from nekko_sm.models.hfcache import HFCacheView

                HFCacheView(self.store).remove(ev.name)  # its hard links held the bytes too
                freed = gc_report.bytes_freed
            with self._stats_lock:
                self.evictions += 1
                self.bytes_evicted += freed
            if report is not None:
                report.evicted.append(ev)
                report.bytes_freed += freed
            # Epoch times with microseconds, so a log shows the order (bench/soak_budget.py).
            log.info(
                "evicted %s %s (last used %s = %.6f, %s freed, at %.6f) %s",
                ev.kind,
                ev.name,
                _iso(ev.last_used),
                ev.last_used,
                human(freed),
                time.time(),
                why,
            )
            if self.on_evict is not None:
                self.on_evict(ev, oldest_kept)

    # -- the refusal ------------------------------------------------------------------------
    def protected_bytes(self) -> tuple[int, int]:
        """(bytes pinned entries reach, bytes held entries reach that no pin covers)."""
        now = time.time()
        pinned: set[str] = set()
        held: set[str] = set()
        for rec in self.store.entry_records():
            if rec.pinned:
                pinned.update(self.store.reach_of(rec.key))
            elif rec.held_until is not None and rec.held_until > now:
                held.update(self.store.reach_of(rec.key))
        held -= pinned
        sizes = self.store.blob_counts(pinned | held)
        return (
            sum(sizes[d][1] for d in pinned if d in sizes),
            sum(sizes[d][1] for d in held if d in sizes),
        )

    def _refusal(self, u: Usage, need: int, what: str, footprint: int, plan: list[Eviction]) -> str:
        pinned, held = self.protected_bytes()
        could = sum(e.nbytes for e in plan)
        return (
            f"not enough space for {what}: it needs {human(footprint)} and the budget"
            f" ({self.describe()}) is {human(need)} short even after evicting every"
            f" entry it may ({human(could)} evictable); the cache holds {human(u.used)}:"
            f" {human(pinned)} pinned, {human(held)} held, {human(u.in_flight)} for pulls"
            f" in flight; {human(u.free)} free on disk (keeping {human(self.floor(u.disk))}"
            "); nothing was evicted"
        )


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d}"
