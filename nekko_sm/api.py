"""The HTTP API (DESIGN section 5) on ThreadingHTTPServer, over TCP or a Unix socket.

JSON in, JSON out.  Every error is ``{"error": {"code", "message"}}`` with the status of
its :class:`~nekko_sm.errors.NekkoError`; no request can stop the server.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import socket
import socketserver
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import unquote, urlsplit

from nekko_sm import __version__
from nekko_sm.config import Address, Config
from nekko_sm.connlimit import BoundedServerMixin
from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    BadRequest,
    BodyTooLarge,
    ConfigError,
    EntryNotFound,
    InvalidBase64,
    InvalidJSON,
    MethodNotAllowed,
    NekkoError,
)
from nekko_sm.refs import redact
from nekko_sm.service import Service

log = logging.getLogger("nekko_sm.api")

MAX_BODY = 64 << 10  # a POST body is a small JSON object
MAX_DRAIN = 64 << 20  # an oversized body up to this is read and dropped before the 413
CONNECTION_TIMEOUT = 60.0  # seconds a client may sit idle or dribble a request
_CONTENT_ARG = re.compile(r"/content/([^\s?#\"']+)")


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
    if not url or any(ord(c) < 32 for c in url):
        raise InvalidBase64(f"{text[:80]!r} does not decode to a URL")
    return url


def _loggable(text: str) -> str:
    """``text`` with any ``/content/B64`` whose URL carries a user:password made harmless:
    base64 hides nothing, and logs must not hold credentials."""

    def one(m: re.Match) -> str:
        try:
            url = decode_url(m.group(1))
        except NekkoError:
            return m.group(0)
        if "@" not in url.partition("://")[2].split("/", 1)[0]:
            return m.group(0)
        return f"/content/<{redact(url)}>"

    return _CONTENT_ARG.sub(one, text)


class _Deadline(io.RawIOBase):
    """A connection's input with a deadline for the request being read: its line, headers and
    body must all arrive within the handler's timeout, however slowly they dribble in
    (Slowloris), not just with no pause longer than that."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        self._sock = sock
        self._timeout = timeout
        self._deadline: float | None = None
        self.fresh = False  # no byte of the request yet: the connection is idle
        self.give_up: Callable[[], bool] | None = None  # the server wants idle threads back

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        self._deadline = value
        self.fresh = value is not None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        if self.deadline is None:
            return self._sock.recv_into(buf)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request took too long to arrive")
        # Idle between requests (fresh), a read waits a second at a time: while every
        # handler thread is taken (connlimit), an idle keep-alive connection gives its
        # thread back within a second.
        idle = self.fresh and self.give_up is not None
        try:
            while True:
                wait = min(left, self._timeout) if self._timeout else left
                self._sock.settimeout(min(wait, 1.0) if idle else wait)
                try:
                    n = self._sock.recv_into(buf)
                    break
                except socket.timeout:
                    left = self.deadline - time.monotonic()
                    if not idle or left <= 0:
                        raise
                    if self.give_up():  # type: ignore[misc]
                        raise socket.timeout("idle connection closed: the server is busy")\
                            from None
        finally:
            self._sock.settimeout(self._timeout)
        self.fresh = False
        return n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"nekko-sm/{__version__}"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT
    service: Service  # set on the subclass made by make_server

    # -- plumbing ------------------------------------------------------------------------
    def address_string(self) -> str:
        addr = self.client_address
        return addr[0] if isinstance(addr, tuple) and addr else "unix"

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, 414, 431, 501) as JSON too."""
        codes = {400: "bad-request", 404: "not-found", 405: "method-not-allowed",
                 408: "request-timeout", 414: "uri-too-long", 431: "headers-too-large",
                 501: "method-not-allowed", 505: "http-version-not-supported"}
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line all the same
        try:
            self.send_response(code, message)
            body = json.dumps({"error": {"code": codes.get(code, "bad-request"),
                                         "message": message or explain or "bad request"}}).encode()
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
            log.debug("%s %s", self.address_string(), _loggable(format % args))

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Header and body go out as two writes; with Nagle the body waits for the
            # client's delayed ACK of the header (~40 ms): ~25 requests/s per connection.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile.close()
        self._input = _Deadline(self.connection, self.timeout)
        self._input.give_up = getattr(self.server, "saturated", None)
        self.rfile = io.BufferedReader(self._input)

    def handle_one_request(self) -> None:
        self._input.deadline = time.monotonic() + self.timeout if self.timeout else None
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # no status line: errors would look like data
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        if self.request_version == "HTTP/1.1" and "Host" not in self.headers:
            self.send_error(400, "an HTTP/1.1 request needs a Host header")  # RFC 9112 3.2
            return False
        return True

    def _send(self, status: int, body: object | None = None, headers: dict | None = None) -> None:
        data = b""
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _error(self, err: NekkoError) -> None:
        self.server.count_error(err.code)  # type: ignore[attr-defined]
        status = err.status if 400 <= err.status < 600 else 500
        self._send(status, err.to_json())

    def _dispatch(self, fn) -> None:
        try:
            fn()
        except NekkoError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # the server keeps serving, whatever happened
            log.exception("error handling %s %s", self.command, _loggable(self.path))
            self._error(NekkoError(f"internal error: {type(e).__name__}"))

    def _content_arg(self) -> str | None:
        path = urlsplit(self.path).path
        if path in ("/content", "/content/"):
            return None
        if path.startswith("/content/"):
            return path[len("/content/"):]
        raise EntryNotFound(f"no such endpoint {path[:100]!r}")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            raise BadRequest("send the body with Content-Length, not chunked")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        length = (lengths.pop() or "0") if len(lengths) == 1 else "" if lengths else "0"
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True
            self.close_connection = True
            raise BadRequest("bad Content-Length")
        n = int(length)
        if n > MAX_BODY:
            # Read (and drop) a moderate excess so the client sees our answer rather than a
            # broken pipe; beyond that, answer and hang up.
            self.close_connection = True
            if n <= MAX_DRAIN:
                left = n
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            raise BodyTooLarge(f"request body of {n} bytes is larger than {MAX_BODY}")
        body = self.rfile.read(n)
        self._input.deadline = None  # the request is in: what follows may take its time
        return body

    # -- methods ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_HEAD(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def do_DELETE(self) -> None:
        self._dispatch(self._delete)

    def do_PUT(self) -> None:
        self._dispatch(self._not_allowed)

    do_PATCH = do_PUT

    def _not_allowed(self) -> None:
        self._read_body()
        raise MethodNotAllowed(f"{self.command} is not supported")

    def _get(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._send(200, {"status": "ok", "version": __version__})
            return
        if path == "/metrics":
            data = self.server.metrics().encode()  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        arg = self._content_arg()
        if arg is None:
            self._send(200, {"entries": self.service.list()})
            return
        entry = self.service.status(decode_url(arg))
        self._send(200 if entry["state"] == "complete" else 206, entry)

    def _post(self) -> None:
        body = self._read_body()
        if self._content_arg() is not None:
            raise MethodNotAllowed("POST to /content/ with the URL in the JSON body")
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise InvalidJSON(f"the body is not JSON: {str(e)[:200]}") from None
        if not isinstance(req, dict):
            raise InvalidJSON("the body must be a JSON object")
        url = req.get("url")
        if not isinstance(url, str) or not url:
            raise BadRequest('the body needs "url", a string')
        for field in ("credentials", "credentialsType", "digest", "platform"):
            if req.get(field) is not None and not isinstance(req[field], str):
                raise BadRequest(f'"{field}" must be a string')
        is_async = req.get("async", False)
        if not isinstance(is_async, bool):
            raise BadRequest('"async" must be true or false')
        creds = Credentials.make(req.get("credentials"), req.get("credentialsType"))
        flight, entry = self.service.start(url, creds, req.get("digest"), req.get("platform") or None)
        if entry is not None:
            self._send(200, entry)
            return
        assert flight is not None
        if is_async:
            self._send(202, {"url": flight.url, "state": "downloading",
                             "downloaded": flight.progress.done, "size": flight.progress.total},
                       {"Location": "/content/" + encode_url(flight.url)})
            return
        entry, created = flight.future.result()
        self._send(201 if created else 200, entry)

    def _delete(self) -> None:
        self._read_body()
        arg = self._content_arg()
        if arg is None:
            raise MethodNotAllowed("DELETE needs /content/BASE64_URL")
        self.service.remove(decode_url(arg))
        self._send(204)


class _Server(BoundedServerMixin, ThreadingHTTPServer):  # bounded threads: connlimit
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr, handler, service: Service, family=socket.AF_INET) -> None:
        self.address_family = family
        self.service = service
        self._errors: dict[str, int] = {}
        self._errors_lock = threading.Lock()
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_UNIX:
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = "unix", 0
        else:
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    def handle_error(self, request, client_address) -> None:
        """A client that went away is not worth a traceback; anything else is."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            log.debug("client went away: %s", sys.exc_info()[1])
            return
        log.exception("error on a connection")

    def count_error(self, code: str) -> None:
        with self._errors_lock:
            self._errors[code] = self._errors.get(code, 0) + 1

    def metrics(self) -> str:
        from nekko_sm.metrics import render

        with self._errors_lock:
            errors = dict(self._errors)
        return render(self.service, errors)


