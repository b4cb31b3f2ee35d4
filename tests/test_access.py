"""Access control (issue 14, DESIGN section 10): who may call the API, and where it connects.

* The API token (--api-token-file): 401 with WWW-Authenticate without it, /healthz open, never
  logged; rotated by rewriting the file or SIGHUP while a pull runs (the real serve).
* A body announced too large is answered 413 before it is sent; the connection then ends after
  a bounded drain.
* Signed-URL query credentials are sent upstream but appear in no canonical URL, log, error,
  index.json or listing.
* Egress: link-local and metadata destinations refused, also after a redirect, shown through a
  recording proxy on 127.0.0.1 that must see nothing; DNS answers checked and connected to as
  checked (a resolver stub); --deny-network/--allow-network on real loopback connections;
  errors that do not say what the destination said or whether a port refused or timed out.
* Browser defences: Origin refused, POST only as application/json, Host must name loopback.
* The deployment files say what the README says.

Everything binds to 127.0.0.1 (one trap to 127.0.0.2); no test connects anywhere else: a
tripwire refuses any connection to a non-loopback address.
"""

# Fixtures imported from test_security come back as parameters, which is how pytest uses them:
# ruff: noqa: F811

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from peers import closing_all, require_module
from test_security import (  # the helpers of the security review, reused
    api_server,  # noqa: F401  (a fixture)
    assert_no_leak,
    json_body,
    logs,  # noqa: F401  (a fixture)
    make_service,
    run,  # noqa: F401  (a fixture)
    running_api,
    sha,
    status_of,
    tiny,  # noqa: F401  (a fixture)
)
from urllib3.util import connection as u3connection

from nekko_sm import api, api_http, egress
from nekko_sm import config as cfg
from nekko_sm.api_http import encode_url
from nekko_sm.errors import ConfigError, EgressDenied, InvalidReference, NekkoError
from nekko_sm.refparse import parse
from nekko_sm.refs import QUERY_CREDENTIALS

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
    """No connection of this module leaves the machine: urllib3's connect is refused for
    any address that is not loopback (and recorded, so a test can say it never happened)."""
    offsite: list = []
    real = u3connection.create_connection

    def guarded(address, *a, **kw):
        host = str(address[0]).strip("[]")
        try:
            loop = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
        except ValueError:
            loop = host == "localhost"
        if not loop:
            offsite.append(address)
            raise OSError(101, f"tripwire: no test connects to {host}")
        return real(address, *a, **kw)

    monkeypatch.setattr(u3connection, "create_connection", guarded)
    yield offsite
    assert offsite == [], f"a connection off the machine was attempted: {offsite}"


