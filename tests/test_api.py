"""The HTTP API over real sockets, TCP and Unix (DESIGN section 5)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_security import api_request

from nekko_sm import config as cfg
from nekko_sm import entries
from nekko_sm.api import make_server
from nekko_sm.api_http import decode_url, encode_url
from nekko_sm.errors import ConfigError
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Api:
    """A running server and a way to call it."""

    def __init__(self, tmp_path: Path, address: str) -> None:
        self.config = cfg.build({"cache_dir": str(tmp_path / "cache"), "address": address}, {})
        self.service = Service(
            self.config, transfer=Transfer(self.config, read_timeout=5, backoff=0.05)
        )
        self.server = make_server(self.service, self.config.address)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def conn(self) -> http.client.HTTPConnection:
        if self.config.address.kind == "unix":
            return UnixHTTPConnection(self.config.address.path)
        host, port = self.server.server_address[:2]
        return http.client.HTTPConnection(host, port, timeout=30)

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        raw: bytes | None = None,
        headers: dict | None = None,
    ):
        r, payload = api_request(self.conn(), method, path, body, raw, headers)
        doc = (
            json.loads(payload)
            if payload and r.getheader("Content-Type") == "application/json"
            else payload
        )
        return r.status, doc, r

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.service.close()


@pytest.fixture
def api(tmp_path):
    a = Api(tmp_path, "127.0.0.1:0")
    yield a
    a.close()


def content(url: str) -> str:
    return "/content/" + encode_url(url)


def test_healthz_and_keepalive(api):
    c = api.conn()
    try:
        for _ in range(3):  # one connection, several requests: HTTP/1.1 keep-alive
            c.request("GET", "/healthz")
            r = c.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        c.close()


def test_post_get_head_delete(api, nginx):
    data = os.urandom(1 << 20)
    url = nginx.put("api.bin", data)
    status, entry, _ = api.call("GET", content(url))
    assert status == 404 and entry["error"]["code"] == "not-found"
    status, entry, _ = api.call("POST", "/content/", {"url": url})
    assert status == 201
    assert entry["digest"] == sha(data) and entry["state"] == "complete"
    assert Path(entry["path"]).read_bytes() == data
    status, again, _ = api.call("POST", "/content/", {"url": url})
    assert status == 200 and again["last_used"] > entry["last_used"]  # a use (DESIGN 9)
    assert {**again, "last_used": 0} == {**entry, "last_used": 0}
    status, got, _ = api.call("GET", content(url))
    assert status == 200 and got == again  # a GET is not a use
    status, body, r = api.call("HEAD", content(url))
    assert status == 200 and body == b"" and int(r.getheader("Content-Length")) > 0
    status, listing, _ = api.call("GET", "/content/")
    assert [e["url"] for e in listing["entries"]] == [url]
    status, _, _ = api.call("DELETE", content(url))
    assert status == 204
    assert not Path(entry["path"]).exists()
    assert api.call("DELETE", content(url))[0] == 404
    assert api.call("GET", content(url))[0] == 404


def test_cache_hit_answers_from_memory_until_any_process_changes_the_cache(
    api, nginx, pyz, monkeypatch
):
    url = nginx.put("hit.bin", b"answered from memory")
    other = nginx.put("hit-other.bin", b"another entry")
    assert api.call("POST", "/content/", {"url": url})[0] == 201
    status, first, _ = api.call("GET", content(url))
    assert status == 200
    store = api.service.store
    real, reads = store.entry_info, []
    monkeypatch.setattr(store, "entry_info", lambda key: (reads.append(key), real(key))[1])
    for _ in range(3):
        status, again, r = api.call("GET", content(url))
        assert status == 200 and again == first and r.getheader("Date")
    assert reads == []  # a dictionary lookup of the encoded answer
    # a change in this process drops the answers: the next GET reads the database again
    assert api.call("POST", "/content/", {"url": other})[0] == 201
    reads.clear()
    assert api.call("GET", content(url))[0] == 200
    assert reads == [url]
    # a change by another process (the CLI) on the same cache: the next GET sees it
    r = subprocess.run(
        [sys.executable, str(pyz), "--cache-dir", str(store.root), "rm", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert api.call("GET", content(url))[0] == 404
    assert api.call("GET", content(other))[0] == 200


def test_answers_kept_are_the_recently_asked_within_the_bound(api, nginx, monkeypatch):
    urls = [nginx.put(f"gen-{n}.bin", n.encode() * 8) for n in "abc"]
    for url in urls:
        assert api.call("POST", "/content/", {"url": url})[0] == 201
    a, b, c = urls
    size = max(int(api.call("GET", content(u))[2].getheader("Content-Length")) for u in urls)
    # room for one answer and a half in each of the two generations
    monkeypatch.setattr(entries, "_MAX_ANSWER_BYTES", 3 * (size + 200 + entries._ANSWER_OVERHEAD))
    store = api.service.store
    real, reads = store.entry_info, []
    monkeypatch.setattr(store, "entry_info", lambda key: (reads.append(key), real(key))[1])
    api.service.catalog._answers_revision = -1  # start empty, at the smaller bound
    for url in (a, b, a, c, a, b):
        status, entry, _ = api.call("GET", content(url))
        assert status == 200 and entry["url"] == url
    # a and b read once; a asked again is kept (moved back to the young generation);
    # c pushes out b, the one not asked since, which is read again
    assert reads == [a, b, c, b]


def test_a_connection_per_request_leaks_no_database_handle(api, nginx):
    url = nginx.put("fd.bin", b"one connection each")
    assert api.call("POST", "/content/", {"url": url})[0] == 201

    def db_fds() -> int:
        fds = os.listdir("/proc/self/fd")
        return sum(
            1
            for fd in fds
            if os.path.realpath(f"/proc/self/fd/{fd}").startswith(
                str(api.service.store.root / "nekko.db")
            )
        )

    for _ in range(3):  # warm: the pool, the first threads
        api.call("GET", content(url))
    before = db_fds()
    for _ in range(100):  # each on a new connection: a new handler thread
        assert api.call("GET", content(url))[0] == 200
    time.sleep(0.2)  # the last handler threads end
    assert db_fds() <= before + 4


@pytest.mark.parametrize(
    "encode",
    [
        lambda u: base64.b64encode(u.encode()).decode(),
        lambda u: base64.urlsafe_b64encode(u.encode()).decode().rstrip("="),
        lambda u: base64.b64encode(u.encode()).decode().replace("=", "%3D").replace("/", "%2F"),
    ],
)
def test_base64_spellings(encode):
    url = "http://example.com/some/path?x=ÿ>>>"
    assert decode_url(encode(url)) == url


def test_base64_with_slash_inside_path(api, nginx):
    # Find a URL whose standard base64 contains "/", and GET it unescaped.
    base = nginx.put("slash.bin", b"s")
    for i in range(12):
        url = base + "?" + "a" * i + "???"  # 0x3F3F3F has a 6-bit group of all ones: "/"
        b64 = encode_url(url)
        if "/" in b64:
            break
    else:
        pytest.fail("no base64 with a slash found")
    api.call("POST", "/content/", {"url": url})
    assert api.call("GET", "/content/" + b64)[0] == 200


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{not json", "invalid-json"),
        (b"[1, 2]", "invalid-json"),
        (b'{"nourl": 1}', "bad-request"),
        (b'{"url": "ftp://example.com/x"}', "unsupported-scheme"),
        (b'{"url": "gopher://x"}', "unsupported-scheme"),
        (b'{"url": "http://x/y", "digest": "md5:abc"}', "invalid-digest"),
        (
            b'{"url": "http://x/y", "credentials": "!!", "credentialsType": "Basic"}',
            "invalid-base64",
        ),
        (b'{"url": "http://x/y", "credentialsType": "Digest", "credentials": "x"}', "bad-request"),
        (b'{"url": "hf:///org/name/../../../etc/passwd"}', "unsafe-name"),
        (b'{"url": "oci://reg.io/x", "platform": "plan9/sparc"}', "invalid-platform"),
        (b'{"url": "http://x/y", "async": "yes"}', "bad-request"),
    ],
)
def test_bad_requests_get_400(api, body, code):
    status, doc, _ = api.call(
        "POST", "/content/", raw=body, headers={"Content-Type": "application/json"}
    )
    assert status == 400, doc
    assert doc["error"]["code"] == code and doc["error"]["message"]
    assert api.call("GET", "/healthz")[0] == 200


def test_bad_base64_in_path(api):
    status, doc, _ = api.call("GET", "/content/%%%not-base64!!")
    assert status == 400 and doc["error"]["code"] == "invalid-base64"


def test_body_too_large(api):
    status, doc, _ = api.call("POST", "/content/", raw=b"x" * (10 << 20))
    assert status == 413 and doc["error"]["code"] == "body-too-large"
    assert api.call("GET", "/healthz")[0] == 200


@pytest.mark.parametrize("code", [404, 401, 403, 500])
def test_upstream_status_maps(api, nginx, code):
    status, doc, _ = api.call("POST", "/content/", {"url": f"{nginx.url}/status/{code}"})
    assert status == {404: 404, 401: 401, 403: 403, 500: 502}[code]
    assert "error" in doc
    assert api.call("GET", "/healthz")[0] == 200


def test_unknown_endpoint_and_method(api):
    assert api.call("GET", "/nope")[0] == 404
    assert api.call("PUT", "/content/")[0] == 405


def test_async_post(api, faulty):
    data = os.urandom(1 << 20)
    url = faulty.add("async.bin", data, stall_after=1000, stall_seconds=0.5)
    status, doc, r = api.call("POST", "/content/", {"url": url, "async": True})
    assert status == 202 and r.getheader("Location") == content(url)
    status, doc, _ = api.call("GET", r.getheader("Location"))
    assert status == 206 and doc["state"] == "downloading"
    for _ in range(100):
        status, doc, _ = api.call("GET", content(url))
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200 and doc["digest"] == sha(data)


def test_twenty_posts_one_download(api, faulty):
    data = os.urandom(2 << 20)
    url = faulty.add("twenty.bin", data, stall_after=10_000, stall_seconds=0.5)
    answers = []

    def post():
        answers.append(api.call("POST", "/content/", {"url": url})[:2])

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 20
    assert all(s in (200, 201) and e["digest"] == sha(data) for s, e in answers)
    assert len([r for r in faulty.requests_for("twenty.bin") if r.method == "GET"]) == 1


def test_delete_cancels_inflight_download(api, faulty):
    data = os.urandom(1 << 20)
    url = faulty.add("cancel.bin", data, stall_after=1000, stall_seconds=3)
    api.call("POST", "/content/", {"url": url, "async": True})
    time.sleep(0.3)
    t = time.monotonic()
    assert api.call("DELETE", content(url))[0] == 204
    assert api.call("GET", content(url))[0] == 404
    assert list(api.service.store.blobs()) == []
    assert time.monotonic() - t < 10


def test_slow_client_does_not_block_others(api):
    host, port = api.server.server_address[:2]
    slow = socket.create_connection((host, port))
    try:
        slow.sendall(b"POST /content/ HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and then nothing
        t = time.monotonic()
        assert api.call("GET", "/healthz")[0] == 200
        assert time.monotonic() - t < 2
    finally:
        slow.close()


def test_metrics(api, nginx):
    api.call("POST", "/content/", {"url": nginx.put("m.bin", b"m")})
    api.call("POST", "/content/", raw=b"{bad")
    status, text, _ = api.call("GET", "/metrics")
    text = text.decode()
    assert status == 200
    assert 'nekko_pulls_total{source="http",result="complete"} 1' in text
    assert 'nekko_api_errors_total{code="invalid-json"} 1' in text
    assert "nekko_cache_entries 1" in text
    assert "nekko_downloaded_bytes_total 1" in text


def test_unix_socket(tmp_path, nginx):
    sock = tmp_path / "run" / "nekko.sock"
    a = Api(tmp_path, f"unix:{sock}")
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        url = nginx.put("unix.bin", b"over a unix socket")
        status, entry, _ = a.call("POST", "/content/", {"url": url})
        assert status == 201 and entry["digest"] == sha(b"over a unix socket")
        assert a.call("GET", content(url))[0] == 200
    finally:
        a.close()


def test_unix_socket_stale_file_replaced_live_one_refused(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    a = Api(tmp_path, f"unix:{path}")
    try:
        assert a.call("GET", "/healthz")[0] == 200
        with pytest.raises(ConfigError):
            Api(tmp_path / "second", f"unix:{path}")
    finally:
        a.close()
