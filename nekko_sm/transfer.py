"""Every byte from the network comes through here: one urllib3 pool per proxy, redirects
that drop credentials on other hosts, retries of temporary failures, and resumable
streaming into a store :class:`~nekko_sm.store.IngestWriter`.

Sources build URLs and headers; this module moves bytes and checks the counts.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as _Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from nekko_sm import __version__, retrying
from nekko_sm.config import Config
from nekko_sm.errors import (
    Forbidden,
    NekkoError,
    SizeMismatch,
    Unauthorized,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.refs import redact

log = logging.getLogger("nekko_sm.transfer")

# A specific User-Agent (the Hub asks tools to name themselves; its logs and rate limits do).
USER_AGENT = f"nekko-sm/{__version__} (urllib3/{urllib3.__version__})"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
CHUNK = 1 << 20


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    return (p.scheme.lower(), (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme.lower()))


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


def default_error(status: int, url: str, body: bytes, headers: Mapping[str, str]) -> NekkoError:
    """Turn an unexpected HTTP status into the matching error (one place, all protocols)."""
    where = redact(url)
    if status == 401:
        return Unauthorized(f"{where}: the server wants (other) credentials (401)")
    if status == 403:
        return Forbidden(f"{where}: access denied (403)")
    if status in (404, 410):
        return UpstreamNotFound(f"{where}: not found ({status})")
    if status in RETRY_STATUSES:
        return UpstreamUnavailable(f"{where}: server answered {status}"
                                   + retrying.describe(status, headers),
                                   retry_after=retrying.wait_hint(status, headers))
    return UpstreamError(f"{where}: unexpected answer {status}")


ErrorMapper = Callable[[int, str, bytes, Mapping[str, str]], NekkoError]


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    data: bytes
    url: str  # after redirects


class _NoProxy:
    def __init__(self, spec: str | None) -> None:
        self.all = False
        self.entries: list[tuple[str, int | None]] = []
        for item in (spec or "").split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item == "*":
                self.all = True
                continue
            if item.startswith("["):  # [v6] or [v6]:port
                host, _, port = item[1:].partition("]")
                port = port.lstrip(":")
            else:
                host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
            self.entries.append((host.lstrip("*").lstrip("."), int(port) if port.isdigit() else None))

    def bypass(self, url: str) -> bool:
        if self.all:
            return True
        scheme, host, port = _origin(url)
        for h, p in self.entries:
            if p is not None and p != port:
                continue
            if host == h or host.endswith("." + h):
                return True
        return False


class Transfer:
    """The one place that holds connection pools."""

    def __init__(self, config: Config, read_timeout: float = 30.0, connect_timeout: float = 30.0,
                 attempts: int = 6, backoff: float = 0.5) -> None:
        self.config = config
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._no_proxy = _NoProxy(config.no_proxy)
        # Connections beyond one per download, shared by every ranged download at once.
        self.extra_connections = threading.Semaphore(max(0, config.jobs - 1))
        self.pacer = retrying.Pacer(reserve=2 * config.jobs)  # rate limits, per server
        self._lock = threading.Lock()
        self._managers: dict[str | None, urllib3.PoolManager] = {}
        self._pool_kw = {
            "num_pools": 64,
            "maxsize": max(4, config.jobs * 2),
            "block": False,
            "retries": False,
            "timeout": self.timeout,
        }
        if config.ca_cert:
            self._pool_kw["ca_certs"] = config.ca_cert

    # -- pools ------------------------------------------------------------------------
    def _proxy_for(self, url: str) -> str | None:
        scheme = urlsplit(url).scheme.lower()
        proxy = self.config.https_proxy if scheme == "https" else self.config.http_proxy
        if not proxy or self._no_proxy.bypass(url):
            return None
        return proxy if "://" in proxy else "http://" + proxy

    def _manager(self, url: str) -> urllib3.PoolManager:
        proxy = self._proxy_for(url)
        with self._lock:
            m = self._managers.get(proxy)
            if m is None:
                if proxy:
                    p = urlsplit(proxy)
                    headers = {}
                    if p.username:
                        from urllib.parse import unquote

                        headers = urllib3.make_headers(
                            proxy_basic_auth=f"{unquote(p.username)}:{unquote(p.password or '')}")
                        proxy = proxy.replace(p.netloc, p.netloc.rsplit("@", 1)[1])
                    m = urllib3.ProxyManager(proxy, proxy_headers=headers, **self._pool_kw)
                else:
                    m = urllib3.PoolManager(**self._pool_kw)
                self._managers[self._proxy_for(url)] = m
            return m

    def _proxy_name(self, url: str) -> str:
        """The proxy for ``url`` as ``host:port``, without its credentials."""
        p = urlsplit(self._proxy_for(url) or "")
        return p.netloc.rsplit("@", 1)[-1]

    def _proxy_refused(self, url: str, answer: str) -> str:
        env = "HTTPS_PROXY" if urlsplit(url).scheme.lower() == "https" else "HTTP_PROXY"
        return (f"the proxy {self._proxy_name(url)} wants (other) credentials ({answer}):"
                f" give them as user:password@ (percent-encoded) in {env}")

    def _connection_error(self, url: str, e: BaseException) -> NekkoError:
        """What a failed connection means: a certificate we do not trust and a proxy that
        refuses the tunnel are final; anything else (refused, reset, timed out) is retried."""
        via_proxy = isinstance(e, urllib3.exceptions.ProxyError) and bool(self._proxy_for(url))
        cert = _cert_failure(e)
        if cert is not None:  # a ProxyError: the proxy's own certificate (an https:// proxy)
            whose = f"the proxy {self._proxy_name(url)}" if via_proxy else \
                urlsplit(url).netloc.rsplit("@", 1)[-1]
            return UpstreamError(f"{redact(url)}: the TLS certificate of {whose} is not trusted"
                                 f" ({cert}); give the CA that signed it with --ca-cert FILE"
                                 " or SSL_CERT_FILE")
        dns = None if via_proxy else retrying.dns_failure(e)
        if dns is not None:  # said plainly; "no such name" at once, without retries
            host = urlsplit(url).hostname
            cls = UpstreamError if dns[0] else UpstreamUnavailable
            return cls(f"{redact(url)}: cannot resolve host {host!r} ({dns[1]})")
        if not via_proxy:
            return UpstreamUnavailable(f"{redact(url)}: {_reason(e)}")
        inner = getattr(e, "original_error", None) or e
        m = _TUNNEL_RE.search(str(inner))
        if m is not None:
            status, said = int(m.group(1)), f"{m.group(1)} {m.group(2).strip()}".strip()
            if status == 407:
                return UpstreamError(f"{redact(url)}: {self._proxy_refused(url, said)}")
            if 400 <= status < 500 and status not in RETRY_STATUSES:
                return UpstreamError(f"{redact(url)}: the proxy {self._proxy_name(url)} refused"
                                     f" the tunnel ({said})")
        return UpstreamUnavailable(f"{redact(url)}: the proxy {self._proxy_name(url)}:"
                                   f" {_reason(inner)}")

    def close(self) -> None:
        with self._lock:
            for m in self._managers.values():
                m.clear()
            self._managers.clear()

    # -- one request, redirects handled here ----------------------------------------------
    def open(self, method: str, url: str, headers: Mapping[str, str] | None = None,
             auth: str | None = None, body: bytes | None = None,
             follow_redirects: bool = True) -> tuple[urllib3.BaseHTTPResponse, str]:
        """Send one request (following redirects) and return the unread response and final URL.

        ``auth`` is the Authorization header value.  It goes to the first URL's origin
        only: once a redirect leaves that origin, no later hop carries it.
        """
        hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        hdrs.update(headers or {})
        origin = _origin(url)
        left_origin = False
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(hdrs)
            left_origin = left_origin or _origin(url) != origin
            if auth is not None and not left_origin:
                h["Authorization"] = auth
            retrying.pause(*self.pacer.delay(url))  # a rate limit running dry: spread out
            log.log(5, "%s %s", method, redact(url))
            if log.isEnabledFor(3):  # wire level: headers, never a credential
                log.log(3, "> %s %s %s", method, redact(url), _safe_headers(h))
            try:
                resp = self._manager(url).urlopen(
                    method, url, headers=h, body=body, redirect=False, retries=False,
                    preload_content=False, decode_content=False, timeout=self.timeout,
                    assert_same_host=False,
                )
            except _Urllib3Error as e:
                raise self._connection_error(url, e) from e
            self.pacer.observe(url, resp.headers)
            if log.isEnabledFor(3):
                log.log(3, "< %d %s %s", resp.status, redact(url), _safe_headers(resp.headers))
            if resp.status == 407 and self._proxy_for(url):
                _drain(resp)
                raise UpstreamError(f"{redact(url)}: {self._proxy_refused(url, '407')}")
            if follow_redirects and resp.status in REDIRECT_STATUSES and resp.headers.get("Location"):
                location = urljoin(url, resp.headers["Location"])
                _drain(resp)
                if urlsplit(location).scheme not in ("http", "https"):
                    raise UpstreamError(f"{redact(url)} redirected to a non-http URL")
                log.debug("redirect %s -> %s", redact(url), redact(location))
                url = location
                if resp.status == 303:
                    method, body = "GET", None
                continue
            return resp, url
        raise UpstreamError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")

    def request(self, method: str, url: str, headers: Mapping[str, str] | None = None,
                auth: str | None = None, body: bytes | None = None,
                follow_redirects: bool = True, limit: int = 16 << 20,
                retry: bool = True) -> Response:
        """A small request: the body is read whole (at most ``limit`` bytes).

        Temporary failures are retried with backoff; any status comes back to the caller.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                resp, final = self.open(method, url, headers, auth, body, follow_redirects)
                try:
                    # Read even a HEAD answer (no body: this returns at once): http.client
                    # forgets a response only once it is read or garbage-collected, and a
                    # pooled connection whose last response is still open fails its next
                    # request with ResponseNotReady('Request-sent') (every retry did).
                    data = _read_limited(resp, limit, url)
                finally:
                    resp.release_conn()
                if retry and resp.status in RETRY_STATUSES and attempt < self.attempts:
                    self._sleep(attempt, retrying.wait_hint(resp.status, resp.headers),
                                f"{method} {redact(final)}: {resp.status}"
                                + retrying.describe(resp.status, resp.headers))
                    continue
                return Response(resp.status, resp.headers, data, final)
            except UpstreamUnavailable as e:
                if not retry or attempt >= self.attempts:
                    raise
                self._sleep(attempt, e.retry_after, e.message)

    def _sleep(self, attempt: int, hint: float | None, what: str = "a download failed") -> None:
        delay = hint if hint is not None else min(30.0, self.backoff * (2 ** (attempt - 1)))
        delay *= 1.0 if hint is not None else random.uniform(0.8, 1.2)
        retrying.notice(what, attempt, self.attempts, delay)  # one visible line per wait
        retrying.sleep(delay)

    # -- streaming download into the store ----------------------------------------------
    def download(self, url: str, writer, *, auth: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 expected_size: int | None = None, immutable: bool = False,
                 errors: ErrorMapper = default_error,
                 progress: Callable[[int], None] | None = None,
                 on_total: Callable[[int | None, int], None] | None = None,
                 max_span: int | None = None,
                 connections: int | None = None) -> Mapping[str, str]:
        """Fetch ``url`` into ``writer``, resuming what it already holds.

        ``immutable`` says the bytes are content-addressed (a registry blob, a Hub file
        with a known digest), so a Range needs no validator; otherwise ranges carry
        ``If-Range`` with the ETag or Last-Modified seen first, and a ``200`` answer means
        start over.  A large body whose server takes ranges comes over ``connections``
        connections at once (default ``--jobs``; see :mod:`nekko_sm.ranged`), one that
        does not in one stream.  ``max_span`` caps the bytes of one response (CDNs
        refuse very large ones).  Temporary failures and broken connections are retried;
        an attempt that made progress does not use up the budget.  ``on_total(total,
        offset)`` is called once the size is known and before any body byte is written
        (to refuse early when the disk is too small).  Returns the last response's headers.
        """
        from nekko_sm.ranged import RangesRefused  # ranged builds on this module

        conns = max(1, self.config.jobs if connections is None else connections)
        ranges_refused = False
        failures = stalls = 0
        total_hint = expected_size
        while True:
            before = _progress_mark(writer)
            try:
                if writer.state.get("ranged") and not ranges_refused:
                    if on_total is not None:
                        on_total(writer.state["ranged"]["total"], _progress_mark(writer))
                        on_total = None
                    self._fetch_ranged(url, writer, auth, headers, errors, progress, conns)
                    return writer.state.get("headers") or {}
                if (not ranges_refused and expected_size is not None and immutable
                        and self._wants_ranges(expected_size - writer.offset, conns, max_span)):
                    self._start_ranged(writer, expected_size, None, conns, max_span)
                    continue
                result = self._download_once(url, writer, auth, headers, expected_size,
                                             immutable, errors, progress, on_total,
                                             max_span, 1 if ranges_refused else conns)
                on_total = None if writer.offset else on_total
                if (max_span and total_hint is not None
                        and before < writer.offset < total_hint):
                    failures = 0  # one span done: ask for the next
                    continue
                return result
            except RangesRefused:
                log.info("%s: server does not honour ranges; one stream instead", redact(url))
                ranges_refused = True
                writer.reset()
            except UpstreamUnavailable as e:
                if _progress_mark(writer) > before:
                    failures = 0  # it was moving: a broken connection, not a dead server
                if e.context.get("stalled") and stalls < MAX_STALLS:
                    stalls += 1  # a quiet connection is replaced, not held against the server
                else:
                    failures += 1
                if failures >= self.attempts:
                    raise
                self._sleep(failures, e.retry_after,
                            f"{e.message}; resuming at byte {writer.offset}")
            except (Unauthorized, Forbidden) as e:
                # An expired signed URL at a CDN: ask the origin again, once or twice.
                if not e.context.get("redirected") or failures >= 2:
                    raise
                failures += 1
                log.info("%s: redirect target refused us; asking the origin again", redact(url))

    @staticmethod
    def _wants_ranges(remaining: int, conns: int, max_span: int | None) -> bool:
        from nekko_sm import ranged

        return (conns > 1 and remaining >= ranged.MIN_PARALLEL) or bool(
            max_span and remaining > max_span)

    def _start_ranged(self, writer, total: int, validator: str | None, conns: int,
                      max_span: int | None) -> None:
        """Turn ``writer`` into a ranged download of ``total`` bytes from its frontier."""
        from nekko_sm import ranged

        part = ranged.part_size_for(total, conns, max_span)
        done = writer.offset
        parts = ([[0, done, done]] if done else []) + ranged.plan(total, part, done)
        writer.preallocate(total)
        writer.save_state(ranged={"total": total, "parts": parts, "validator": validator})

    def _fetch_ranged(self, url, writer, auth, headers, errors, progress, conns,
                      first=None) -> None:
        from nekko_sm import ranged

        state = writer.state["ranged"]
        fetch = ranged.RangedFetch(self, url, writer, auth=auth, headers=headers,
                                   validator=state.get("validator"), errors=errors,
                                   progress=progress, connections=conns)
        fetch.run(first)

    def _download_once(self, url, writer, auth, headers, expected_size, immutable, errors,
                       progress, on_total, max_span=None, conns=1) -> Mapping[str, str]:
        if expected_size is not None and writer.offset == expected_size and expected_size > 0:
            return {}
        h = dict(headers or {})
        validator = writer.state.get("validator")
        if writer.offset > 0 and not (immutable or validator):
            writer.reset()
        end = ""
        if max_span and expected_size is not None and expected_size - writer.offset > max_span:
            end = str(writer.offset + max_span - 1)
        if writer.offset > 0 or end:
            h["Range"] = f"bytes={writer.offset}-{end}"
            if writer.offset > 0 and not immutable:
                h["If-Range"] = validator
        resp, final = self.open("GET", url, h, auth)
        try:
            status = resp.status
            if status == 416 and writer.offset > 0:
                total = _content_range_total(resp.headers.get("Content-Range"))
                promised = writer.state.get("total")
                if total is not None and total == writer.offset and promised in (None, total):
                    return resp.headers
                writer.reset()
                if promised is not None and total is not None and promised != total:
                    raise SizeMismatch(f"{redact(url)}: promised {promised} bytes, has {total}")
                raise UpstreamUnavailable(f"{redact(url)}: range not satisfiable; starting over")
            if status not in (200, 206):
                body = _read_limited(resp, 64 << 10, url, strict=False)
                err = errors(status, final, body, resp.headers)
                if final != url:
                    err.context["redirected"] = True
                raise err
            whole = None  # the size of the whole resource, when the answer says it
            if status == 206:
                start, whole = _content_range(resp.headers.get("Content-Range"))
                if start != writer.offset:
                    writer.reset()
                    raise UpstreamUnavailable(
                        f"{redact(url)}: asked for bytes from {writer.offset}, got {start}")
                if whole is not None and expected_size is not None and whole != expected_size:
                    raise SizeMismatch(f"{redact(url)}: server has {whole} bytes,"
                                       f" expected {expected_size}")
            elif writer.offset:
                log.info("%s: server ignored Range; starting over", redact(url))
                writer.reset()
            length = resp.headers.get("Content-Length")
            remaining = int(length) if length and length.isdigit() else None
            if status == 200:
                whole = remaining
                if whole is not None and expected_size is not None and whole != expected_size:
                    raise SizeMismatch(f"{redact(url)}: Content-Length {whole},"
                                       f" expected {expected_size}; refusing")
            if status == 200 or not writer.state.get("validator"):
                etag = resp.headers.get("ETag")
                validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
                writer.save_state(url=redact(url), validator=validator, total=whole,
                                  headers=_kept_headers(resp.headers))
            if on_total is not None:
                on_total(whole if whole is not None else expected_size, writer.offset)
            takes_ranges = status == 206 or resp.headers.get("Accept-Ranges", "").lower() == "bytes"
            if (whole is not None and takes_ranges and (immutable or validator)
                    and self._wants_ranges(whole - writer.offset, conns, max_span)):
                # Big, and the server takes ranges: this answer brings the first part while
                # the other parts come over other connections.
                self._start_ranged(writer, whole, None if immutable else validator, conns,
                                   max_span)
                self._fetch_ranged(url, writer, auth, headers, errors, progress, conns,
                                   first=resp)
                return resp.headers
            self._stream(resp, writer, url, remaining, progress)
            if expected_size is not None and writer.offset < expected_size and remaining is None:
                raise UpstreamUnavailable(f"{redact(url)}: body ended after {writer.offset}"
                                          f" of {expected_size} bytes")
            return resp.headers
        except BaseException:
            resp.close()  # the body was not read to its end: never back into the pool
            raise
        finally:
            resp.release_conn()

    def _stream(self, resp, writer, url, remaining, progress) -> None:
        got = 0
        try:
            while True:
                want = CHUNK if remaining is None else min(CHUNK, remaining - got)
                if want <= 0:
                    break
                # read1: whatever has arrived (up to want). read(amt) would block until amt
                # bytes and lose the ones it holds if the connection then stalls or drops.
                chunk = resp.read1(want)
                if not chunk:
                    break
                writer.write(chunk)
                got += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        except BaseException as e:
            # Whatever stopped us, the body is not read to its end: this connection must
            # not go back to the pool (release_conn would hand it to the next request).
            resp.close()
            if isinstance(e, NekkoError) or not isinstance(e, (_Urllib3Error, OSError)):
                raise  # disk full, cancelled, too many bytes, Ctrl-C: not the network's fault
            raise UpstreamUnavailable(f"{redact(url)}: connection broke after {got} bytes:"
                                      f" {_reason(e)}", stalled=_is_stall(e)) from e
        if remaining is not None and got < remaining:
            resp.close()
            raise UpstreamUnavailable(f"{redact(url)}: body ended after {got} of {remaining} bytes")


