"""The connections under :class:`nekko_sm.transfer.Transfer`: urllib3 connection and pool
classes whose answers must bring their headers within ``httpio.HEADER_TIMEOUT`` and whose
body reads are timed (a trickle is given up), the ``NO_PROXY`` rules, one PoolManager per
proxy (direct ones through the egress checks, a proxy's credentials percent-decoded into
``Proxy-Authorization``), and what a failed connection means (an untrusted certificate, a
proxy refusing the tunnel, a name that does not resolve, a refusal or timeout to retry).
It never sends a request of its own, follows a redirect or retries: that is the transfer's.
"""

from __future__ import annotations

import logging
import re
import ssl
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ProtocolError
from urllib3.response import HTTPResponse

from nekko_sm import egress, httpio, retrying
from nekko_sm.errors import NekkoError, UpstreamError, UpstreamUnavailable
from nekko_sm.httpio import REAPER, SpeedGuard, origin, reason
from nekko_sm.refs import redact
from nekko_sm.retrying import RETRY_STATUSES

log = logging.getLogger("nekko_sm.transfer")


class _GuardedResponse(HTTPResponse):
    """Every body read is timed (httpio.SpeedGuard): a trickle is given up."""

    _guard: SpeedGuard

    def read(
        self,
        amt: int | None = None,
        decode_content: bool | None = None,
        cache_content: bool = False,
    ) -> bytes:
        data = super().read(amt, decode_content, cache_content)
        self._guard.update(len(data))
        return data

    def read1(self, amt: int | None = None, decode_content: bool | None = None) -> bytes:
        data = super().read1(amt, decode_content)
        self._guard.update(len(data))
        return data


def _timed_getresponse(
    conn: HTTPConnection,
    getresponse: Callable[[], HTTPResponse],
) -> HTTPResponse:
    """``conn``'s answer, whose headers must all arrive within httpio.HEADER_TIMEOUT (a
    socket timeout bounds each read, not a header dribbled a byte at a time), its body read
    through a _GuardedResponse."""
    token = REAPER.watch(conn.sock, httpio.HEADER_TIMEOUT)
    try:
        resp = getresponse()
    except BaseException:
        if REAPER.unwatch(token):  # what the shut socket made of the read says less
            raise ProtocolError(f"no headers within {httpio.HEADER_TIMEOUT:.0f} s") from None
        raise
    if REAPER.unwatch(token):
        resp.close()
        raise ProtocolError(f"no headers within {httpio.HEADER_TIMEOUT:.0f} s")
    resp.__class__ = _GuardedResponse
    resp._guard = SpeedGuard(resp.url or "")  # type: ignore[attr-defined]
    return resp


class _HTTPConnection(HTTPConnection):
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        return _timed_getresponse(self, super().getresponse)


class _HTTPSConnection(HTTPSConnection):
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        return _timed_getresponse(self, super().getresponse)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class NoProxy:
    """The ``NO_PROXY`` rules: hosts (and their subdomains), ``host:port``, ``[v6]``, ``*``."""

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
            self.entries.append(
                (host.lstrip("*").lstrip("."), int(port) if port.isdigit() else None)
            )

    def bypass(self, url: str) -> bool:
        if self.all:
            return True
        _scheme, host, port = origin(url)
        for h, p in self.entries:
            if p is not None and p != port:
                continue
            if host == h or host.endswith("." + h):
                return True
        return False


def pool_manager(
    proxy: str | None, policy: egress.Policy, pool_kw: dict[str, Any]
) -> urllib3.PoolManager:
    """A new PoolManager for requests through ``proxy`` (None: direct)."""
    if proxy:
        p = urlsplit(proxy)
        headers = {}
        if p.username:
            headers = urllib3.make_headers(
                proxy_basic_auth=f"{unquote(p.username)}:{unquote(p.password or '')}"
            )
            proxy = proxy.replace(p.netloc, p.netloc.rsplit("@", 1)[1])
        m = urllib3.ProxyManager(proxy, proxy_headers=headers, **pool_kw)
        m.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return m
    # checked addresses (egress) and timed answers (httpio) both
    return egress.pool_manager(policy, _HTTPConnection, _HTTPSConnection, **pool_kw)


