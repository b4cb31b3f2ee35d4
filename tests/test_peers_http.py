"""The http test peers themselves (real nginx, the fault-injecting server), checked with urllib3
and http.client only, so a failure here is a peer's fault, never nekko_sm's."""

from __future__ import annotations

import base64
import http.client
import os
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import urllib3
from peers import require_binary
from peers.faulty import FaultyServer, start_faulty
from peers.nginx import BASIC_PASSWORD, BASIC_USER, BEARER_TOKEN, NginxPeer, running_nginx

# The fixtures ``nginx`` and ``faulty`` come from tests/conftest.py's pytest_plugins.

DATA = os.urandom(64 * 1024)


@pytest.fixture
def pool() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=5))
    yield pool
    pool.clear()


def _name() -> str:
    return f"f-{uuid.uuid4().hex[:12]}.bin"


def _get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", timeout: float = 5
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh http.client connection; the body is read to the end."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


# -- nginx ------------------------------------------------------------------------------------


def test_nginx_serves_ranges_with_validators(nginx: NginxPeer, pool: urllib3.PoolManager) -> None:
    url = nginx.put(name := _name(), DATA)
    assert url == f"{nginx.url}/files/{name}"
    full = pool.request("GET", url)
    assert full.status == 200 and full.data == DATA
    etag, last_modified = full.headers["ETag"], full.headers["Last-Modified"]
    assert etag and last_modified and full.headers["Accept-Ranges"] == "bytes"

    part = pool.request("GET", url, headers={"Range": "bytes=100-199"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(DATA)}"
    assert part.data == DATA[100:200]

    tail = pool.request("GET", url, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert tail.status == 206 and tail.data == DATA[1000:]
    stale = pool.request("GET", url, headers={"Range": "bytes=1000-", "If-Range": '"other"'})
    assert stale.status == 200 and stale.data == DATA

    missing = pool.request("GET", f"{nginx.url}/files/{_name()}")
    assert missing.status == 404


def test_nginx_put_changes_etag_on_rewrite(nginx: NginxPeer, pool: urllib3.PoolManager) -> None:
    url = nginx.put(name := _name(), b"a" * 10)
    first = pool.request("HEAD", url).headers["ETag"]
    nginx.put(name, b"b" * 10)  # same size, same second
    assert pool.request("HEAD", url).headers["ETag"] != first


def test_nginx_basic_auth(nginx: NginxPeer, pool: urllib3.PoolManager) -> None:
    nginx.put(name := _name(), DATA)
    url = f"{nginx.url}/basic/{name}"
    anon = pool.request("GET", url)
    assert anon.status == 401 and anon.headers["WWW-Authenticate"].startswith("Basic")
    wrong = pool.request("GET", url, headers=urllib3.make_headers(basic_auth=f"{BASIC_USER}:no"))
    assert wrong.status == 401
    good = pool.request(
        "GET", url, headers=urllib3.make_headers(basic_auth=f"{BASIC_USER}:{BASIC_PASSWORD}")
    )
    assert good.status == 200 and good.data == DATA


def test_nginx_bearer_auth(nginx: NginxPeer, pool: urllib3.PoolManager) -> None:
    nginx.put(name := _name(), DATA)
    url = f"{nginx.url}/bearer/{name}"
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"bearer {BEARER_TOKEN}x"},
        {"Authorization": f"Basic {BEARER_TOKEN}"},
    ):
        r = pool.request("GET", url, headers=headers)
        assert r.status == 401, headers
        assert r.headers["WWW-Authenticate"] == "Bearer"
    good = pool.request(
        "GET", url, headers={"Authorization": f"Bearer {BEARER_TOKEN}", "Range": "bytes=0-9"}
    )
    assert good.status == 206 and good.data == DATA[:10]


def test_nginx_cdn_refuses_authorization(nginx: NginxPeer, pool: urllib3.PoolManager) -> None:
    nginx.put(name := _name(), DATA)
    url = f"{nginx.cdn_url}/files/{name}"
    assert urlsplit(nginx.cdn_url).hostname == "localhost"
    assert urlsplit(nginx.url).hostname == "127.0.0.1"
    assert pool.request("GET", url, headers={"Authorization": "Bearer x"}).status == 400
    assert pool.request("GET", url, headers={"Authorization": "Basic eDp5"}).status == 400
    ok = pool.request("GET", url, headers={"Range": "bytes=5-"})
    assert ok.status == 206 and ok.data == DATA[5:]


