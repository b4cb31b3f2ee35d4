"""The API's front door: one thread and a selector hold every connection between requests,
and answer the common ones themselves.

A thread per connection (``ThreadingHTTPServer``) made every cache hit pay for a thread
switch under the GIL and for ``http.server``'s layers of reading: 3,100 answers a second
from a dictionary, p99 127 ms, at 16 connections on 2 cores (issue 11, item 5).  Here a
connection is a buffer: :class:`Front` reads what arrives, and a complete request head that
is a plain ``GET``/``HEAD`` with no body is given to ``quick`` (the routes' fast answer:
``/healthz``, a complete entry's cached JSON).  What ``quick`` answers is written from
here, in order, keep-alive as the client asked; anything else (a body, an error, an
incomplete entry, a head we do not parse, a request over ``_HEAD_MAX``) is handed with the
bytes read so far to ``hand_off``, the server's handler thread, which answers that request
as it always did and gives the connection back (``add`` with what it read beyond it).  A connection whose request has not fully
arrived within ``timeout()`` seconds of the previous answer (or of its accept) is closed, as
the handler's deadline does (Slowloris); a client that does not read its answers is not
read from until it does; past ``connlimit.MAX_IDLE`` connections, the one idle longest is
closed for a new one (a client may close an idle keep-alive connection, RFC 9112 9.5).  This module knows HTTP framing only: admission and routes are
``quick``'s.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable

from nekko_sm import connlimit
from nekko_sm.api_http import address_of, head_bytes, loggable
from nekko_sm.httphead import Headers, common_line, keeps_alive, parse_simple

log = logging.getLogger("nekko_sm.api")

_READ = 1 << 16
_HEAD_MAX = 16 << 10  # a longer head goes to the handler, whose limits answer it
_SWEEP = 1.0  # seconds between looks for connections past their deadline

# (command, target, headers) -> the 200 answer's JSON body, or None: hand it off
Quick = Callable[[str, str, Headers], "bytes | None"]


class _Conn:
    __slots__ = ("addr", "buf", "closing", "deadline", "out", "sock")

    def __init__(self, sock: socket.socket, addr: Any, deadline: float | None) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.out: memoryview | None = None  # an answer the client has not read yet
        self.deadline = deadline
        self.closing = False


class Front:
    """The selector thread.  ``hand_off(sock, addr, prefix)`` takes a connection over (and
    its bytes read so far); ``release(addr)`` is told of every connection closed here."""

    def __init__(
        self,
        quick: Quick,
        hand_off: Callable[[socket.socket, Any, bytes], None],
        release: Callable[[Any], None],
        timeout: Callable[[], float | None],
    ) -> None:
        self._quick = quick
        self._hand_off = hand_off
        self._release = release
        self._timeout = timeout
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._new: list[tuple[socket.socket, Any, bytes]] = []
        self._conns: dict[socket.socket, _Conn] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._heads: dict[int, bytes] = {}  # the second's 200 heads, by body length
        self._heads_second = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="api front")
        self._thread.start()

    def add(self, sock: socket.socket, addr: Any, prefix: bytes = b"") -> bool:
        """Take a connection (new, from the accepting thread, or back from a handler with
        the bytes it read beyond its request); False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._new.append((sock, addr, prefix))
        self._wake()
        return True

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full: a wake-up is pending already
            pass

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        next_sweep = time.monotonic() + _SWEEP
        while True:
            with self._lock:
                if self._closed:
                    return
                new, self._new = self._new, []
            for sock, addr, prefix in new:
                self._open(sock, addr, prefix)
            wait = max(0.0, next_sweep - time.monotonic())
            for key, mask in self._sel.select(wait):
                conn = key.data
                if conn is None:
                    self._drain_wake()
                    continue
                try:
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                    else:
                        self._read(conn)
                except Exception:  # one connection's trouble never stops the others
                    log.exception("error on an API connection")
                    self._close(conn)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + _SWEEP

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _deadline(self) -> float | None:
        timeout = self._timeout()
        return time.monotonic() + timeout if timeout else None

    def _open(self, sock: socket.socket, addr: Any, prefix: bytes) -> None:
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, addr, self._deadline())
            conn.buf += prefix
            self._sel.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            connlimit.close_socket(sock)
            self._release(addr)
            return
        if len(self._conns) >= connlimit.MAX_IDLE:  # at the bound: the longest idle goes
            idle = (c for c in self._conns.values() if not c.buf and c.out is None)
            self._close(next(idle, None) or next(iter(self._conns.values())))
        self._conns[sock] = conn
        if conn.buf:
            self._serve(conn)  # requests a handler read past its own

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buf += data
        self._serve(conn)

    def _serve(self, conn: _Conn) -> None:
        """Answer the complete requests in the buffer, in order, until one is not ours."""
        while conn.sock in self._conns and conn.out is None:
            buf = conn.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:  # not all here: wait, unless it is not a head we would answer
                line = buf.find(b"\n") + 1
                if len(buf) > _HEAD_MAX or b"\n\n" in buf or line and not common_line(buf[:line]):
                    self._give(conn)  # the handler answers those as http.server would
                return
            answer = self._answer(conn, bytes(buf[: end + 4]))
            if answer is None:
                self._give(conn)
                return
            del buf[: end + 4]
            conn.deadline = self._deadline()
            self._conns[conn.sock] = self._conns.pop(conn.sock)  # the dict: longest idle first
            conn.closing = answer[1]
            self._send(conn, answer[0])

    def _answer(self, conn: _Conn, head: bytes) -> tuple[bytes, bool] | None:
        """(the bytes to send, close after) for a request ``quick`` answers, else None."""
        parsed = parse_simple(head)
        if parsed is None:
            return None
        command, target, minor, headers = parsed
        if command not in ("GET", "HEAD") or minor == "1" and "Host" not in headers:
            return None
        if headers.get("Content-Length", "0").strip() != "0":
            return None
        if "Transfer-Encoding" in headers or "Expect" in headers:
            return None
        try:
            body = self._quick(command, target, headers)
        except Exception:  # noqa: BLE001 - the handler answers it again, and logs why
            return None
        if body is None:
            return None
        if log.isEnabledFor(logging.DEBUG):
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            log.debug("%s %s", address_of(conn.addr), loggable(f'"{line}" 200 -'))
        data = self._ok_head(len(body))
        return (data + body if command == "GET" else data), not keeps_alive(minor, headers)

    def _ok_head(self, length: int) -> bytes:
        """``head_bytes(200, length)``, made once a second for each length."""
        now = int(time.time())
        if now != self._heads_second or len(self._heads) > 4096:
            self._heads, self._heads_second = {}, now
        head = self._heads.get(length)
        if head is None:
            head = self._heads[length] = head_bytes(200, length)
        return head

    def _send(self, conn: _Conn, data: bytes | memoryview) -> None:
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close(conn)
            return
        if n < len(data):  # the client reads slowly: wait until it has room
            conn.out = memoryview(data)[n:]
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        elif conn.closing:
            self._close(conn)

    def _flush(self, conn: _Conn) -> None:
        data, conn.out = conn.out, None
        self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        if data is not None:
            self._send(conn, data)
        if conn.out is None and conn.sock in self._conns:
            self._serve(conn)  # requests that arrived behind the answer

    def _give(self, conn: _Conn) -> None:
        self._forget(conn)
        try:
            conn.sock.setblocking(True)
            self._hand_off(conn.sock, conn.addr, bytes(conn.buf))
        except Exception:
            log.exception("could not hand an API connection to a handler")
            connlimit.close_socket(conn.sock)
            self._release(conn.addr)

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _close(self, conn: _Conn) -> None:
        if conn.sock not in self._conns:
            return
        self._forget(conn)
        connlimit.close_socket(conn.sock)
        self._release(conn.addr)

    def _sweep(self, now: float) -> None:
        """Close what took longer than allowed: once a second, whatever the traffic."""
        late = [c for c in self._conns.values() if c.deadline is not None and c.deadline <= now]
        for conn in late:
            self._close(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            new, self._new = self._new, []
        self._wake()
        self._thread.join(5)
        for sock, addr, _ in new:
            connlimit.close_socket(sock)
            self._release(addr)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
