"""The HTTP plumbing under the API: connections, request framing, limits, JSON answers.

:class:`JsonHandler` reads a request within its deadline (line, headers and body, however
slowly they dribble in), refuses what it will not take before reading a byte of its body
(a framing or size it does not accept, a Host, Origin or token that may not call: the
checks of :mod:`nekko_sm.api_guard`), answers every error as ``{"error": {"code",
"message"}}`` with its status, lingers over a body it did not read, and keeps serving
whatever a handler raised.  URLs travel in paths as base64 (:func:`decode_url`) and reach
the log without their credentials (:func:`loggable`).  It knows no route and never touches
the service: :mod:`nekko_sm.api` adds those.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import socket
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from nekko_sm import __version__
from nekko_sm.api_guard import ApiToken, host_of, is_loopback
from nekko_sm.errors import (
    ApiUnauthorized,
    BadRequest,
    BodyTooLarge,
    InvalidBase64,
    MisdirectedRequest,
    NekkoError,
    OriginRefused,
    UnsupportedMediaType,
)
from nekko_sm.httphead import parse_common
from nekko_sm.refs import has_query_credentials, redact

log = logging.getLogger("nekko_sm.api")

MAX_BODY = 64 << 10  # a POST body is a small JSON object
CONNECTION_TIMEOUT = 60.0  # seconds a client may sit idle or dribble a request
# After answering a request whose body we did not read (a 413, a 401 ...), the connection is
# half-closed and what the client still sends is read and dropped for a while, as nginx's
# lingering close does: closing at once, with its bytes unread, would reset the connection
# and the client could lose the answer.
LINGER_SECONDS = 5.0  # at most this long in all
LINGER_IDLE = 1.0  # ... and at most this long without a byte
LINGER_BYTES = 64 << 20
REALM = 'Bearer realm="nekko-sm"'
SERVER = f"nekko-sm/{__version__}"
_C0 = re.compile("[\x00-\x1f]")  # control characters: no URL has them
_CONTENT_ARG = re.compile(r"/content/([^\s?#\"']+)")
_DATE: list = [0, ""]  # (second, its Date header)


def encode_url(url: str) -> str:
    return base64.b64encode(url.encode()).decode()


def decode_url(text: str) -> str:
    """Base64 of a URL from a path: standard or URL-safe alphabet, padding optional."""
    raw = unquote(text).strip()
    raw = "".join(raw.split())
    if not raw:
        raise InvalidBase64("empty base64 in the path")
    raw = raw.replace("-", "+").replace("_", "/")
    raw = raw.rstrip("=")
    raw += "=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw, validate=True)
        url = data.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidBase64(f"{text[:80]!r} is not base64 of a URL") from None
    if not url or _C0.search(url):
        raise InvalidBase64(f"{text[:80]!r} does not decode to a URL")
    return url


def loggable(text: str) -> str:
    """``text`` with any ``/content/B64`` whose URL carries a user:password made harmless:
    base64 hides nothing, and logs must not hold credentials."""

    def one(m: re.Match) -> str:
        try:
            url = decode_url(m.group(1))
        except NekkoError:
            return m.group(0)
        if "@" not in url.partition("://")[2].split("/", 1)[0] and not has_query_credentials(
            url.partition("?")[2].partition("#")[0]
        ):
            return m.group(0)
        return f"/content/<{redact(url)}>"

    return _CONTENT_ARG.sub(one, text)


def _linger(sock: socket.socket) -> None:
    """Half-close, then read and drop what the client still sends, for a bounded time."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    end = time.monotonic() + LINGER_SECONDS
    got = 0
    try:
        while got < LINGER_BYTES:
            left = end - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(min(left, LINGER_IDLE))
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass


def http_date() -> str:
    """The Date header's value, formatted once a second rather than once a request."""
    now = int(time.time())
    cached = _DATE
    if cached[0] != now:
        cached = _DATE[:] = [now, formatdate(now, usegmt=True)]
    return str(cached[1])