_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "set-cookie",
                   "x-amz-security-token"}


def _safe_headers(headers: Mapping[str, str]) -> dict:
    """Headers for a log line: credentials replaced, URLs in Location without their query."""
    out = {}
    for k, v in headers.items():
        if k.lower() in _SECRET_HEADERS:
            v = "<redacted>"
        elif k.lower() in ("location", "www-authenticate", "link"):
            v = v if k.lower() != "location" else redact(v)
        out[k] = v
    return out


MAX_STALLS = 20  # stalled connections replaced for one download before giving up


def _is_stall(e: BaseException) -> bool:
    """A read that timed out: the server went quiet, which a new connection may cure."""
    return isinstance(e, ReadTimeoutError) or isinstance(getattr(e, "reason", None),
                                                         ReadTimeoutError)


def _progress_mark(writer) -> int:
    """Bytes a writer holds: its frontier, or for a ranged download every part's progress."""
    r = writer.state.get("ranged")
    if not r:
        return writer.offset
    return sum(int(p[2]) - int(p[0]) for p in r.get("parts", []))


def _kept_headers(headers: Mapping[str, str]) -> dict:
    """The answer headers a source reads after a download (kept for a ranged resume)."""
    keep = ("ETag", "Content-Disposition", "Content-Type", "Last-Modified")
    return {k: headers[k] for k in keep if headers.get(k)}


