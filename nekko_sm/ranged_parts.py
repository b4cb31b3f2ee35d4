"""The part map of a ranged download: which bytes are there, and who fetches which.

The blob is cut into parts (a few MiB each, :func:`part_size_for`); the map
``[[start, end, next], ...]`` lives in the writer's state.  :class:`PartMap` hands parts
to the workers (one per connection) in order, so the contiguous frontier the writer hashes
behind advances while the rest is still arriving: a lone worker claims a whole run of
parts and fetches it in one request, as one stream would; when more connections join they
take the untouched parts nearest the frontier from it (it stops at the end of its current
part), and at the end an idle worker splits the in-progress part with the most left.  It
saves the map only after an fdatasync of the data, so after a crash every byte it says is
there is there.  It opens no connection and decides nothing about how many there are.
"""

from __future__ import annotations

import threading

MIN_PART = 4 << 20
MAX_PART = 1 << 30
MAX_PARTS = 4096
SPLIT_MIN = 16 << 20  # split an in-progress part only when it has this much left
MARGIN = 8 << 20  # a split point stays this far past its owner's last recorded byte (at
# least two receive buffers: the owner may be reading one past what it recorded)


def part_size_for(total: int, connections: int, max_span: int | None = None) -> int:
    """About four parts per connection, within [MIN_PART, 1 GiB] (and ``max_span``)."""
    size = total // max(1, connections * 4)
    size = max(MIN_PART, min(MAX_PART, size), -(-total // MAX_PARTS))
    if max_span:
        size = min(size, max_span)
    return (size + 4095) // 4096 * 4096


def plan(total: int, part: int, start: int = 0) -> list:
    return [[s, min(s + part, total), s] for s in range(start, total, part)]


class Part:
    """Bytes ``[start, end)`` of the blob, there up to ``next``; owned by one worker."""

    __slots__ = ("end", "next", "owner", "start", "touched")

    def __init__(self, start: int, end: int, nxt: int) -> None:
        self.start, self.end, self.next = start, end, nxt
        self.owner: Worker | None = None
        self.touched = False  # its owner has started on it: no one else may take it


class Worker:
    """One connection's worker: what it received, and the budget its connection is from."""

    __slots__ = ("alive", "budget", "got", "name")

    def __init__(self, name: str, budget: threading.Semaphore | None) -> None:
        self.name = name
        self.got = 0  # bytes this connection received (only its own thread adds)
        self.budget = budget  # the semaphore its connection came from, if any
        self.alive = True

    def saw(self, n: int) -> None:
        self.got += n


class PartMap:
    """The parts of ``writer.state['ranged']`` and the workers that own them."""

    def __init__(self, writer, connections: int, max_span: int | None) -> None:
        self.writer = writer
        self.max_span = max_span
        ranged = writer.state["ranged"]
        self.total = int(ranged["total"])
        self.parts = [Part(*(int(x) for x in p)) for p in sorted(ranged["parts"])]
        self._lock = threading.Lock()  # parts' owners and ends, the list, the workers
        self._front_lock = threading.Lock()
        self._front = 0
        self._front_i = 0
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._workers: list[Worker] = []
        self._active = 0  # workers that have not decided to leave
        self.target = connections

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

    # -- which worker takes what -------------------------------------------------------
    def _leave(self, w: Worker) -> None:
        """``w`` stops: its parts are free for the others (under the lock)."""
        if w.alive:
            w.alive = False
            self._active -= 1
        for p in self.parts:
            if p.owner is w:
                p.owner = None
                p.touched = False

    def _claim(self, w: Worker) -> Part | None:
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
                        for q in parts[i + 1 :]:
                            if (
                                q.owner is not None
                                or q.next != q.start
                                or (self.max_span and size + q.end - q.start > self.max_span)
                            ):
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
            if (
                best is not None
                and best.end - best.next >= max(SPLIT_MIN, 2 * MARGIN)
                and len(parts) < MAX_PARTS
            ):
                cut = (best.next + (best.end - best.next) // 2 + 4095) // 4096 * 4096
                cut = max(cut, best.next + MARGIN)
                if cut < best.end:
                    new = Part(cut, best.end, cut)
                    new.owner, new.touched = w, True
                    i = parts.index(best)
                    best.end = cut
                    self.parts = parts[: i + 1] + [new] + parts[i + 1 :]
                    return new
            self._leave(w)
            return None

    def _run_end(self, w: Worker, p: Part) -> int:
        """Where a request for ``w`` starting at ``p`` ends: its run of untouched parts."""
        with self._lock:
            end = p.end
            parts = self.parts
            for q in parts[parts.index(p) + 1 :]:
                if (
                    q.owner is not w
                    or q.touched
                    or q.start != end
                    or q.next != q.start
                    or (self.max_span and q.end - p.next > self.max_span)
                ):
                    break
                end = q.end
            return end

    def _go_on(self, w: Worker, p: Part, pos: int, resp_end: int) -> Part | None:
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

    def _current(self, w: Worker, p: Part) -> Part:
        """After a break: the part of ``w``'s run it had got to (the first unfinished)."""
        with self._lock:
            parts = self.parts
            for q in parts[parts.index(p) :]:
                if q.owner is not w:
                    break
                if q.next < q.end:
                    q.touched = True
                    return q
            return p
