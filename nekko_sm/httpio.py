"""Small facts about HTTP answers that the single-stream and the ranged download share.

This module owns what both :mod:`nekko_sm.transfer` and :mod:`nekko_sm.ranged` read off
a URL or an open urllib3 response: the origin of a URL, ``Content-Range``, a body read up
to a limit, whether a failure is a stall (a read timeout) and the short reason a failure
gives.  It imports neither of them, so they import it and ranged never imports transfer.
It holds no connection and never retries.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from urllib3.exceptions import HTTPError as _Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from nekko_sm.errors import UpstreamError, UpstreamUnavailable
from nekko_sm.refs import redact

MAX_STALLS = 20  # stalled connections replaced for one download before giving up


def origin(url: str) -> tuple:
    """``(scheme, host, port)`` of ``url``, lower-cased, with the default port filled in."""
    p = urlsplit(url)
    return (p.scheme.lower(), (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme.lower()))


def is_stall(e: BaseException) -> bool:
    """A read that timed out: the server went quiet, which a new connection may cure."""
    return isinstance(e, ReadTimeoutError) or isinstance(getattr(e, "reason", None),
                                                         ReadTimeoutError)


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


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` of ``bytes START-END/TOTAL`` (total None for ``/*``)."""
    try:
        _unit, rng = value.split(" ", 1)  # type: ignore[union-attr]
        span, total = rng.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def content_range_total(value: str | None) -> int | None:
    """TOTAL of ``bytes */TOTAL`` (a 416 answer), or None."""
    try:
        return int(value.rsplit("/", 1)[1])  # type: ignore[union-attr]
    except (AttributeError, ValueError, IndexError):
        return None
