"""Who may call the API (DESIGN section 10): its Bearer token and the loopback names.

:class:`ApiToken` holds the hash of the token of ``--api-token-file`` (never the token
itself), re-reads the file when it changes or on SIGHUP, and compares in constant time;
:func:`is_loopback` and :func:`host_of` tell whether a Host header names this machine (a
server on loopback answers no other name: DNS rebinding).  It decides nothing about a
request by itself and never answers one: the handler in :mod:`nekko_sm.api_http` asks.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import threading

from nekko_sm.config_values import read_api_token
from nekko_sm.errors import ConfigError

log = logging.getLogger("nekko_sm.api")


class ApiToken:
    """The API's Bearer token, from ``--api-token-file``: re-read when the file changes (a
    Kubernetes Secret is updated in place) and on SIGHUP.  Only its hash is kept."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._digest = b""
        self.reload(strict=True)

    def _identity(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, strict: bool = False) -> bool:
        """Read the file again; a file that cannot be read keeps the token we have."""
        with self._lock:
            stamp = self._identity()
            try:
                token = read_api_token(self.path)
            except ConfigError as e:
                if strict:
                    raise
                self._stamp = stamp  # do not retry a bad file on every request
                log.warning("%s; still using the API token read before", e.message)
                return False
            self._digest = hashlib.sha256(token.encode()).digest()
            self._stamp = stamp
            return True

    def accepts(self, authorization: str | None) -> bool:
        if self._identity() != self._stamp and self.reload():
            log.info("the API token file %s changed: token re-read", self.path)
        scheme, _, given = (authorization or "").strip().partition(" ")
        given_digest = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
        ok = hmac.compare_digest(given_digest, self._digest)  # constant time, any length
        return ok and scheme.lower() == "bearer"


@functools.lru_cache(maxsize=256)  # per request, and the same few Host values each time
def is_loopback(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host of a Host header value, without its port."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header
