"""Talking to one registry endpoint: its challenges, tokens and error answers.

In the spirit of go-containerregistry's ``transport`` package, this module owns how a
request to a registry (or a mirror of it) gets authorised: :class:`Endpoint` pings
``/v2/``, answers a ``WWW-Authenticate`` challenge with Basic credentials or a Bearer
token fetched from the realm it names (checked: http or https, never plain http from an
https registry unless marked insecure), caches tokens per realm, service, scopes and
credentials in a :class:`TokenCache` per Transfer, and re-authenticates once when a
token is refused mid-pull.  :func:`registry_error` turns a registry's ``errors`` answer
into ours.  The caller's credentials go to the registry and its token service, never to
a mirror.  It never reads manifests, chooses platforms or fetches blobs (that is
:mod:`nekko_sm.sources.oci_manifests` and :mod:`nekko_sm.sources.oci_fetch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Mapping
from functools import partial
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    NekkoError,
    Unauthorized,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.httpio import origin, sanitise
from nekko_sm.refs import OCIRef, redact
from nekko_sm.retrying import retry_after
from nekko_sm.sources.base import Job
from nekko_sm.transfer import default_error

log = logging.getLogger("nekko_sm.oci")

_DEFAULT_EXPIRES = 60
_HOSTPORT = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?$"
)


# --------------------------------------------------------------------------------------------
# the one translator of registry errors

# The error codes of the OCI distribution spec (and Docker's registry API, which it grew
# from): the only words of a registry's error answer that reach our messages.
SPEC_ERROR_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "MANIFEST_UNVERIFIED",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "TAG_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
        "PAGINATION_NUMBER_INVALID",
        "RANGE_INVALID",
    }
)


def registry_error(
    status: int,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    what: str = "",
    retryable: bool = True,
) -> NekkoError:
    """Turn a registry's error answer (``{"errors": [{"code", "message"}]}``) into ours.

    ``what`` names the pull (``oci://…``) in messages.  ``retryable=False`` (mirrors) makes
    temporary failures final, so the caller falls back at once instead of backing off.
    """
    pairs: list[tuple[str, str]] = []
    try:
        doc = json.loads(body.decode("utf-8", "replace")) if body else None
        for e in (doc or {}).get("errors") or []:
            if isinstance(e, dict):
                pairs.append(
                    (str(e.get("code", "")).upper()[:40], str(e.get("message") or "")[:200])
                )
    except (ValueError, AttributeError, RecursionError):
        pass
    codes = [c for c, _ in pairs]
    where = what or redact(url)
    if pairs:  # the registry's own words: for whoever reads the debug log, never an answer
        log.debug("%s: the registry answered %d: %s", where, status, sanitise(repr(pairs[:4]), 500))
    # The fact, not the value (issue 9, finding 9): the status, and the codes the spec
    # defines; a registry's messages (and codes of its own) are upstream bytes.
    said = ", ".join(dict.fromkeys(c for c in codes if c in SPEC_ERROR_CODES))
    detail = f" ({status} {said})" if said else f" ({status})"
    challenge = headers.get("WWW-Authenticate")
    if status == 429 or "TOOMANYREQUESTS" in codes:
        err: NekkoError = UpstreamUnavailable(
            f"{where}: the registry is rate limiting us{detail}",
            retry_after=retry_after(headers.get("Retry-After")),
        )
    elif status == 401 or {"UNAUTHORIZED", "DENIED"} & set(codes):
        err = Unauthorized(f"{where} needs credentials: pass credentials or check them{detail}")
        if status == 401:
            err.context["challenge"] = challenge  # for a re-challenge mid-pull
    elif status == 404 or {"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"} & set(codes):
        err = UpstreamNotFound(f"{where}: not found at the registry{detail}")
    else:
        base = default_error(status, url, body, headers)
        kw = {"retry_after": base.retry_after} if isinstance(base, UpstreamUnavailable) else {}
        err = type(base)(f"{where}: the registry answered{detail}", **kw)
    if not retryable and isinstance(err, UpstreamUnavailable):
        err = UpstreamError(err.message)
    return err


# --------------------------------------------------------------------------------------------
# WWW-Authenticate

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PARAM_RE = re.compile(r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^,\s]*)""")


