"""When and how loudly to ask a server again.

* Rate limits as the Hugging Face Hub sends them on every answer (IETF draft
  ``draft-ietf-httpapi-ratelimit-headers``, the subset the Hub uses)::

      RateLimit: "resolvers";r=REMAINING;t=SECONDS_TO_RESET
      RateLimit-Policy: "fixed window";"resolvers";q=QUOTA;w=WINDOW_SECONDS

  A ``429`` often comes without ``Retry-After``: the wait is ``t`` (bounded by
  :data:`MAX_WAIT`).  :class:`Pacer` remembers the last answer per server and bucket and
  spaces requests out once few remain, so a pull of many files does not run into the wall.
* :func:`retry_after` reads a ``Retry-After`` header (seconds or an HTTP date);
  :func:`wait_hint` prefers it to the rate-limit window.
* :func:`notice`: the one line a person sees for every wait (what failed, the attempt, how
  long); a warning, so the CLI shows it on stderr even when quiet.
* :func:`dns_failure`: a name that does not resolve is said plainly, at once.
"""

from __future__ import annotations

import email.utils
import logging
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger("nekko_sm.transfer")

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})  # temporary: ask again
MAX_WAIT = 300.0  # never sleep longer than one of the Hub's windows for one answer
MARGIN = 0.5  # t is whole seconds: wait a little past the reset
_RATELIMIT = re.compile(r'"(?P<bucket>[^"]*)"\s*;\s*r\s*=\s*(?P<r>\d+)\s*;\s*t\s*=\s*(?P<t>\d+)')
_POLICY = re.compile(r"\bq\s*=\s*(?P<q>\d+)(?:.*?\bw\s*=\s*(?P<w>\d+))?")

sleep = time.sleep  # one place every wait goes through (tests record the delays here)


@dataclass(frozen=True)
class RateLimit:
    bucket: str
    remaining: int
    reset: int  # seconds until the window ends
    quota: int | None = None
    window: int | None = None

    def describe(self) -> str:
        per = f" ({self.quota} requests per {self.window} s)" if self.quota and self.window else ""
        return f"rate limit {self.bucket!r}{per}: {self.remaining} left, resets in {self.reset} s"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    get = getattr(headers, "get", None)
    value = get(name) if get is not None else None
    if value is None:  # a plain dict: look for any spelling
        for k, v in headers.items():
            if k.lower() == name.lower():
                return v
    return value


def parse(headers: Mapping[str, str]) -> RateLimit | None:
    """The ``RateLimit``/``RateLimit-Policy`` pair of an answer, or None."""
    m = _RATELIMIT.search(_header(headers, "RateLimit") or "")
    if not m:
        return None
    quota = window = None
    p = _POLICY.search(_header(headers, "RateLimit-Policy") or "")
    if p:
        quota = int(p.group("q"))
        window = int(p.group("w")) if p.group("w") else None
    return RateLimit(
        m.group("bucket") or "default", int(m.group("r")), int(m.group("t")), quota, window
    )


def retry_after(value: str | None, cap: float = 60.0) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, min(cap, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, min(cap, when.timestamp() - time.time()))


def wait_hint(status: int, headers: Mapping[str, str]) -> float | None:
    """How long the server asks us to wait before the next try: ``Retry-After`` first, else
    the rate-limit window's end when the answer is a 429 or the bucket is empty."""
    hint = retry_after(_header(headers, "Retry-After"), cap=MAX_WAIT)
    if hint is not None:
        return hint
    rl = parse(headers)
    if rl is not None and (status == 429 or rl.remaining == 0):
        return min(MAX_WAIT, rl.reset + MARGIN)
    return None


def describe(status: int, headers: Mapping[str, str]) -> str:
    """What a 429 (or any answer with an empty bucket) means, for an error message."""
    rl = parse(headers)
    if rl is None:
        return ""
    if status != 429 and rl.remaining:
        return ""
    return f": {rl.describe()}"


def notice(what: str, attempt: int, attempts: int, delay: float) -> None:
    """The one line a person sees for a wait before another try."""
    log.warning("%s; try %d of %d in %.1f s", what, attempt + 1, attempts, delay)


def pause(delay: float, why: str) -> None:
    """Wait ``delay`` seconds before a request (pacing); said when a person would notice."""
    if delay <= 0:
        return
    if delay >= 1:
        log.warning("%s; waiting %.1f s", why, delay)
    else:
        log.debug("%s; waiting %.2f s", why, delay)
    sleep(delay)


# -- pacing ----------------------------------------------------------------------------------


