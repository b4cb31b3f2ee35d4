"""A small HTTP/1.1 server of our own that misbehaves on purpose, bound to 127.0.0.1.

``start_faulty() -> FaultyServer`` (usable outside pytest; also a context manager), and the
function-scoped fixture ``faulty``: a fresh server per test, shut down after it.

``srv.add(path, data, **behaviour) -> url`` registers a resource (``path`` may omit its leading
``/``; adding a path again replaces it).  ``GET``/``HEAD`` answer with ``ETag``,
``Last-Modified``, ``Accept-Ranges: bytes`` and ``Content-Length``, honour
``Range: bytes=N-``, ``bytes=N-M`` and ``bytes=-N`` (``206`` with ``Content-Range``; ``416`` when
unsatisfiable; several ranges or a malformed one are ignored: ``200``) and ``If-Range`` (an ETag
or a Last-Modified that does not match: ``200`` with the full body).  Unknown paths are ``404``.

Each request goes through these stages in order; the first that answers wins:

1. ``require_auth="Bearer x"`` or ``"Basic <b64>"``: any other ``Authorization`` is ``401``
   with ``WWW-Authenticate`` of that scheme.
2. ``statuses=[503, 429, ...]``: the first requests (any method) answer these, one each, with a
   short text body and, with ``retry_after="1"``, a ``Retry-After`` header.
3. ``redirect_to=URL``: ``302`` (``redirect_status=`` to change it) to URL.
4. The content.  "GETs" below means GETs that reach this stage.

Content behaviours (combine freely):

- ``drop_after=N``: promise the whole length, send N body bytes, close the connection
  (``drop_reset=True``: with a TCP reset instead of a clean FIN).  Only bodies longer than N;
  ``drop_times=K`` (default 1, ``None`` = always) such GETs do it.
- ``stall_after=N, stall_seconds=S``: send N body bytes, pause S seconds, send the rest;
  ``stall_times=K`` (default 1, ``None`` = always).  ``shutdown()`` ends a pause by closing
  the connection.
- ``lie_length=+N/-N``: ``Content-Length`` is the real length plus N; the real body is sent, then
  the connection is closed.
- ``no_length=True``: no ``Content-Length``; the body ends when the connection closes.
- ``extra_bytes=N``: like ``no_length``, with N junk bytes after the body.
- ``ignore_range=True``: no ``Accept-Ranges``; always ``200`` with the full body.
- ``corrupt=True``: flip bytes of the content (every 1024th and the last), same length and ETag;
  ``corrupt_times=K`` (default ``None`` = always) GETs are corrupted, later ones are not.
- ``etag='"v1"'`` (default: from the sha256 of data), ``last_modified="<HTTP date>"``.
- ``change_etag_after=K``: after K GETs, the content becomes ``new_data`` (default: ``data``
  with every byte XOR 0x5A, same length) with another ETag and a later Last-Modified, so a
  resume with ``If-Range`` must get a full ``200``.
- ``content_disposition="attachment; filename=x"``, ``content_type=...``, ``headers={...}``.

Observing: ``srv.requests`` is the list of ``FaultyRequest`` records (``method``, ``path``
without query, ``target`` as sent, ``headers`` with lower-case names, ``range``, ``if_range``,
``status``, ``body_bytes`` actually sent, ``complete`` (the whole promised body went out),
``connection`` (a number per TCP connection)).  Reading it waits (at most 1 s) until no handler is
mid-response, so counts are final.  ``srv.requests_for(path)``, ``srv.body_bytes(path)`` (sum over
``2xx`` answers unless ``all_statuses=True``; path or full URL), ``srv.clear_requests()``.
``srv.errors`` holds exceptions raised inside the server (a test may assert it is empty).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import io
import itertools
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only type checkers read it

_CHUNK = 64 * 1024
_SOCKET_TIMEOUT = 10.0
_XOR_5A = bytes(b ^ 0x5A for b in range(256))
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class FaultyRequest:
    """One request as the server saw and answered it."""

    method: str
    path: str
    target: str
    headers: dict[str, str]
    connection: int
    range: str | None = None
    if_range: str | None = None
    status: int = 0
    body_bytes: int = 0
    complete: bool = False


@dataclass
class _Version:
    data: bytes
    etag: str
    last_modified: str


@dataclass
class _Resource:
    versions: list[_Version]
    drop_after: int | None = None
    drop_times: int | None = 1
    drop_reset: bool = False
    stall_after: int | None = None
    stall_seconds: float = 0.0
    stall_times: int | None = 1
    statuses: Sequence[int] = ()
    retry_after: str | None = None
    lie_length: int = 0
    no_length: bool = False
    extra_bytes: int = 0
    ignore_range: bool = False
    corrupt: bool = False
    corrupt_times: int | None = None
    change_etag_after: int | None = None
    content_disposition: str | None = None
    content_type: str = "application/octet-stream"
    require_auth: str | None = None
    redirect_to: str | None = None
    redirect_status: int = 302
    headers: dict[str, str] = field(default_factory=dict)
    # counters, changed under the server's lock
    requests_seen: int = 0
    gets_served: int = 0
    drops: int = 0
    stalls: int = 0
    corruptions: int = 0


_BEHAVIOURS = set(_Resource.__dataclass_fields__) - {
    "versions",
    "change_etag_after",
    "requests_seen",
    "gets_served",
    "drops",
    "stalls",
    "corruptions",
}


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'


def _corrupted(data: bytes) -> bytes:
    buf = bytearray(data)
    for i in itertools.chain(range(0, len(buf), 1024), [len(buf) - 1] if buf else []):
        buf[i] ^= 0xFF
    return bytes(buf)


def _under(limit: int | None, done: int) -> bool:
    return limit is None or done < limit


def _parse_range(value: str, size: int) -> Any:
    """(start, end) inclusive, None to ignore the header, or "unsatisfiable"."""
    m = _RANGE.fullmatch(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        suffix = int(m.group(2))
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


class _Dropped(Exception):
    """The handler closed the connection on purpose."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faulty/1"
    timeout = _SOCKET_TIMEOUT
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _refuse_method(self) -> None:
        self.close_connection = True
        self._simple(405, "method not allowed\n", {"Allow": "GET, HEAD", "Connection": "close"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    # -- helpers -----------------------------------------------------------------------------
    def _simple(
        self,
        status: int,
        text: str,
        headers: dict[str, str] | None = None,
        rec: FaultyRequest | None = None,
    ) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if rec is not None:
            rec.status = status
        if self.command != "HEAD":
            self.wfile.write(body)
            if rec is not None:
                rec.body_bytes = len(body)
        if rec is not None:
            rec.complete = True

    def _close_now(self, reset: bool) -> None:
        """Close the TCP connection at once (FIN, or RST with ``reset``)."""
        self.close_connection = True
        conn = self.connection
        try:
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()
                self.wfile.close()
                self.rfile = io.BytesIO()  # what the stdlib handler flushes and closes next
                self.wfile = io.BytesIO()
                conn.close()
            else:
                conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self, body: memoryview, origin: int, pos: int, end: int, rec: FaultyRequest) -> None:
        """Send ``body[pos:end]``, keeping ``rec.body_bytes`` (counted from ``origin``) exact."""
        while pos < end:
            n = min(end, pos + _CHUNK)
            self.wfile.write(body[pos:n])
            rec.body_bytes = n - origin
            pos = n

    # -- the request -------------------------------------------------------------------------
    def _serve(self) -> None:
        srv = self.server
        target = self.path
        path = target.split("?", 1)[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        rec = FaultyRequest(
            self.command,
            path,
            target,
            headers,
            srv.connection_id(self.request),
            headers.get("range"),
            headers.get("if-range"),
        )
        srv.begin(rec)
        try:
            self._answer(srv, rec, headers)
        except _Dropped:
            pass
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            srv.end()

    def _answer(self, srv: _Server, rec: FaultyRequest, headers: dict[str, str]) -> None:
        length = int(headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        with srv.lock:
            res = srv.resources.get(rec.path)
            if res is not None:
                res.requests_seen += 1
        if res is None:
            self._simple(404, f"no such resource: {rec.path}\n", rec=rec)
            return

        # 1. authentication
        if res.require_auth is not None and headers.get("authorization") != res.require_auth:
            scheme = res.require_auth.split(" ", 1)[0]
            challenge = f'{scheme} realm="faulty"' if scheme.lower() == "basic" else scheme
            self._simple(401, "unauthorized\n", {"WWW-Authenticate": challenge}, rec)
            return

        # 2. scripted statuses
        with srv.lock:
            status = None
            if res.statuses:
                status = res.statuses[0]
                res.statuses = res.statuses[1:]
        if status is not None:
            extra = {"Retry-After": res.retry_after} if res.retry_after is not None else {}
            self._simple(status, f"status {status}\n", extra, rec)
            return

        # 3. redirect
        if res.redirect_to is not None:
            self._simple(res.redirect_status, "redirect\n", {"Location": res.redirect_to}, rec)
            return

        # 4. content
        get = self.command == "GET"
        with srv.lock:
            changed = res.change_etag_after is not None and res.gets_served >= res.change_etag_after
            version = res.versions[1 if changed else 0]
            corrupt = get and res.corrupt and _under(res.corrupt_times, res.corruptions)
            if get:
                res.gets_served += 1
                res.corruptions += corrupt
        data = _corrupted(version.data) if corrupt else version.data
        size = len(data)

        status, start, end = 200, 0, size
        content_range = None
        if (
            rec.range is not None
            and not res.ignore_range
            and (rec.if_range is None or rec.if_range in (version.etag, version.last_modified))
        ):
            parsed = _parse_range(rec.range, size)
            if parsed == "unsatisfiable":
                self._simple(
                    416,
                    "range not satisfiable\n",
                    {"Content-Range": f"bytes */{size}", "ETag": version.etag},
                    rec,
                )
                return
            if parsed is not None:
                status, (start, last) = 206, parsed
                end = last + 1
                content_range = f"bytes {start}-{last}/{size}"
        body_len = end - start

        close_delimited = res.no_length or res.extra_bytes > 0
        with srv.lock:
            drop_at = stall_at = None
            if (
                get
                and res.drop_after is not None
                and body_len > res.drop_after
                and _under(res.drop_times, res.drops)
            ):
                res.drops += 1
                drop_at = start + res.drop_after
            sent = res.drop_after if drop_at is not None else body_len
            if (
                get
                and res.stall_after is not None
                and sent > res.stall_after
                and _under(res.stall_times, res.stalls)
            ):
                res.stalls += 1
                stall_at = start + res.stall_after

        self.send_response(status)
        self.send_header("Content-Type", res.content_type)
        self.send_header("ETag", version.etag)
        self.send_header("Last-Modified", version.last_modified)
        if not res.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        if content_range:
            self.send_header("Content-Range", content_range)
        if res.content_disposition:
            self.send_header("Content-Disposition", res.content_disposition)
        for k, v in res.headers.items():
            self.send_header(k, v)
        if close_delimited or res.lie_length:
            self.close_connection = True
            self.send_header("Connection", "close")
        if not close_delimited:
            self.send_header("Content-Length", str(max(0, body_len + res.lie_length)))
        self.end_headers()
        rec.status = status
        if not get:
            rec.complete = True
            return

        view = memoryview(data)
        stop = drop_at if drop_at is not None else end
        pos = start
        if stall_at is not None:
            self._write(view, start, pos, stall_at, rec)
            if srv.pause(res.stall_seconds):  # shutting down: do not finish the body
                self._close_now(reset=False)
                raise _Dropped
            pos = stall_at
        self._write(view, start, pos, stop, rec)
        if drop_at is not None:
            self._close_now(res.drop_reset)
            raise _Dropped
        if res.extra_bytes:
            self.wfile.write(b"\xa5" * res.extra_bytes)
            rec.body_bytes += res.extra_bytes
        rec.complete = res.lie_length <= 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resources: dict[str, _Resource] = {}
        self.records: list[FaultyRequest] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._idle = threading.Condition(self.lock)
        self._busy = 0
        self._conns: dict[socket.socket, int] = {}
        self._conn_ids = itertools.count(1)
        self._no_conns = threading.Condition(self.lock)
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self._conns[request] = next(self._conn_ids)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self.lock:
            self._conns.pop(request, None)
            self._no_conns.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):  # a bug here, not a client leaving
            self.errors.append(exc)
            traceback.print_exc()

    def connection_id(self, request: socket.socket) -> int:
        with self.lock:
            return self._conns.get(request, 0)

    def begin(self, rec: FaultyRequest) -> None:
        with self.lock:
            self.records.append(rec)
            self._busy += 1

    def end(self) -> None:
        with self.lock:
            self._busy -= 1
            self._idle.notify_all()

    def pause(self, seconds: float) -> bool:
        """Sleep, not counting as busy (a stall is a state to observe); True if shut down."""
        self.end()
        try:
            return self.stopping.wait(seconds)
        finally:
            with self.lock:
                self._busy += 1

    def snapshot(self, wait: float = 1.0) -> list[FaultyRequest]:
        with self.lock:
            self._idle.wait_for(lambda: self._busy == 0, timeout=wait)
            return list(self.records)

    def close_connections(self, wait: float) -> None:
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.lock:
            self._no_conns.wait_for(lambda: not self._conns, timeout=wait)


class FaultyServer:
    """A running fault-injecting server; see the module docstring."""

    def __init__(self) -> None:
        self._server = _Server()
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._start = time.time()
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"faulty-{self.port}", daemon=True
        )
        self._thread.start()
        self._closed = False

    def add(
        self,
        path: str,
        data: bytes = b"",
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        change_etag_after: int | None = None,
        new_data: bytes | None = None,
        **behaviour: Any,
    ) -> str:
        """Serve ``data`` at ``path`` with the given behaviour; returns the full URL."""
        if not path.startswith("/"):
            path = "/" + path
        path = path.split("?", 1)[0]
        unknown = set(behaviour) - _BEHAVIOURS
        if unknown:
            raise TypeError(f"unknown behaviour: {sorted(unknown)}")
        first = _Version(
            data,
            _quote_etag(etag) if etag else f'"{hashlib.sha256(data).hexdigest()[:20]}"',
            last_modified or email.utils.formatdate(self._start - 3600, usegmt=True),
        )
        second_data = data.translate(_XOR_5A) if new_data is None else new_data
        second = _Version(
            second_data,
            first.etag[:-1] + '-2"',
            email.utils.formatdate(self._start, usegmt=True),
        )
        if "statuses" in behaviour:
            behaviour["statuses"] = tuple(behaviour["statuses"])
        res = _Resource(versions=[first, second], change_etag_after=change_etag_after, **behaviour)
        with self._server.lock:
            self._server.resources[path] = res
        return self.url + path

    def url_for(self, path: str) -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    @property
    def requests(self) -> list[FaultyRequest]:
        """Every request so far, oldest first (waits up to 1 s for responses in progress)."""
        return self._server.snapshot()

    @property
    def errors(self) -> list[BaseException]:
        return list(self._server.errors)

    def _path(self, path_or_url: str) -> str:
        path_or_url = path_or_url.removeprefix(self.url)
        if not path_or_url.startswith("/"):
            path_or_url = "/" + path_or_url
        return path_or_url.split("?", 1)[0]

    def requests_for(self, path: str) -> list[FaultyRequest]:
        """The requests for ``path`` (a path or a full URL; the query is ignored)."""
        path = self._path(path)
        return [r for r in self.requests if r.path == path]

    def body_bytes(self, path: str, *, all_statuses: bool = False) -> int:
        """Body bytes sent for ``path``, counting ``2xx`` answers only unless ``all_statuses``."""
        return sum(
            r.body_bytes for r in self.requests_for(path) if all_statuses or 200 <= r.status < 300
        )

    def clear_requests(self) -> None:
        with self._server.lock:
            self._server.records.clear()

    def shutdown(self) -> None:
        """Stop serving and close every connection (idempotent; ends stalls at once)."""
        if self._closed:
            return
        self._closed = True
        self._server.stopping.set()
        self._server.shutdown()
        self._thread.join(5)
        self._server.close_connections(wait=2.0)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<FaultyServer {self.url}>"


def start_faulty() -> FaultyServer:
    """Start a server on a free 127.0.0.1 port, serving in a daemon thread."""
    return FaultyServer()


@contextlib.contextmanager
def running_faulty() -> Iterator[FaultyServer]:
    srv = start_faulty()
    try:
        yield srv
    finally:
        srv.shutdown()


@pytest.fixture
def faulty() -> Iterator[FaultyServer]:
    """A fresh FaultyServer for one test."""
    with running_faulty() as srv:
        yield srv
