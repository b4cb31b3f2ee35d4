"""Every byte from the network comes through here: each request goes to the pool of its
proxy (the pools, the proxies and what a failed connection means are :mod:`nekko_sm.pools`'s),
redirects drop credentials on other hosts, temporary failures are retried, and
:meth:`Transfer.download` streams resumably into a store :class:`~nekko_sm.store.IngestWriter`
(carried out by :mod:`nekko_sm.download`, which hands large bodies to :mod:`nekko_sm.ranged`).

Sources build URLs and headers; this module moves bytes and checks the counts.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as _Urllib3Error

from nekko_sm import __version__, pools, ranged_control, retrying
from nekko_sm import download as _download
from nekko_sm.config import Config
from nekko_sm.errors import (
    Forbidden,
    NekkoError,
    Unauthorized,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.httpio import (
    origin,
    read_limited,
)
from nekko_sm.refs import QueryCredentialFilter, redact
from nekko_sm.retrying import RETRY_STATUSES

log = logging.getLogger("nekko_sm.transfer")
logging.getLogger("urllib3.connectionpool").addFilter(QueryCredentialFilter())  # signed URLs

# A specific User-Agent (the Hub asks tools to name themselves; its logs and rate limits do).
USER_AGENT = f"nekko-sm/{__version__} (urllib3/{urllib3.__version__})"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10


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
        return UpstreamUnavailable(
            f"{where}: server answered {status}" + retrying.describe(status, headers),
            retry_after=retrying.wait_hint(status, headers),
        )
    return UpstreamError(f"{where}: unexpected answer {status}")


ErrorMapper = Callable[[int, str, bytes, Mapping[str, str]], NekkoError]


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    data: bytes
    url: str  # after redirects


class Transfer:
    """The one place that holds connection pools."""

    def __init__(
        self,
        config: Config,
        read_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        attempts: int = 6,
        backoff: float = 0.5,
    ) -> None:
        self.config = config
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._no_proxy = pools.NoProxy(config.no_proxy)
        # Connections beyond one per download, shared by every ranged download at once:
        # --jobs - 1 to start with, and more (up to ranged_control.connection_cap in all) for a
        # download that measurably goes faster with them.  What worked, per origin.
        self.extra_connections = threading.Semaphore(max(0, config.jobs - 1))
        self.pacer = retrying.Pacer(reserve=2 * config.jobs)  # rate limits, per server
        self.connection_cap = ranged_control.connection_cap(config.jobs)
        self.more_connections = threading.Semaphore(self.connection_cap - config.jobs)
        self.connection_memory: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._managers: dict[str | None, urllib3.PoolManager] = {}
        self._pool_kw: dict[str, Any] = {  # keyword arguments of every PoolManager
            "num_pools": 64,
            "maxsize": max(4, self.connection_cap),
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
                m = pools.pool_manager(proxy, self.config.egress, self._pool_kw)
                self._managers[proxy] = m
            return m

    def close(self) -> None:
        with self._lock:
            for m in self._managers.values():
                m.clear()
            self._managers.clear()

    # -- one request, redirects handled here ----------------------------------------------
    def open(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        auth: str | None = None,
        body: bytes | None = None,
        follow_redirects: bool = True,
    ) -> tuple[urllib3.BaseHTTPResponse, str]:
        """Send one request (following redirects) and return the unread response and final URL.

        ``auth`` is the Authorization header value.  It goes to the first URL's origin
        only: once a redirect leaves that origin, no later hop carries it.
        """
        hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        hdrs.update(headers or {})
        home = origin(url)
        left_origin = False
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(hdrs)
            left_origin = left_origin or origin(url) != home
            if auth is not None and not left_origin:
                h["Authorization"] = auth
            retrying.pause(*self.pacer.delay(url))  # a rate limit running dry: spread out
            log.log(5, "%s %s", method, redact(url))
            self.config.egress.check_url(url)  # every hop; direct connections check addresses
            if log.isEnabledFor(3):  # wire level: headers, never a credential
                log.log(3, "> %s %s %s", method, redact(url), _safe_headers(h))
            self.pacer.sending(url)
            try:
                resp = self._manager(url).urlopen(
                    method,
                    url,
                    headers=h,
                    body=body,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    decode_content=False,
                    timeout=self.timeout,
                    assert_same_host=False,
                )
            except BaseException as e:
                self.pacer.observe(url, None)  # landed without an answer
                if isinstance(e, _Urllib3Error):
                    raise pools.connection_error(url, e, self._proxy_for(url)) from e
                raise
            self.pacer.observe(url, resp.headers)
            if log.isEnabledFor(3):
                log.log(3, "< %d %s %s", resp.status, redact(url), _safe_headers(resp.headers))
            if resp.status == 407 and self._proxy_for(url):
                _drain(resp)
                raise UpstreamError(
                    f"{redact(url)}: {pools.proxy_refused(url, self._proxy_for(url), '407')}"
                )
            if (
                follow_redirects
                and resp.status in REDIRECT_STATUSES
                and resp.headers.get("Location")
            ):
                location = urljoin(url, resp.headers["Location"])
                _drain(resp)
                if urlsplit(location).scheme not in ("http", "https"):
                    raise UpstreamError(f"{redact(url)} redirected to a non-http URL")
                if urlsplit(url).scheme == "https" and urlsplit(location).scheme == "http":
                    raise UpstreamError(
                        f"{redact(url)} redirected from https to plain http:"
                        " refused, as a downgrade"
                    )  # as apt does
                log.debug("redirect %s -> %s", redact(url), redact(location))
                url = location
                if resp.status == 303:
                    method, body = "GET", None
                continue
            return resp, url
        raise UpstreamError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        auth: str | None = None,
        body: bytes | None = None,
        follow_redirects: bool = True,
        limit: int = 16 << 20,
        retry: bool = True,
    ) -> Response:
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
                    data = read_limited(resp, limit, url)
                finally:
                    resp.release_conn()
                if retry and resp.status in RETRY_STATUSES and attempt < self.attempts:
                    self._sleep(
                        attempt,
                        retrying.wait_hint(resp.status, resp.headers),
                        f"{method} {redact(final)}: {resp.status}"
                        + retrying.describe(resp.status, resp.headers),
                    )
                    continue
                return Response(resp.status, resp.headers, data, final)
            except UpstreamUnavailable as e:
                if not retry or attempt >= self.attempts:
                    raise
                self._sleep(attempt, e.retry_after, e.message)

    def _sleep(self, attempt: int, hint: float | None, what: str) -> None:
        delay = hint if hint is not None else min(30.0, self.backoff * (2 ** (attempt - 1)))
        delay *= 1.0 if hint is not None else random.uniform(0.8, 1.2)
        retrying.notice(what, attempt, self.attempts, delay)  # one visible line per wait
        retrying.sleep(delay)

    # -- streaming download into the store ----------------------------------------------
    def download(
        self,
        url: str,
        writer,
        *,
        auth: str | None = None,
        headers: Mapping[str, str] | None = None,
        expected_size: int | None = None,
        immutable: bool = False,
        errors: ErrorMapper = default_error,
        progress: Callable[[int], None] | None = None,
        on_total: Callable[[int | None, int], None] | None = None,
        max_span: int | None = None,
        connections: int | None = None,
    ) -> Mapping[str, str]:
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
        return _download.download(
            self,
            url,
            writer,
            auth=auth,
            headers=headers,
            expected_size=expected_size,
            immutable=immutable,
            errors=errors,
            progress=progress,
            on_total=on_total,
            max_span=max_span,
            connections=connections,
        )


_SECRET_HEADERS = {
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-amz-security-token",
}


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


def _drain(resp) -> None:
    """Read the rest of a small body so the connection can be reused; close it otherwise
    (a redirect's endless, trickled body must not hold us)."""
    length = resp.headers.get("Content-Length") or ""
    if not (length.isdigit() and int(length) <= 64 << 10):
        resp.close()
        resp.release_conn()
        return
    try:
        resp.drain_conn()
    except Exception:  # noqa: BLE001 - whatever broke, the connection is not reusable: close it
        resp.close()
    resp.release_conn()