def answer(a, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """(status, headers, text) of one request to the in-process server ``a``."""
    c = http.client.HTTPConnection(a.host, a.port, timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return (
            r.status,
            {k.lower(): v for k, v in r.getheaders()},
            r.read().decode("utf-8", "replace"),
        )
    finally:
        c.close()


def code_of(text: str) -> str:
    return json.loads(text)["error"]["code"]


def post(a, body: dict, headers: dict | None = None):
    h = {"Content-Type": "application/json", **(headers or {})}
    return answer(a, "POST", "/content/", h, json.dumps(body).encode())


def wait_for(pred, timeout: float = 30.0, what: str = "a condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout} s for {what}")


class Recorder:
    """A TCP server that records every connection and what it was sent, answers 502, closes.

    As HTTP_PROXY it is a proxy that forwards nothing; on 127.0.0.2 it is a trap."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.seen: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                self.seen.append(data)
                with contextlib.suppress(OSError):
                    conn.sendall(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )

    def close(self) -> None:
        self._stop = True
        # close() alone leaves accept() blocked (the join then waited its full 5 s): a
        # shutdown wakes it on Linux.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the recorder did not stop"


@pytest.fixture
def recorder():
    """recorder(host="127.0.0.1", port=0) -> a started :class:`Recorder`, closed after the test."""
    yield from closing_all(Recorder)


# --------------------------------------------------------------------------------------------
# item 2: the API token


def token_service(tmp_path: Path, token: str, **flags):
    f = tmp_path / "api-token"
    f.write_text(token + "\n")
    return make_service(tmp_path, attempts=1, api_token_file=str(f), **flags), f


def test_api_token_missing_or_wrong_is_401_right_is_200_healthz_open(tmp_path, nginx, logs):
    token = "api-" + uuid.uuid4().hex
    url = nginx.put(f"tok-{uuid.uuid4().hex}.bin", os.urandom(20_000))
    svc, _ = token_service(tmp_path, token)
    texts = []
    with running_api(svc) as a:
        wrong = [
            {},
            {"Authorization": "Bearer " + token[:-1]},
            {"Authorization": "Bearer " + token + "x"},
            {"Authorization": "Basic " + token},
            {"Authorization": token},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer " + token + " " + token},
        ]
        requests = [
            ("GET", "/content/", None),
            ("GET", "/metrics", None),
            ("HEAD", "/content/" + encode_url(url), None),
            ("DELETE", "/content/" + encode_url(url), None),
            ("POST", "/content/", json.dumps({"url": url}).encode()),
            ("GET", "/nowhere", None),
        ]
        for h in wrong:
            for method, path, body in requests:
                hdrs = dict(h, **({"Content-Type": "application/json"} if body else {}))
                status, headers, text = answer(a, method, path, hdrs, body)
                assert status == 401, (h, method, path, text)
                assert headers["www-authenticate"].startswith('Bearer realm="nekko-sm"')
                if method != "HEAD":
                    assert code_of(text) == "api-unauthorized"
                texts.append(text + json.dumps(headers))
        assert nginx.requests_for(url.rsplit("/", 1)[1]) == []  # nothing was pulled
        for method in ("GET", "HEAD"):
            assert answer(a, method, "/healthz")[0] == 200
        good = {"Authorization": "Bearer " + token}
        status, _, text = post(a, {"url": url}, good)
        assert status == 201, text
        texts.append(text)
        for scheme in ("Bearer ", "bearer ", "BEARER  "):
            status, _, text = answer(a, "GET", "/content/", {"Authorization": scheme + token})
            assert status == 200 and json.loads(text)["entries"][0]["url"] == url
            texts.append(text)
        assert answer(a, "GET", "/metrics", good)[0] == 200
    assert logs.lines
    assert_no_leak([token], tmp_path / "cache", answers="\n".join(texts), logs=logs.text)


def test_a_changed_token_file_is_read_again_and_a_bad_one_keeps_the_token(tmp_path, logs):
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    svc, f = token_service(tmp_path, old)
    with running_api(svc) as a:
        assert answer(a, "GET", "/content/", {"Authorization": "Bearer " + old})[0] == 200
        tmp = tmp_path / "api-token.new"
        tmp.write_text(new + "\n")
        os.replace(tmp, f)  # as the kubelet swaps a Secret's files: no signal, no restart
        assert answer(a, "GET", "/content/", {"Authorization": "Bearer " + old})[0] == 401
        assert answer(a, "GET", "/content/", {"Authorization": "Bearer " + new})[0] == 200
        f.write_text("")  # half-written, or emptied by mistake: keep the token we have
        assert answer(a, "GET", "/content/", {"Authorization": "Bearer " + new})[0] == 200
        assert "is empty" in logs.text
        f.unlink()
        assert answer(a, "GET", "/content/", {"Authorization": "Bearer " + new})[0] == 200
    assert old not in logs.text and new not in logs.text


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("two words\n", "without spaces"),
        ("t\u00e9st\n", "printable ASCII"),
    ],
)
def test_a_bad_token_file_stops_the_start(tmp_path, run, content, why):
    f = tmp_path / "api-token"
    if content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=why):
        cfg.build({"cache_dir": str(tmp_path / "c"), "api_token_file": str(f)}, {})
    r = run("--api-token-file", str(f), "--address", "127.0.0.1:0", "serve", timeout=60)
    assert r.returncode == 2 and why in r.stderr, r.stderr


def _serve_in_main_thread(config) -> list[str]:
    """api.run() (it installs signal handlers, so in the main thread) until it is up; the
    log records it made.  The test's signal handlers are restored afterwards."""
    cap: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            cap.append(f"{record.levelname} {record.getMessage()}")

    lg = logging.getLogger("nekko_sm")
    h = H(level=logging.INFO)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    level = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        api.run(
            config, ready=lambda srv: threading.Thread(target=srv.shutdown, daemon=True).start()
        )
    finally:
        lg.removeHandler(h)
        lg.setLevel(level)
        for s, handler in saved.items():
            signal.signal(s, handler)
    return cap


def test_a_network_address_without_a_token_is_warned_about(tmp_path, monkeypatch):
    # No test listens off loopback: the server is told its loopback address is not one.
    config = cfg.build({"cache_dir": str(tmp_path / "c"), "address": "127.0.0.1:0"}, {})
    quiet = _serve_in_main_thread(config)
    assert not [x for x in quiet if x.startswith("WARNING")], quiet
    monkeypatch.setattr(api, "is_loopback", lambda host: False)
    warned = _serve_in_main_thread(config)
    assert any(x.startswith("WARNING") and "without --api-token-file" in x for x in warned), warned
    f = tmp_path / "t"
    f.write_text("tok-" + uuid.uuid4().hex)
    with_token = cfg.build(
        {"cache_dir": str(tmp_path / "c"), "address": "127.0.0.1:0", "api_token_file": str(f)}, {}
    )
    assert not [x for x in _serve_in_main_thread(with_token) if x.startswith("WARNING")]


def test_sighup_rotates_the_token_while_a_pull_runs(pyz, tmp_path, tiny):
    """The real serve, at -v 3: SIGHUP after a new token is written; the pull under way
    (admitted with the old token) finishes, the old token is refused, the new one taken."""
    data = os.urandom(400_000)
    started, release = threading.Event(), threading.Event()

    def gated(h):  # the upstream holds its answer until the test lets it go
        started.set()
        release.wait(60)
        return 200, {}, data

    upstream = tiny(gated)
    url = f"{upstream.url}/gated.bin"
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    f = tmp_path / "api-token"
    f.write_text(old + "\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(pyz),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--address",
            "127.0.0.1:0",
            "--api-token-file",
            str(f),
            "--jobs",
            "1",
            "-v=3",
            "serve",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True
    )
    reader.start()
    answers: list[str] = []
    try:
        port = int(
            wait_for(
                lambda: next(
                    (
                        m.group(1)
                        for m in (
                            re.search(r"serving on 127\.0\.0\.1:(\d+)", x) for x in list(lines)
                        )
                        if m
                    ),
                    None,
                ),
                what="serve to start",
            )
        )

        def call(method, path, tok=None, body=None):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
            try:
                h = {"Authorization": f"Bearer {tok}"} if tok else {}
                if body is not None:
                    h["Content-Type"] = "application/json"
                c.request(method, path, body=body, headers=h)
                r = c.getresponse()
                text = r.read().decode()
                answers.append(text)
                return r.status, text
            finally:
                c.close()

        result: dict = {}

        def pull_it() -> None:
            try:
                result["status"], result["text"] = call(
                    "POST", "/content/", old, json.dumps({"url": url})
                )
            except Exception as e:  # noqa: BLE001  (reported by the assertion below)
                result["error"] = e

        pull = threading.Thread(target=pull_it)
        pull.start()
        assert started.wait(30), "the pull never reached the upstream"
        tmp = tmp_path / "api-token.new"
        tmp.write_text(new + "\n")
        os.replace(tmp, f)
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any("SIGHUP: re-read the API token" in x for x in list(lines)),
            what="the SIGHUP to be handled",
        )
        assert proc.poll() is None  # SIGHUP's default action would have killed it
        assert call("GET", "/content/", old)[0] == 401
        assert call("GET", "/content/", None)[0] == 401
        status, text = call("GET", "/content/", new)
        assert status == 200 and json.loads(text)["entries"][0]["state"] == "downloading"
        assert call("GET", "/healthz")[0] == 200
        assert pull.is_alive()  # still waiting for the held upstream
        release.set()
        pull.join(60)
        assert result.get("status") == 201, result
        assert json.loads(result["text"])["digest"] == sha(data)
        assert call("POST", "/content/", new, json.dumps({"url": url}))[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
        proc.stderr.close()
    log_text = "".join(lines)
    assert "WIRE" in log_text or "< 200" in log_text, "the wire log was not on"
    assert_no_leak([old, new], tmp_path / "cache", answers="\n".join(answers), logs=log_text)


# --------------------------------------------------------------------------------------------
# item 3: the 413 at once


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)  # the socket's timeout bounds the wait: a hang fails the test
        if not chunk:
            return out
        out += chunk


@pytest.mark.parametrize("with_token", [False, True], ids=["413", "401-first"])
@pytest.mark.parametrize("expect_100", [False, True], ids=["plain", "expect-100"])
def test_a_body_announced_too_large_is_answered_before_it_is_sent(tmp_path, with_token, expect_100):
    if with_token:
        svc, _ = token_service(tmp_path, "tok-" + uuid.uuid4().hex)
    else:
        svc = make_service(tmp_path, attempts=1)
    with running_api(svc) as a:
        s = socket.create_connection(("127.0.0.1", a.port), timeout=20)
        try:
            s.sendall(
                b"POST /content/ HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: 10485760\r\n"
                + (b"Expect: 100-continue\r\n" if expect_100 else b"")
                + b"\r\n"
            )
            # ... and not one byte of the body: a server that waits for it never answers
            got = _read_all(s)
        finally:
            s.close()
        assert not got.startswith(b"HTTP/1.1 100"), got[:100]
        expect = 401 if with_token else 413
        assert status_of(got) == expect, got[:300]
        assert json_body(got)["error"]["code"] == (
            "api-unauthorized" if with_token else "body-too-large"
        )
        assert answer(a, "GET", "/healthz")[0] == 200


def test_a_client_that_goes_on_sending_after_the_413_is_cut_off(api_server, monkeypatch):
    monkeypatch.setattr(api_http, "LINGER_SECONDS", 1.0)
    s = socket.create_connection(("127.0.0.1", api_server.port), timeout=20)
    try:
        s.sendall(
            b"POST /content/ HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n"
        )
        head = s.recv(65536)  # before the fix: no answer while it waited for the body
        assert status_of(head) == 413, head
        end = time.monotonic() + 30
        cut = False
        while time.monotonic() < end and not cut:  # a byte every 0.1 s: never idle
            try:
                s.sendall(b"x")
                time.sleep(0.1)
            except OSError:  # reset: the server closed the connection (its thread is free)
                cut = True
        assert cut, "the server drained a dribbling client for 30 s"
    finally:
        s.close()
    assert api_server.healthy()


# --------------------------------------------------------------------------------------------
# item 6: signed URLs


def signed_query(secrets: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in secrets.items())


SIGNED_PARAMS = [
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "Signature",
    "Policy",
    "Key-Pair-Id",
    "X-Goog-Signature",
    "sig",
    "token",
    "access_token",
]


@pytest.fixture
def signed(nginx):
    data = os.urandom(80_000)
    name = f"signed-{uuid.uuid4().hex}.bin"
    base = nginx.put(name, data)
    secrets = {p: f"S{i}x{uuid.uuid4().hex}" for i, p in enumerate(SIGNED_PARAMS)}
    url = f"{base}?{signed_query(secrets)}&X-Amz-Date=20260101T000000Z&keep=1"
    return url, f"{base}?keep=1", list(secrets.values()), name, data


def test_signed_url_credentials_are_sent_but_never_kept_api(tmp_path, nginx, signed, logs):
    url, canonical, secrets, name, data = signed
    cache = tmp_path / "cache"
    texts = []
    with running_api(make_service(tmp_path, attempts=1)) as a:
        status, _, text = post(a, {"url": url})
        assert status == 201, text
        entry = json.loads(text)
        assert entry["url"] == canonical and entry["digest"] == sha(data)
        texts.append(text)
        for method in ("GET", "HEAD"):
            status, _, text = answer(a, method, "/content/" + encode_url(url))
            assert status == 200
            texts.append(text)
        status, _, text = answer(a, "GET", "/content/" + encode_url(canonical))
        assert status == 200 and json.loads(text)["url"] == canonical
        status, _, text = answer(a, "GET", "/content/")
        assert [e["url"] for e in json.loads(text)["entries"]] == [canonical]
        texts.append(text)
        # refused ones: the message names the URL, not its signature
        host = nginx.url.split("://", 1)[1]
        for bad in (
            f"{nginx.url}/status/403?{signed_query({'X-Amz-Signature': secrets[0]})}",
            f"http://{host.split(':')[0]}:99999/x?Signature={secrets[3]}",
            f"http://127.0.0.1:1/closed?sig={secrets[7]}",
        ):
            status, _, text = post(a, {"url": bad})
            assert 400 <= status < 600 and status != 500, text
            texts.append(text)
        status, _, text = answer(a, "DELETE", "/content/" + encode_url(url))
        assert status == 204
    sent = [e["request_uri"] for e in nginx.requests_for(name)]
    assert sent and all(s in sent[0] for s in secrets)  # the upstream got them all
    assert logs.lines
    assert_no_leak(secrets + [encode_url(url)], cache, answers="\n".join(texts), logs=logs.text)


def test_signed_url_credentials_are_sent_but_never_kept_cli(run, signed):
    url, canonical, secrets, _name, data = signed
    r = run("-v=3", "pull", url, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["url"] == canonical
    outs = [r]
    for args in (("ls",), ("ls", "--json"), ("status", url), ("path", url)):
        outs.append(run(*args))
        assert outs[-1].returncode == 0, outs[-1].stderr
    assert Path(outs[-1].stdout.strip()).read_bytes() == data
    assert_no_leak(
        secrets, run.cache, **{f"out{i}": x.stdout + x.stderr for i, x in enumerate(outs)}
    )
    index = (run.cache / "index.json").read_text()
    assert canonical in index


@pytest.mark.parametrize(
    "param", sorted(QUERY_CREDENTIALS) + ["X-AMZ-SIGNATURE", "X-Amz-%53ignature"]
)
def test_query_credentials_leave_the_canonical_url(param):
    ref = parse(f"https://bucket.example/o/model.gguf?a=1&{param}=SECRET&X-Amz-Date=1&b=2")
    assert ref.canonical == "https://bucket.example/o/model.gguf?a=1&b=2"
    assert "SECRET" in ref.fetch_url and "SECRET" not in repr(ref)
    assert parse(ref.canonical).canonical == ref.canonical
    # without a credential, a parameter that schemes sign along is just a parameter
    assert parse("https://h/f?Expires=1&sp=r").canonical == "https://h/f?Expires=1&sp=r"
    with pytest.raises(InvalidReference) as e:
        parse(f"https://h:99999/f?{param}=SECRET")
    assert "SECRET" not in e.value.message


# --------------------------------------------------------------------------------------------
# item 7: egress


METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.google.internal./computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/x",
    "http://[::ffff:169.254.169.254]/latest/",
    "http://0xa9fea9fe/latest/",
    "http://2852039166/latest/",
    "http://169.254.43518/latest/",
    "http://100.100.100.200/latest/meta-data/",
]


@pytest.fixture
def proxied(tmp_path, recorder):
    """A service whose proxy (for http and https) is a recorder that forwards nothing;
    127.0.0.1 and localhost are reached directly (NO_PROXY)."""
    rec = recorder()
    return make_service(tmp_path, attempts=1, environ=_through(rec)), rec


def _through(rec) -> dict:
    """Proxy settings that send every request off loopback to the recorder ``rec`` (both
    spellings, so nothing inherited from the environment can route around it)."""
    env = {}
    for name, value in (
        ("http_proxy", rec.url),
        ("https_proxy", rec.url),
        ("no_proxy", "127.0.0.1,localhost"),
    ):
        env[name] = env[name.upper()] = value
    return env


def test_metadata_destinations_are_refused_before_the_proxy_sees_them(
    proxied, faulty, logs, tripwire
):
    svc, rec = proxied
    with running_api(svc) as a:
        for url in METADATA_URLS:
            status, _, text = post(a, {"url": url})
            assert status == 403 and code_of(text) == "egress-denied", (url, text)
        # a redirect to it from an allowed host (127.0.0.1: direct, NO_PROXY)
        for target in METADATA_URLS[:3]:
            hop = faulty.add(f"/hop-{uuid.uuid4().hex}", b"never", redirect_to=target)
            status, _, text = post(a, {"url": hop})
            assert status == 403 and code_of(text) == "egress-denied", (target, text)
            assert "never" not in text
        assert any(r.status == 302 for r in faulty.requests)
        assert rec.seen == []  # not one request reached the proxy
        # the control: a destination that is allowed does go to the proxy (no DNS here)
        status, _, text = post(a, {"url": "http://allowed.example/model.bin"})
        assert status == 502, text
        assert len(rec.seen) == 1 and rec.seen[0].startswith(
            b"GET http://allowed.example/model.bin HTTP/1.1"
        ), rec.seen
    assert "egress" in logs.text or "denied" in logs.text


def test_the_cli_refuses_metadata_with_exit_2(run, recorder):
    rec = recorder()
    r = run("pull", METADATA_URLS[0], env=_through(rec))  # a failing guard reaches rec only
    assert r.returncode == 2 and "denied network 169.254.0.0/16" in r.stderr, r.stderr
    assert rec.seen == []


def _stub_resolver(monkeypatch, answers: dict[str, list[list[str]]]) -> list[str]:
    """egress.resolve answers ``answers[host]``, one list of addresses per call (the last one
    again once they run out); any other host resolves as usual.  Returns the hosts asked."""
    asked: list[str] = []
    real = egress.resolve

    def stub(host: str, port: int) -> list:
        if host not in answers:
            return real(host, port)
        asked.append(host)
        seq = answers[host]
        ips = seq.pop(0) if len(seq) > 1 else seq[0]
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (ip, port),
            )
            for ip in ips
        ]

    monkeypatch.setattr(egress, "resolve", stub)
    return asked


