"""The HTTP API (DESIGN section 5) on ThreadingHTTPServer, over TCP or a Unix socket.

JSON in, JSON out.  This module owns the routes (``/healthz``, ``/metrics`` and
``/content/…``: list, status, pull, remove) and what each answers, and the server that
serves them: its socket (a TCP port, or a Unix socket of mode 0660), the API
token it checks, its error counts, and :func:`run` until a signal stops it.  Framing,
limits, who may call and the JSON errors are :mod:`nekko_sm.api_http`'s; every error is
``{"error": {"code", "message"}}`` with the status of its
:class:`~nekko_sm.errors.NekkoError`, and no request can stop the server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import stat
import threading
from functools import partial
from http.server import ThreadingHTTPServer

from nekko_sm import __version__
from nekko_sm.api_front import Front
from nekko_sm.api_guard import ApiToken, is_loopback
from nekko_sm.api_http import JsonHandler, admit, decode_url, encode_url, target_path
from nekko_sm.config import Config
from nekko_sm.config_values import Address
from nekko_sm.connlimit import BoundedServerMixin
from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    BadRequest,
    ConfigError,
    EntryNotFound,
    InvalidJSON,
    MethodNotAllowed,
    NekkoError,
)
from nekko_sm.httphead import Headers
from nekko_sm.refparse import with_patterns
from nekko_sm.service import Service, check_hold

log = logging.getLogger("nekko_sm.api")


class Handler(JsonHandler):
    """The routes: ``GET``/``HEAD``, ``POST`` and ``DELETE`` of ``/content/…``, and the
    probes."""

    service: Service  # set on the subclass made by make_server

    def _content_arg(self) -> str | None:
        path = target_path(self.path)
        if path in ("/content", "/content/"):
            return None
        if path.startswith("/content/"):
            return path[len("/content/") :]
        raise EntryNotFound(f"no such endpoint {path[:100]!r}")

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
        path = target_path(self.path)
        if path == "/healthz":
            self._send_json(200, HEALTHZ)
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
            texts = self.service.catalog.list_texts()
            self._send_json(200, ('{"entries":[' + ",".join(texts) + "]}\n").encode())
            return
        cached = self.service.answer(arg, decode_url)  # a complete entry: no JSON work
        if cached is not None:
            self._send_json(200, cached)
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
        pin = req.get("pin")
        if pin is not None and not isinstance(pin, bool):
            raise BadRequest('"pin" must be true or false')
        hold = check_hold(req.get("hold"))
        creds = Credentials.make(req.get("credentials"), req.get("credentialsType"))
        # "include"/"exclude" (hf:// only) become part of the URL: its canonical query.
        url = with_patterns(
            url, req.get("include"), req.get("exclude"), self.service.config.hf_endpoint
        )
        flight, entry = self.service.start(
            url, creds, req.get("digest"), req.get("platform") or None, pin, hold
        )
        if entry is not None:
            self._send(200, entry)
            return
        assert flight is not None
        if is_async:
            if pin is not None or hold:  # also when this caller joined after the commit
                flight.future.add_done_callback(
                    lambda f: f.exception() or self.service.mark(flight.url, pin, hold, False)
                )
            self._send(
                202,
                {
                    "url": flight.url,
                    "state": "downloading",
                    "downloaded": flight.progress.done,
                    "size": flight.progress.total,
                },
                {"Location": "/content/" + encode_url(flight.url)},
            )
            return
        entry, created = self.service.finish(flight, pin, hold)
        self._send(201 if created else 200, entry)

    def _delete(self) -> None:
        self._read_body()
        arg = self._content_arg()
        if arg is None:
            raise MethodNotAllowed("DELETE needs /content/BASE64_URL")
        self.service.remove(decode_url(arg))
        self._send(204)


HEALTHZ = (
    json.dumps({"status": "ok", "version": __version__}, separators=(",", ":")).encode() + b"\n"
)


def quick(server: _Server, command: str, target: str, headers: Headers) -> bytes | None:
    """The front door's answer to a ``GET``/``HEAD``: ``/healthz``, or a complete entry's
    cached JSON, for a caller :func:`admit` lets in; None for anything else (the handler's
    to answer, with its errors)."""
    path = target_path(target)
    try:
        admit(server, command, path, headers)
        if path == "/healthz":
            return HEALTHZ
        if path.startswith("/content/") and len(path) > len("/content/"):
            # never render (and write) here: a write could wait on another process's lock
            return server.service.answer(path[len("/content/") :], decode_url, render=False)
    except NekkoError:
        pass
    return None


class _Server(BoundedServerMixin, ThreadingHTTPServer):  # bounded threads: connlimit
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr, handler, service: Service, family=socket.AF_INET) -> None:
        self.address_family = family
        self.service = service
        self._errors: dict[str, int] = {}
        self._errors_lock = threading.Lock()
        path = service.config.api_token_file
        self.api_token = ApiToken(path) if path else None
        super().__init__(addr, handler)
        # On loopback, the Host header must name loopback too (DNS rebinding).
        self.loopback = family != socket.AF_UNIX and is_loopback(str(self.server_address[0]))
        self.front = Front(
            partial(quick, self), self.hand_off, self.release_connection, lambda: handler.timeout
        )

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


def _reread_token(token: ApiToken) -> None:
    if token.reload():
        log.info("SIGHUP: re-read the API token from %s", token.path)


# The front door alone holds up to connlimit.MAX_IDLE connections, beside the handlers, the
# overflow and the pulls' files and sockets: more than the usual soft limit of 1,024.
FD_WANTED = 8192


def raise_fd_limit() -> None:
    """Raise the soft limit on open files toward the hard one, up to FD_WANTED (as Go's
    runtime does for every program)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_WANTED if hard == resource.RLIM_INFINITY else min(FD_WANTED, hard)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        log.debug("raised the open-file limit from %d to %d", soft, want)
    except (ValueError, OSError) as e:
        log.warning("could not raise the open-file limit from %d: %s", soft, e)


def run(config: Config, ready=None) -> int:
    """Serve until SIGTERM/SIGINT, then stop cleanly (partials stay resumable)."""
    import signal

    raise_fd_limit()
    service = Service(config)
    if service.budget.enabled:
        log.info("disk budget: %s", service.budget.describe())
        service.budget.enforce("to bring the cache within its budget at start")
    srv = make_server(service, config.address)
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: stopping", signum)
            threading.Thread(target=srv.shutdown, daemon=True).start()

    def reread(signum, frame) -> None:
        if srv.api_token is not None:
            threading.Thread(target=_reread_token, args=(srv.api_token,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, reread)
    log.info(
        "nekko-sm %s serving on %s, cache %s", __version__, bound_address(srv), config.cache_dir
    )
    if srv.api_token is None and config.address.kind == "tcp" and not srv.loopback:
        log.warning(
            "serving on %s without --api-token-file: anyone who can reach this port"
            " can pull, list and delete; give a token file, or listen on localhost or"
            " a Unix socket",
            bound_address(srv),
        )
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
