"""A real nginx, run as a foreground child process bound to 127.0.0.1 on free ports.

``start_nginx(workdir, limit_rate=None) -> NginxPeer`` works outside pytest too (bench/), and the
session-scoped fixture ``nginx`` yields one started in a temporary directory.

Main server, ``peer.url`` = ``http://127.0.0.1:PORT``:

- ``GET /files/NAME``: ``peer.root/NAME``, static, with ``Range``, ``If-Range``, ``ETag`` and
  ``Last-Modified`` (nginx's own).  With ``limit_rate`` (e.g. ``"20m"``), every static location
  (``/files/``, ``/basic/``, ``/bearer/``, on both servers) is limited to that many bytes per
  second per connection, as a CDN would.  nginx lets the first second's worth go at once.
- ``/basic/NAME``: the same file, behind HTTP Basic ``BASIC_USER``:``BASIC_PASSWORD``.
- ``/bearer/NAME``: the same file, only with exactly ``Authorization: Bearer BEARER_TOKEN``;
  anything else is ``401`` with ``WWW-Authenticate: Bearer``.
- ``/redirect/NAME``: ``302`` to ``peer.cdn_url + "/files/NAME"`` (another host name).
- ``/redirect-rel/NAME``: ``302`` with the relative ``Location: /files/NAME``.
- ``/bearer-redirect/NAME``: the bearer check, then ``302`` to the cdn host.
- ``/status/CODE``: answers CODE (2xx, 4xx or 5xx) with a short text body;
  ``?retry_after=N`` adds ``Retry-After: N``.
  (Redirect targets keep the raw, still percent-encoded NAME and its query string.)

CDN server, ``peer.cdn_url`` = ``http://localhost:PORT2``: ``/files/NAME`` from the same root,
and ``400`` to any request that carries an ``Authorization`` header, so a client that forwards
credentials across a redirect to another host fails loudly.

Both servers log every request as one JSON object per line.  ``peer.access_log()`` returns them
(up to date: it first waits until nginx has logged everything it finished before the call), each
with the keys ``method``, ``uri`` (decoded path), ``request_uri`` (as sent, with the query),
``status``, ``bytes_sent``, ``body_bytes_sent``, ``range``, ``if_range``, ``authorization``
(``True``/``False``: present or not; the value is never logged), ``host``, ``server_port``,
``connection``, ``connection_requests``, ``request_time``, ``completed`` (``False`` when the
client went away before the end).  ``peer.body_bytes(substring)`` sums ``body_bytes_sent`` of the
``2xx`` requests whose uri contains ``substring`` (``requests_for(substring)`` lists them all);
``peer.clear_log()`` empties the log.

``peer.put(name, data) -> str`` drops a file into the root and returns its ``/files/`` URL.

nginx's ETag is ``"<mtime hex>-<size hex>"`` with one-second mtimes: a file rewritten with the
same size in the same second keeps its ETag.  ``put`` moves the mtime forward to avoid that.

nginx runs as a single process (``master_process off``), which is what makes the log sync exact,
and (when started from the main thread, on Linux) dies with its parent, so a killed test run
leaves no nginx behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers import ChildProcess, require_binary

BASIC_USER = "alice"
BASIC_PASSWORD = "s3cret"
BEARER_TOKEN = "tok-123"

_SYNC_PATH = "/__nekko_sync"
_PING_PATH = "/__nekko_ping"
_START_TIMEOUT = 10.0
# Every code ``/status/CODE`` answers; nginx's ``return`` needs a literal code.
_STATUS_CODES = [200, 201, 202, 203, 204] + [c for c in range(400, 512) if c not in (444, 499)]

_LOG_FORMAT = (
    '{"method":"$request_method","uri":"$uri","request_uri":"$request_uri",'
    '"status":$status,"bytes_sent":$bytes_sent,"body_bytes_sent":$body_bytes_sent,'
    '"range":"$http_range","if_range":"$http_if_range","authorization":$nekko_has_auth,'
    '"host":"$host","server_port":$server_port,"connection":$connection,'
    '"connection_requests":$connection_requests,"request_time":$request_time,'
    '"completion":"$request_completion"}'
)


class NginxError(RuntimeError):
    """nginx did not start (the message carries its error log)."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _quote(path: Path | str) -> str:
    text = str(path)
    if any(c in text for c in '"\\$;{}\n'):
        raise ValueError(f"path unusable in an nginx config: {text!r}")
    return f'"{text}"'