def test_dns_answers_are_checked_and_connected_to_as_checked(
    tmp_path, tiny, recorder, monkeypatch, tripwire
):
    data = os.urandom(30_000)
    good = tiny(lambda h: (200, {}, data))
    trap = recorder("127.0.0.2", good.port)  # stands for the metadata service
    svc = make_service(tmp_path, attempts=1, deny_network=["127.0.0.2/32"])
    host = f"rebind.test:{good.port}"
    try:
        # 1. rebinding: checked as 127.0.0.1, then the name says 127.0.0.2. One resolution
        #    per connection, and the connect goes to the address that was checked.
        asked = _stub_resolver(monkeypatch, {"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
        entry, created = svc.pull(f"http://{host}/one.bin")
        assert created and entry["digest"] == sha(data)
        assert asked == ["rebind.test"] and trap.seen == []
        assert good.log and good.log[0][3] == host  # the Host header keeps the name
        # 2. a new connection (another process: no pooled one) asks again, gets 127.0.0.2,
        #    and is refused: nothing is sent
        svc2 = make_service(tmp_path / "2", attempts=1, deny_network=["127.0.0.2/32"])
        try:
            with pytest.raises(EgressDenied):
                svc2.pull(f"http://{host}/two.bin")
        finally:
            svc2.close()
        assert asked == ["rebind.test", "rebind.test"]
        # 3. one denied address among allowed ones refuses the name
        _stub_resolver(
            monkeypatch,
            {
                "mixed.test": [["127.0.0.1", "127.0.0.2"]],
                "meta.test": [["169.254.169.254"]],
                "meta6.test": [["::ffff:169.254.169.254"]],
            },
        )
        for name in ("mixed.test", "meta.test", "meta6.test"):
            with pytest.raises(EgressDenied) as e:
                svc.pull(f"http://{name}:{good.port}/x.bin")
            assert "169.254.169.254" not in e.value.message  # the log has it, not the caller
        # 4. the same holds on a redirect hop
        hop = tiny(lambda h: (302, {"Location": f"http://meta.test:{good.port}/x"}, b""))
        with pytest.raises(EgressDenied):
            svc.pull(f"{hop.url}/hop.bin")
    finally:
        svc.close()
    assert trap.seen == [] and len(good.log) == 1
    assert tripwire == []


def test_deny_and_allow_networks_work_on_real_loopback_connections(tmp_path, nginx, tiny, recorder):
    def attempt(tag: str, environ: dict | None = None, **flags) -> int:
        name = f"net-{tag}-{uuid.uuid4().hex}.bin"
        url = nginx.put(name, b"n" * 1000)
        svc = make_service(tmp_path / tag, attempts=1, environ=environ, **flags)
        try:
            svc.pull(url)
            status = 201
        except NekkoError as e:
            status = e.status
            assert e.code == "egress-denied", e.message
        finally:
            svc.close()
        assert (status == 201) == bool(nginx.requests_for(name)), tag  # refused: not sent
        return status

    assert attempt("plain") == 201
    assert attempt("deny8", deny_network=["127.0.0.0/8"]) == 403
    assert attempt("hole", deny_network=["127.0.0.0/8"], allow_network=["127.0.0.1/32"]) == 201
    assert attempt("narrow", deny_network=["127.0.0.1"], allow_network=["127.0.0.0/8"]) == 403
    assert attempt("env", environ={"NEKKO_DENY_NETWORKS": "10.0.0.0/8, 127.0.0.0/8"}) == 403
    assert (
        attempt(
            "flag-wins", environ={"NEKKO_DENY_NETWORKS": "127.0.0.0/8"}, deny_network=["10.0.0.0/8"]
        )
        == 201
    )
    assert (
        attempt(
            "allow-env",
            environ={"NEKKO_DENY_NETWORKS": "127.0.0.0/8", "NEKKO_ALLOW_NETWORKS": "127.0.0.1"},
        )
        == 201
    )

    # a name that resolves into a denied network (localhost), direct and as a redirect hop
    svc = make_service(
        tmp_path / "names", attempts=1, deny_network=["127.0.0.2", "::1"], allow_network=[]
    )
    trap = recorder("127.0.0.2")
    hop = tiny(lambda h: (302, {"Location": f"{trap.url}/x"}, b""))
    try:
        with pytest.raises(EgressDenied):
            svc.pull(f"{hop.url}/hop.bin")
    finally:
        svc.close()
    assert hop.log and trap.seen == []
    name = f"net-localhost-{uuid.uuid4().hex}.bin"
    nginx.put(name, b"l" * 100)
    svc = make_service(tmp_path / "localhost", attempts=1, deny_network=["127.0.0.0/8", "::1"])
    try:
        with pytest.raises(EgressDenied):
            svc.pull(f"{nginx.cdn_url}/files/{name}")
    finally:
        svc.close()
    assert nginx.requests_for(name) == []


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "banana", "10.0.0.0/8/8", "::g/64"])
def test_a_bad_network_is_a_configuration_error(tmp_path, run, bad):
    for key in ("deny_network", "allow_network"):
        with pytest.raises(ConfigError, match="is not a network"):
            cfg.build({"cache_dir": str(tmp_path / "c"), key: [bad]}, {})
    with pytest.raises(ConfigError):
        cfg.build({"cache_dir": str(tmp_path / "c")}, {"NEKKO_DENY_NETWORKS": f"10.0.0.0/8,{bad}"})
    r = run("--deny-network", bad, "ls")
    assert r.returncode == 2 and "is not a network" in r.stderr, r.stderr


