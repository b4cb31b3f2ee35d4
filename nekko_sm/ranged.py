"""One large blob over several connections: byte ranges written at their offsets.

The blob is cut into parts (a few MiB each).  Workers, one per connection, claim parts in
order, so the contiguous frontier the writer hashes behind advances while the rest is
still arriving.  A lone worker claims a whole run of parts and fetches it in one request,
as one stream would; when more connections join they take the untouched parts nearest the
frontier from it (it stops at the end of its current part), and at the end an idle worker
splits the in-progress part with the most left.  The part map ``[[start, end, next], ...]``
lives in the writer's state and is saved (every half second) only after an fdatasync of
the data, so after a crash every byte it says is there is there.  A server that answers a
ranged request with ``200`` (it ignores ranges, or the content changed under
``If-Range``) ends this mode: the caller starts over with one stream.

How many connections (a blob of at least ``GROW_MIN``): one stream first; after a short
measurement, ``connections`` (``--jobs``) if the hasher is not already the limit, then
twice as many, and so on up to :func:`connection_cap`, each step kept only while the
aggregate rate rises by ``GAIN`` and the hasher keeps up; a step that does not pay is
undone and the count stays.  What worked is remembered per origin for this process, and
the next blob from there starts at it.  Extra connections come from the transfer's shared
budgets, so many blobs at once do not multiply them.  A smaller blob simply gets
``connections`` from the start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Callable

from nekko_sm.errors import Cancelled, NekkoError, SizeMismatch, UpstreamUnavailable
from nekko_sm.httpio import (
    MAX_STALLS,
    content_range,
    content_range_end,
    fill,
    is_stall,
    origin,
    read_limited,
    reason,
)
from nekko_sm.refs import redact

log = logging.getLogger("nekko_sm.ranged")

MIN_PART = 4 << 20
MIN_PARALLEL = 32 << 20  # below this, one stream is as fast: not worth the extra requests
MAX_PART = 1 << 30
MAX_PARTS = 4096
SAVE_EVERY = 0.5  # seconds between durable saves of the part map (what a crash can lose)
MAX_CONNECTIONS = 32  # per blob, however much faster more would be
GROW_MIN = 64 << 20  # smaller blobs keep the connections they start with
TICK = 0.05  # seconds between looks of the controller
PROBE = 0.15  # seconds one stream is measured before more connections are tried
WINDOW = 0.25  # seconds each later connection count is measured
WINDOW_BYTES = 2 << 20  # ... and at least this much per connection (servers pace in bursts),
WINDOW_MAX = 4  # unless the window is this many times longer already
SETTLE = 0.5  # at most this long for new connections to start bringing bytes
GAIN = 1.25  # a step up must raise the aggregate rate this much to be kept
HASH_BOUND = 0.85  # the hasher busy this share of the time: more bytes would only wait
SPLIT_MIN = 16 << 20  # split an in-progress part only when it has this much left
MARGIN = 8 << 20  # a split point stays this far past its owner's last recorded byte (at
# least two receive buffers: the owner may be reading one past what it recorded)


_Thread = threading.Thread  # (the tests of the controller put a stand-in here)


class RangesRefused(Exception):
    """The server answered a ranged request with the whole body: use one stream instead."""


def connection_cap(jobs: int) -> int:
    """Connections one transfer may hold for ranged downloads: up to 4 x ``--jobs``
    (at most ``MAX_CONNECTIONS``), never fewer than ``--jobs`` itself."""
    return max(jobs, min(MAX_CONNECTIONS, 4 * jobs))


def part_size_for(total: int, connections: int, max_span: int | None = None) -> int:
    """About four parts per connection, within [MIN_PART, 1 GiB] (and ``max_span``)."""
    size = total // max(1, connections * 4)
    size = max(MIN_PART, min(MAX_PART, size), -(-total // MAX_PARTS))
    if max_span:
        size = min(size, max_span)
    return (size + 4095) // 4096 * 4096


def plan(total: int, part: int, start: int = 0) -> list:
    return [[s, min(s + part, total), s] for s in range(start, total, part)]


class _Part:
    __slots__ = ("end", "next", "owner", "start", "touched")

    def __init__(self, start: int, end: int, nxt: int) -> None:
        self.start, self.end, self.next = start, end, nxt
        self.owner: _Worker | None = None
        self.touched = False  # its owner has started on it: no one else may take it


class _Worker:
    __slots__ = ("alive", "budget", "got", "name")

    def __init__(self, name: str, budget: threading.Semaphore | None) -> None:
        self.name = name
        self.got = 0  # bytes this connection received (only its own thread adds)
        self.budget = budget  # the semaphore its connection came from, if any
        self.alive = True

    def saw(self, n: int) -> None:
        self.got += n


class RangedFetch:
    """Fetch ``writer.state['ranged']['parts']`` over one or more connections."""

    def __init__(self, transfer, url: str, writer, *, auth: str | None,
                 headers: Mapping[str, str] | None, validator: str | None, errors,
                 progress: Callable[[int], None] | None, connections: int,
                 max_span: int | None = None) -> None:
        self.transfer = transfer
        self.url = url
        self.writer = writer
        self.auth = auth
        self.headers = dict(headers or {})
        self.validator = validator
        self.errors = errors
        self.progress = progress
        self.connections = max(1, connections)
        self.max_span = max_span
        ranged = writer.state["ranged"]
        self.total = int(ranged["total"])
        self.parts = [_Part(*(int(x) for x in p)) for p in sorted(ranged["parts"])]
        self._lock = threading.Lock()  # parts' owners and ends, the list, the workers
        self._front_lock = threading.Lock()
        self._front = 0
        self._front_i = 0
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._exited = threading.Event()
        self._started = threading.Event()  # the first connections all start together
        self._direct: str | None = None  # where the origin redirected the parts to
        self._serves = False  # the origin answered a part itself: no need to ask one at a time
        self._resolving = threading.Lock()
        self._workers: list[_Worker] = []
        self._threads: list[threading.Thread] = []
        self._active = 0  # workers that have not decided to leave
        self.target = self.connections
        # adaptation
        cap = max(self.connections, getattr(transfer, "connection_cap", self.connections))
        self.adaptive = self.total >= GROW_MIN and self.connections > 1
        levels = [1, self.connections]
        while levels[-1] < cap:
            levels.append(min(cap, levels[-1] * 2))
        self._levels = levels
        self._level = 0
        self._rates: dict[int, float] = {}
        self._mark: tuple | None = None
        self._settle_until = 0.0
        self._frozen = not self.adaptive
        self._origin = origin(url)
        self._memory = getattr(transfer, "connection_memory", None)
        remembered = self._memory.get(self._origin) if self._memory is not None else None
        if self.adaptive:
            self.target = 1  # one stream first
            if remembered:  # what this origin settled at earlier in this process
                self.target = min(cap, remembered)
                self._frozen = True

    # -- bookkeeping -----------------------------------------------------------------
    def _frontier(self) -> int:
        frontier = 0
        for p in self.parts:
            if p.start > frontier:
                break
            frontier = p.next
            if p.next < p.end:
                break
        return frontier

    def _advance(self) -> None:
        """Move the contiguous frontier on from where it was last seen; tell the writer."""
        with self._front_lock:
            parts = self.parts
            i, f = self._front_i, self._front
            if i >= len(parts) or parts[i].start > f:
                i, f = 0, 0
            while i < len(parts):
                p = parts[i]
                if p.start > f:
                    break
                f = max(f, p.next)
                if p.next < p.end:
                    break
                i += 1
            self._front_i, self._front = min(i, len(parts) - 1), f
        self.writer.advance(f)

    def _save(self) -> None:
        with self._lock:
            snapshot = [[p.start, p.end, p.next] for p in self.parts]
        self._advance()
        self.writer.sync()  # the data first: the map must never claim bytes that are not there
        ranged = dict(self.writer.state["ranged"], parts=snapshot)
        self.writer.save_state(ranged=ranged)

    def _got(self) -> int:
        return sum(w.got for w in self._workers)

    # -- workers and what they take ----------------------------------------------------
    def _spawn(self, first=None, own: bool = False) -> bool:
        """Start one more worker (a connection from the shared budget unless ``own``).
        ``first``: an open answer for the worker's first part, claimed for it here."""
        budget = None
        if not own:
            for sem in (self.transfer.extra_connections,
                        getattr(self.transfer, "more_connections", None) if self.adaptive
                        else None):
                if sem is not None and sem.acquire(blocking=False):
                    budget = sem
                    break
            else:
                return False
        w = _Worker(f"range {len(self._workers)}", budget)
        with self._lock:
            self._workers.append(w)
            self._active += 1
        part = self._claim(w) if first is not None else None
        t = _Thread(target=self._work, args=(w, first, part), daemon=True, name=w.name)
        self._threads.append(t)
        t.start()
        return True

    def _leave(self, w: _Worker) -> None:
        """``w`` stops: its parts are free for the others (under the lock)."""
        if w.alive:
            w.alive = False
            self._active -= 1
        for p in self.parts:
            if p.owner is w:
                p.owner = None
                p.touched = False

    def _claim(self, w: _Worker) -> _Part | None:
        """The part ``w`` works on next (owned and touched), or None: ``w`` leaves."""
        with self._lock:
            if self._failed is not None or self._stop.is_set() or self._active > self.target:
                self._leave(w)
                return None
            parts = self.parts
            for p in parts:  # between two answers: what ``w`` still holds goes back
                if p.owner is w:
                    p.owner, p.touched = None, False
            for i, p in enumerate(parts):  # 1. the first free part
                if p.owner is None and p.next < p.end:
                    p.owner, p.touched = w, True
                    if self.target == 1:  # alone: the run of free parts after it, too
                        size = p.end - p.next
                        for q in parts[i + 1:]:
                            if q.owner is not None or q.next != q.start or (
                                    self.max_span and size + q.end - q.start > self.max_span):
                                break
                            q.owner = w
                            size += q.end - q.start
                    return p
            for p in parts:  # 2. an untouched part of another's run, nearest the frontier
                if p.owner is not None and not p.touched and p.next == p.start:
                    p.owner, p.touched = w, True
                    return p
            # 3. the back half of the in-progress part with the most left
            busy = [p for p in parts if p.owner is not None and p.next < p.end]
            best = max(busy, key=lambda p: p.end - p.next, default=None)
            if best is not None and best.end - best.next >= max(SPLIT_MIN, 2 * MARGIN) \
                    and len(parts) < MAX_PARTS:
                cut = (best.next + (best.end - best.next) // 2 + 4095) // 4096 * 4096
                cut = max(cut, best.next + MARGIN)
                if cut < best.end:
                    new = _Part(cut, best.end, cut)
                    new.owner, new.touched = w, True
                    i = parts.index(best)
                    best.end = cut
                    self.parts = parts[:i + 1] + [new] + parts[i + 1:]
                    return new
            self._leave(w)
            return None

    def _run_end(self, w: _Worker, p: _Part) -> int:
        """Where a request for ``w`` starting at ``p`` ends: its run of untouched parts."""
        with self._lock:
            end = p.end
            parts = self.parts
            for q in parts[parts.index(p) + 1:]:
                if q.owner is not w or q.touched or q.start != end or q.next != q.start or (
                        self.max_span and q.end - p.next > self.max_span):
                    break
                end = q.end
            return end

    def _go_on(self, w: _Worker, p: _Part, pos: int, resp_end: int) -> _Part | None:
        """At the end of ``p``: the next part of ``w``'s run, if its answer brings it."""
        if pos >= resp_end:
            return None
        with self._lock:
            if self._active > self.target:
                return None
            parts = self.parts
            i = parts.index(p) + 1
            if i < len(parts):
                q = parts[i]
                if q.owner is w and not q.touched and q.start == pos and q.next == q.start:
                    q.touched = True
                    return q
            return None

    # -- work ----------------------------------------------------------------------------
    def run(self, first=None) -> None:
        """Fetch every unfinished part.  ``first`` is an answer already open at the first
        unfinished part's next byte (the probe that showed the server takes ranges); it
        brings that part (and, while it is alone, what follows) as the others start."""
        unfinished = sum(1 for p in self.parts if p.next < p.end)
        try:
            self._spawn(first, own=True)  # one connection is this download's own
            # More come from the transfer's shared budgets (--jobs - 1 to start with, in
            # all), so eight blobs at once do not open 64 connections.
            for _ in range(min(self.target, unfinished) - 1):
                if not self._spawn():
                    break
            self._started.set()
            self._settle_until = time.monotonic() + SETTLE
            self._control()
        finally:
            self._started.set()
            self._stop.set()
            for t in self._threads:
                t.join()
            if self.adaptive and (self._frozen or self._level) and self._memory is not None:
                self._memory[self._origin] = self.target  # what it settled at, or got to
        try:
            self._save()
        except NekkoError:
            if self._failed is None:
                raise
        if self._failed is not None:
            raise self._failed
        if self._frontier() != self.total:
            raise UpstreamUnavailable(f"{redact(self.url)}: parts missing after a ranged fetch")

    def _control(self) -> None:
        """Save the part map every ``SAVE_EVERY`` (even when no bytes arrive: a stall) and
        adapt the number of connections, until every worker has left."""
        last_save = time.monotonic()
        while any(t.is_alive() for t in self._threads):
            self._exited.wait(TICK)
            self._exited.clear()
            now = time.monotonic()
            if now - last_save >= SAVE_EVERY:
                last_save = now
                try:
                    self._save()
                except Exception:  # a failing disk shows up in the workers' writes too
                    log.debug("could not save the part map", exc_info=True)
            if not self._frozen and self._failed is None:
                self._adapt(now)

    def _adapt(self, now: float) -> None:
        got = self._got()
        busy = self.writer.hash_stats()[1] if hasattr(self.writer, "hash_stats") else 0.0
        if self._mark is None:  # wait until the connections of this step bring bytes
            with self._lock:  # (one stream: past the burst a server sends at first)
                first = WINDOW_BYTES if self._level == 0 else 1
                ready = all(w.got >= first for w in self._workers if w.alive)
            if ready or now >= self._settle_until:
                self._mark = (now, got, busy)
            return
        t0, g0, b0 = self._mark
        n = self._levels[self._level]
        least = PROBE if self._level == 0 else WINDOW
        if now - t0 < least or (got - g0 < n * WINDOW_BYTES and now - t0 < least * WINDOW_MAX):
            return
        rate = (got - g0) / (now - t0)
        hashing = (busy - b0) / (now - t0)
        self._rates[self._level] = rate
        below = self._rates.get(self._level - 1)
        left = self.total - sum(p.next - p.start for p in self.parts)
        log.debug("%s: %d connection(s): %.0f MiB/s, hasher busy %.0f%%", redact(self.url), n,
                  rate / (1 << 20), 100 * hashing)
        self._mark = None
        self._settle_until = now + SETTLE
        if below is not None and rate < below * GAIN:
            self._set_level(self._level - 1)  # the last step did not pay: undo it, stay
            self._frozen = True
        elif (hashing >= HASH_BOUND or self._level + 1 >= len(self._levels)
              or left < GROW_MIN // 4):
            self._frozen = True  # hashing is the limit already, or little is left
        elif not self._set_level(self._level + 1):
            self._frozen = True  # no connections to spare in the transfer
        if self._frozen:
            log.debug("%s: staying at %d connection(s)", redact(self.url),
                      self._levels[self._level])

    def _set_level(self, level: int) -> bool:
        """Aim at ``self._levels[level]`` connections; False if none could be added."""
        want, old = self._levels[level], self.target
        self.target = want  # before the new workers look at it
        if want > old:
            added = 0
            for _ in range(want - self._active):  # (not while short: they may leave at once)
                if not self._spawn():
                    break
                added += 1
            if not added:
                self.target = old
                return False
            self.target = min(want, old + added)  # fewer were free: that is what is measured
            self._levels[level] = self.target
        self._level = level
        return True

    def _work(self, w: _Worker, first=None, part: _Part | None = None) -> None:
        try:
            while not self._stop.is_set():
                if part is None:  # no thread takes every part before the rest have started
                    self._started.wait()
                p = part or self._claim(w)
                part = None
                if p is None:
                    return
                self._fetch(w, p, first)
                first = None
        except BaseException as e:  # noqa: BLE001 - handed to run(), which raises it
            self._fail(e)
        finally:
            if first is not None:
                first.close()  # never used (another part failed first)
            with self._lock:
                self._leave(w)
            if w.budget is not None:  # the connection goes back to the transfer's budget
                w.budget.release()
                w.budget = None
            self._exited.set()

    def _fail(self, e: BaseException) -> None:
        """The first failure stops everyone."""
        with self._lock:
            if self._failed is None:
                self._failed = e
        self._stop.set()

    def _fetch(self, w: _Worker, p: _Part, first=None) -> None:
        """Bring ``p`` (and the run after it that ``w`` owns), retrying broken connections."""
        failures = stalls = 0
        while True:
            if p.next >= p.end:
                return
            before = w.got
            try:
                p = self._stream(w, p, first)
                return
            except UpstreamUnavailable as e:
                if w.got > before:
                    failures = 0  # moving: a broken or stalled connection, not a dead server
                if e.context.get("stalled") and stalls < MAX_STALLS:
                    stalls += 1  # a quiet connection is replaced, not counted as a failure
                else:
                    failures += 1
                if failures >= self.transfer.attempts or self._stop.is_set():
                    raise
                log.info("%s: part at %d: %s; retrying", redact(self.url), p.next, e.message)
                self.transfer._sleep(failures, e.retry_after)
            finally:
                first = None
            p = self._current(w, p)

    def _current(self, w: _Worker, p: _Part) -> _Part:
        """After a break: the part of ``w``'s run it had got to (the first unfinished)."""
        with self._lock:
            parts = self.parts
            for q in parts[parts.index(p):]:
                if q.owner is not w:
                    break
                if q.next < q.end:
                    q.touched = True
                    return q
            return p

    def _open(self, p: _Part, end: int):
        h = dict(self.headers)
        h["Range"] = f"bytes={p.next}-{end - 1}"
        if self.validator:
            h["If-Range"] = self.validator
        resp = None
        direct = self._direct
        if direct is None and not self._serves:
            with self._resolving:  # one worker asks the origin; the others use its answer
                direct = self._direct
                if direct is None and not self._serves:
                    resp, final = self.transfer.open("GET", self.url, h, self.auth)
                    if origin(final) != origin(self.url):
                        self._direct = final  # ask the origin once, not once per part
                    else:
                        self._serves = True
        if resp is None and direct is None:  # the origin serves the parts itself
            resp, final = self.transfer.open("GET", self.url, h, self.auth)
        elif resp is None:  # the CDN URL the origin sent us to: no credentials go there
            resp, final = self.transfer.open("GET", direct, h, None)
        try:
            if resp.status == 200:
                raise RangesRefused()
            if resp.status != 206 and direct is not None:
                self._direct = None  # expired or refused: ask the origin again
                raise UpstreamUnavailable(f"{redact(direct)}: answered {resp.status};"
                                          " asking the origin for a new URL")
            if resp.status != 206:
                body = read_limited(resp, 64 << 10, final, strict=False)
                err = self.errors(resp.status, final, body, resp.headers)
                if final != self.url:
                    err.context["redirected"] = True
                raise err
            got_start, total = content_range(resp.headers.get("Content-Range"))
            if got_start != p.next:
                raise UpstreamUnavailable(f"{redact(self.url)}: asked for byte {p.next},"
                                          f" got {got_start}")
            if total is not None and total != self.total:
                raise SizeMismatch(f"{redact(self.url)}: server has {total} bytes now,"
                                   f" expected {self.total}")
        except BaseException:
            resp.close()
            resp.release_conn()
            raise
        return resp, min(end, content_range_end(resp.headers.get("Content-Range")) or end)

    def _stream(self, w: _Worker, p: _Part, first=None) -> _Part:
        """One answer: ``p`` from its next byte on, and the parts after it while the answer
        brings them and ``w`` owns them.  Returns the part it stopped in."""
        resp = first
        if resp is not None:
            end = self.total
            start: int | None = 0
            if resp.status == 206:
                start = content_range(resp.headers.get("Content-Range"))[0]
                end = content_range_end(resp.headers.get("Content-Range")) or end
            if start != p.next:  # not where this part goes on: not usable here
                resp.close()
                resp.release_conn()
                resp = None
        if resp is None:
            resp, end = self._open(p, self._run_end(w, p))
        writer, progress = self.writer, self.progress
        pos = p.next
        try:
            while True:
                while pos < p.end:
                    if self._stop.is_set():
                        raise Cancelled("another part failed")
                    buf = writer.buffer()
                    n, err = fill(resp, buf[:min(len(buf), p.end - pos, end - pos)], w.saw)
                    n = min(n, p.end - pos)  # the part may have been split meanwhile
                    if n:
                        writer.pwrite(buf[:n], pos)  # the buffer is the writer's now
                        pos += n
                        p.next = pos
                        if progress is not None:
                            progress(n)
                        if p.start <= self._front:
                            self._advance()
                    if err is not None:
                        raise err
                    if not n:
                        raise UpstreamUnavailable(
                            f"{redact(self.url)}: part at {p.start} ended early")
                self._advance()
                q = self._go_on(w, p, pos, end)
                if q is None:
                    return p
                p = q
        except NekkoError:
            resp.close()
            raise
        except Exception as e:  # urllib3, http.client and socket errors: the connection broke
            resp.close()
            raise UpstreamUnavailable(f"{redact(self.url)}: connection broke in part at"
                                      f" {p.start}: {reason(e)}", stalled=is_stall(e)) from e
        finally:
            if pos < end:
                resp.close()  # the rest of this answer is not wanted (or not coming)
            resp.release_conn()
