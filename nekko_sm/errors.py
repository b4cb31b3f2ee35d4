"""Every exception nekko-sm raises on purpose.

One root, :class:`NekkoError`.  Each subclass carries a stable kebab-case ``code``
(what API clients match on), the HTTP ``status`` the API answers with, and the
``exit_code`` the CLI returns.  Messages name what failed and what to do; they
never contain credentials.  This module imports nothing else from nekko_sm.
"""

from __future__ import annotations

# CLI exit statuses (DESIGN section 6).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_ABSENT = 4


class NekkoError(Exception):
    """The root.  A subclass names what sets it apart in its class line,
    ``class Busy(NekkoError, code="busy", status=503)``, and inherits the rest."""

    code = "internal-error"
    status = 500
    exit_code = EXIT_FAILED

    def __init_subclass__(
        cls,
        code: str | None = None,
        status: int | None = None,
        exit_code: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in (("code", code), ("status", status), ("exit_code", exit_code)):
            if value is not None:
                setattr(cls, name, value)

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


# --- the caller's fault: 4xx, exit 2 -------------------------------------------------


class ConfigError(NekkoError, ValueError, code="bad-configuration", exit_code=EXIT_USAGE): ...


class UnsafeCacheDir(ConfigError, code="unsafe-cache-dir"):
    """The cache directory (or one above it) could be changed by someone else: refused at
    start-up, as sshd's StrictModes refuses a home directory others can write."""


class BadRequest(NekkoError, ValueError, code="bad-request", status=400, exit_code=EXIT_USAGE): ...


class InvalidJSON(BadRequest, code="invalid-json"): ...


class InvalidBase64(BadRequest, code="invalid-base64"): ...


class InvalidReference(BadRequest, code="invalid-reference"): ...


class UnsupportedScheme(InvalidReference, code="unsupported-scheme"): ...


class InvalidDigest(BadRequest, code="invalid-digest"): ...


class UnsafeName(BadRequest, code="unsafe-name"):
    """A file name from a request, a manifest or the Hub that would escape its directory."""


class UnsafeLayer(UnsafeName, code="layer-unsafe"):
    """A layer whose contents would escape the model: absolute or ``..`` paths, links leaving
    it, devices, duplicate or colliding names, overlong or non-UTF-8 names."""


class InvalidPlatform(BadRequest, code="invalid-platform"): ...


class BodyTooLarge(BadRequest, code="body-too-large", status=413): ...


class MethodNotAllowed(BadRequest, code="method-not-allowed", status=405): ...


class UnsupportedMediaType(BadRequest, code="unsupported-media-type", status=415): ...


# --- who may call the API (DESIGN section 10) -----------------------------------------


class ApiUnauthorized(NekkoError, code="api-unauthorized", status=401, exit_code=EXIT_USAGE):
    """The API wants its Bearer token (--api-token-file) and did not get it."""


class OriginRefused(NekkoError, code="origin-refused", status=403, exit_code=EXIT_USAGE):
    """A request from a web page (it has an Origin header): the API is not for browsers."""


class MisdirectedRequest(NekkoError, code="misdirected-request", status=421, exit_code=EXIT_USAGE):
    """A Host header that does not name this loopback server (DNS rebinding)."""


# --- local state -----------------------------------------------------------------------


class EntryNotFound(NekkoError, LookupError, code="not-found", status=404, exit_code=EXIT_ABSENT):
    """The URL is not in the cache."""


class Conflict(NekkoError, code="conflict", status=409): ...


class Cancelled(Conflict, code="cancelled"):
    """The download was cancelled, e.g. by a DELETE of its entry."""


class InsufficientStorage(NekkoError, OSError, code="insufficient-storage", status=507): ...


class UnsupportedLayer(NekkoError, code="layer-unsupported", status=501):
    """A layer in a form this interpreter cannot read (zstd without ``compression.zstd``)."""


class CacheCorrupt(NekkoError, code="cache-corrupt"): ...


class UnsafeCachePath(CacheCorrupt, OSError, code="unsafe-cache-path"):
    """A symbolic link (or another kind of file) where the cache has its own directory or
    file: never followed.  An OSError too, so code that skips unreadable files skips it."""


class PullTooLarge(NekkoError, code="pull-too-large", status=413):
    """The pull would exceed --max-pull-size or --max-pull-files: the upstream is fine, the
    node's policy refuses it, and asking again will not help (413, as for a body too large)."""


class Busy(NekkoError, code="busy", status=503):
    """Too many pulls queued or connections open: try again shortly."""


# --- the upstream's answer ----------------------------------------------------------------


class UpstreamError(NekkoError, code="upstream-error", status=502):
    """The upstream failed, answered nonsense, or could not be reached."""


class UpstreamUnavailable(UpstreamError, code="upstream-unavailable"):
    """Temporary: connection refused or dropped, 408, 429, 5xx.  Worth a retry."""

    def __init__(self, message: str, retry_after: float | None = None, **context: object) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after


class UpstreamTooSlow(UpstreamError, code="upstream-too-slow"):
    """The upstream sends too slowly to be worth a worker (a trickle): not retried."""


class IntegrityError(UpstreamError, code="digest-mismatch"):
    """The bytes do not match the promised digest or size.  Nothing was committed."""


class SizeMismatch(IntegrityError, code="size-mismatch"): ...


class ManifestInvalid(UpstreamError, code="manifest-invalid"): ...


class BrokenLayer(UpstreamError, code="layer-invalid"):
    """A layer that verifies against its digest but is not what its media type says (a tar
    that does not read, an invalid whiteout).  The registry served it as it was pushed."""


class UpstreamNotFound(NekkoError, code="upstream-not-found", status=404): ...


class NoMatchingPlatform(UpstreamNotFound, code="no-matching-platform"): ...


class Unauthorized(NekkoError, code="unauthorized", status=401):
    """The upstream wants (other) credentials."""


class Forbidden(NekkoError, code="forbidden", status=403): ...


class GatedRepo(Forbidden, code="gated-repo"): ...


class EgressDenied(Forbidden, code="egress-denied", exit_code=EXIT_USAGE):
    """The destination is one nekko-sm does not connect to (the egress policy); retrying
    will not help: the configuration says no."""
