"""The API's own reader of common request heads (nekko_sm/httphead.py), against the real
server over real sockets: what http.server did for these requests it still does, and the
header lines RFC 9112 says a server must refuse are refused (the email parser merged or
guessed at them)."""

from __future__ import annotations

import io
import json
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nekko_sm import config as cfg
from nekko_sm.api import encode_url, make_server
from nekko_sm.httphead import MAX_HEADERS, HeadError, parse_simple, read_headers
from nekko_sm.service import Service


@pytest.fixture
def port(tmp_path):
    config = cfg.build({"cache_dir": str(tmp_path / "cache"), "address": "127.0.0.1:0"}, {})
    service = Service(config)
    server = make_server(service, config.address)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        service.close()


def exchange(port: int, data: bytes, answers: int = 1) -> list[tuple[int, dict, bytes]]:
    """Send ``data`` on one connection; read ``answers`` answers (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        f = s.makefile("rb")
        out = []
        for _ in range(answers):
            status_line = f.readline()
            assert status_line.startswith(b"HTTP/1."), status_line
            head = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                head[k.strip().lower()] = v.strip()
            body = f.read(int(head.get("content-length", "0")))
            out.append((int(status_line.split()[1]), head, body))
        return out


def test_keep_alive_several_requests_on_one_connection(port):
    req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    got = exchange(port, req * 3, answers=3)
    assert [g[0] for g in got] == [200, 200, 200]
    assert json.loads(got[2][2])["status"] == "ok"


def test_http_1_0_closes_unless_keep_alive_and_1_1_closes_when_asked(port):
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # the server closes after its answer
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")  # (http.server names its own version)
    got = exchange(
        port,
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        answers=2,
    )
    assert [g[0] for g in got] == [200, 200]


def test_double_slash_is_a_path_not_a_host(port):
    ((status, _, body),) = exchange(port, b"GET //healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_an_unknown_entry_is_still_a_404_in_json(port):
    arg = encode_url("https://example.com/never-pulled").encode()
    ((status, head, body),) = exchange(
        port, b"GET /content/" + arg + b" HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    )
    assert status == 404 and head["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "not-found"


@pytest.mark.parametrize(
    "line",
    [
        b"Host : localhost\r\n",  # whitespace before the colon (RFC 9112 5.1: must be a 400)
        b"X-Folded: a\r\n b\r\n",  # obsolete line folding
        b"no colon at all\r\n",
        b"Bad[Name]: x\r\n",  # not a token
    ],
)
def test_header_lines_a_server_must_refuse_are_a_400(port, line):
    req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + line + b"\r\n"
    ((status, head, body),) = exchange(port, req)
    assert status == 400 and head.get("connection") == "close"
    assert json.loads(body)["error"]["code"] == "bad-request"


def test_too_many_or_too_long_header_lines_are_a_431(port):
    many = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS + 1))
    ((status, _, body),) = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: l\r\n" + many + b"\r\n")
    assert status == 431 and json.loads(body)["error"]["code"] == "headers-too-large"
    long = b"X-Long: " + b"a" * 70_000 + b"\r\n"
    ((status, _, _),) = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: l\r\n" + long + b"\r\n")
    assert status == 431


def test_requests_off_the_common_path_still_get_http_servers_answers(port):
    ((status, _, _),) = exchange(port, b"GET /healthz HTTP/2.0\r\nHost: l\r\n\r\n")
    assert status == 505
    ((status, _, _),) = exchange(port, b"BREW /healthz HTTP/1.1\r\nHost: l\r\n\r\n")
    assert status == 501
    ((status, _, _),) = exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")  # no Host
    assert status == 400


def test_expect_100_continue_is_answered_before_the_body(port):
    body = json.dumps({"url": "ftp://nowhere/x"}).encode()
    head = (
        b"POST /content HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head)
        f = s.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 100")
        assert f.readline() == b"\r\n"
        s.sendall(body)
        assert f.readline().split()[1] == b"400"  # an unknown scheme, with a JSON error


def test_headers_repeated_names_and_case():
    h = read_headers(io.BytesIO(b"Content-Length: 1\r\ncontent-length: 2\r\nA:  b c \r\n\r\n"))
    assert h.get("CONTENT-LENGTH") == "1" and h.get_all("content-length") == ["1", "2"]
    assert h["a"] == "b c" and "a" in h and "b" not in h and h.get_all("x") is None
    assert len(h) == 3 and list(h) == ["Content-Length", "content-length", "A"]
    with pytest.raises(HeadError):
        read_headers(io.BytesIO(b"\tfolded\r\n\r\n"))


_PIECES = [
    b"Host",
    b"X-A",
    b"Bad Name",
    b":",
    b": ",
    b" ",
    b"\t",
    b"v",
    b"\r",
    b"\n",
    b"\r\n",
    b"\xff",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=6), max_size=6))
def test_the_front_doors_parse_agrees_with_the_handlers(lines):
    # A head the front door parses, it parses as read_headers does; one it does not, it
    # leaves to the handler (None), never reading it another way.
    block = b"".join(b"".join(parts) + b"\r\n" for parts in lines) + b"\r\n"
    head = b"GET /content/x HTTP/1.1\r\n" + block
    if head.find(b"\r\n\r\n") != len(head) - 4:
        return  # the front door only ever sees a head up to its first empty line
    parsed = parse_simple(head)
    if parsed is None:
        return
    assert parsed[:3] == ("GET", "/content/x", "1")
    assert parsed[3].items() == read_headers(io.BytesIO(block)).items()