def test_nginx_redirects(nginx: NginxPeer, pool: urllib3.PoolManager) -> None:
    nginx.put(name := _name(), DATA)
    r = pool.request("GET", f"{nginx.url}/redirect/{name}?a=1", redirect=False)
    assert r.status == 302
    assert r.headers["Location"] == f"{nginx.cdn_url}/files/{name}?a=1"
    assert pool.request("GET", r.headers["Location"]).data == DATA

    r = pool.request("GET", f"{nginx.url}/redirect-rel/{name}", redirect=False)
    assert r.status == 302 and r.headers["Location"] == f"/files/{name}"

    url = f"{nginx.url}/bearer-redirect/{name}"
    assert pool.request("GET", url, redirect=False).status == 401
    r = pool.request(
        "GET", url, redirect=False, headers={"Authorization": f"Bearer {BEARER_TOKEN}"}
    )
    assert r.status == 302 and r.headers["Location"] == f"{nginx.cdn_url}/files/{name}"
    # Forwarding the credentials to the cdn is refused; dropping them works.
    assert (
        pool.request(
            "GET", r.headers["Location"], headers={"Authorization": f"Bearer {BEARER_TOKEN}"}
        ).status
        == 400
    )
    assert pool.request("GET", r.headers["Location"]).status == 200


def test_nginx_status_endpoint(nginx: NginxPeer) -> None:
    for code in (401, 404, 429, 500, 503):
        status, headers, body = _get(f"{nginx.url}/status/{code}")
        assert status == code and body == f"status {code}\n".encode()
        assert headers["Retry-After"] is None
    status, headers, _ = _get(f"{nginx.url}/status/503?retry_after=1")
    assert status == 503 and headers["Retry-After"] == "1"


def test_nginx_access_log(nginx: NginxPeer, pool: urllib3.PoolManager) -> None:
    nginx.clear_log()
    nginx.put(name := _name(), DATA)
    pool.request("GET", f"{nginx.url}/files/{name}")
    pool.request("GET", f"{nginx.url}/files/{name}", headers={"Range": "bytes=0-99"})
    pool.request(
        "GET", f"{nginx.url}/bearer/{name}", headers={"Authorization": f"Bearer {BEARER_TOKEN}"}
    )
    pool.request("GET", f"{nginx.cdn_url}/files/{name}")

    log = nginx.access_log()
    assert [r["status"] for r in log] == [200, 206, 200, 200]
    assert [r["range"] for r in log] == ["", "bytes=0-99", "", ""]
    assert [r["authorization"] for r in log] == [False, False, True, False]
    assert [r["server_port"] for r in log] == [nginx.port] * 3 + [nginx.cdn_port]
    assert log[3]["host"] == "localhost" and log[0]["host"] == "127.0.0.1"
    assert all(r["method"] == "GET" and r["completed"] for r in log)
    assert nginx.body_bytes(name) == 3 * len(DATA) + 100
    assert BEARER_TOKEN not in nginx.log_path.read_text()

    pool.request("GET", f"{nginx.url}/basic/{name}")  # 401: HTML body, not content
    assert nginx.body_bytes(name) == 3 * len(DATA) + 100
    assert nginx.body_bytes(name, all_statuses=True) > 3 * len(DATA) + 100
    nginx.clear_log()
    assert nginx.access_log() == [] and nginx.body_bytes(name) == 0


def test_nginx_access_log_is_up_to_date(nginx: NginxPeer) -> None:
    nginx.put(name := _name(), b"x")
    for i in range(20):
        _get(f"{nginx.url}/files/{name}")
        assert len(nginx.requests_for(name)) == i + 1


def test_nginx_limit_rate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_binary("nginx", "nginx-light")
    size = 6 << 20
    with running_nginx(tmp_path, limit_rate="8m") as peer:
        url = peer.put("big.bin", b"\0" * size)
        t0 = time.monotonic()
        status, _, body = _get(url)
        elapsed = time.monotonic() - t0
        assert status == 200 and len(body) == size
        # nginx lets the first second's worth go at once, then throttles: ~0.5 s here.
        assert elapsed > 0.3
        assert peer.body_bytes("big.bin") == size
    assert not peer.alive()


# -- faulty -----------------------------------------------------------------------------------


