"""A real OCI registry (CNCF distribution 2.8, Debian's ``docker-registry``) behind a counting
reverse proxy of our own, for tests and the benchmark.

Plain functions work outside pytest (the benchmark uses them)::

    peer = start_registry(workdir)             # anonymous
    apeer = start_registry(workdir, auth=True)  # auth: token, with tests/peers/tokenserver.py
    ...
    peer.close()

What nekko-sm is given is ``peer.host`` (``127.0.0.1:PROXYPORT``, plain http): the proxy, which
records every request in ``peer.requests`` (:class:`Request`: method, path, status,
has_authorization, range, bytes).  ``peer.registry_host`` is the registry itself (not counted;
the seeding code and skopeo use it).

Proxy options (constructor keywords of :func:`start_registry`, attributes at run time, or
temporarily with ``with peer.configured(...)``):

* ``redirect_blobs=True``: a blob GET the registry would allow (checked with a HEAD carrying
  the client's headers) is answered ``307`` with ``Location: http://localhost:PORT3/blobs/
  DIGEST?X-Amz-...`` -- a second host name -- where a tiny blob server, reading the registry's
  own storage, answers ``400`` to any request carrying ``Authorization`` and supports
  ``Range``/``If-Range`` (object storage behind a registry, as S3/GCS redirects are).
* ``expire_blob_urls_after=N`` (with ``redirect_blobs``): every presigned URL expires once it
  has served N body bytes, as a signed CDN URL runs out in the middle of a long download: the
  answer that crosses N is cut there, and any later request with that URL (a resume) gets
  ``403 AccessDenied: Request has expired``.  Each redirect signs a fresh URL, so a client
  must go back to the registry for a new one.
* ``ignore_ranges=True``: blob GETs reach the registry without ``Range``/``If-Range``, so a
  resume gets the whole blob again (``200``), as from a server that does not take ranges.
* ``peer.drop_blob_once(digest, after_bytes)``: the next GET of that blob (at the proxy or the
  blob host) sends its headers and ``after_bytes`` bytes of body, then drops the connection.
* ``fail_with=500`` (with ``fail_times=N`` for the next N requests only, ``fail_match=REGEX``
  on the path, ``retry_after=S``): answer with that status without asking the registry (a
  broken mirror, a 429/503 to retry).

``peer.new_proxy(**options)`` adds another counting proxy in front of the same registry (a
mirror that can be broken independently); it is closed with the peer.

Fixtures (session-scoped; register them with ``pytest_plugins = ["peers.registry"]``):
``registry``, ``auth_registry``, ``seeded`` (images on ``registry``), ``auth_seeded`` (images on
``auth_registry``).  The peers are shared: a test that counts or sets faults should start with
``peer.reset()`` or use ``with peer.configured(...)``; the function-scoped ``reg`` and ``areg``
are ``registry`` and ``auth_registry`` with their images, reset before and after the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from peers import free_ports
from peers.tokenserver import (  # noqa: F401 - re-exported
    ALICE_TOKEN,
    CREDENTIALS,
    ISSUER,
    PASSWORD,
    SERVICE,
    USER,
    TokenServer,
    fetch_token,
    parse_challenge,
)

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only type checkers read it

BLOB_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[A-Za-z0-9_+.-]+:[A-Fa-f0-9]+)$")
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_CHUNK = 256 * 1024


@dataclass
class Request:
    """One request a proxy (or a blob host) answered.  Recorded before the client can have
    the whole answer (``bytes`` grows as the body is sent), so a test sees it at once."""

    method: str
    path: str  # with the query string
    status: int
    has_authorization: bool
    range: str | None
    bytes: int  # body bytes sent to the client

    def __iter__(self) -> Iterator[Any]:
        """``method, path, status, has_auth, rng, nbytes = request`` works too."""
        return iter(
            (self.method, self.path, self.status, self.has_authorization, self.range, self.bytes)
        )

    @property
    def blob_digest(self) -> str | None:
        m = BLOB_RE.match(urlsplit(self.path).path)
        return m.group("digest") if m else None


@dataclass
class Response:
    """A response read whole by :meth:`CountingProxy.request` / :meth:`RegistryPeer.request`."""

    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# --------------------------------------------------------------------------------------------
# the counting reverse proxy


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, OSError)):
            return  # a client went away: nothing to say
        super().handle_error(request, client_address)


class CountingProxy:
    """A threaded HTTP/1.1 keep-alive reverse proxy in front of one registry (see module doc)."""

    # The fault/redirect options (see the module docstring), set from the keywords of
    # __init__ and configured(), back to these defaults on reset().
    redirect_blobs: bool
    fail_with: int | None
    fail_times: int | None
    fail_match: str | None
    retry_after: int | None
    expire_blob_urls_after: int | None
    ignore_ranges: bool
    OPTIONS: ClassVar[dict[str, Any]] = {
        "redirect_blobs": False,
        "fail_with": None,
        "fail_times": None,
        "fail_match": None,
        "retry_after": None,
        "expire_blob_urls_after": None,
        "ignore_ranges": False,
    }

    def __init__(
        self, backend: tuple[str, int], storage_dir: str | None = None, **options: Any
    ) -> None:
        self.backend = backend
        self.storage_dir = storage_dir
        self.requests: list[Request] = []
        self.blob_host_requests: list[Request] = []
        self._set_options({**self.OPTIONS, **options})
        self._url_bytes: dict[str, int] = {}  # presigned URL (its signature) -> bytes served
        self._nonce = 0
        self._drops: dict[str, int] = {}
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(16)
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []
        self._server = self._serve(self.proxy_handler())
        self._blob_server = self._serve(_BlobHostHandler)

    def proxy_handler(self) -> type:
        """The request handler of the proxy (a subclass may misbehave differently)."""
        return _ProxyHandler

    def _serve(self, handler: type) -> ThreadingHTTPServer:
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.proxy = self  # type: ignore[attr-defined]
        t = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name=f"{handler.__name__}:{server.server_address[1]}",
        )
        t.start()
        self._servers.append((server, t))
        return server

    # -- addresses ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what nekko-sm is given (plain http)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def blob_host(self) -> str:
        """``localhost:PORT``: the redirect target, a second host name."""
        return f"localhost:{self._blob_server.server_address[1]}"

    # -- records ------------------------------------------------------------------------
    def _record(self, req: Request, blob_host: bool = False) -> Request:
        with self._lock:
            (self.blob_host_requests if blob_host else self.requests).append(req)
        return req

    def blob_gets(self, digest: str | None = None) -> int:
        """GETs of ``/v2/*/blobs/DIGEST`` (any digest when None) this proxy answered,
        whatever the status (a redirect counts; so does a 401 challenge)."""
        with self._lock:
            reqs = list(self.requests)
        return sum(
            1
            for r in reqs
            if r.method == "GET"
            and r.blob_digest is not None
            and (digest is None or r.blob_digest == digest)
        )

    def blob_bytes(self, digest: str | None = None) -> int:
        """Body bytes of blob GETs sent, by the proxy and the blob host together."""
        with self._lock:
            reqs = list(self.requests) + list(self.blob_host_requests)
        return sum(
            r.bytes
            for r in reqs
            if r.method == "GET"
            and r.blob_digest is not None
            and (digest is None or r.blob_digest == digest)
        )

    def manifest_gets(self, reference: str | None = None) -> int:
        with self._lock:
            reqs = list(self.requests)
        n = 0
        for r in reqs:
            p = urlsplit(r.path).path
            if (
                r.method == "GET"
                and "/manifests/" in p
                and (reference is None or p.endswith("/manifests/" + reference))
            ):
                n += 1
        return n

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            del self.requests[:]
            del self.blob_host_requests[:]

    def reset(self) -> None:
        """Forget the records and turn every fault/redirect option off."""
        self.clear()
        with self._lock:
            self._drops.clear()
            self._url_bytes.clear()
        self._set_options(self.OPTIONS)

    def _set_options(self, options: dict[str, Any]) -> None:
        for k, v in options.items():
            if k not in self.OPTIONS:
                raise TypeError(f"unknown proxy option {k}")
            setattr(self, k, v)

    @contextlib.contextmanager
    def configured(self, **options: Any) -> Iterator[CountingProxy]:
        """``with peer.configured(redirect_blobs=True): ...``; records cleared on entry, every
        option reset on exit."""
        self.reset()
        self._set_options(options)
        try:
            yield self
        finally:
            self.reset()

    # -- faults -------------------------------------------------------------------------
    def drop_blob_once(self, digest: str, after_bytes: int) -> None:
        """The next GET of blob ``digest`` sends ``after_bytes`` bytes, then drops."""
        with self._lock:
            self._drops[digest] = after_bytes

    def _take_drop(self, digest: str) -> int | None:
        with self._lock:
            return self._drops.pop(digest, None)

    def _url_allowance(self, signature: str, length: int) -> int | None:
        """Body bytes a presigned URL may still serve (None: no limit); the answer about to
        send ``length`` bytes is charged now, so a resume finds the URL spent."""
        with self._lock:
            budget = self.expire_blob_urls_after
            if budget is None:
                return None
            used = self._url_bytes.get(signature, 0)
            left = max(0, budget - used)
            self._url_bytes[signature] = used + min(left, length) if length else budget
            return left

    def expired_url_refusals(self) -> int:
        """Requests the blob host refused because their presigned URL had expired."""
        with self._lock:
            return sum(1 for r in self.blob_host_requests if r.status == 403)

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            if not self.fail_with:
                return None
            if self.fail_match and not re.search(self.fail_match, path):
                return None
            if self.fail_times is not None:
                if self.fail_times <= 0:
                    return None
                self.fail_times -= 1
            return self.fail_with

    # -- presigned blob URLs --------------------------------------------------------------
    def _sign(self, digest: str, expires: str, nonce: str = "") -> str:
        return hmac.new(
            self._secret, f"{digest}\n{expires}\n{nonce}".encode(), hashlib.sha256
        ).hexdigest()

    def presigned_url(self, repo: str, digest: str) -> str:
        expires = str(int(time.time()) + 600)
        with self._lock:
            self._nonce += 1
            nonce = str(self._nonce)
        q = urlencode(
            {
                "repo": repo,
                "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                "X-Amz-Expires": expires,
                "X-Amz-Date": nonce,
                "X-Amz-Signature": self._sign(digest, expires, nonce),
            }
        )
        return f"http://{self.blob_host}/blobs/{quote(digest, safe=':')}?{q}"

    def blob_file(self, digest: str) -> str:
        """Where the registry's filesystem driver keeps blob ``digest``."""
        assert self.storage_dir, "no storage directory known"
        algo, _, hexd = digest.partition(":")
        return os.path.join(
            self.storage_dir, "docker", "registry", "v2", "blobs", algo, hexd[:2], hexd, "data"
        )

    # -- a tiny client, for tests and seeding -----------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        *,
        creds: tuple[str, str] | None = None,
        token: str | None = None,
        direct: bool = False,
        auth: bool = True,
    ) -> Response:
        """One request to this proxy (``direct=True``: to the registry itself, not counted),
        read whole.  With ``auth`` (default) a Bearer challenge is answered by asking the
        token server for a token (with ``creds`` as Basic, or anonymously) and retrying once.
        """
        host, port = self.backend if direct else ("127.0.0.1", self.port)
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        resp = _one_request(host, port, method, path, hdrs, body)
        if resp.status == 401 and auth and not token:
            scheme, params = parse_challenge(resp.headers.get("www-authenticate", ""))
            if scheme == "bearer" and "realm" in params:
                scopes = [params["scope"]] if params.get("scope") else []
                tok = fetch_token(params["realm"], params.get("service"), scopes, creds)
                if tok:
                    hdrs["Authorization"] = f"Bearer {tok}"
                    resp = _one_request(host, port, method, path, hdrs, body)
        return resp

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(5)
        self._servers = []


def _one_request(
    host: str, port: int, method: str, path: str, headers: dict[str, str], body: bytes | None
) -> Response:
    conn = _NoDelayConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        hdrs: dict[str, str] = {}
        for k, v in r.getheaders():
            k = k.lower()
            hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
        return Response(r.status, hdrs, data)
    finally:
        conn.close()


class _NoDelayConnection(http.client.HTTPConnection):
    """Headers and body go out as separate writes: without TCP_NODELAY, Nagle and delayed
    ACKs would add ~40 ms to every small request."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nekko-test-proxy/1"
    timeout = 120
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self._up: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._close_up()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def proxy(self) -> CountingProxy:
        return self.server.proxy  # type: ignore[attr-defined]

    def _close_up(self) -> None:
        if self._up is not None:
            self._up.close()
            self._up = None

    def _upstream(self) -> http.client.HTTPConnection:
        if self._up is None:
            host, port = self.proxy.backend
            self._up = _NoDelayConnection(host, port, timeout=120)
        return self._up

    # -- request bodies -------------------------------------------------------------------
    def _body_kind(self) -> tuple[str, int]:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            return "chunked", -1
        length = int(self.headers.get("Content-Length") or 0)
        return ("length", length) if length > 0 else ("none", 0)

    def _read_exactly(self, left: int) -> Iterator[bytes]:
        while left > 0:
            data = self.rfile.read(min(_CHUNK, left))
            if not data:
                raise ConnectionError("client body ended early")
            left -= len(data)
            yield data

    def _iter_body(self) -> Iterator[bytes]:
        kind, length = self._body_kind()
        if kind == "length":
            yield from self._read_exactly(length)
        elif kind == "chunked":
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._read_exactly(size)
                self.rfile.readline(3)

    def _drain(self) -> None:
        kind, length = self._body_kind()
        if kind == "none":
            return
        if kind == "length" and length <= 16 * 1024 * 1024:
            for _ in self._iter_body():
                pass
        else:
            self.close_connection = True

    # -- dispatch -------------------------------------------------------------------------
    def _handle(self) -> None:
        proxy = self.proxy
        has_auth = "Authorization" in self.headers
        rng = self.headers.get("Range")
        status = proxy._take_failure(self.path)
        if status:
            self._drain()
            body = json.dumps(
                {
                    "errors": [
                        {"code": "UNAVAILABLE", "message": "injected failure", "detail": status}
                    ]
                }
            ).encode()
            sent = len(body) if self.command != "HEAD" else 0
            proxy._record(Request(self.command, self.path, status, has_auth, rng, sent))
            self.send_response_only(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if proxy.retry_after is not None:
                self.send_header("Retry-After", str(proxy.retry_after))
            self.end_headers()
            if sent:
                self.wfile.write(body)
            return
        m = BLOB_RE.match(urlsplit(self.path).path)
        if m and self.command == "GET" and proxy.redirect_blobs and self._redirect(m):
            return
        self._forward(m.group("digest") if m and self.command == "GET" else None)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _send_upstream(
        self,
        method: str,
        headers: list[tuple[str, str]],
        body: Iterator[bytes] | None,
        chunked: bool,
    ) -> http.client.HTTPResponse:
        for attempt in (0, 1):
            conn = self._upstream()
            try:
                conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                if body is not None:
                    for data in body:
                        conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    if chunked:
                        conn.send(b"0\r\n\r\n")
                return conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # a kept-alive upstream connection the registry had closed: retry once when
                # no request body was consumed yet
                self._close_up()
                if attempt or body is not None:
                    raise
        raise AssertionError("unreachable")

    def _headers_out(self, drop: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        # Expect: 100-continue was already answered by BaseHTTPRequestHandler
        return [
            (k, v)
            for k, v in self.headers.items()
            if k.lower() not in _HOP and k.lower() not in drop and k.lower() != "expect"
        ]

    def _redirect(self, m: re.Match) -> bool:
        """Answer a blob GET with a 307 to the blob host when the registry allows it."""
        proxy = self.proxy
        try:
            resp = self._send_upstream(
                "HEAD", self._headers_out(("range", "if-range")), None, False
            )
            resp.read()
            if resp.will_close:
                self._close_up()
        except (OSError, http.client.HTTPException):
            self._close_up()
            return False
        if resp.status != 200:
            return False  # let the real GET answer (a 401 challenge, a 404 ...)
        self._drain()
        proxy._record(
            Request(
                "GET", self.path, 307, "Authorization" in self.headers, self.headers.get("Range"), 0
            )
        )
        self.send_response_only(307)
        self.send_header("Location", proxy.presigned_url(m.group("repo"), m.group("digest")))
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def _forward(self, blob_digest: str | None) -> None:
        proxy = self.proxy
        has_auth = "Authorization" in self.headers
        rng = self.headers.get("Range")
        kind, _ = self._body_kind()
        headers = self._headers_out()
        if kind == "chunked":
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if blob_digest is not None and proxy.ignore_ranges:
            headers = [(k, v) for k, v in headers if k.lower() not in ("range", "if-range")]
        try:
            resp = self._send_upstream(
                self.command,
                headers,
                self._iter_body() if kind != "none" else None,
                kind == "chunked",
            )
        except (OSError, http.client.HTTPException) as e:
            self._close_up()
            body = f"proxy: upstream failed: {e}\n".encode()
            self.close_connection = True
            proxy._record(Request(self.command, self.path, 502, has_auth, rng, len(body)))
            self.send_response_only(502)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            return

        status = resp.status
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        length = resp.getheader("Content-Length")
        chunk_out = not no_body and length is None
        if chunk_out and self.request_version != "HTTP/1.1":
            chunk_out = False
            self.close_connection = True
        drop_after = None
        if blob_digest and status in (200, 206) and not no_body:
            drop_after = proxy._take_drop(blob_digest)

        rec = proxy._record(Request(self.command, self.path, status, has_auth, rng, 0))
        complete = False
        try:
            if no_body:
                resp.read()
            self.send_response_only(status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            if chunk_out:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if no_body:
                complete = True
            else:
                while True:
                    data = resp.read(_CHUNK)
                    last = not data
                    if drop_after is not None and rec.bytes + len(data) >= drop_after:
                        data = data[: max(0, drop_after - rec.bytes)]
                        last = False
                    if data:
                        rec.bytes += len(data)
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunk_out else data)
                    if last:
                        if chunk_out:
                            self.wfile.write(b"0\r\n\r\n")
                        complete = True
                        break
                    if drop_after is not None and rec.bytes >= drop_after:
                        break
            self.wfile.flush()
        except (OSError, http.client.HTTPException):
            complete = False
        if not complete:
            self._close_up()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        elif resp.will_close:
            self._close_up()


class _BlobHostHandler(BaseHTTPRequestHandler):
    """Object storage: serves the registry's blobs by presigned URL, refuses Authorization."""

    protocol_version = "HTTP/1.1"
    server_version = "nekko-test-objectstore/1"
    timeout = 120
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def proxy(self) -> CountingProxy:
        return self.server.proxy  # type: ignore[attr-defined]

    def _error(self, rec: Request, status: int, code: str, message: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>\n"
        ).encode()
        rec.status = status
        rec.bytes = len(body) if self.command != "HEAD" else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        rec = Request(
            self.command,
            self.path,
            0,
            "Authorization" in self.headers,
            self.headers.get("Range"),
            0,
        )
        self._serve(rec)

    do_HEAD = do_GET

    def _serve(self, rec: Request) -> None:
        proxy = self.proxy
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        # recorded at once, but filled in before any byte of the answer goes out
        proxy._record(rec, blob_host=True)
        if rec.has_authorization:
            self._error(
                rec,
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query "
                "parameter, Signature query string parameter or the Authorization "
                "header should be specified",
            )
            return
        m = re.match(r"^/blobs/([A-Za-z0-9_+.-]+:[A-Fa-f0-9]+)$", unquote(url.path))
        if not m:
            self._error(rec, 404, "NoSuchKey", "The specified key does not exist.")
            return
        digest = m.group(1)
        expires = (q.get("X-Amz-Expires") or [""])[0]
        nonce = (q.get("X-Amz-Date") or [""])[0]
        sig = (q.get("X-Amz-Signature") or [""])[0]
        if (
            not hmac.compare_digest(sig, proxy._sign(digest, expires, nonce))
            or not expires.isdigit()
            or int(expires) < time.time()
        ):
            self._error(rec, 403, "SignatureDoesNotMatch", "bad or expired signature")
            return
        self.signature = sig
        try:
            f = open(proxy.blob_file(digest), "rb")  # noqa: SIM115 - closed by the with below
        except OSError:
            self._error(rec, 404, "NoSuchKey", "The specified key does not exist.")
            return
        with f:
            self._send_file(rec, f, digest)

    def _send_file(self, rec: Request, f: Any, digest: str) -> None:
        size = os.fstat(f.fileno()).st_size
        etag = '"' + digest.partition(":")[2] + '"'
        start, end = 0, size - 1
        status = 200
        if_range = self.headers.get("If-Range")
        if rec.range and (if_range is None or if_range == etag):
            mr = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rec.range)
            if mr and (mr.group(1) or mr.group(2)):
                if mr.group(1):
                    start = int(mr.group(1))
                    end = min(int(mr.group(2)), size - 1) if mr.group(2) else size - 1
                else:
                    start = max(0, size - int(mr.group(2)))
                if start >= size or start > end:
                    rec.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        length = end - start + 1 if size else 0
        drop_after = self.proxy._take_drop(digest) if self.command == "GET" else None
        allowed = (
            self.proxy._url_allowance(self.signature, length) if self.command == "GET" else None
        )
        if allowed is not None:
            if allowed <= 0 and length:
                self._error(rec, 403, "AccessDenied", "Request has expired")
                return
            drop_after = allowed if drop_after is None else min(drop_after, allowed)
            if drop_after >= length:
                drop_after = None
        rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        f.seek(start)
        left = length
        try:
            while left > 0:
                n = min(_CHUNK, left)
                if drop_after is not None:
                    n = min(n, drop_after - rec.bytes)
                    if n <= 0:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                data = f.read(n)
                if not data:
                    break
                rec.bytes += len(data)
                self.wfile.write(data)
                left -= len(data)
        except OSError:
            self.close_connection = True


# --------------------------------------------------------------------------------------------
# the registry


def _registry_binary() -> str:
    path = shutil.which("docker-registry") or shutil.which("registry")
    if not path:
        raise FileNotFoundError("docker-registry (Debian package docker-registry) not found")
    return path


class RegistryPeer(CountingProxy):
    """A running ``docker-registry serve`` and the counting proxy in front of it.

    Attributes beyond :class:`CountingProxy`'s (``host``, ``url``, ``blob_host``,
    ``requests``, ``blob_host_requests``, options): ``auth`` (bool), ``token_server``
    (:class:`~peers.tokenserver.TokenServer` or None), ``registry_host`` (the registry itself,
    not counted), ``registry_port``, ``workdir``, ``storage_dir``, ``config_path``,
    ``log_path``, ``service``, ``credentials`` ((user, password) for the auth registry).
    """

    def __init__(
        self, workdir: str, *, auth: bool = False, token_expires_in: int = 300, **proxy_options: Any
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.auth = auth
        self.service = SERVICE
        self.credentials: tuple[str, str] | None = CREDENTIALS if auth else None
        self.token_server: TokenServer | None = None
        self.process: subprocess.Popen | None = None
        self._extra: list[CountingProxy] = []
        self._log = None
        storage = os.path.join(self.workdir, "storage")
        os.makedirs(storage, exist_ok=True)
        self.config_path = os.path.join(self.workdir, "config.yml")
        self.log_path = os.path.join(self.workdir, "registry.log")
        try:
            if auth:
                self.token_server = TokenServer(
                    os.path.join(self.workdir, "token"), expires_in=token_expires_in
                ).start()
            self.registry_port = self._start_process(storage)
            super().__init__(("127.0.0.1", self.registry_port), storage, **proxy_options)
        except BaseException:
            self._stop_process()
            if self.token_server:
                self.token_server.close()
            raise

    @property
    def registry_host(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    def oci_url(self, ref: str) -> str:
        """``public/single:v1`` -> ``oci://127.0.0.1:PROXYPORT/public/single:v1``."""
        return f"oci://{self.host}/{ref}"

    def _config(self, storage: str, port: int) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(storage)}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "    readonly:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{port}",
            "  secret: nekko-test-registry-secret",
        ]
        if self.token_server is not None:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {json.dumps(self.token_server.realm)}",
                f"    service: {json.dumps(self.service)}",
                f"    issuer: {json.dumps(ISSUER)}",
                f"    rootcertbundle: {json.dumps(self.token_server.cert_path)}",
            ]
        return "\n".join(lines) + "\n"

    def _start_process(self, storage: str) -> int:
        binary = _registry_binary()
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        last_error = ""
        for _ in range(5):  # a port taken between free_ports() and the bind: try another
            (port,) = free_ports(1)
            with open(self.config_path, "w") as f:
                f.write(self._config(storage, port))
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child's log; closed at stop
            self.process = subprocess.Popen(
                [binary, "serve", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            if self._wait_ready(port):
                return port
            last_error = self._log_tail()
            self._stop_process()
        raise RuntimeError(f"docker-registry did not start; log tail:\n{last_error}")

    def _wait_ready(self, port: int, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                r = _one_request("127.0.0.1", port, "GET", "/v2/", {}, None)
                if r.status in (200, 401):
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _stop_process(self) -> None:
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def new_proxy(self, **options: Any) -> CountingProxy:
        """Another counting proxy in front of this registry (e.g. a mirror to break)."""
        p = CountingProxy(self.backend, self.storage_dir, **options)
        self._extra.append(p)
        return p

    def log_text(self) -> str:
        """The last MiB of the registry's log (see :meth:`log_since` for what came after a
        point: a long session's log is longer than that)."""
        return self._log_tail(1 << 20)

    def log_size(self) -> int:
        """Where the log ends now: a mark for :meth:`log_since` (the log of a session's
        registry outgrows any tail)."""
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_since(self, mark: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self) -> None:
        for p in self._extra:
            p.close()
        self._extra = []
        if getattr(self, "_servers", None):
            super().close()
        self._stop_process()
        if self.token_server is not None:
            self.token_server.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_registry(workdir: str, auth: bool = False, **options: Any) -> RegistryPeer:
    """Start ``docker-registry`` (``auth=True``: with a token server) and its counting proxy.

    ``options``: ``token_expires_in`` (auth only) and the proxy options ``redirect_blobs``,
    ``fail_with``, ``fail_times``, ``fail_match``, ``retry_after``.  Call ``close()`` (or use
    ``with``) when done.
    """
    return RegistryPeer(workdir, auth=auth, **options)


# --------------------------------------------------------------------------------------------
# pytest fixtures

try:
    import pytest
except ImportError:  # the benchmark may run without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def registry(tmp_path_factory: Any) -> Iterator[RegistryPeer]:
        """An anonymous docker-registry behind a counting proxy (shared by the session)."""
        from peers import require_binary

        require_binary("docker-registry")
        peer = start_registry(str(tmp_path_factory.mktemp("registry")))
        try:
            yield peer
        finally:
            peer.close()

    @pytest.fixture(scope="session")
    def auth_registry(tmp_path_factory: Any) -> Iterator[RegistryPeer]:
        """A docker-registry with ``auth: token`` (peers.tokenserver) behind a counting proxy."""
        from peers import require_binary, require_module

        require_binary("docker-registry")
        require_module("cryptography")
        peer = start_registry(str(tmp_path_factory.mktemp("auth-registry")), auth=True)
        try:
            yield peer
        finally:
            peer.close()

    @pytest.fixture(scope="session")
    def seeded(registry: RegistryPeer) -> dict:
        """The test images pushed to ``registry``: ``{"public/single:v1": ImageInfo, ...}``."""
        from peers import require_binary
        from peers.images import seed_images

        require_binary("skopeo")
        images = seed_images(registry)
        registry.reset()
        return images

    @pytest.fixture(scope="session")
    def auth_seeded(auth_registry: RegistryPeer) -> dict:
        """The test images pushed to ``auth_registry`` (``public/*`` and ``private/single:v1``)."""
        from peers import require_binary
        from peers.images import seed_images

        require_binary("skopeo")
        images = seed_images(auth_registry)
        auth_registry.reset()
        if auth_registry.token_server is not None:
            auth_registry.token_server.clear()
        return images

    @pytest.fixture
    def reg(registry: RegistryPeer, seeded: dict) -> Iterator[RegistryPeer]:
        """``registry`` with its images, reset before and after the test."""
        registry.reset()
        yield registry
        registry.reset()

    @pytest.fixture
    def areg(auth_registry: RegistryPeer, auth_seeded: dict) -> Iterator[RegistryPeer]:
        """``auth_registry`` with its images, reset (its token server's records too) before
        the test; after it, reset and its tokens back to 300 s."""
        auth_registry.reset()
        assert auth_registry.token_server is not None
        auth_registry.token_server.clear()
        yield auth_registry
        auth_registry.reset()
        auth_registry.token_server.expires_in = 300