def test_connection_errors_say_neither_refused_nor_what_the_port_said(tmp_path, logs):
    banner = f"SSH-2.0-OpenSSH_9.6 secret-banner-{uuid.uuid4().hex}"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def talk() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = srv.accept()
                with c:
                    c.sendall(banner.encode() + b"\r\n")
                    time.sleep(0.2)

    threading.Thread(target=talk, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: refused
    messages = []
    with running_api(make_service(tmp_path, attempts=1)) as a:
        for url in (f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{closed_port}/x"):
            status, _, text = post(a, {"url": url})
            assert status == 502, text
            messages.append(json.loads(text)["error"]["message"])
    srv.close()
    for m in messages:
        assert "cannot connect" in m, m
        for word in ("secret-banner", "SSH", "refused", "Errno", "timed out", "111"):
            assert word not in m, (word, m)
    assert "refused" in logs.text and "secret-banner" in logs.text  # the operator still sees


# --------------------------------------------------------------------------------------------
# item 8: browsers and DNS rebinding


def test_requests_from_web_pages_are_refused(api_server, nginx):
    url = nginx.put(f"origin-{uuid.uuid4().hex}.bin", b"o" * 100)
    for origin in ("http://evil.example", "null", "http://localhost:8050"):
        for method, path, body in (
            ("GET", "/content/", None),
            ("DELETE", "/content/x", None),
            ("POST", "/content/", json.dumps({"url": url}).encode()),
        ):
            h = {"Origin": origin, "Content-Type": "application/json"}
            status, _, text = answer(api_server, method, path, h, body)
            assert status == 403 and code_of(text) == "origin-refused", (origin, method, text)
    assert answer(api_server, "GET", "/healthz", {"Origin": "http://evil.example"})[0] == 200
    assert nginx.requests_for(url.rsplit("/", 1)[1]) == []


@pytest.mark.parametrize(
    "ctype, ok",
    [
        (None, False),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/jsonx", False),
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
    ],
)
def test_post_must_be_json(api_server, ctype, ok):
    h = {} if ctype is None else {"Content-Type": ctype}
    status, _, text = answer(api_server, "POST", "/content/", h, b'{"url": "ftp://x/y"}')
    if ok:
        assert status == 400 and code_of(text) == "unsupported-scheme", text
    else:
        assert status == 415 and code_of(text) == "unsupported-media-type", text
    assert api_server.healthy()


@pytest.mark.parametrize(
    "host, ok",
    [
        ("localhost", True),
        ("localhost:8050", True),
        ("LOCALHOST.", True),
        ("127.0.0.1:1", True),
        ("127.9.9.9", True),
        ("[::1]:8050", True),
        ("app.localhost:80", True),
        ("[::1]", True),
        ("evil.example", False),
        ("evil.example:8050", False),
        ("127.0.0.1.nip.io", False),
        ("localhost.evil.example", False),
        ("10.0.0.1:8050", False),
        ("", False),
        ("[fe80::1]:8050", False),
    ],
)
def test_on_loopback_the_host_header_must_name_loopback(api_server, host, ok):
    head = f"GET /content/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    s = socket.create_connection(("127.0.0.1", api_server.port), timeout=20)
    try:
        s.sendall(head)
        got = _read_all(s)
    finally:
        s.close()
    if ok:
        assert status_of(got) == 200, got[:300]
    else:
        assert status_of(got) == 421, got[:300]
        assert json_body(got)["error"]["code"] == "misdirected-request"
    # /healthz answers whatever the Host (probes), and HTTP/1.0 may have none
    for req in (
        f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        "GET /content/ HTTP/1.0\r\n\r\n",
    ):
        s = socket.create_connection(("127.0.0.1", api_server.port), timeout=20)
        try:
            s.sendall(req.encode())
            assert status_of(_read_all(s)) == 200
        finally:
            s.close()


def test_a_unix_socket_takes_any_host(tmp_path):
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="nk-", dir="/tmp"))
    try:
        sock = d / "api.sock"
        svc = make_service(tmp_path, address=f"unix:{sock}")
        with running_api(svc):
            c = http.client.HTTPConnection("evil.example", timeout=10)
            c.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.sock.connect(str(sock))
            try:
                c.request("GET", "/content/", headers={"Host": "evil.example"})
                assert c.getresponse().status == 200
            finally:
                c.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# item 9: the deployment files