def test_faulty_serves_ranges_and_if_range(faulty: FaultyServer, pool: urllib3.PoolManager) -> None:
    url = faulty.add("a.bin", DATA)
    full = pool.request("GET", url)
    assert full.status == 200 and full.data == DATA
    assert full.headers["Accept-Ranges"] == "bytes"
    assert full.headers["Content-Length"] == str(len(DATA))
    etag, last_modified = full.headers["ETag"], full.headers["Last-Modified"]

    head = pool.request("HEAD", url)
    assert head.status == 200 and head.headers["Content-Length"] == str(len(DATA))
    assert head.data == b""

    r = pool.request("GET", url, headers={"Range": "bytes=10-19"})
    assert r.status == 206 and r.data == DATA[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"
    r = pool.request("GET", url, headers={"Range": "bytes=-5"})
    assert r.status == 206 and r.data == DATA[-5:]
    for validator in (etag, last_modified):
        r = pool.request("GET", url, headers={"Range": "bytes=100-", "If-Range": validator})
        assert r.status == 206 and r.data == DATA[100:]
    r = pool.request("GET", url, headers={"Range": "bytes=100-", "If-Range": '"nope"'})
    assert r.status == 200 and r.data == DATA
    r = pool.request("GET", url, headers={"Range": f"bytes={len(DATA)}-"})
    assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(DATA)}"

    assert pool.request("GET", faulty.url + "/nothing").status == 404
    assert pool.request("POST", url, body=b"x").status == 405
    assert faulty.body_bytes(url) == 2 * len(DATA) + 10 + 5 + 2 * (len(DATA) - 100)
    assert faulty.errors == []


def test_faulty_records_requests(faulty: FaultyServer, pool: urllib3.PoolManager) -> None:
    url = faulty.add("/r.bin", DATA)
    pool.request("GET", url + "?x=1", headers={"Range": "bytes=0-9", "X-Test": "yes"})
    pool.request("GET", url)
    first, second = faulty.requests_for("/r.bin")
    assert first.method == "GET" and first.path == "/r.bin" and first.target == "/r.bin?x=1"
    assert first.headers["x-test"] == "yes" and first.range == "bytes=0-9"
    assert (first.status, first.body_bytes, first.complete) == (206, 10, True)
    assert (second.status, second.body_bytes, second.range) == (200, len(DATA), None)
    assert first.connection == second.connection  # keep-alive
    faulty.clear_requests()
    assert faulty.requests == []
    with pytest.raises(TypeError):
        faulty.add("x", b"", drop_afterr=1)


def test_faulty_drop_after(faulty: FaultyServer) -> None:
    url = faulty.add("d.bin", DATA, drop_after=1000)
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        conn.request("GET", u.path)
        resp = conn.getresponse()
        assert resp.headers["Content-Length"] == str(len(DATA))
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert info.value.partial == DATA[:1000]
    finally:
        conn.close()
    status, _, body = _get(url, {"Range": "bytes=1000-"})
    assert status == 206 and body == DATA[1000:]
    assert faulty.body_bytes(url) == len(DATA)
    assert [r.complete for r in faulty.requests] == [False, True]


def test_faulty_drop_times_and_reset(faulty: FaultyServer, pool: urllib3.PoolManager) -> None:
    url = faulty.add("d.bin", DATA, drop_after=10, drop_times=2, drop_reset=True)
    for _ in range(2):
        r = pool.request("GET", url, preload_content=False)
        with pytest.raises(urllib3.exceptions.ProtocolError):
            r.read()
        r.release_conn()
    assert pool.request("GET", url).data == DATA
    assert [r.body_bytes for r in faulty.requests] == [10, 10, len(DATA)]


def test_faulty_lies_about_length(faulty: FaultyServer) -> None:
    longer = faulty.add("long.bin", DATA, lie_length=+100)
    shorter = faulty.add("short.bin", DATA, lie_length=-100)
    u = urlsplit(longer)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        conn.request("GET", u.path)
        resp = conn.getresponse()
        assert resp.headers["Content-Length"] == str(len(DATA) + 100)
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert info.value.partial == DATA
    finally:
        conn.close()
    _status, headers, body = _get(shorter)
    assert headers["Content-Length"] == str(len(DATA) - 100)
    assert headers["Connection"] == "close" and body == DATA[:-100]
    assert faulty.requests_for(shorter)[0].body_bytes == len(DATA)


def test_faulty_close_delimited_bodies(faulty: FaultyServer) -> None:
    plain = faulty.add("plain.bin", DATA, no_length=True)
    extra = faulty.add("extra.bin", DATA, extra_bytes=7)
    status, headers, body = _get(plain)
    assert status == 200 and headers["Content-Length"] is None and body == DATA
    status, headers, body = _get(extra)
    assert headers["Content-Length"] is None
    assert len(body) == len(DATA) + 7 and body.startswith(DATA)