def _prepare_unix(path: str) -> None:
    """Remove a stale socket file; refuse if a live server owns it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ConfigError(f"another server is listening on {path}")


def make_server(service: Service, address: Address) -> _Server:
    handler = type("BoundHandler", (Handler,), {"service": service})
    if address.kind == "unix":
        _prepare_unix(address.path)
        old = os.umask(0o117)
        try:
            srv = _Server(address.path, handler, service, socket.AF_UNIX)
        finally:
            os.umask(old)
        os.chmod(address.path, 0o660)
        return srv
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return _Server((address.host, address.port), handler, service, family)
    except OSError as e:
        raise ConfigError(f"cannot listen on {address}: {e.strerror or e}") from None


def bound_address(srv: _Server) -> str:
    if srv.address_family == socket.AF_UNIX:
        return f"unix:{srv.server_address}"
    host, port = srv.server_address[:2]
    # An AF_INET or AF_INET6 address: the host is a str, never bytes.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # type: ignore[str-bytes-safe]


def run(config: Config, ready=None) -> int:
    """Serve until SIGTERM/SIGINT, then stop cleanly (partials stay resumable)."""
    import signal

    service = Service(config)
    srv = make_server(service, config.address)
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: stopping", signum)
            threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("nekko-sm %s serving on %s, cache %s", __version__, bound_address(srv),
             config.cache_dir)
    if ready is not None:
        ready(srv)
    try:
        srv.serve_forever(poll_interval=0.5)
    finally:
        srv.server_close()
        service.close()
        if config.address.kind == "unix":
            try:
                os.unlink(config.address.path)
            except OSError:
                pass
    log.info("stopped")
    return 0