def proxy_name(proxy: str | None) -> str:
    """The proxy as ``host:port``, without its credentials."""
    p = urlsplit(proxy or "")
    return p.netloc.rsplit("@", 1)[-1]


def proxy_refused(url: str, proxy: str | None, answer: str) -> str:
    """What to say when ``proxy``, asked for ``url``, wants (other) credentials."""
    env = "HTTPS_PROXY" if urlsplit(url).scheme.lower() == "https" else "HTTP_PROXY"
    return (
        f"the proxy {proxy_name(proxy)} wants (other) credentials ({answer}):"
        f" give them as user:password@ (percent-encoded) in {env}"
    )


def connection_error(url: str, e: BaseException, proxy: str | None) -> NekkoError:
    """What a failed connection to ``url`` (through ``proxy``, None: direct) means: a
    certificate we do not trust and a proxy that refuses the tunnel are final; anything else
    (refused, reset, timed out) is retried."""
    via_proxy = isinstance(e, urllib3.exceptions.ProxyError) and bool(proxy)
    cert = _cert_failure(e)
    if cert is not None:  # a ProxyError: the proxy's own certificate (an https:// proxy)
        whose = (
            f"the proxy {proxy_name(proxy)}"
            if via_proxy
            else urlsplit(url).netloc.rsplit("@", 1)[-1]
        )
        return UpstreamError(
            f"{redact(url)}: the TLS certificate of {whose} is not trusted"
            f" ({cert}); give the CA that signed it with --ca-cert FILE"
            " or SSL_CERT_FILE"
        )
    dns = None if via_proxy else retrying.dns_failure(e)
    if dns is not None:  # said plainly; "no such name" at once, without retries
        host = urlsplit(url).hostname
        cls = UpstreamError if dns[0] else UpstreamUnavailable
        return cls(f"{redact(url)}: cannot resolve host {host!r} ({dns[1]})")
    why = reason(e)
    if not via_proxy and "no headers within" in why:  # our deadline: no server's words
        return UpstreamUnavailable(
            f"{redact(url)}: no headers within {httpio.HEADER_TIMEOUT:.0f} s"
        )
    if not via_proxy:  # refused or timed out, a banner: the log's, not the caller's
        # The log has what was said (escaped, cut short); the caller, only that it failed.
        said = httpio.sanitise(str(getattr(e, "reason", None) or e), 300)
        log.info("%s: cannot connect: %s", redact(url), said)
        return UpstreamUnavailable(f"{redact(url)}: cannot connect (the reason is logged)")
    inner = getattr(e, "original_error", None) or e
    m = _TUNNEL_RE.search(str(inner))
    if m is not None:
        status, said = int(m.group(1)), m.group(1)  # the status, not the proxy's words
        if status == 407:
            return UpstreamError(f"{redact(url)}: {proxy_refused(url, proxy, said)}")
        if 400 <= status < 500 and status not in RETRY_STATUSES:
            return UpstreamError(
                f"{redact(url)}: the proxy {proxy_name(proxy)} refused the tunnel ({said})"
            )
    return UpstreamUnavailable(f"{redact(url)}: the proxy {proxy_name(proxy)}: {reason(inner)}")


_TUNNEL_RE = re.compile(r"Tunnel connection failed: (\d{3})(.*)$")


def _cert_failure(e: BaseException | None) -> str | None:
    """Why a certificate was refused, when that is what ``e`` (or what it wraps) says."""
    for x in retrying.causes(e):
        if isinstance(x, ssl.SSLCertVerificationError):
            return str(x.verify_message or x.reason or x)[:200]
    return None