def test_faulty_ignore_range_and_corrupt(faulty: FaultyServer, pool: urllib3.PoolManager) -> None:
    url = faulty.add("i.bin", DATA, ignore_range=True)
    r = pool.request("GET", url, headers={"Range": "bytes=10-"})
    assert r.status == 200 and r.data == DATA and "Accept-Ranges" not in r.headers

    url = faulty.add("c.bin", DATA, corrupt=True, corrupt_times=1)
    bad = pool.request("GET", url)
    assert bad.status == 200 and len(bad.data) == len(DATA) and bad.data != DATA
    good = pool.request("GET", url)
    assert good.data == DATA and good.headers["ETag"] == bad.headers["ETag"]


def test_faulty_stall(faulty: FaultyServer, pool: urllib3.PoolManager) -> None:
    url = faulty.add("s.bin", DATA, stall_after=100, stall_seconds=0.3)
    t0 = time.monotonic()
    r = pool.request("GET", url)
    assert r.data == DATA and time.monotonic() - t0 >= 0.3

    faulty.add("s.bin", DATA, stall_after=100, stall_seconds=2)
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        pool.request("GET", url, timeout=urllib3.Timeout(read=0.1), preload_content=True)
    t0 = time.monotonic()
    assert pool.request("GET", url).data == DATA  # stall_times=1: no second stall
    assert time.monotonic() - t0 < 0.5


def test_faulty_shutdown_ends_stalls_and_idle_connections(pool: urllib3.PoolManager) -> None:
    srv = start_faulty()
    url = srv.add("s.bin", DATA, stall_after=100, stall_seconds=60)
    pool.request("GET", srv.add("idle", b"x"))  # leaves an idle keep-alive connection
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            pool.request("GET", url, timeout=10)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    t = threading.Thread(target=fetch)
    t.start()
    deadline = time.monotonic() + 2
    while not any(r.path == "/s.bin" for r in srv.requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.shutdown()
    assert time.monotonic() - t0 < 1
    t.join(5)
    assert not t.is_alive() and len(errors) == 1


def test_faulty_statuses_retry_after(faulty: FaultyServer, pool: urllib3.PoolManager) -> None:
    url = faulty.add("busy.bin", DATA, statuses=[503, 429], retry_after="1")
    first, second = pool.request("GET", url), pool.request("HEAD", url)
    assert (first.status, second.status) == (503, 429)
    assert first.headers["Retry-After"] == second.headers["Retry-After"] == "1"
    third = pool.request("GET", url)
    assert third.status == 200 and third.data == DATA and "Retry-After" not in third.headers
    assert faulty.body_bytes(url) == len(DATA)


def test_faulty_change_etag_defeats_if_range(
    faulty: FaultyServer, pool: urllib3.PoolManager
) -> None:
    url = faulty.add("v.bin", DATA, change_etag_after=1)
    old = pool.request("GET", url)
    assert old.data == DATA
    new = pool.request("GET", url, headers={"Range": "bytes=10-", "If-Range": old.headers["ETag"]})
    assert new.status == 200 and new.headers["ETag"] != old.headers["ETag"]
    assert len(new.data) == len(DATA) and new.data != DATA
    assert new.headers["Last-Modified"] != old.headers["Last-Modified"]
    r = pool.request("GET", url, headers={"Range": "bytes=10-", "If-Range": new.headers["ETag"]})
    assert r.status == 206 and r.data == new.data[10:]

    url = faulty.add("e.bin", DATA, etag="v1", change_etag_after=1, new_data=b"second")
    assert pool.request("GET", url).headers["ETag"] == '"v1"'
    r = pool.request("GET", url)
    assert r.headers["ETag"] != '"v1"' and r.data == b"second"


def test_faulty_auth_redirect_disposition(faulty: FaultyServer, pool: urllib3.PoolManager) -> None:
    target = faulty.add("t.bin", DATA, content_disposition='attachment; filename="model.gguf"')
    r = pool.request("GET", target)
    assert r.headers["Content-Disposition"] == 'attachment; filename="model.gguf"'

    bearer = faulty.add("b.bin", DATA, require_auth="Bearer x")
    r = pool.request("GET", bearer, headers={"Authorization": "Bearer y"})
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert pool.request("GET", bearer, headers={"Authorization": "Bearer x"}).data == DATA

    basic_value = "Basic " + base64.b64encode(b"u:p").decode()
    basic = faulty.add("basic.bin", DATA, require_auth=basic_value)
    r = pool.request("GET", basic)
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert pool.request("GET", basic, headers={"Authorization": basic_value}).status == 200

    moved = faulty.add("moved", redirect_to=target)
    r = pool.request("GET", moved, redirect=False)
    assert r.status == 302 and r.headers["Location"] == target
    assert faulty.errors == []