def parse_challenges(value: str | None) -> list[tuple[str, dict[str, str]]]:
    """``Bearer realm="…",scope="a,b", Basic realm="x"`` -> ``[("bearer", {…}), ("basic", {…})]``.

    Schemes and parameter names are lower-cased; quoted values keep their commas and lose
    their backslash escapes.  Parsing stops at anything it cannot read.
    """
    out: list[tuple[str, dict[str, str]]] = []
    s = value or ""
    i = 0
    while True:
        while i < len(s) and s[i] in " \t,":
            i += 1
        param = _PARAM_RE.match(s, i)
        if param and out:
            v = param.group(2)
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = re.sub(r"\\(.)", r"\1", v[1:-1])
            out[-1][1].setdefault(param.group(1).lower(), v)
            i = param.end()
            continue
        scheme = _TOKEN_RE.match(s, i)
        if not scheme:
            return out
        out.append((scheme.group(0).lower(), {}))
        i = scheme.end()


# --------------------------------------------------------------------------------------------
# tokens


class TokenCache:
    """Tokens by (realm, service, scopes, credentials) until they are about to expire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[tuple, tuple[str, float]] = {}

    def get(self, key: tuple) -> str | None:
        with self._lock:
            hit = self._tokens.get(key)
            if hit is None:
                return None
            if hit[1] <= time.monotonic():
                del self._tokens[key]
                return None
            return hit[0]

    def put(self, key: tuple, token: str, expires_in: float) -> None:
        slack = min(30.0, max(1.0, expires_in / 10))
        with self._lock:
            if len(self._tokens) > 1000:
                self._tokens.clear()
            self._tokens[key] = (token, time.monotonic() + max(0.0, expires_in - slack))

    def drop(self, key: tuple) -> None:
        with self._lock:
            self._tokens.pop(key, None)


# One cache per Transfer (i.e. per Service): tokens outlive a pull, never a process.
_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def token_cache_for(transfer: object) -> TokenCache:
    with _caches_lock:
        cache = _caches.get(transfer)
        if cache is None:
            cache = TokenCache()
            _caches[transfer] = cache
        return cache


# --------------------------------------------------------------------------------------------
# one endpoint: a mirror or the registry


class Endpoint:
    """A base URL that speaks the registry API for one repository, and how to authorise there."""

    def __init__(self, job: Job, ref: OCIRef, base: str, mirror: bool) -> None:
        self.job = job
        self.ref = ref
        self.base = base.rstrip("/").removesuffix("/v2")
        self.mirror = mirror
        self.query = "?" + urlencode({"ns": ref.registry}) if mirror else ""
        # The caller's credentials are for the registry: a mirror only gets anonymous tokens.
        self.credentials: Credentials | None = None if mirror else job.credentials
        self.errors = partial(registry_error, what=ref.canonical, retryable=not mirror)
        self._lock = threading.Lock()
        self._ready = False
        self._auth: str | None = None
        self._token_key: tuple | None = None
        self._cache = token_cache_for(job.transfer)

    def __str__(self) -> str:
        return f"mirror {redact(self.base)}" if self.mirror else f"registry {redact(self.base)}"

    def url(self, path: str) -> str:
        return f"{self.base}/v2/{path}{self.query}"

    @property
    def auth(self) -> str | None:
        return self._auth

    def same_origin(self, url: str) -> bool:
        return origin(url) == origin(self.base)

    # -- ping and challenges -------------------------------------------------------------
    def ready(self) -> None:
        """Ping ``/v2/`` once and answer its challenge, if any.

        A registry without the ping (registry.ollama.ai answers ``404``) is asked as it is:
        with the caller's Bearer token, if any, answering a challenge when a request gets one.
        """
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            creds = self.credentials
            first = creds.header if creds is not None and creds.type == "Bearer" else None
            resp = self.job.transfer.request(
                "GET", self.url(""), auth=first, limit=1 << 20, retry=not self.mirror
            )
            if resp.status == 200:
                self._auth = first
            elif resp.status == 404:
                log.debug("%s has no /v2/ ping (404); asking it as it is", self)
                self._auth = first
            elif resp.status == 401 and self.same_origin(resp.url):
                self._answer(resp.headers.get("WWW-Authenticate"), force=False)
            else:
                raise self.errors(resp.status, resp.url, resp.data, resp.headers)
            self._ready = True

    def reauthenticate(self, challenge: str | None, used: str | None) -> None:
        """A 401 mid-pull: drop the token that was refused and answer the challenge again
        (asking ``/v2/`` for one when the 401 came without)."""
        with self._lock:
            if self._auth != used:
                return  # another thread already did
            if self._token_key is not None:
                self._cache.drop(self._token_key)
            if not challenge:
                resp = self.job.transfer.request(
                    "GET", self.url(""), limit=1 << 20, retry=not self.mirror
                )
                if resp.status != 401 or not self.same_origin(resp.url):
                    raise Unauthorized(
                        f"{self.ref.canonical}: the registry refused us"
                        f" (401) without saying how to authenticate"
                    )
                challenge = resp.headers.get("WWW-Authenticate")
            self._answer(challenge, force=True)

    def _answer(self, value: str | None, force: bool) -> None:
        challenges = parse_challenges(value)
        bearer = next((p for s, p in challenges if s == "bearer" and p.get("realm")), None)
        basic = next((p for s, p in challenges if s == "basic"), None)
        creds = self.credentials
        if bearer is not None:
            self._auth = "Bearer " + self._token(bearer, force)
        elif basic is not None and creds is not None and creds.type == "Basic":
            if force and self._auth == creds.header:
                raise Unauthorized(
                    f"{self.ref.canonical}: the registry refused the credentials: check them"
                )
            self._auth = creds.header
        else:
            kind = (
                "Basic credentials (base64 user:password)" if basic is not None else "credentials"
            )
            raise Unauthorized(f"{self.ref.canonical} needs {kind}: pass credentials or check them")

    def _realm(self, realm: str) -> str:
        p = urlsplit(realm)
        if p.scheme not in ("http", "https") or not p.hostname:
            log.debug("%s: token realm %s", self.ref.canonical, sanitise(repr(realm), 300))
            raise UpstreamError(
                f"{self.ref.canonical}: the registry named a token service"
                " that is not an http or https URL"
            )
        if (
            p.scheme == "http"
            and urlsplit(self.base).scheme == "https"
            and not self.job.config.is_insecure(p.netloc)
        ):
            host = p.netloc.rsplit("@", 1)[-1]
            host = host if _HOSTPORT.match(host) else "it"  # a name to mark, or nothing
            raise UpstreamError(
                f"{self.ref.canonical}: the registry named a plain-http token"
                " service; refusing to send credentials in the clear (mark"
                f" {host} --insecure-registry if you mean it)"
            )
        return realm

    def _token(self, params: dict[str, str], force: bool) -> str:
        realm = self._realm(params["realm"])
        service = params.get("service")
        scopes = [f"repository:{self.ref.repository}:pull"]
        for s in (params.get("scope") or "").split():
            if s not in scopes:
                scopes.insert(0, s)  # some token servers only read the first scope
        creds = self.credentials
        who = hashlib.sha256(creds.header.encode()).hexdigest() if creds else ""
        key = (self.base, realm, service, tuple(scopes), who)
        self._token_key = key
        if not force:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
        p = urlsplit(realm)
        query = parse_qsl(p.query, keep_blank_values=True)
        if service:
            query.append(("service", service))
        query.extend(("scope", s) for s in scopes)
        url = urlunsplit((p.scheme, p.netloc, p.path or "/", urlencode(query), ""))
        log.debug("asking %s for a token (scope %s)", redact(url), " ".join(scopes))
        resp = self.job.transfer.request(
            "GET",
            url,
            headers={"Accept": "application/json"},
            auth=creds.header if creds else None,
            limit=1 << 20,
            retry=not self.mirror,
        )
        if resp.status in (401, 403):
            if creds is None:
                raise Unauthorized(
                    f"{self.ref.canonical} needs credentials: the token service"
                    f" refused an anonymous request ({resp.status})"
                )
            raise Unauthorized(
                f"{self.ref.canonical}: the token service refused the"
                f" credentials ({resp.status}): check them"
            )
        if resp.status != 200:
            raise self.errors(resp.status, resp.url, resp.data, resp.headers)
        try:
            doc = json.loads(resp.data)
            token = doc.get("token") or doc.get("access_token")
            expires = doc.get("expires_in")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise UpstreamError(
                f"{self.ref.canonical}: the token service answered without a usable token"
            )
        if not isinstance(expires, (int, float)) or isinstance(expires, bool) or expires <= 0:
            expires = _DEFAULT_EXPIRES
        self._cache.put(key, token, float(expires))
        return token


__all__ = ["Endpoint", "TokenCache", "parse_challenges", "registry_error", "token_cache_for"]