def _kind(url: str) -> tuple[str, str]:
    """(origin, kind) of a request: servers rate-limit by kind of path ("/api/…", "…/resolve/…")."""
    p = urlsplit(url)
    path = p.path
    if "/resolve/" in path or path.startswith("/api/resolve-cache/"):
        kind = "resolve"
    elif path.startswith("/api/"):
        kind = "api"
    else:
        kind = "other"
    return f"{p.scheme.lower()}://{p.netloc.lower()}", kind


@dataclass
class _Bucket:
    remaining: int
    reset_at: float
    quota: int | None
    next_at: float = 0.0


class Pacer:
    """Spaces requests out before a server's rate-limit bucket runs dry.

    It learns from each answer which bucket a kind of request counts against and how much
    of it is left; once at most ``reserve`` requests (or 5% of the quota) remain, the rest of
    the window is shared out evenly among them, and with nothing left the next request
    waits for the window to end instead of earning a 429.
    """

    def __init__(self, reserve: int = 8) -> None:
        self.reserve = reserve
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._kinds: dict[tuple[str, str], str] = {}
        self._flying: dict[tuple[str, str], int] = {}  # sent, not answered yet, per kind

    def sending(self, url: str) -> None:
        """A request of ``url``'s kind is going out now (:meth:`observe` says it landed)."""
        key = _kind(url)
        with self._lock:
            self._flying[key] = self._flying.get(key, 0) + 1

    def observe(self, url: str, headers: Mapping[str, str] | None) -> None:
        """The answer to a request :meth:`sending` announced (``None``: it got none).

        The count an answer carries does not know the requests of the same kind still in
        flight, which the server counts too: they are taken off it, so that four parallel
        first requests against a quota of four do not send a fifth into a 429."""
        origin, kind = _kind(url)
        with self._lock:
            flying = self._flying.get((origin, kind), 0)
            if flying > 1:
                self._flying[(origin, kind)] = flying - 1
            else:
                self._flying.pop((origin, kind), None)
            others = max(0, flying - 1)
        rl = parse(headers) if headers is not None else None
        if rl is None:
            return
        remaining = max(0, rl.remaining - others)
        now = time.monotonic()
        reset_at = now + min(rl.reset, MAX_WAIT)
        with self._lock:
            self._kinds[(origin, kind)] = rl.bucket
            b = self._buckets.get((origin, rl.bucket))
            if b is None or reset_at > b.reset_at + 1.0:  # a new window
                self._buckets[(origin, rl.bucket)] = _Bucket(
                    remaining, reset_at, rl.quota, b.next_at if b else 0.0
                )
            else:  # answers cross in flight: the smallest count is the newest
                b.remaining = min(b.remaining, remaining)

    def delay(self, url: str) -> tuple[float, str]:
        """Seconds to wait before sending ``url`` (0 mostly), and why."""
        origin, kind = _kind(url)
        now = time.monotonic()
        with self._lock:
            bucket = self._kinds.get((origin, kind))
            if bucket is None:
                return 0.0, ""
            b = self._buckets.get((origin, bucket))
            if b is None:
                return 0.0, ""
            if now >= b.reset_at:
                del self._buckets[(origin, bucket)]  # the window ended: the next answer tells
                return 0.0, ""
            left = b.remaining
            b.remaining = max(0, left - 1)
            low = max(self.reserve, (b.quota or 0) // 20)
            if left > low:
                return 0.0, ""
            if left <= 0:
                slot = max(now, b.next_at, b.reset_at + MARGIN)
            else:
                slot = max(now, b.next_at)
                b.next_at = slot + (b.reset_at - now) / (left + 1)
            wait = min(MAX_WAIT, slot - now)
            why = (
                f"{origin}: rate limit {bucket!r}: {left} requests left for"
                f" {b.reset_at - now:.0f} s"
            )
            return wait, why


# -- names that do not resolve ----------------------------------------------------------------

_FINAL_GAI = {
    getattr(socket, n)
    for n in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL", "EAI_SERVICE", "EAI_ADDRFAMILY")
    if hasattr(socket, n)
}


def causes(e: BaseException | None):
    """``e`` and everything it wraps (reason, original_error, cause, context, args), once each."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, BaseException):
            todo += [
                getattr(x, "reason", None),
                getattr(x, "original_error", None),
                x.__cause__,
                x.__context__,
            ]
            todo += [a for a in x.args if isinstance(a, BaseException)]


def dns_failure(e: BaseException | None) -> tuple[bool, str] | None:
    """(final, reason) when ``e`` (or what it wraps) is a failed name lookup, else None.

    "No such name" is final; a temporary failure (no DNS server answered) is worth a retry."""
    for x in causes(e):
        if isinstance(x, socket.gaierror):
            return x.errno in _FINAL_GAI, x.strerror or str(x)
    return None
