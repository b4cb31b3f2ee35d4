"""Small facts about HTTP answers that the single-stream and the ranged download share.

This module owns what both :mod:`nekko_sm.transfer` and :mod:`nekko_sm.ranged` read off
a URL or an open urllib3 response: the origin of a URL, ``Content-Range``, a body read up
to a limit, a body read straight into a caller's buffer (:func:`fill`), whether a failure
is a stall (a read timeout) and the short reason a failure gives.  It imports neither of them, so they import it and ranged never imports transfer.
It holds no connection and never retries.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import socket
import threading
import time
from collections import deque
from typing import Callable
from urllib.parse import urlsplit

from urllib3.exceptions import HTTPError as _Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from nekko_sm.errors import UpstreamError, UpstreamTooSlow, UpstreamUnavailable
from nekko_sm.refs import redact

MAX_STALLS = 20  # stalled connections replaced for one download before giving up
MIN_READ = 64 << 10  # fill() stops when less room than this is left in the buffer

# A server must not hold a worker forever by trickling (issue 9, finding 6).  Silence is
# the read timeout's (30 s); a trickle -- a byte now and then, never 30 s of silence -- is
# these rules', which every answer obeys:
# * its headers arrive within HEADER_TIMEOUT seconds of the request (else the connection
#   is shut, and the request retried like a dropped one: a bounded number of times);
# * its body comes at LOW_SPEED_LIMIT bytes/s or more, on average over any LOW_SPEED_TIME
#   seconds (curl's --speed-limit/--speed-time), else UpstreamTooSlow, not retried.
# A rate over a window, not a deadline for the pull: a 500 GB model on a slow link takes
# hours and is fine; 10 KiB/s is below any link a model is pulled over.
HEADER_TIMEOUT = 60.0
LOW_SPEED_LIMIT = 10 << 10
LOW_SPEED_TIME = 60.0


class SpeedGuard:
    """The body rule above for one answer: ``update(n)`` after each read of ``n`` bytes."""

    def __init__(self, url: str) -> None:
        self.url = url
        now = time.monotonic()
        self._got = 0
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])  # one a second at most

    def update(self, n: int) -> None:
        now = time.monotonic()
        self._got += n
        samples = self._samples
        if now - samples[-1][0] >= 1.0:
            samples.append((now, self._got))
        while len(samples) > 1 and now - samples[1][0] >= LOW_SPEED_TIME:
            samples.popleft()  # samples[0]: the newest at least a window old
        start, got = samples[0]
        if now - start >= LOW_SPEED_TIME and (self._got - got) / (now - start) < LOW_SPEED_LIMIT:
            raise UpstreamTooSlow(
                f"{redact(self.url)}: the server sent {self._got - got} bytes in"
                f" {now - start:.0f} s, less than {LOW_SPEED_LIMIT} bytes/s: given up"
            )


class Reaper:
    """One daemon thread that shuts the sockets whose deadline passed (a blocked read then
    returns), for limits a socket timeout cannot set: it bounds each read, not their sum."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: dict[int, bool] = {}  # token -> fired
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, seconds: float) -> int:
        with self._cond:
            token = next(self._ids)
            self._live[token] = False
            heap = self._heap
            while heap and heap[0][1] not in self._live:
                heapq.heappop(heap)  # unwatched: the oldest go first, so the heap stays small
            deadline = time.monotonic() + seconds
            # The thread already wakes by the earliest deadline: only an earlier one (or the
            # first) needs it now.  One wake-up per request cost a pull of many small files
            # a sixth of its CPU in lock hand-offs.
            sooner = not heap or deadline < heap[0][0]
            heapq.heappush(heap, (deadline, token, sock))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="nekko-reaper")
                self._thread.start()
            if sooner:
                self._cond.notify()
            return token

    def unwatch(self, token: int) -> bool:
        """Stop watching; True when the deadline had passed and the socket was shut."""
        with self._cond:
            return self._live.pop(token, False)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # unwatched
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token, sock = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._live[token] = True
                try:  # under the lock: an unwatch cannot slip in and reuse the connection
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


REAPER = Reaper()


def origin(url: str) -> tuple:
    """``(scheme, host, port)`` of ``url``, lower-cased, with the default port filled in."""
    p = urlsplit(url)
    return (
        p.scheme.lower(),
        (p.hostname or "").lower(),
        p.port or {"http": 80, "https": 443}.get(p.scheme.lower()),
    )


def is_stall(e: BaseException) -> bool:
    """A read that timed out: the server went quiet, which a new connection may cure."""
    return isinstance(e, (ReadTimeoutError, socket.timeout)) or isinstance(
        getattr(e, "reason", None), ReadTimeoutError
    )


# http.client's complaints about an answer quote the answer: say what was wrong instead.
_MALFORMED = {
    "BadStatusLine": "the answer is not HTTP",
    "LineTooLong": "a line of the answer is too long",
    "UnknownProtocol": "the answer is not HTTP/1.x",
    "RemoteDisconnected": "the server closed the connection without an answer",
    "IncompleteRead": "the body ended early",
    "InvalidChunkLength": "the chunked body is malformed",
    "InvalidHeader": "a header of the answer is malformed",
}


