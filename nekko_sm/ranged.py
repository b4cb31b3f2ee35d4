"""One large blob over several connections: byte ranges written at their offsets.

:class:`RangedFetch` runs the workers, one per connection: each fetches the parts the
part map (:mod:`nekko_sm.ranged_parts`) gives it, writing every byte at its offset and
retrying a broken or stalled connection, while the fetch's own thread saves the map every
half second and lets the controller (:mod:`nekko_sm.ranged_control`) change the number of
connections.  The first request asks the origin; when it redirects (a CDN), the parts go
to the URL it gave, without credentials, until that stops answering.  A server that
answers a ranged request with ``200`` (it ignores ranges, or the content changed under
``If-Range``) ends this mode (:class:`RangesRefused`): the caller starts over with one
stream.  It plans no parts and keeps no count of its own: it does the requests.
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
from nekko_sm.ranged_control import SETTLE, ConnectionControl
from nekko_sm.ranged_parts import Part, Worker
from nekko_sm.refs import redact

log = logging.getLogger("nekko_sm.ranged")

MIN_PARALLEL = 32 << 20  # below this, one stream is as fast: not worth the extra requests
SAVE_EVERY = 0.5  # seconds between durable saves of the part map (what a crash can lose)
TICK = 0.05  # seconds between looks of the controller

_Thread = threading.Thread  # (the tests of the controller put a stand-in here)


class RangesRefused(Exception):
    """The server answered a ranged request with the whole body: use one stream instead."""


class RangedFetch(ConnectionControl):
    """Fetch ``writer.state['ranged']['parts']`` over one or more connections."""

    def __init__(
        self,
        transfer,
        url: str,
        writer,
        *,
        auth: str | None,
        headers: Mapping[str, str] | None,
        validator: str | None,
        errors,
        progress: Callable[[int], None] | None,
        connections: int,
        max_span: int | None = None,
    ) -> None:
        super().__init__(transfer, url, writer, max(1, connections), max_span)
        self.auth = auth
        self.headers = dict(headers or {})
        self.validator = validator
        self.errors = errors
        self.progress = progress
        self._exited = threading.Event()
        self._started = threading.Event()  # the first connections all start together
        self._direct: str | None = None  # where the origin redirected the parts to
        self._serves = False  # the origin answered a part itself: no need to ask one at a time
        self._resolving = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- workers -------------------------------------------------------------------------
    def _spawn(self, first=None, own: bool = False) -> bool:
        """Start one more worker (a connection from the shared budget unless ``own``).
        ``first``: an open answer for the worker's first part, claimed for it here."""
        budget = None
        if not own:
            for sem in (
                self.transfer.extra_connections,
                getattr(self.transfer, "more_connections", None) if self.adaptive else None,
            ):
                if sem is not None and sem.acquire(blocking=False):
                    budget = sem
                    break
            else:
                return False
        w = Worker(f"range {len(self._workers)}", budget)
        with self._lock:
            self._workers.append(w)
            self._active += 1
        part = self._claim(w) if first is not None else None
        t = _Thread(target=self._work, args=(w, first, part), daemon=True, name=w.name)
        self._threads.append(t)
        t.start()
        return True

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

    def _work(self, w: Worker, first=None, part: Part | None = None) -> None:
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

    def _fetch(self, w: Worker, p: Part, first=None) -> None:
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
                self.transfer._sleep(
                    failures,
                    e.retry_after,
                    f"{redact(self.url)}: part at byte {p.next}: {e.message}",
                )
            finally:
                first = None
            p = self._current(w, p)

    def _open(self, p: Part, end: int):
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
                raise UpstreamUnavailable(
                    f"{redact(direct)}: answered {resp.status}; asking the origin for a new URL"
                )
            if resp.status != 206:
                body = read_limited(resp, 64 << 10, final, strict=False)
                err = self.errors(resp.status, final, body, resp.headers)
                if final != self.url:
                    err.context["redirected"] = True
                raise err
            got_start, total = content_range(resp.headers.get("Content-Range"))
            if got_start != p.next:
                raise UpstreamUnavailable(
                    f"{redact(self.url)}: asked for byte {p.next}, got {got_start}"
                )
            if total is not None and total != self.total:
                raise SizeMismatch(
                    f"{redact(self.url)}: server has {total} bytes now, expected {self.total}"
                )
        except BaseException:
            resp.close()
            resp.release_conn()
            raise
        return resp, min(end, content_range_end(resp.headers.get("Content-Range")) or end)

    def _stream(self, w: Worker, p: Part, first=None) -> Part:
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
                    n, err = fill(resp, buf[: min(len(buf), p.end - pos, end - pos)], w.saw)
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
                            f"{redact(self.url)}: part at {p.start} ended early"
                        )
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
            raise UpstreamUnavailable(
                f"{redact(self.url)}: connection broke in part at {p.start}: {reason(e)}",
                stalled=is_stall(e),
            ) from e
        finally:
            if pos < end:
                resp.close()  # the rest of this answer is not wanted (or not coming)
            resp.release_conn()
