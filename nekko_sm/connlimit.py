"""Bounds on the API server's connections and threads, with liveness answered regardless.

``ThreadingHTTPServer`` starts a thread per connection, however many: 400 idle connections
were 400 threads, and under a thread limit (systemd's ``TasksMax``, a pod's pids limit)
``/healthz`` stopped answering, so the liveness probe killed every download (issue 9,
finding 6).  :class:`BoundedServerMixin` holds at most ``MAX_PER_CLIENT`` connections per
client address (TCP; a Unix socket's callers are one local client).  Between requests a
connection belongs to the front door (one thread: :mod:`nekko_sm.api_front`, which
answers cache hits itself, and past ``MAX_IDLE`` connections closes the one idle longest);
a request it hands on gets one of at most ``MAX_HANDLERS`` handler threads.  A connection over a bound, or a
request with no thread free, is not served: :class:`_Overflow`, one thread and a selector
for all of them, reads its request line and answers ``GET``/``HEAD /healthz`` with 200 (a
saturated server is alive) and anything else with ``503 busy`` and ``Retry-After: 1``, then
closes it; one that sends nothing within ``OVERFLOW_TIMEOUT`` is closed, and past
``MAX_OVERFLOW`` the oldest goes first.  A handler thread serves one request: a connection
that stays open goes back to the front (:meth:`BoundedServerMixin.give_back`), so no thread
waits on an idle one.  It imports nothing of the API's request handling.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
import time
from typing import Any

from nekko_sm import __version__

log = logging.getLogger("nekko_sm.api")

MAX_HANDLERS = 128  # handler threads at once (each a connection being served)
MAX_IDLE = 512  # connections the front door holds between requests (then the longest idle goes)
MAX_PER_CLIENT = 64  # connections at once from one client address
MAX_OVERFLOW = 256  # connections over the bounds waiting for their short answer
OVERFLOW_TIMEOUT = 5.0  # seconds such a connection has to send its request line
_HEAD_MAX = 8192


def _answer(status: str, body: dict, head: bool) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    lines = [
        f"HTTP/1.1 {status}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    if not status.startswith("200"):
        lines.append("Retry-After: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else data)


def overflow_answer(request_head: bytes, why: str) -> bytes:
    """What a connection over the bounds is told, from the start of its request."""
    line = request_head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
    method = line[0] if line else b""
    path = line[1].split(b"?", 1)[0] if len(line) > 1 else b""
    if method in (b"GET", b"HEAD") and path == b"/healthz":
        return _answer("200 OK", {"status": "ok", "version": __version__}, method == b"HEAD")
    return _answer(
        "503 Service Unavailable", {"error": {"code": "busy", "message": why}}, method == b"HEAD"
    )


class _Overflow:
    """One thread answering, with a selector, the connections over the bounds."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, tuple[float, bytearray, str]] = {}  # oldest first
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="api overflow")
        self._thread.start()

    def add(self, sock: socket.socket, why: str, prefix: bytes = b"") -> None:
        """Take ``sock``, of which ``prefix`` was read already (never blocks: called from
        the accepting thread, or the front's)."""
        if _complete(prefix):
            sock.setblocking(False)
            _answer_once(sock, prefix, why)
            return
        old = None
        with self._lock:
            if self._closed:
                close_socket(sock)
                return
            sock.setblocking(False)
            self._conns[sock] = (time.monotonic() + OVERFLOW_TIMEOUT, bytearray(prefix), why)
            self._sel.register(sock, selectors.EVENT_READ)
            if len(self._conns) > MAX_OVERFLOW:
                old = next(iter(self._conns))
                self._drop(old)
        if old is not None:
            close_socket(old)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _drop(self, sock: socket.socket) -> None:
        self._conns.pop(sock, None)
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [s for s, (t, _, _) in self._conns.items() if t <= now]
                for s in expired:
                    self._drop(s)
                nearest = min((t for t, _, _ in self._conns.values()), default=now + 1.0)
            for s in expired:
                close_socket(s)
            for key, _ in self._sel.select(max(0.0, min(1.0, nearest - time.monotonic()))):
                sock = key.fileobj
                if sock is self._wake_r:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                    continue
                self._readable(sock)  # type: ignore[arg-type]

    def _readable(self, sock: socket.socket) -> None:
        with self._lock:
            entry = self._conns.get(sock)
        if entry is None:
            return
        _, buf, why = entry
        try:
            chunk = sock.recv(_HEAD_MAX)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf += chunk
        if chunk and not _complete(buf):
            return  # the rest of the head is on its way
        with self._lock:
            self._drop(sock)
        if chunk or buf:
            _answer_once(sock, bytes(buf), why)
        else:
            close_socket(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
            for s in conns:
                self._drop(s)
        for s in conns:
            close_socket(s)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


def _complete(head: bytes | bytearray) -> bool:
    """Enough of a request head to answer it: its end, or as much as we ever read."""
    return b"\r\n\r\n" in head or b"\n\n" in head or len(head) >= _HEAD_MAX


def _answer_once(sock: socket.socket, head: bytes, why: str) -> None:
    try:
        sock.send(overflow_answer(head, why))  # small: fits the socket buffer
    except OSError:
        pass
    close_socket(sock)


def close_socket(sock: socket.socket) -> None:
    """Shut a connection both ways and close it, whatever state it is in."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class BoundedServerMixin:
    """Put before ``ThreadingHTTPServer``: every connection is the ``front``'s (one thread,
    a selector: :mod:`nekko_sm.api_front`, set by the subclass) between requests, and a
    handler thread's from the first request the front hands off, within the bounds above."""

    front: Any  # add(sock, addr, prefix=b"") -> bool, close(); made by the subclass once bound

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._slots_lock = threading.Lock()
        self._handlers = 0
        self._clients: dict[str, int] = {}
        self._prefixes: dict[socket.socket, bytes] = {}
        self._kept: set[socket.socket] = set()  # handed back to the front: not to be shut
        self._overflow = _Overflow()
        try:
            super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        except BaseException:
            self._overflow.close()
            raise

    @staticmethod
    def _client(client_address: object) -> str | None:
        if isinstance(client_address, tuple) and client_address:
            return str(client_address[0])
        return None  # a Unix socket

    def process_request(self, request: Any, client_address: Any) -> None:
        """A new connection (the accepting thread): the front's, or over a bound."""
        client = self._client(client_address)
        with self._slots_lock:
            if client is not None and self._clients.get(client, 0) >= MAX_PER_CLIENT:
                why = (
                    f"more than {MAX_PER_CLIENT} connections from one client at once:"
                    " close some, then try again"
                )
            else:
                why = ""
                if client is not None:
                    self._clients[client] = self._clients.get(client, 0) + 1
        if why:
            self._refuse(request, why)
        elif not self.front.add(request, client_address):
            self.release_connection(client_address)
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def _refuse(self, request: Any, why: str, prefix: bytes = b"") -> None:
        log.debug("a connection over the bounds: %s", why)
        self._overflow.add(request, why, prefix)

    def hand_off(self, request: Any, client_address: Any, prefix: bytes) -> None:
        """The front gives a connection to a handler thread, with the bytes it read."""
        with self._slots_lock:
            free = self._handlers < MAX_HANDLERS
            if free:
                self._handlers += 1
                self._prefixes[request] = prefix
        if not free:
            self.release_connection(client_address)
            self._refuse(
                request, f"the server is serving {MAX_HANDLERS} requests: try again shortly", prefix
            )
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self._release(client_address)
            raise

    def take_prefix(self, request: Any) -> bytes:
        """What the front read of a connection before handing it to this handler."""
        with self._slots_lock:
            return self._prefixes.pop(request, b"")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            with self._slots_lock:
                kept = request in self._kept
                self._kept.discard(request)
            self._release(client_address, closed=not kept)

    def give_back(self, request: Any, client_address: Any, prefix: bytes) -> None:
        """A handler answered and the connection stays open: it is the front's again,
        with the bytes the handler read beyond its request."""
        with self._slots_lock:
            self._kept.add(request)
        if not self.front.add(request, client_address, prefix):
            with self._slots_lock:
                self._kept.discard(request)  # the server is closing: shut it as usual

    def shutdown_request(self, request: Any) -> None:
        with self._slots_lock:
            if request in self._kept:
                return  # given back to the front, which closes it in its time
        super().shutdown_request(request)  # type: ignore[misc]

    def _release(self, client_address: Any, closed: bool = True) -> None:
        with self._slots_lock:
            self._handlers -= 1
        if closed:
            self.release_connection(client_address)

    def release_connection(self, client_address: Any) -> None:
        """A connection closed: it no longer counts against its client."""
        client = self._client(client_address)
        if client is None:
            return
        with self._slots_lock:
            left = self._clients.get(client, 1) - 1
            if left > 0:
                self._clients[client] = left
            else:
                self._clients.pop(client, None)

    def server_close(self) -> None:
        super().server_close()  # type: ignore[misc]
        front = getattr(self, "front", None)
        if front is not None:
            front.close()
        self._overflow.close()