def test_the_daemonset_is_locked_down():
    require_module("yaml")
    import yaml

    docs = {
        d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text())
    }
    assert set(docs) == {"DaemonSet", "Service", "NetworkPolicy"}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (main,) = pod["containers"]
    sc = main["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    for init in pod.get("initContainers", []):
        assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert set(init["securityContext"]["capabilities"].get("add", [])) <= {"CHOWN"}
    # the token comes from a Secret volume, mounted where --api-token-file looks
    (flag,) = [a for a in main["args"] if a.startswith("--api-token-file=")]
    path = flag.split("=", 1)[1]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (vol,) = [n for n, mp in mounts.items() if path.startswith(mp + "/")]
    assert volumes[vol]["secret"]["secretName"] == "nekko-sm-api-token"
    assert not volumes[vol]["secret"].get("optional")
    # the NetworkPolicy covers these pods, lets in only labelled clients, denies metadata
    np = docs["NetworkPolicy"]["spec"]
    labels = docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert np["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(np["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = np["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"] == {"nekko-sm/client": "true"}
    blocks = [t["ipBlock"] for r in np["egress"] for t in r["to"] if "ipBlock" in t]
    assert {"169.254.0.0/16", "fe80::/10"} <= {c for b in blocks for c in b["except"]}
    readme = (ROOT / "README.md").read_text()
    assert "nekko-sm-api-token" in readme and 'nekko-sm/client: "true"' in readme


def test_the_systemd_unit_keeps_the_socket():
    unit = (ROOT / "deploy" / "nekko-sm.service").read_text()
    (start,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    assert "--address=unix:/run/nekko/nekko.sock" in start
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_a_signed_url_in_a_content_path_is_logged_without_its_query():
    # loggable: a /content/B64 path of a signed URL is logged without its query
    url = "https://b.example/o?X-Amz-Signature=SECRET"
    line = api_http.loggable(f'"GET /content/{encode_url(url)} HTTP/1.1" 200 -')
    assert "SECRET" not in line and encode_url(url) not in line
    assert base64.b64encode(b"SECRET").decode() not in line
