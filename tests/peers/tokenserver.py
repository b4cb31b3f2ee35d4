"""A token server for distribution's ``auth: token`` (docker/distribution 2.8), for tests.

It generates an RSA key and a self-signed certificate at start (with ``cryptography``, a
test-only dependency), writes the certificate to a PEM file for the registry's
``rootcertbundle``, and issues RS256 JWTs whose header carries ``x5c`` (the certificate, base64
DER), which is how distribution 2.8 finds and checks the signing key.

Policy:

* anonymous: ``pull`` on ``public/*``;
* ``Basic alice:s3cret`` (:data:`USER`/:data:`PASSWORD`), or ``Bearer`` :data:`ALICE_TOKEN` (a
  personal access token sent as is): ``pull,push,delete`` on every repository, ``*`` on
  ``registry:catalog:*``;
* anything else asked for is left out of the token (never an error, as the spec says); the
  registry then answers 401 ``insufficient_scope``/``denied``.

Wrong credentials (bad password, unknown user, unknown Bearer) get ``401``.

Endpoints: ``GET /token?service=S&scope=repository:NAME:pull[,push]`` (``scope`` may repeat,
``offline_token=true`` adds a ``refresh_token``), and ``POST /token`` (OAuth2 form:
``grant_type=password`` or ``refresh_token``).  Answers ``{"token", "access_token",
"expires_in", "issued_at"}``.

distribution allows 60 s of clock-skew leeway on ``exp``.  So that a short ``expires_in``
(``TokenServer(expires_in=2)`` or ``server.expires_in = 2`` at run time) really expires at the
registry, a token issued with ``expires_in < 120`` carries ``exp = iat + expires_in - 60``: the
registry then starts refusing it ``expires_in`` seconds after issue, like a real short-lived
token.

Requests are recorded in :attr:`TokenServer.requests` (never the token or password): method,
kind of Authorization (``None``/``"basic"``/``"bearer"``), user, scopes asked, actions
granted, status.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import itertools
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; only type checkers read it

USER = "alice"
PASSWORD = "s3cret"
CREDENTIALS = (USER, PASSWORD)  # as a (user, password) tuple
ALICE_TOKEN = "nekko-test-pat-alice"  # a Bearer credential the token server accepts as alice
SERVICE = "nekko-test-registry"
ISSUER = "nekko-test-tokenserver"
DISTRIBUTION_LEEWAY = 60  # seconds distribution 2.8 tolerates past exp / before nbf

_ALL_ACTIONS = ("pull", "push", "delete")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class TokenRequest:
    """One request the token server answered.  Never holds a secret."""

    method: str
    path: str
    auth: str | None  # None, "basic" or "bearer"
    user: str  # "" when anonymous or refused
    service: str | None
    scopes: list[str]
    granted: list[dict[str, Any]] = field(default_factory=list)
    status: int = 0
    grant_type: str | None = None


class TokenServer:
    """A threaded token server on 127.0.0.1.  Use :meth:`start`/:meth:`close` or ``with``."""

    def __init__(
        self,
        workdir: str,
        *,
        service: str = SERVICE,
        issuer: str = ISSUER,
        expires_in: int = 300,
        users: dict[str, str] | None = None,
        bearer_tokens: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.users = dict(users if users is not None else {USER: PASSWORD})
        self.bearer_tokens = dict(
            bearer_tokens if bearer_tokens is not None else {ALICE_TOKEN: USER}
        )
        self.requests: list[TokenRequest] = []
        self.fail_with: int | None = None  # answer every request with this status
        self._lock = threading.Lock()
        self._jti = itertools.count(1)
        self._refresh: dict[str, str] = {}  # refresh token -> user
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        os.makedirs(workdir, exist_ok=True)
        self.cert_path = os.path.join(workdir, "token-cert.pem")
        self._make_key()

    # -- key material -------------------------------------------------------------------
    def _make_key(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        self._key = key
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))

    def _sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    # -- policy -------------------------------------------------------------------------
    @staticmethod
    def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
        """``repository:NAME:pull,push`` -> (type, name, actions).  NAME may hold ``:``
        (a registry host with a port), so split the type off the left and actions off the
        right."""
        typ, sep, rest = scope.partition(":")
        if not sep:
            return None
        name, sep, actions = rest.rpartition(":")
        if not sep or not name:
            return None
        return typ, name, [a for a in actions.split(",") if a]

    def password_ok(self, user: str, password: str) -> bool:
        return user in self.users and secrets.compare_digest(
            self.users[user].encode(), password.encode()
        )

    def allowed(self, user: str, typ: str, name: str) -> set[str]:
        """Actions ``user`` ("" = anonymous) has on resource ``typ:name``."""
        if user:
            if typ == "repository":
                return set(_ALL_ACTIONS)
            if typ == "registry" and name == "catalog":
                return {"*"}
            return set()
        if typ == "repository" and name.startswith("public/"):
            return {"pull"}
        return set()

    def grant(self, user: str, scopes: list[str]) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            for one in scope.split(" "):  # a POST carries several scopes space-separated
                parsed = self.parse_scope(one) if one else None
                if parsed is None:
                    continue
                typ, name, asked = parsed
                ok = self.allowed(user, typ, name)
                actions = [a for a in asked if a in ok or "*" in ok]
                if actions:
                    access.append({"type": typ, "name": name, "actions": actions})
        return access

    def issue(self, user: str, access: list[dict[str, Any]], service: str | None) -> dict[str, Any]:
        now = int(time.time())
        expires_in = int(self.expires_in)
        exp = now + expires_in
        if expires_in < 2 * DISTRIBUTION_LEEWAY:
            exp -= DISTRIBUTION_LEEWAY  # see the module docstring
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": service or self.service,
            "exp": exp,
            "nbf": now - 1,
            "iat": now,
            "jti": f"{next(self._jti)}-{secrets.token_hex(8)}",
            "access": access,
        }
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self._cert_der).decode("ascii")],
        }
        token = self._sign(header, claims)
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        return {
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def new_refresh_token(self, user: str) -> str:
        tok = "refresh-" + hashlib.sha256(secrets.token_bytes(16)).hexdigest()[:32]
        with self._lock:
            self._refresh[tok] = user
        return tok

    def refresh_user(self, tok: str) -> str | None:
        with self._lock:
            return self._refresh.get(tok)

    # -- records ------------------------------------------------------------------------
    def record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def scopes_asked(self) -> list[str]:
        with self._lock:
            return [s for r in self.requests for s in r.scopes]

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "token server not started"
        return self._server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> TokenServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
        server.daemon_threads = True
        server.token_server = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name="token-server",
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nekko-test-tokenserver/1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def ts(self) -> TokenServer:
        return self.server.token_server  # type: ignore[attr-defined]

    def _send_json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authenticate(self, rec: TokenRequest) -> str | None:
        """The user ("" for anonymous), or None when the credentials are wrong."""
        value = self.headers.get("Authorization")
        if not value:
            return ""
        scheme, _, cred = value.strip().partition(" ")
        scheme = scheme.lower()
        cred = cred.strip()
        if scheme == "basic":
            rec.auth = "basic"
            try:
                user, sep, password = base64.b64decode(cred, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            if sep and self.ts.password_ok(user, password):
                return user
            return None
        if scheme == "bearer":
            rec.auth = "bearer"
            user = self.ts.bearer_tokens.get(cred)
            return user if user else None
        rec.auth = scheme or "other"
        return None

    def _answer(
        self, rec: TokenRequest, status: int, obj: Any, extra: dict[str, str] | None = None
    ) -> None:
        """Record ``rec`` with ``status``, then send ``obj``."""
        rec.status = status
        self.ts.record(rec)
        self._send_json(status, obj, extra)

    def _refuse(self, rec: TokenRequest) -> None:
        rec.user = ""
        self._answer(
            rec,
            401,
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            {"WWW-Authenticate": 'Basic realm="nekko-test-tokenserver"'},
        )

    def _refused_early(self, rec: TokenRequest) -> bool:
        """Answered already: the server is set to fail, or the path is not ``/token``."""
        if self.ts.fail_with:
            self._answer(rec, self.ts.fail_with, {"errors": [{"code": "UNAVAILABLE"}]})
            return True
        if rec.path != "/token":
            self._answer(rec, 404, {"errors": [{"code": "NOT_FOUND"}]})
            return True
        return False

    def _grant(self, rec: TokenRequest, user: str) -> dict[str, Any]:
        """The token answer for ``user`` and the scopes ``rec`` asked for (recorded)."""
        rec.user = user
        rec.granted = self.ts.grant(user, rec.scopes)
        return self.ts.issue(user, rec.granted, rec.service)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = parse_qs(url.query, keep_blank_values=True)
        rec = TokenRequest(
            method="GET",
            path=url.path,
            auth=None,
            user="",
            service=(q.get("service") or [None])[0],
            scopes=list(q.get("scope", [])),
        )
        if self._refused_early(rec):
            return
        user = self._authenticate(rec)
        if user is None:
            self._refuse(rec)
            return
        answer = self._grant(rec, user)
        if (q.get("offline_token") or ["false"])[0].lower() == "true" and user:
            answer["refresh_token"] = self.ts.new_refresh_token(user)
        self._answer(rec, 200, answer)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)

        def one(name: str) -> str | None:
            return (form.get(name) or [None])[0]

        scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
        rec = TokenRequest(
            method="POST",
            path=url.path,
            auth=None,
            user="",
            service=one("service"),
            scopes=scopes,
            grant_type=one("grant_type"),
        )
        if self._refused_early(rec):
            return
        user: str | None
        refresh = None
        if rec.grant_type == "password":
            rec.auth = "password"
            name, password = one("username") or "", one("password") or ""
            user = name if self.ts.password_ok(name, password) else None
            if user and (one("access_type") == "offline"):
                refresh = self.ts.new_refresh_token(user)
        elif rec.grant_type == "refresh_token":
            rec.auth = "refresh_token"
            user = self.ts.refresh_user(one("refresh_token") or "")
        else:
            self._answer(rec, 400, {"error": "unsupported_grant_type"})
            return
        if user is None:
            self._refuse(rec)
            return
        answer = self._grant(rec, user)
        answer["scope"] = " ".join(rec.scopes)
        if refresh:
            answer["refresh_token"] = refresh
        self._answer(rec, 200, answer)


def decode_jwt_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, without checking anything.  For tests."""

    def part(s: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))

    h, c, _ = token.split(".")
    return part(h), part(c)


def start_token_server(workdir: str, **kwargs: Any) -> TokenServer:
    """Create and start a :class:`TokenServer` (see its arguments)."""
    return TokenServer(workdir, **kwargs).start()


# -- the client side, for tests and seeding -----------------------------------------------------


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = value.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'([A-Za-z_]+)\s*=\s*"([^"]*)"', rest)}
    return scheme.lower(), params


def fetch_token(
    realm: str, service: str | None, scopes: list[str], creds: tuple[str, str] | None = None
) -> str | None:
    """GET a token from ``realm`` (``creds`` as Basic, or anonymous); None when refused."""
    u = urlsplit(realm)
    q: list[tuple[str, str]] = []
    if service:
        q.append(("service", service))
    q.extend(("scope", s) for s in scopes)
    path = (u.path or "/") + ("?" + urlencode(q) if q else "")
    headers = {}
    if creds:
        headers["Authorization"] = (
            "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        )
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        return None
    doc = json.loads(body)
    return doc.get("token") or doc.get("access_token")