def head_bytes(status: int, length: int | None, headers: dict | None = None) -> bytes:
    """The head of an answer: a JSON body of ``length`` bytes (None: no body), ``headers``."""
    lines = [
        f"HTTP/1.1 {status} {BaseHTTPRequestHandler.responses.get(status, ('',))[0]}",
        f"Server: {SERVER}",
        f"Date: {http_date()}",
    ]
    if length is not None:
        lines.append("Content-Type: application/json")
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    lines.append(f"Content-Length: {length or 0}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def address_of(client_address: Any) -> str:
    """A client's address as the log shows it: its IP, or "unix" on a Unix socket."""
    addr = client_address
    return addr[0] if isinstance(addr, tuple) and addr else "unix"


def target_path(target: str) -> str:
    """The path of an origin-form request target (what ``urlsplit(target).path`` is)."""
    return target.partition("#")[0].partition("?")[0]


def admit(server: Any, command: str, path: str, headers: Any) -> None:
    """Who may call (DESIGN section 10): the Host, Origin and token checks of a request."""
    if path == "/healthz" and command in ("GET", "HEAD"):
        return  # liveness probes: open to all, says nothing but "ok" and the version
    host = headers.get("Host")
    if server.loopback and host is not None and not is_loopback(host_of(host)):
        raise MisdirectedRequest(
            "this server listens on loopback and answers only requests addressed to"
            " localhost, 127.0.0.1 or [::1] (a Host header of another name is a DNS"
            " rebinding attempt from a web page)"
        )
    if "Origin" in headers:
        raise OriginRefused(
            "requests from web pages (with an Origin header) are refused:"
            " the nekko-sm API is not for browsers"
        )
    token: ApiToken | None = server.api_token
    if token is not None and not token.accepts(headers.get("Authorization")):
        raise ApiUnauthorized(
            "this API needs Authorization: Bearer TOKEN, the token of the server's --api-token-file"
        )


class _Deadline(io.RawIOBase):
    """A connection's input with a deadline for the request being read: its line, headers and
    body must all arrive within the handler's timeout, however slowly they dribble in
    (Slowloris), not just with no pause longer than that.  It starts with the bytes the
    front door read; :meth:`rest` is what is left unread when the request is answered."""

    def __init__(self, sock: socket.socket, timeout: float | None, prefix: bytes = b"") -> None:
        self._sock = sock
        self._prefix = prefix  # what the front door read before handing the connection on
        self._timeout = timeout
        self.deadline: float | None = None
        self._emptying = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int | None:  # type: ignore[override]
        if self._prefix:
            n = min(len(buf), len(self._prefix))
            buf[:n], self._prefix = self._prefix[:n], self._prefix[n:]
            return n
        if self._emptying:
            return None  # as a non-blocking stream: nothing more without waiting
        if self.deadline is None:
            return self._sock.recv_into(buf)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request took too long to arrive")
        try:
            self._sock.settimeout(min(left, self._timeout) if self._timeout else left)
            return self._sock.recv_into(buf)
        finally:
            self._sock.settimeout(self._timeout)

    def rest(self, reader: Any) -> bytes:
        """What ``reader`` (a BufferedReader over this) holds unread, and what is left of
        the prefix."""
        self._emptying = True
        try:
            return reader.peek(1) + self._prefix
        finally:
            self._emptying = False


class JsonHandler(BaseHTTPRequestHandler):
    """The plumbing of every request: its framing and limits, who may send it, and the
    JSON answer or error; :class:`nekko_sm.api.Handler` adds the routes."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER
    sys_version = ""
    timeout = CONNECTION_TIMEOUT

    # -- plumbing ------------------------------------------------------------------------
    def address_string(self) -> str:
        return address_of(self.client_address)

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, 414, 431, 501) as JSON too."""
        codes = {
            400: "bad-request",
            404: "not-found",
            405: "method-not-allowed",
            408: "request-timeout",
            414: "uri-too-long",
            431: "headers-too-large",
            501: "method-not-allowed",
            505: "http-version-not-supported",
        }
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line all the same
        try:
            self.send_response(code, message)
            body = json.dumps(
                {
                    "error": {
                        "code": codes.get(code, "bad-request"),
                        "message": message or explain or "bad request",
                    }
                }
            ).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), loggable(format % args))

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Header and body go out as two writes; with Nagle the body waits for the
            # client's delayed ACK of the header (~40 ms): ~25 requests/s per connection.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile.close()
        prefix = self.server.take_prefix(self.connection)  # type: ignore[attr-defined]
        self._input = _Deadline(self.connection, self.timeout, prefix)
        self.rfile = self._reader = io.BufferedReader(self._input)

    def handle(self) -> None:
        """One request: a connection that stays open goes back to the front door (in
        :meth:`finish`), with what it sent beyond this request, so no thread waits on it."""
        self.close_connection = True
        self.handle_one_request()
        self._answered = True

    def handle_one_request(self) -> None:
        self._input.deadline = time.monotonic() + self.timeout if self.timeout else None
        self._body_read = False
        super().handle_one_request()

    def finish(self) -> None:
        if getattr(self, "_linger", False):
            try:
                self.wfile.flush()
            except OSError:
                pass
            _linger(self.connection)
        keep = getattr(self, "_answered", False) and not self.close_connection
        rest = self._input.rest(self._reader) if keep else b""
        super().finish()
        if keep:
            self.server.give_back(self.connection, self.client_address, rest)  # type: ignore[attr-defined]

    def handle_expect_100(self) -> bool:
        """No ``100 Continue`` for a body we will refuse: the client hears the 413 instead."""
        length = (self.headers.get("Content-Length") or "").strip()
        if length.isascii() and length.isdigit() and int(length) > MAX_BODY:
            return True
        return super().handle_expect_100()

    def _announces_body(self) -> bool:
        length = (self.headers.get("Content-Length") or "0").strip()
        return length != "0" or "Transfer-Encoding" in self.headers

    def parse_request(self) -> bool:
        ok = parse_common(self)  # the usual request without the email package (httphead)
        if ok is None:
            ok = super().parse_request()
        if not ok:
            return False
        if self.request_version == "HTTP/0.9":  # no status line: errors would look like data
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        if self.request_version == "HTTP/1.1" and "Host" not in self.headers:
            self.send_error(400, "an HTTP/1.1 request needs a Host header")  # RFC 9112 3.2
            return False
        return True

    def _send(self, status: int, body: object | None = None, headers: dict | None = None) -> None:
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        self._send_json(status, data, headers)

    def _send_json(self, status: int, data: bytes | None, headers: dict | None = None) -> None:
        """Answer with ``data``, JSON already encoded (None: no body): status line, headers
        and body in one write, one packet.  The head is built by :func:`head_bytes`, not
        through http.server's ``send_response``/``send_header`` list (a tenth of a cache
        hit's cost); a ``Connection`` header has the effect ``send_header`` gives it."""
        self.log_request(status)
        for k, v in (headers or {}).items():
            if k.lower() == "connection":
                if v.lower() == "close":
                    self.close_connection = True
                elif v.lower() == "keep-alive":
                    self.close_connection = False
        head = head_bytes(status, None if data is None else len(data), headers)
        self.wfile.write(head + data if data is not None and self.command != "HEAD" else head)

    def date_time_string(self, timestamp: float | None = None) -> str:
        return http_date() if timestamp is None else super().date_time_string(timestamp)

    def _error(self, err: NekkoError) -> None:
        self.server.count_error(err.code)  # type: ignore[attr-defined]
        status = err.status if 400 <= err.status < 600 else 500
        headers = {}
        if isinstance(err, ApiUnauthorized):
            headers["WWW-Authenticate"] = REALM + (
                ', error="invalid_token"' if "Authorization" in self.headers else ""
            )
        self._send(status, err.to_json(), headers)

    def _dispatch(self, fn) -> None:
        try:
            self._admit()
            fn()
        except NekkoError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # the server keeps serving, whatever happened
            log.exception("error handling %s %s", self.command, loggable(self.path))
            self._error(NekkoError(f"internal error: {type(e).__name__}"))
        finally:
            if not self._body_read and self._announces_body():
                # What follows on this connection is the body we did not read, not a request.
                self.close_connection = True
                self._linger = True

    def _admit(self) -> None:
        """Who may call (:func:`admit`), and a POST's framing, checked before any byte of a
        body is read."""
        admit(self.server, self.command, target_path(self.path), self.headers)
        if self.command == "POST":
            self._body_length()  # framing (400) and size (413) before the media type
            media = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise UnsupportedMediaType(
                    "POST a JSON body with Content-Type: application/json"
                    " (curl: -H 'Content-Type: application/json')"
                )

    def _body_length(self) -> int:
        """The announced body length, checked; refused (unread: a lingering close follows,
        see _dispatch) when it is not one we take."""
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise BadRequest("send the body with Content-Length, not chunked")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        length = (lengths.pop() or "0") if len(lengths) == 1 else "" if lengths else "0"
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
            raise BadRequest("bad Content-Length")
        n = int(length)
        if n > MAX_BODY:
            raise BodyTooLarge(f"request body of {n} bytes is larger than {MAX_BODY}")
        return n

    def _read_body(self) -> bytes:
        body = self.rfile.read(self._body_length())
        self._body_read = True
        self._input.deadline = None  # the request is in: what follows may take its time
        return body
