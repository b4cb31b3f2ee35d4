"""A registry front that bends the distribution spec the way ``registry.ollama.ai`` does.

In front of the real docker-registry of tests/peers/registry.py (its counting proxy, with
all of that proxy's records and options), on 127.0.0.1, this front:

* has no ``/v2/`` ping: ``GET /v2/`` is ``404 page not found`` (Go's default mux);
* serves manifests as ``Content-Type: text/plain; charset=utf-8``, without
  ``Content-Length`` and without ``Docker-Content-Digest``: the body ends when the connection
  closes;
* redirects every blob GET (``307``) to a presigned URL on a second host name, which may
  expire in the middle of the download (``expire_blob_urls_after``, bytes per URL): the
  client must ask the registry again for a new URL, as with Ollama's Cloudflare R2 URLs.

Use :func:`start_ollama_front` (in front of the ``registry`` fixture's docker-registry, say, as
tests/test_engine_ready.py's ``ollama`` fixture does): ``front.host`` is what nekko-sm is given
(``--insecure-registry``); ``peers.modelpacks.push_pack(front, ...)`` pushes to the registry
behind it (``direct``) and returns the front's ``oci://`` URL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from peers.registry import CountingProxy, Request, _ProxyHandler

TEXT_PLAIN = "text/plain; charset=utf-8"


class OllamaFront(CountingProxy):
    """A :class:`~peers.registry.CountingProxy` that answers as registry.ollama.ai does."""

    def __init__(
        self, backend: tuple[str, int], storage_dir: str | None = None, **options: Any
    ) -> None:
        options.setdefault("redirect_blobs", True)
        super().__init__(backend, storage_dir, **options)

    def proxy_handler(self) -> type:
        return _OllamaHandler

    def reset(self) -> None:
        """Records cleared; the options back to an Ollama front's (blobs redirected)."""
        super().reset()
        self.redirect_blobs = True


class _OllamaHandler(_ProxyHandler):
    server_version = "nekko-test-ollama/1"

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/v2", "/v2/"):
            self._not_found()
            return
        if "/manifests/" in path and self.command == "GET":
            self._manifest()
            return
        super()._handle()

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _not_found(self) -> None:
        body = b"404 page not found\n"
        self.proxy._record(
            Request(self.command, self.path, 404, "Authorization" in self.headers, None, len(body))
        )
        self._drain()
        self.send_response_only(404)
        self.send_header("Content-Type", TEXT_PLAIN)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _manifest(self) -> None:
        """The registry's answer, re-sent as text/plain, close-delimited."""
        resp = self._send_upstream("GET", self._headers_out(), None, False)
        body = resp.read()
        if resp.will_close:
            self._close_up()
        self.proxy._record(
            Request("GET", self.path, resp.status, "Authorization" in self.headers, None, len(body))
        )
        self.close_connection = True
        self.send_response_only(resp.status)
        self.send_header(
            "Content-Type",
            TEXT_PLAIN if resp.status == 200 else resp.getheader("Content-Type") or TEXT_PLAIN,
        )
        if resp.getheader("WWW-Authenticate"):
            self.send_header("WWW-Authenticate", resp.getheader("WWW-Authenticate"))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def start_ollama_front(registry: Any, **options: Any) -> OllamaFront:
    """An :class:`OllamaFront` before ``registry`` (a :class:`~peers.registry.RegistryPeer`).
    ``options``: the counting proxy's (``expire_blob_urls_after``, ``fail_with`` …)."""
    return OllamaFront(registry.backend, registry.storage_dir, **options)