_TUNNEL_RE = re.compile(r"Tunnel connection failed: (\d{3})(.*)$")


def _cert_failure(e: BaseException | None) -> str | None:
    """Why a certificate was refused, when that is what ``e`` (or what it wraps) says."""
    for x in retrying.causes(e):
        if isinstance(x, ssl.SSLCertVerificationError):
            return str(x.verify_message or x.reason or x)[:200]
    return None


def _reason(e: BaseException) -> str:
    r = getattr(e, "reason", None) or e
    text = str(r)
    return text.split(": ", 1)[-1][:200] if "object at 0x" in text else text[:200]


def _drain(resp) -> None:
    try:
        resp.drain_conn()
    except Exception:
        resp.close()
    resp.release_conn()


def _read_limited(resp, limit: int, url: str, strict: bool = True) -> bytes:
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
        raise UpstreamUnavailable(f"{redact(url)}: connection broke: {_reason(e)}") from e
    return b"".join(chunks)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    # "bytes START-END/TOTAL" or "bytes START-END/*"
    try:
        unit, rng = value.split(" ", 1)  # type: ignore[union-attr]
        span, total = rng.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def _content_range_total(value: str | None) -> int | None:
    try:
        return int(value.rsplit("/", 1)[1])  # type: ignore[union-attr]
    except (AttributeError, ValueError, IndexError):
        return None
