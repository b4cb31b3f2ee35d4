"""A cached private model is not a public one (DESIGN section 10, Kubernetes KEP-2535).

An entry whose pull used credentials — the caller's, the daemon's own (``HF_TOKEN``), a
``user:password@`` in the URL or a signed URL's query — is *protected*: its index entry
carries :data:`A_PROTECTED` (what kind of credential, never the credential).  A later
caller is answered from the cache only once the upstream has confirmed, with the
credentials a pull by that caller would use, that it may fetch the content now.  The
cheapest question that proves it: a manifest ``HEAD`` by digest in the repository's pull
scope (registries), a ``HEAD`` of ``/resolve/COMMIT/PATH`` (the Hub), a ``HEAD`` of the URL,
or a 1-byte ranged ``GET`` where ``HEAD`` is refused (http).  A confirmation is remembered
in this process for 15 minutes per entry and *hash* of those credentials.

This module asks and remembers; it never stores or logs a credential, and it never touches
the store beyond reading a manifest.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    Forbidden,
    NekkoError,
    Unauthorized,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.refs import HFRef, HTTPRef, OCIRef, redact

if TYPE_CHECKING:
    from nekko_sm.puller import Puller
    from nekko_sm.store import Descriptor

A_PROTECTED = "io.nekko.protected"  # "credentials", "node" or "signed": never the secret

CONFIRMED_FOR = 15 * 60.0  # seconds a confirmation is good for
_MAX_REMEMBERED = 10_000


def pull_auth(service: Puller, ref, credentials: Credentials | None) -> tuple[str, str] | None:
    """(kind, secret material) a pull of ``ref`` by this caller would present, or None.

    ``kind`` says whose credential it is; the material is only ever hashed.
    """
    if isinstance(ref, HTTPRef):
        if credentials is not None:
            return "credentials", credentials.header
        if ref.userinfo:
            return "credentials", "userinfo:" + ref.userinfo
        if ref.signed:
            return "signed", ref.signed
        return None
    if isinstance(ref, OCIRef):
        return ("credentials", credentials.header) if credentials is not None else None
    if isinstance(ref, HFRef):
        if credentials is not None:
            return "credentials", credentials.header
        from nekko_sm.sources.hf_api import auth_header

        node = auth_header(_job(service, None), ref)
        return ("node", node) if node else None
    return None


def credential_hash(auth: tuple[str, str] | None) -> str:
    if auth is None:
        return "anonymous"
    import hashlib  # here: loading OpenSSL is a cost status, path and ls need not pay

    return hashlib.sha256(f"{auth[0]}\0{auth[1]}".encode()).hexdigest()


class AccessChecks:
    """Confirmations the upstream gave, per (entry, credential hash), for a bounded time."""

    def __init__(self, ttl: float = CONFIRMED_FOR) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.asked = 0  # upstream questions asked (for /metrics and the tests)

    def remembered(self, key: str, cred: str) -> bool:
        with self._lock:
            until = self._until.get((key, cred))
            if until is None:
                return False
            if until < time.monotonic():
                del self._until[(key, cred)]
                return False
            return True

    def remember(self, key: str, cred: str) -> None:
        with self._lock:
            self._until[(key, cred)] = time.monotonic() + self.ttl
            self._until.move_to_end((key, cred))
            while len(self._until) > _MAX_REMEMBERED:
                self._until.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            for k in [k for k in self._until if k[0] == key]:
                del self._until[k]

    def confirm(
        self, service: Puller, key: str, ref, desc: Descriptor, credentials: Credentials | None
    ) -> None:
        """Return when this caller may have the protected entry ``desc``; raise otherwise."""
        if desc.annotations.get(A_PROTECTED) is None:
            return
        if service.config.verify_cached_credentials == "never":
            return
        cred = credential_hash(pull_auth(service, ref, credentials))
        if self.remembered(key, cred):
            return
        with self._lock:
            self.asked += 1
        try:
            _ask_upstream(service, ref, desc, credentials)
        except (Unauthorized, Forbidden, UpstreamNotFound):
            raise
        except NekkoError as e:  # fail closed: no answer is no
            raise UpstreamUnavailable(
                f"{key} is a protected entry and its upstream could not confirm this caller's"
                f" access ({e.code}); nothing is handed out until it can"
            ) from None
        self.remember(key, cred)


def _job(service: Puller, credentials: Credentials | None):
    from nekko_sm.sources.base import Job

    return Job(
        service.config,
        service.store,
        service.transfer,
        None,  # type: ignore[arg-type]
        credentials,
    )


def _ask_upstream(service: Puller, ref, desc: Descriptor, credentials: Credentials | None) -> None:
    if isinstance(ref, OCIRef):
        from nekko_sm.sources import oci

        digest = desc.annotations.get("io.nekko.digest") or desc.digest
        oci.confirm_access(_job(service, credentials), ref, digest)
    elif isinstance(ref, HFRef):
        _ask_hub(service, ref, desc, credentials)
    elif isinstance(ref, HTTPRef):
        _ask_http(service, ref, credentials)


def _ask_hub(
    service: Puller, ref: HFRef, desc: Descriptor, credentials: Credentials | None
) -> None:
    from nekko_sm.record import replace
    from nekko_sm.sources import hf_api

    manifest = json.loads(service.store.read_blob(desc.digest))
    commit = (manifest.get("annotations") or {}).get("io.nekko.hf.commit") or ref.revision
    path = ref.path
    if not path:  # a whole repository: any one of its files proves access to the repo
        layers = manifest.get("layers") or [{}]
        path = (layers[0].get("annotations") or {}).get("org.opencontainers.image.title", "")
    job = _job(service, credentials)
    at = replace(ref, revision=commit, path=path)
    hf_api.file_metadata(
        job,
        at,
        hf_api.resolve_url(hf_api.base_url(job, at), at, path, commit),
        hf_api.auth_header(job, at),
    )


def _ask_http(service: Puller, ref: HTTPRef, credentials: Credentials | None) -> None:
    from nekko_sm.transfer import default_error

    if credentials is None and ref.userinfo:
        user, _, password = ref.userinfo.partition(":")
        credentials = Credentials.basic(user, password)
    auth = credentials.header if credentials is not None else None
    url = ref.fetch_url
    t = service.transfer
    r = t.request("HEAD", url, auth=auth)
    if r.status in (405, 501):  # HEAD refused: one byte of the body says as much
        r = t.request("GET", url, headers={"Range": "bytes=0-0"}, auth=auth, limit=1 << 16)
    if not 200 <= r.status < 300:
        raise default_error(r.status, redact(url), b"", r.headers)
