"""One large blob over several connections: byte ranges written at their offsets.

The blob is cut into parts (a few dozen MiB each); ``connections`` workers take them in
order, so the contiguous frontier the writer hashes behind advances while the rest is
still arriving.  The part map ``[[start, end, next], ...]`` lives in the writer's state and
is saved (every half second) only after an fdatasync of the data, so after a crash every byte it says is there
is there.  A server that answers a ranged request with ``200`` (it ignores ranges, or the
content changed under ``If-Range``) ends this mode: the caller starts over with one stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Callable

from nekko_sm.errors import Cancelled, NekkoError, SizeMismatch, UpstreamUnavailable
from nekko_sm.httpio import MAX_STALLS, content_range, is_stall, origin, read_limited, reason
from nekko_sm.refs import redact

log = logging.getLogger("nekko_sm.ranged")

MIN_PART = 8 << 20
MIN_PARALLEL = 32 << 20  # below this, one stream is as fast: not worth the extra requests
MAX_PART = 1 << 30
MAX_PARTS = 4096
SAVE_EVERY = 0.5  # seconds between durable saves of the part map (what a crash can lose)
READ = 1 << 20


class RangesRefused(Exception):
    """The server answered a ranged request with the whole body: use one stream instead."""


def part_size_for(total: int, connections: int, max_span: int | None = None) -> int:
    """About four parts per connection, within [8 MiB, 1 GiB] (and ``max_span``)."""
    size = total // max(1, connections * 4)
    size = max(MIN_PART, min(MAX_PART, size), -(-total // MAX_PARTS))
    if max_span:
        size = min(size, max_span)
    return (size + 4095) // 4096 * 4096


def plan(total: int, part: int, start: int = 0) -> list:
    return [[s, min(s + part, total), s] for s in range(start, total, part)]


class RangedFetch:
    """Fetch ``writer.state['ranged']['parts']`` with ``connections`` workers."""

    def __init__(self, transfer, url: str, writer, *, auth: str | None,
                 headers: Mapping[str, str] | None, validator: str | None, errors,
                 progress: Callable[[int], None] | None, connections: int) -> None:
        self.transfer = transfer
        self.url = url
        self.writer = writer
        self.auth = auth
        self.headers = dict(headers or {})
        self.validator = validator
        self.errors = errors
        self.progress = progress
        self.connections = max(1, connections)
        ranged = writer.state["ranged"]
        self.total = int(ranged["total"])
        self.parts = sorted([int(x) for x in p] for p in ranged["parts"])
        self._lock = threading.Lock()
        self._queue = [i for i, p in enumerate(self.parts) if p[2] < p[1]]
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._direct: str | None = None  # where the origin redirected the parts to
        self._resolving = threading.Lock()
        self._last_save = time.monotonic()

    # -- bookkeeping -----------------------------------------------------------------
    def _take(self) -> int | None:
        with self._lock:
            if self._failed is not None or not self._queue:
                return None
            return self._queue.pop(0)

    def _frontier(self) -> int:
        frontier = 0
        for start, end, nxt in self.parts:
            if start > frontier:
                break
            frontier = nxt
            if nxt < end:
                break
        return frontier

    def _moved(self, force: bool = False) -> None:
        with self._lock:
            frontier = self._frontier()
            due = force or time.monotonic() - self._last_save >= SAVE_EVERY
            if due:
                self._last_save = time.monotonic()
            snapshot = [list(p) for p in self.parts]
        self.writer.advance(frontier)
        if due:
            self._save(snapshot)

    def _save(self, parts: list) -> None:
        self.writer.sync()  # the data first: the map must never claim bytes that are not there
        ranged = dict(self.writer.state["ranged"], parts=parts)
        self.writer.save_state(ranged=ranged)

    # -- work ----------------------------------------------------------------------------
    def run(self, first=None) -> None:
        """Fetch every unfinished part.  ``first`` is an answer already open at the first
        unfinished part's next byte (the probe that showed the server takes ranges); it
        brings that part while the other connections start."""
        if first is not None and self._queue:
            i = self._queue.pop(0)
            workers = [threading.Thread(target=self._work, args=(i, first), daemon=True,
                                        name="range 0")]
        else:
            workers = []
        # One connection is this download's own; more come from the transfer's shared
        # budget (--jobs - 1 in all), so eight blobs at once do not open 64 connections.
        wanted = min(self.connections, len(workers) + len(self._queue)) - 1
        budget = self.transfer.extra_connections
        extra = 0
        while extra < wanted and budget.acquire(blocking=False):
            extra += 1
        try:
            self._run(workers + [
                threading.Thread(target=self._work, daemon=True, name=f"range {n}")
                for n in range(len(workers), 1 + extra)])
        finally:
            for _ in range(extra):
                budget.release()

    def _run(self, workers: list) -> None:
        for t in workers:
            t.start()
        saver = threading.Thread(target=self._save_periodically, daemon=True, name="range saver")
        saver.start()
        for t in workers:
            t.join()
        self._done.set()
        saver.join()
        try:
            self._moved(force=True)
        except NekkoError:
            if self._failed is None:
                raise
        if self._failed is not None:
            raise self._failed
        if self._frontier() != self.total:
            raise UpstreamUnavailable(f"{redact(self.url)}: parts missing after a ranged fetch")

    def _save_periodically(self) -> None:
        """Save the part map every few seconds even when no bytes arrive (a stall)."""
        while not self._done.wait(SAVE_EVERY):
            try:
                self._moved(force=True)
            except Exception:  # a failing disk shows up in the workers' writes too
                log.debug("could not save the part map", exc_info=True)

    def _work(self, first_part: int | None = None, first_resp=None) -> None:
        if first_part is not None:
            try:
                try:
                    self._consume(first_part, first_resp)
                finally:
                    first_resp.close()  # an open-ended answer: the rest is not wanted
                self._fetch_part(first_part)  # finish it over a fresh request if it broke
            except BaseException as e:  # noqa: BLE001 - handed to run(), which raises it
                self._fail(e)
                return
        while not self._stop.is_set():
            i = self._take()
            if i is None:
                return
            try:
                self._fetch_part(i)
            except BaseException as e:  # noqa: BLE001 - handed to run(), which raises it
                self._fail(e)
                return

    def _fail(self, e: BaseException) -> None:
        """The first failure stops everyone."""
        with self._lock:
            if self._failed is None:
                self._failed = e
        self._stop.set()

    def _fetch_part(self, i: int) -> None:
        failures = stalls = 0
        while True:
            _start, end, nxt = self.parts[i]
            if nxt >= end:
                return
            before = nxt
            try:
                self._stream_part(i)
                return
            except UpstreamUnavailable as e:
                if self.parts[i][2] > before:
                    failures = 0  # moving: a broken or stalled connection, not a dead server
                if e.context.get("stalled") and stalls < MAX_STALLS:
                    stalls += 1  # a quiet connection is replaced, not counted as a failure
                else:
                    failures += 1
                if failures >= self.transfer.attempts or self._stop.is_set():
                    raise
                log.info("%s: part at %d: %s; retrying", redact(self.url), self.parts[i][2],
                         e.message)
                self.transfer._sleep(failures, e.retry_after)

    def _stream_part(self, i: int) -> None:
        _start, end, nxt = self.parts[i]
        h = dict(self.headers)
        h["Range"] = f"bytes={nxt}-{end - 1}"
        if self.validator:
            h["If-Range"] = self.validator
        resp = None
        direct = self._direct
        if direct is None:
            with self._resolving:  # one worker asks the origin; the others use its answer
                direct = self._direct
                if direct is None:
                    resp, final = self.transfer.open("GET", self.url, h, self.auth)
                    if origin(final) != origin(self.url):
                        self._direct = final  # ask the origin once, not once per part
        if resp is None:  # the CDN URL the origin sent us to: no credentials go there
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
            if got_start != nxt:
                raise UpstreamUnavailable(f"{redact(self.url)}: asked for byte {nxt},"
                                          f" got {got_start}")
            if total is not None and total != self.total:
                raise SizeMismatch(f"{redact(self.url)}: server has {total} bytes now,"
                                   f" expected {self.total}")
            self._consume(i, resp)
        finally:
            resp.release_conn()

    def _consume(self, i: int, resp) -> None:
        """Read part ``i`` from ``resp`` (positioned at the part's next byte) to its end."""
        start, end, pos = self.parts[i]
        try:
            while pos < end:
                if self._stop.is_set():
                    raise Cancelled("another part failed")
                chunk = resp.read1(min(READ, end - pos))
                if not chunk:
                    break
                self.writer.pwrite(chunk, pos)
                pos += len(chunk)
                with self._lock:
                    self.parts[i][2] = pos
                if self.progress is not None:
                    self.progress(len(chunk))
                self._moved()
        except NekkoError:
            resp.close()
            raise
        except Exception as e:  # urllib3 and socket errors: the connection broke
            resp.close()
            raise UpstreamUnavailable(f"{redact(self.url)}: connection broke in part at"
                                      f" {start}: {reason(e)}", stalled=is_stall(e)) from e
        if pos < end:
            resp.close()
            raise UpstreamUnavailable(f"{redact(self.url)}: part at {start} ended early")
        self._moved()
