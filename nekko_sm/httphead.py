"""The common request head read without the ``email`` package: the API's fast path.

``http.server`` parses every request's headers with ``email.parser`` (a feed parser built
for MIME messages), a quarter of the Python time a cache-hit ``GET`` costs.  A request
whose line is the plain kind orchestrators send (``GET /content/… HTTP/1.1``, a method
nekko-sm answers, an origin-form target, HTTP/1.0 or 1.1) is parsed here instead, more
strictly than the email parser does: a header line with no colon, whitespace before the
colon, a name that is not an RFC 9110 token, or an obsolete folded line is a ``400`` (RFC
9112 section 5), not a header merged or guessed at.  Anything else (HTTP/0.9, HTTP/2.0,
odd request lines) goes to ``http.server``'s own parser, with its own answers.

This module reads from the handler's ``rfile`` and sets the attributes ``http.server``
would; it sends nothing itself except through the handler's ``send_error``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

MAX_LINE = 65536  # as http.client: a longer header line is a 431
MAX_HEADERS = 100  # as http.client: more is a 431

_LINE = re.compile(rb"(GET|HEAD|POST|DELETE|PUT|PATCH) (/[!-~]*) HTTP/1\.([01])\r?\n")
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class HeadError(Exception):
    """A header block we refuse: ``status`` (400 or 431) and a message for the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Headers:
    """The request's header fields: the part of ``email.message.Message`` the handlers use
    (``get``, ``get_all``, ``in``, ``[]``, ``items``), names case-insensitive, the first
    value of a repeated name answering ``get``."""

    __slots__ = ("_fields", "_first")

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields
        self._first: dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    def __getitem__(self, name: str) -> str | None:
        return self._first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def get_all(self, name: str, failobj: Any = None) -> Any:
        low = name.lower()
        values = [v for k, v in self._fields if k.lower() == low]
        return values or failobj

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def keys(self) -> list[str]:
        return [k for k, _ in self._fields]

    def values(self) -> list[str]:
        return [v for _, v in self._fields]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._fields)

    def __str__(self) -> str:
        return "".join(f"{k}: {v}\r\n" for k, v in self._fields) + "\r\n"


def read_headers(rfile: Any) -> Headers:
    """The header block after a request line, up to its empty line; HeadError if refused."""
    fields: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise HeadError(431, "Line too long")
        if line in (b"\r\n", b"\n", b""):
            return Headers(fields)
        if len(fields) >= MAX_HEADERS:
            raise HeadError(431, "Too many headers")
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.fullmatch(name):  # also a folded line (leading space)
            raise HeadError(400, "malformed header line (RFC 9112 section 5)")
        fields.append((name.decode("ascii"), value.strip(b" \t\r\n").decode("latin-1")))


def parse_common(handler: Any) -> bool | None:
    """Parse ``handler.raw_requestline`` and the headers as ``http.server`` would, for the
    common kind of request.  True: parsed; False: refused (the error is sent); None: not
    the common kind, leave it to ``BaseHTTPRequestHandler.parse_request``."""
    m = _LINE.fullmatch(handler.raw_requestline)
    if m is None:
        return None
    handler.command, handler.path, minor = _request_line(m)
    handler.request_version = "HTTP/1." + minor
    handler.requestline = handler.raw_requestline.rstrip(b"\r\n").decode("latin-1")
    try:
        handler.headers = read_headers(handler.rfile)
    except HeadError as e:
        handler.close_connection = True
        handler.send_error(e.status, e.message)
        return False
    handler.close_connection = not keeps_alive(minor, handler.headers)
    expect = handler.headers.get("Expect", "").lower()
    if expect == "100-continue" and handler.request_version == "HTTP/1.1":
        return bool(handler.handle_expect_100())
    return True


def keeps_alive(minor: str, headers: Headers) -> bool:
    """Whether the connection stays open after the answer to an HTTP/1.``minor`` request
    (the API speaks HTTP/1.1): 1.1 unless it says ``close``, 1.0 only if ``keep-alive``."""
    conntype = headers.get("Connection", "").lower()
    if conntype == "close":
        return False
    return minor == "1" or conntype == "keep-alive"


def common_line(line: bytes | bytearray) -> bool:
    """Whether a request line (with its line end) is of the common kind parsed here."""
    return _LINE.fullmatch(line) is not None


def parse_simple(head: bytes) -> tuple[str, str, str, Headers] | None:
    """(method, target, HTTP/1.minor, headers) of a complete request head of the common kind,
    parsed as :func:`parse_common` would; None for any other head, or one it refuses (the
    handler's own parsing then answers it)."""
    end = head.find(b"\n") + 1
    m = _LINE.fullmatch(head, 0, end)
    if m is None or head.count(b"\n") != head.count(b"\r\n"):  # bare LF: read_headers'
        return None
    lines = head[end:-4].split(b"\r\n") if len(head) > end + 2 else []
    if len(lines) > MAX_HEADERS:
        return None
    fields = []
    for line in lines:  # as read_headers does, of a head whose lines all end in CRLF
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.fullmatch(name):
            return None
        fields.append((name.decode("ascii"), value.strip(b" \t\r\n").decode("latin-1")))
    return (*_request_line(m), Headers(fields))


def _request_line(m: re.Match) -> tuple[str, str, str]:
    """(method, target, minor version) of a request line ``_LINE`` matched."""
    target = m.group(2).decode("latin-1")
    if target.startswith("//"):  # as http.server: never read as //host/path
        target = "/" + target.lstrip("/")
    return m.group(1).decode(), target, m.group(3).decode()