def _config(prefix: Path, root: Path, port: int, cdn_port: int, limit_rate: str | None,
            token: str) -> str:
    cdn_url = f"http://localhost:{cdn_port}"
    limit = f"limit_rate {limit_rate};" if limit_rate else ""
    alias = _quote(f"{root}/")
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {_quote(prefix / 'tmp' / kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    statuses = "\n".join(
        f'            location = /status/{c} {{ return {c} "status {c}\\n"; }}'
        for c in _STATUS_CODES
    )
    bearer_check = (
        f'if ($http_authorization != "Bearer {BEARER_TOKEN}") '
        "{ add_header WWW-Authenticate Bearer always; return 401 \"bearer token required\\n\"; }"
    )
    return f"""# generated by tests/peers/nginx.py
{user}
master_process off;
worker_processes 1;
pid {_quote(prefix / 'nginx.pid')};
lock_file {_quote(prefix / 'nginx.lock')};
error_log {_quote(prefix / 'error.log')} warn;

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    sendfile on;
    server_tokens off;
    keepalive_timeout 30s;
{temp}

    map $http_authorization $nekko_has_auth {{
        "" false;
        default true;
    }}
    # The part of the raw request URI after its first segment, query included.
    map $request_uri $nekko_tail {{
        "~^/[^/?]+/(.*)$" $1;
        default "";
    }}
    log_format nekko escape=json '{_LOG_FORMAT}';
    access_log {_quote(prefix / 'access.log')} nekko;

    server {{
        listen 127.0.0.1:{port};
        server_name 127.0.0.1;

        location = {_PING_PATH} {{ default_type text/plain; return 200 "{token}"; }}
        location = {_SYNC_PATH} {{ return 204; }}

        location /files/ {{ alias {alias}; {limit} }}
        location /basic/ {{
            auth_basic "nekko";
            auth_basic_user_file {_quote(prefix / 'htpasswd')};
            alias {alias}; {limit}
        }}
        location /bearer/ {{
            {bearer_check}
            alias {alias}; {limit}
        }}
        location /redirect/ {{ return 302 {cdn_url}/files/$nekko_tail; }}
        location /redirect-rel/ {{
            absolute_redirect off;
            return 302 /files/$nekko_tail;
        }}
        location /bearer-redirect/ {{
            {bearer_check}
            return 302 {cdn_url}/files/$nekko_tail;
        }}
        location /status/ {{
            default_type text/plain;
            add_header Retry-After $arg_retry_after always;
{statuses}
            return 404 "peers.nginx: no such status\\n";
        }}
    }}

    server {{
        listen 127.0.0.1:{cdn_port};
        server_name localhost;

        if ($nekko_has_auth = true) {{ return 400 "cdn: Authorization header refused\\n"; }}
        location = {_PING_PATH} {{ default_type text/plain; return 200 "{token}"; }}
        location /files/ {{ alias {alias}; {limit} }}
    }}
}}
"""


def _set_pdeathsig() -> Any:
    """A preexec_fn that kills nginx with its parent (Linux), so a crashed run leaves no orphan."""
    if threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG fires when the forking *thread* exits
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


class NginxPeer(ChildProcess):
    """A running nginx; see the module docstring for what it serves."""

    def __init__(self, prefix: Path, root: Path, port: int, cdn_port: int,
                 proc: subprocess.Popen[bytes]) -> None:
        self.prefix = prefix
        self.root = root
        self.port = port
        self.cdn_port = cdn_port
        self.url = f"http://127.0.0.1:{port}"
        self.cdn_url = f"http://localhost:{cdn_port}"
        self.log_path = prefix / "access.log"
        self.error_log_path = prefix / "error.log"
        self.conf_path = prefix / "nginx.conf"
        self._proc = proc
        self._lock = threading.Lock()

    # -- files -----------------------------------------------------------------------------
    def put(self, name: str, data: bytes) -> str:
        """Write ``root/name`` atomically and return ``url + "/files/" + name``."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.stat().st_mtime if path.exists() else None
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        if old is not None:  # nginx's ETag has a one-second mtime: make sure it changes
            mtime = max(time.time(), old + 1)
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
        return f"{self.url}/files/{name}"

    # -- access log ------------------------------------------------------------------------
    def _sync(self) -> None:
        """Wait until nginx has logged every request it finished before this call.

        nginx runs as one process, so once it has logged a request made after them, it has
        logged them too.
        """
        token = uuid.uuid4().hex
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", f"{_SYNC_PATH}?{token}")
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                if token.encode() in f.read():
                    return
            time.sleep(0.002)
        raise NginxError("nginx did not log the sync request within 5 s")

    def access_log(self) -> list[dict[str, Any]]:
        """Every request logged so far (oldest first), without the log's own sync requests."""
        with self._lock:
            self._sync()
            with open(self.log_path, "rb") as f:
                raw = f.read()
        records = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            rec = json.loads(line.decode("utf-8", "replace"))
            if rec["uri"] in (_SYNC_PATH, _PING_PATH):
                continue
            rec["completed"] = rec.pop("completion") == "OK"
            records.append(rec)
        return records

    def body_bytes(self, name_substring: str, *, all_statuses: bool = False) -> int:
        """The sum of ``body_bytes_sent`` over requests whose uri contains ``name_substring``.

        Only ``2xx`` answers count (file content, not nginx's HTML for a 302 or 401) unless
        ``all_statuses``.
        """
        return sum(
            r["body_bytes_sent"] for r in self.requests_for(name_substring)
            if all_statuses or 200 <= r["status"] < 300
        )

    def requests_for(self, name_substring: str) -> list[dict[str, Any]]:
        """The log records whose uri contains ``name_substring``."""
        return [r for r in self.access_log()
                if name_substring in r["uri"] or name_substring in r["request_uri"]]

    def clear_log(self) -> None:
        """Forget every request logged so far."""
        with self._lock:
            self._sync()
            os.truncate(self.log_path, 0)

    # -- lifetime --------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<NginxPeer {self.url} cdn={self.cdn_url} root={self.root}>"


def _answers(port: int, token: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", _PING_PATH)
        resp = conn.getresponse()
        return resp.status == 200 and resp.read() == token.encode()
    except OSError:
        return False
    finally:
        conn.close()


def start_nginx(workdir: Path, limit_rate: str | None = None) -> NginxPeer:
    """Start nginx with its prefix in ``workdir`` (files go in ``workdir/root``).

    Raises ``NginxError`` if nginx does not come up; ports that another process grabbed between
    choosing and binding them are retried with new ones.
    """
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    workdir = Path(workdir).resolve()
    root = workdir / "root"
    root.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    (workdir / "htpasswd").write_text(f"{BASIC_USER}:{{PLAIN}}{BASIC_PASSWORD}\n")

    last_error = ""
    for _attempt in range(5):
        port, cdn_port = _free_ports(2)
        token = uuid.uuid4().hex
        conf = workdir / "nginx.conf"
        conf.write_text(_config(workdir, root, port, cdn_port, limit_rate, token))
        for name in ("access.log", "error.log"):
            (workdir / name).write_bytes(b"")
        with open(workdir / "stderr.log", "wb") as stderr:
            proc = subprocess.Popen(
                [binary, "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log"),
                 "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                preexec_fn=_set_pdeathsig(),  # noqa: PLW1509 - only prctl(PDEATHSIG), which Popen has no option for
            )
        peer = NginxPeer(workdir, root, port, cdn_port, proc)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(port, token) and _answers(cdn_port, token):
                peer.clear_log()
                return peer
            time.sleep(0.01)
        peer.stop()
        last_error = ((workdir / "error.log").read_text(errors="replace")
                      + (workdir / "stderr.log").read_text(errors="replace"))
        if "Address already in use" not in last_error:
            break
    raise NginxError(f"nginx did not start in {workdir}:\n{last_error}")


@contextlib.contextmanager
def running_nginx(workdir: Path, limit_rate: str | None = None) -> Iterator[NginxPeer]:
    """``with running_nginx(dir) as peer:`` — start_nginx, stopped on exit."""
    peer = start_nginx(workdir, limit_rate)
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxPeer]:
    """One nginx for the whole session; tests use unique file names (or ``clear_log``)."""
    require_binary("nginx", "nginx-light")
    with running_nginx(tmp_path_factory.mktemp("nginx")) as peer:
        yield peer
