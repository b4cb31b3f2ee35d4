"""Property-based fuzzing (hypothesis): URL canonicalisation, names, credentials, and the API
against arbitrary requests, from JSON bodies down to raw bytes on the socket.

The API server here cannot reach anything: every outgoing request goes to a proxy on a closed
127.0.0.1 port (HTTP_PROXY/HTTPS_PROXY, so not even a DNS lookup), the Hub endpoint is that
port too, and the Transfer makes one attempt, so a URL that would download fails at once (502).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import posixpath
import string
import threading
import warnings
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peers import free_ports, raw_exchange

from nekko_sm import config as cfg
from nekko_sm.api import make_server
from nekko_sm.credentials import Credentials
from nekko_sm.errors import BadRequest, NekkoError, UnsafeName
from nekko_sm.refparse import parse
from nekko_sm.refs import HFRef, HTTPRef, OCIRef, redact, safe_name
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer

HF = "http://127.0.0.1:9"

# On a failure, hypothesis's pytest plugin imports its patch writer (libcst, when installed),
# whose imports warn; under filterwarnings=error that turns the report into an INTERNALERROR.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with contextlib.suppress(Exception):
        import hypothesis.extra._patching  # noqa: F401

FUZZ = settings(
    deadline=None,
    database=None,
    max_examples=300,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
LIVE = settings(FUZZ, max_examples=80)


# --------------------------------------------------------------------------------------------
# URL canonicalisation

PIECES = st.sampled_from(
    [
        "/",
        "//",
        ":",
        "@",
        "%",
        "%2F",
        "%2f",
        "%40",
        "%25",
        "%3F",
        "%23",
        "%00",
        "%0a",
        "%2e%2e",
        "%5C",
        "..",
        ".",
        "?",
        "#",
        "[",
        "]",
        "[::1]",
        "::1",
        "~",
        " ",
        "\t",
        "\\",
        "-",
        "_",
        "a",
        "B",
        "0",
        "80",
        "443",
        "9999",
        "99999",
        "org",
        "name",
        "x.io",
        "localhost",
        "huggingface.co",
        "hf.co",
        "www.huggingface.co",
        "docker.io",
        "index.docker.io",
        "datasets",
        "spaces",
        "models",
        "refs/pr/1",
        "refs%2Fpr%2F1",
        "refs/convert/parquet",
        "@main",
        "@v1.0",
        "sha256:" + "a" * 64,
        "@sha256:" + "b" * 64,
        ":latest",
        "user:pass@",
        "é",
        "模型",
        "\u00b2",
        "\uff0f",
        "\u2100",
        "\u00a0",
        "\ud800",
        "\x7f",
    ]
)
SCHEMES = st.sampled_from(
    [
        "oci://",
        "OCI://",
        "hf://",
        "hf:///",
        "Hf://",
        "huggingface://",
        "http://",
        "https://",
        "HTTP://",
        "ftp://",
        "file://",
        "",
    ]
)
URLISH = st.builds(
    lambda s, parts: s + "".join(parts),
    SCHEMES,
    st.lists(PIECES | st.text(max_size=4), max_size=14),
)


def _authority(canonical: str) -> str:
    return canonical.split("://", 1)[1].split("/", 1)[0]


def check_parse(text: str) -> None:
    try:
        ref = parse(text, HF)
    except NekkoError:
        return  # refused with one of ours: fine (anything else fails the test)
    c = ref.canonical
    c.encode("utf-8")
    assert not any(ord(ch) < 32 or ch == "\x7f" for ch in c)
    again = parse(c, HF)
    assert again.canonical == c, (text, c, again.canonical)  # a fixed point
    if isinstance(ref, (OCIRef, HFRef)):
        assert again == ref, (text, ref, again)
    assert "@" not in _authority(c), (text, c)  # never userinfo
    if isinstance(ref, HTTPRef):
        assert c == ref.url and c.startswith(("http://", "https://"))
    if isinstance(ref, HFRef) and ref.path:
        assert safe_name(ref.path) == ref.path, (text, ref.path)
    if isinstance(ref, OCIRef):
        assert (ref.tag is None) != (ref.digest is None)


@FUZZ
@given(st.text(max_size=200))
def test_parse_any_text(text):
    check_parse(text)


@settings(FUZZ, max_examples=750)
@given(URLISH)
# what it found: each once was a canonical URL that did not re-parse to itself
@example("http://\ud800")  # a lone surrogate: no UTF-8, no cache key
@example("hf://h.io/o/n@%2541/f")  # decoded once, then again
@example("hf://h.io/o/n@a%2Fb/f")  # rev "a/b" + "f" and rev "a" + "b/f": one key
@example("hf://h.io/o/n/a%3Fb")  # a decoded "?" cut off the rest
@example("hf://h.io/o/n@x%0a/f")  # a control character in the revision
@example("hf://refs/pr/1 /")  # a trailing space, stripped next time
@example("http://h/a b ?")  # the same
@example("hf://h.io/models/datasets/x")  # a model of org "datasets" became a dataset
def test_parse_url_shaped_text(text):
    check_parse(text)


USERINFO = st.text(
    st.characters(blacklist_characters="/?#@\\[]", blacklist_categories=("Cc", "Cs")),
    min_size=1,
    max_size=12,
)


@FUZZ
@given(
    st.sampled_from(["http", "https", "hf", "oci"]),
    USERINFO,
    USERINFO,
    st.sampled_from(["127.0.0.1:8080", "h.io", "", "[::1]", "h.io:99999", "a b"]),
    st.text(max_size=30),
)
def test_userinfo_never_reaches_the_canonical_url_or_the_error(scheme, user, password, host, rest):
    secret = "PW" + password
    text = f"{scheme}://{user}:{secret}@{host}/{rest}"
    try:
        ref = parse(text, HF)
    except NekkoError as e:
        assert secret not in e.message
        return
    assert secret not in ref.canonical


@FUZZ
@given(st.text(max_size=200))
def test_redact_never_keeps_userinfo_or_query(text):
    out = redact(text)
    if "://" in out:
        assert "@" not in _authority(out)
    assert "?" not in out and "#" not in out


# --------------------------------------------------------------------------------------------
# names

NAME_PIECES = st.sampled_from(
    [
        "..",
        ".",
        "/",
        "//",
        "\\",
        "a",
        "b.bin",
        "C:",
        "c:",
        "\x00",
        "\n",
        "\x1b",
        " ",
        "~",
        "%2e",
        "...",
        "é",
    ]
)


@settings(FUZZ, max_examples=500)
@given(st.lists(NAME_PIECES | st.text(max_size=3), max_size=10).map("".join) | st.text())
def test_safe_name_is_safe(name):
    try:
        out = safe_name(name)
    except UnsafeName:
        return
    assert out and safe_name(out) == out  # normalised, idempotent
    assert not out.startswith("/") and "\\" not in out and "\x00" not in out
    assert ".." not in out.split("/") and "." not in out.split("/") and "" not in out.split("/")
    assert not any(ord(c) < 32 for c in out)
    joined = posixpath.normpath(posixpath.join("/base/view", out))
    assert joined.startswith("/base/view/")


# --------------------------------------------------------------------------------------------
# credentials

JUNK_TEXT = st.text(max_size=40) | st.sampled_from(["Bearer", "basic", "BASIC", "bearer ", ""])


@FUZZ
@given(st.none() | st.just("") | JUNK_TEXT.map(lambda t: "SeCrEt" + t), JUNK_TEXT | st.none())
def test_credentials_are_a_valid_header_or_refused(value, kind):
    try:
        creds = Credentials.make(value, kind)
    except BadRequest as e:
        assert "SeCrEt" not in e.message  # an error never echoes the credentials
        return
    if creds is None:
        assert not value
        return
    creds.header.encode("ascii")
    assert "\r" not in creds.header and "\n" not in creds.header
    assert creds.type in ("Bearer", "Basic") and "SeCrEt" not in repr(creds)


# --------------------------------------------------------------------------------------------
# the API, live


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    (port,) = free_ports(1)  # closed again: nothing listens there
    nowhere = f"http://127.0.0.1:{port}"
    config = cfg.build(
        {"cache_dir": str(tmp_path_factory.mktemp("fuzz") / "cache"), "address": "127.0.0.1:0"},
        {"HTTP_PROXY": nowhere, "HTTPS_PROXY": nowhere, "HF_ENDPOINT": nowhere},
    )
    service = Service(
        config, transfer=Transfer(config, read_timeout=5, connect_timeout=5, attempts=1, backoff=0)
    )
    srv = make_server(service, config.address)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.nowhere = nowhere  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)
        service.close()


def call(
    srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes, str]:
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read(), r.getheader("Content-Type") or ""
    finally:
        c.close()


def check_answer(srv, method: str, status: int, data: bytes, ctype: str) -> None:
    assert status != 500 and (200 <= status < 500 or status == 502), (status, data[:300])
    if status >= 400:
        assert ctype == "application/json", (status, ctype)
        if method != "HEAD":
            err = json.loads(data)["error"]
            assert isinstance(err["code"], str) and isinstance(err["message"], str)
    elif data and method != "HEAD":
        json.loads(data)


def healthy(srv) -> None:
    status, data, _ = call(srv, "GET", "/healthz")
    assert status == 200 and json.loads(data)["status"] == "ok"


@LIVE
@given(st.binary(max_size=2000))
def test_any_bytes_as_a_post_body(server, body):
    status, data, ctype = call(
        server, "POST", "/content/", body, {"Content-Type": "application/json"}
    )
    check_answer(server, "POST", status, data, ctype)
    assert status in (400, 413) or status >= 200
    healthy(server)


def _junk(depth: int = 2):
    leaf = (
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
    )
    if depth == 0:
        return leaf
    return (
        leaf
        | st.lists(_junk(depth - 1), max_size=3)
        | st.dictionaries(st.text(max_size=5), _junk(depth - 1), max_size=3)
    )


def _valid_urls(nowhere: str):
    host = nowhere.split("://", 1)[1]
    return st.sampled_from(
        [
            f"{nowhere}/file.bin",
            f"http://user:pw@{host}/f",
            f"oci://{host}/repo:tag",
            f"oci://{host}/repo@sha256:" + "c" * 64,
            "hf:///org/name/file.gguf",
            f"hf://{host}/org/name",
            "hf:///datasets/org/ds@refs%2Fpr%2F1/x.csv",
            "oci://docker.io/library/alpine",
            f"{nowhere}/a%20b?x=1#frag",
        ]
    )


def _urls(nowhere: str):
    return st.one_of(
        _valid_urls(nowhere),
        URLISH,
        st.text(max_size=60),
        st.sampled_from(
            ["file:///etc/passwd", "http://x/../../etc/passwd", "hf:///org/name/..%2F..%2Fx"]
        ),
    )


@pytest.fixture(scope="module")
def requests_strategy(server):
    # Mostly well-formed values, so that requests get past the first check, and junk of
    # every JSON type for each field.
    fields = {
        "url": st.one_of(_valid_urls(server.nowhere), _urls(server.nowhere), _junk()),
        "credentials": st.one_of(
            st.text(max_size=40), st.sampled_from(["dG9rOnB3", "tok"]), _junk(1)
        ),
        "credentialsType": st.one_of(
            st.sampled_from(["Bearer", "basic", "BASIC", "Digest", ""]), _junk(1)
        ),
        "digest": st.one_of(
            st.none(), st.sampled_from(["sha256:" + "d" * 64, "sha256:xyz"]), _junk(1)
        ),
        "platform": st.one_of(
            st.none(),
            st.sampled_from(["linux/amd64", "all", "linux/arm/v7", "x/y", "linux"]),
            _junk(1),
        ),
        "async": st.one_of(st.booleans(), _junk(1)),
    }
    return st.fixed_dictionaries({}, optional=fields) | _junk()


@LIVE
@given(data=st.data())
def test_any_json_request(server, requests_strategy, data):
    req = data.draw(requests_strategy)
    body = json.dumps(req).encode()
    status, answer, ctype = call(
        server, "POST", "/content/", body, {"Content-Type": "application/json"}
    )
    check_answer(server, "POST", status, answer, ctype)
    if status == 502:
        assert isinstance(req, dict) and isinstance(req.get("url"), str)
    healthy(server)


@settings(LIVE, max_examples=250)
@given(data=st.data())
def test_well_formed_requests_with_any_strings(server, data):
    """Valid fields but for arbitrary URL and credential strings: requests that get as far
    as the source and the wire."""
    req = data.draw(
        st.fixed_dictionaries(
            {"url": _valid_urls(server.nowhere) | URLISH},
            optional={
                "credentials": st.text(max_size=30)
                | st.text(st.characters(min_codepoint=0x80), min_size=1, max_size=4),
                "credentialsType": st.sampled_from(["Bearer", "basic", "BASIC"]),
                "digest": st.sampled_from(["sha256:" + "e" * 64]),
                "platform": st.sampled_from(["linux/amd64", "all"]),
                "async": st.booleans(),
            },
        )
    )
    status, answer, ctype = call(
        server, "POST", "/content/", json.dumps(req).encode(), {"Content-Type": "application/json"}
    )
    check_answer(server, "POST", status, answer, ctype)
    healthy(server)


B64ISH = st.text(alphabet=string.ascii_letters + string.digits + "+/=-_%.~ :@?#\\", max_size=80)


@LIVE
@given(
    st.sampled_from(["GET", "HEAD", "DELETE", "PUT", "PATCH", "POST"]),
    B64ISH
    | _urls("http://127.0.0.1:9").map(
        lambda u: base64.b64encode(u.encode("utf-8", "surrogatepass")).decode()
    )
    | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()),
)
def test_any_content_path(server, method, segment):
    path = "/content/" + quote(segment, safe="/%=+-_.~:@")
    status, data, ctype = call(server, method, path, b"" if method in ("POST", "PUT") else None)
    check_answer(server, method, status, data, ctype)
    healthy(server)


# --------------------------------------------------------------------------------------------
# raw bytes on the socket


def raw(srv, data: bytes) -> bytes:
    host, port = srv.server_address[:2]
    return raw_exchange(host, port, data)  # a hang fails the example


def check_raw(srv, answer: bytes) -> None:
    """Nothing (closed cleanly), or a status line; never a 500, never data without one."""
    if answer:
        assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
        status = int(answer.split(b" ", 2)[1])
        # 501 (unknown method) and 505 (HTTP version) are what RFC 9110 prescribes
        assert status < 300 or 400 <= status < 500 or status in (501, 505), answer[:300]
    healthy(srv)


@LIVE
@given(st.binary(max_size=3000))
def test_random_bytes(server, data):
    check_raw(server, raw(server, data))


TOKENS = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"DELETE",
        b"HEAD",
        b"PUT",
        b"OPTIONS",
        b"TRACE",
        b"CONNECT",
        b"PRI",
        b"get",
        b"G\x00T",
        b"X" * 70_000,
        b"",
    ]
)
TARGETS = st.sampled_from(
    [
        b"/healthz",
        b"/content/",
        b"/content/aHR0cDovL3gveQ==",
        b"*",
        b"http://x/healthz",
        b"//",
        b"/" + b"a" * 70_000,
        b"/\xff\xfe",
        b"/content/%00",
        b"",
    ]
) | st.binary(max_size=20)
VERSIONS = st.sampled_from(
    [
        b" HTTP/1.1",
        b" HTTP/1.0",
        b"",
        b" HTTP/0.9",
        b" HTTP/2.0",
        b" HTTP/1.1 extra",
        b" HTTP/1.x",
        b" http/1.1",
        b" HTTP/11",
    ]
)
HEADER = st.one_of(
    st.sampled_from(
        [
            b"Host: x",
            b"Content-Length: 5",
            b"Content-Length: -1",
            b"Content-Length: 99999999999999999999",
            b"Transfer-Encoding: chunked",
            b"Expect: 100-continue",
            b"Connection: close",
            b"Connection: keep-alive",
            b"Content-Type: application/json",
            b"no colon",
            b": empty name",
            b" folded",
            b"X-Long: " + b"v" * 70_000,
            b"Host: \xff",
        ]
    ),
    st.tuples(st.binary(max_size=10), st.binary(max_size=30)).map(lambda t: t[0] + b": " + t[1]),
)
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r"])


@LIVE
@given(TOKENS, TARGETS, VERSIONS, st.lists(HEADER, max_size=6), LINE_ENDS, st.binary(max_size=200))
def test_garbage_request_lines_and_headers(server, method, target, version, headers, eol, body):
    data = method + b" " + target + version + eol + b"".join(h + eol for h in headers) + eol
    check_raw(server, raw(server, data + body))


def test_http_0_9_and_missing_host_are_refused(server):
    for data in (b"GET /healthz\r\n", b"GET /healthz HTTP/1.1\r\n\r\n"):
        answer = raw(server, data)
        assert answer.startswith(b"HTTP/1.") and int(answer.split(b" ", 2)[1]) == 400, answer
    # HTTP/1.0 needs no Host
    answer = raw(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n", 1)[0]
    healthy(server)