def reason(e: BaseException) -> str:
    """What went wrong, short, without the object addresses urllib3 puts in its messages,
    and without quoting what the server sent (issue 9, finding 9)."""
    seen: set[int] = set()
    todo: list[object] = [e]
    while todo:  # the innermost cause that is a malformed answer decides
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if type(x).__name__ in _MALFORMED:
            return _MALFORMED[type(x).__name__]
        context = None if x.__suppress_context__ else x.__context__
        todo += [getattr(x, "reason", None), x.__cause__, context, *x.args]
    r = getattr(e, "reason", None) or e
    text = str(r)
    text = text.split(": ", 1)[-1] if "object at 0x" in text else text
    return sanitise(text, 200)


def sanitise(text: str, limit: int = 200) -> str:
    """``text`` with every character but printable ASCII escaped, at most ``limit`` long."""
    shown = text.encode("ascii", "backslashreplace").decode()
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def read_limited(resp, limit: int, url: str, strict: bool = True) -> bytes:
    """The body of ``resp``, at most ``limit`` bytes.  ``strict``: more, or a broken
    connection, is an error; otherwise what arrived is returned (an error page)."""
    chunks = []
    n = 0
    try:
        while True:
            chunk = resp.read1(65536)  # what arrived: read(n) waits for n, however slowly
            if not chunk:
                break
            n += len(chunk)
            if n > limit:
                resp.close()
                if strict:
                    raise UpstreamError(f"{redact(url)}: answer larger than {limit} bytes")
                break
            chunks.append(chunk)
    except (_Urllib3Error, OSError) as e:
        resp.close()
        if not strict:
            return b"".join(chunks)
        raise UpstreamUnavailable(f"{redact(url)}: connection broke: {reason(e)}") from e
    return b"".join(chunks)


def readinto1(resp, view: memoryview) -> int:
    """Read what has arrived of ``resp``'s body (at most one receive) into ``view``.

    For an http.client response under urllib3 (the usual case) the bytes go from the
    socket straight into ``view``: no bytes object per read, no copy.  Other responses
    fall back to ``read1``.  Returns 0 at the end of the body."""
    hr = getattr(resp, "_fp", None)
    guard = getattr(resp, "_guard", None)  # transfer's SpeedGuard: reads past resp are timed
    if not isinstance(hr, http.client.HTTPResponse):
        data = resp.read1(len(view))
        view[: len(data)] = data
        return len(data)
    if hr.chunked:
        data = hr.read1(len(view))
        view[: len(data)] = data
        if guard is not None:
            guard.update(len(data))
        return len(data)
    fp = hr.fp
    if fp is None:
        return 0
    n = len(view) if hr.length is None else min(len(view), hr.length)
    got = fp.readinto1(view[:n]) if n else 0
    if guard is not None:
        guard.update(got)
    if not got:
        hr.close()  # at its end (or the server closed): as http.client would
        return 0
    if hr.length is not None:
        hr.length -= got
        if not hr.length:
            hr.close()  # read to its end: the connection may go back to the pool
    return got


def fill(
    resp,
    view: memoryview,
    seen: Callable[[int], None] | None = None,
) -> tuple[int, BaseException | None]:
    """Fill ``view`` from ``resp``'s body: ``(bytes read, the error that stopped it)``.

    Stops early at the end of the body, or when less than ``MIN_READ`` of room is left (so
    a read never waits for a few bytes).  An error (a reset, a read timeout) is returned,
    not raised, so the bytes that did arrive are kept: a stalled connection is resumed
    from its last byte.  ``seen(n)`` is told of every read as it happens (to measure a
    slow connection without waiting for a full buffer)."""
    got = 0
    size = len(view)
    while got < size:
        try:
            n = readinto1(resp, view[got:])
        except Exception as e:  # noqa: BLE001 - the caller keeps what arrived, then raises it
            return got, e
        if not n:
            break
        got += n
        if seen is not None:
            seen(n)
        if size - got < MIN_READ:
            break
    return got, None


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` of ``bytes START-END/TOTAL`` (total None for ``/*``)."""
    try:
        _unit, rng = value.split(" ", 1)  # type: ignore[union-attr]
        span, total = rng.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def content_range_end(value: str | None) -> int | None:
    """END + 1 of ``bytes START-END/TOTAL`` (where the answer's body stops), or None."""
    try:
        _unit, rng = value.split(" ", 1)  # type: ignore[union-attr]
        return int(rng.split("/", 1)[0].split("-", 1)[1]) + 1
    except (AttributeError, ValueError, IndexError):
        return None


def content_range_total(value: str | None) -> int | None:
    """TOTAL of ``bytes */TOTAL`` (a 416 answer), or None."""
    try:
        return int(value.rsplit("/", 1)[1])  # type: ignore[union-attr]
    except (AttributeError, ValueError, IndexError):
        return None
