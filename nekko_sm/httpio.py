"""Small facts about HTTP answers that the single-stream and the ranged download share.

This module owns what both :mod:`nekko_sm.transfer` and :mod:`nekko_sm.ranged` read off
a URL or an open urllib3 response: the origin of a URL, ``Content-Range``, a body read up
to a limit, a body read straight into a caller's buffer (:func:`fill`), whether a failure
is a stall (a read timeout) and the short reason a failure gives.  It imports neither of them, so they import it and ranged never imports transfer.
It holds no connection and never retries.
"""

from __future__ import annotations

import http.client
import socket
from typing import Callable
from urllib.parse import urlsplit

from urllib3.exceptions import HTTPError as _Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from nekko_sm.errors import UpstreamError, UpstreamUnavailable
from nekko_sm.refs import redact

MAX_STALLS = 20  # stalled connections replaced for one download before giving up
MIN_READ = 64 << 10  # fill() stops when less room than this is left in the buffer


def origin(url: str) -> tuple:
    """``(scheme, host, port)`` of ``url``, lower-cased, with the default port filled in."""
    p = urlsplit(url)
    return (p.scheme.lower(), (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme.lower()))


def is_stall(e: BaseException) -> bool:
    """A read that timed out: the server went quiet, which a new connection may cure."""
    return isinstance(e, (ReadTimeoutError, socket.timeout)) or isinstance(
        getattr(e, "reason", None), ReadTimeoutError)


def reason(e: BaseException) -> str:
    """What went wrong, short, without the object addresses urllib3 puts in its messages."""
    r = getattr(e, "reason", None) or e
    text = str(r)
    return text.split(": ", 1)[-1][:200] if "object at 0x" in text else text[:200]


def read_limited(resp, limit: int, url: str, strict: bool = True) -> bytes:
    """The body of ``resp``, at most ``limit`` bytes.  ``strict``: more, or a broken
    connection, is an error; otherwise what arrived is returned (an error page)."""
    chunks = []
    n = 0
    try:
        while True:
            chunk = resp.read(65536)
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
    if not isinstance(hr, http.client.HTTPResponse) or hr.chunked:
        data = (hr if isinstance(hr, http.client.HTTPResponse) else resp).read1(len(view))
        view[:len(data)] = data
        return len(data)
    fp = hr.fp
    if fp is None:
        return 0
    n = len(view) if hr.length is None else min(len(view), hr.length)
    got = fp.readinto1(view[:n]) if n else 0
    if not got:
        hr.close()  # at its end (or the server closed): as http.client would
        return 0
    if hr.length is not None:
        hr.length -= got
        if not hr.length:
            hr.close()  # read to its end: the connection may go back to the pool
    return got


def fill(resp, view: memoryview, seen: Callable[[int], None] | None = None,
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
