"""The references nekko-sm pulls and the keys they are cached under (DESIGN section 3).

An :class:`OCIRef`, :class:`HFRef` or :class:`HTTPRef` (made by :func:`nekko_sm.refparse.parse`)
knows its canonical URL: the cache key, so the same content asked for in two spellings is
one entry.  Beside them, what keeps a name or a URL safe: :func:`safe_name` for the file
names manifests and the Hub give, the query parameters that are credentials (never in a key,
a log or a message) and :func:`redact` for every URL a message shows.  It never parses a
URL into a reference and never touches the network.
"""

from __future__ import annotations

import posixpath
import re
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from nekko_sm.errors import UnsafeName
from nekko_sm.record import dataclass, field

if TYPE_CHECKING:
    import logging

# string.punctuation, spelled out: importing string compiles string.Template's pattern
_PUNCTUATION = r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"""

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
HF_DEFAULT = "huggingface.co"

HF_SPECIAL_REV = re.compile(r"^(refs/pr/[0-9]+|refs/convert/[A-Za-z0-9_.-]+)(?:/|$)")
# What a pattern keeps as is in the canonical query; anything else is percent-encoded.
_PATTERN_SAFE = "*?[]!/:@,;-._~"

# Query parameters that are credentials (signed URLs: AWS SigV4 and S3 v2, CloudFront, GCS,
# Azure SAS, and plain tokens): never part of a cache key, never logged or stored.
QUERY_CREDENTIALS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "signature",
        "policy",
        "key-pair-id",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "sig",
        "token",
        "access_token",
    }
)
# What each scheme signs along with them: it changes with every signature, not with the
# content, so it leaves the key too, but only when a credential above is in the query.
QUERY_SIGNING = frozenset(
    {
        "x-amz-algorithm",
        "x-amz-date",
        "x-amz-expires",
        "x-amz-signedheaders",
        "x-goog-algorithm",
        "x-goog-date",
        "x-goog-expires",
        "x-goog-signedheaders",
        "expires",
        "sv",
        "ss",
        "srt",
        "sp",
        "se",
        "st",
        "spr",
        "sip",
        "sr",
        "si",
        "sdd",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
    }
)


def safe_name(name: str) -> str:
    """Return ``name`` as a safe relative POSIX path, or raise UnsafeName.

    Refuses absolute paths, drive letters, ``..`` segments, backslashes, NUL and empty
    names: names come from manifests and the Hub and must not escape their directory.
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafeName(f"unsafe file name {name!r}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeName(f"unsafe file name {name!r}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UnsafeName(f"unsafe file name {name!r}: '..' is not allowed")
    if any(ord(c) < 32 for c in name):
        raise UnsafeName(f"unsafe file name {name!r}: control characters")
    return "/".join(parts)


def shown_url(url: str) -> str:
    """``url`` for an error message: userinfo (a password) removed, at most 200 characters."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    tail, q, query = tail.partition("?")
    if q:  # a signed URL's query is a credential: show that there was one, not what it said
        query, hash_, fragment = query.partition("#")
        tail += "?" + ("***" if has_query_credentials(query) else query) + hash_ + fragment
    return repr((scheme + sep + authority + slash + tail)[:200])


def _escape(text: str, slash: bool = True) -> str:
    """Percent-encode what parse() would decode or cut off, so canonical forms re-parse alike."""
    text = text.replace("%", "%25").replace("?", "%3F").replace("#", "%23")
    text = "".join(quote(c, safe="") if c.isspace() else c for c in text)  # parse() strips
    return text if slash else text.replace("/", "%2F")


@dataclass(frozen=True)
class OCIRef:
    registry: str  # host[:port] as the user names it ("docker.io" for Docker Hub)
    repository: str
    tag: str | None
    digest: str | None
    # "all" or os/arch[/variant] when the entry is for another platform than the host's:
    # part of the key, so each platform's image is its own entry (``?platform=`` in the URL).
    platform: str | None = None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    @property
    def canonical(self) -> str:
        query = f"?platform={self.platform}" if self.platform else ""
        if self.digest:
            return f"oci://{self.registry}/{self.repository}@{self.digest}{query}"
        return f"oci://{self.registry}/{self.repository}:{self.tag}{query}"

    scheme = "oci"


@dataclass(frozen=True)
class HFRef:
    registry: str  # host[:port]; "" never: parse() fills in the default endpoint's host
    repo_type: str  # model | dataset | space
    repo_id: str  # org/name
    revision: str  # branch, tag, 40-hex commit or refs/pr/N
    path: str  # "" for the whole repository; a file, or a directory (its sub-tree)
    include: tuple = ()  # fnmatch patterns (sorted, unique): keep only files matching one
    exclude: tuple = ()  # fnmatch patterns (sorted, unique): then drop files matching one

    @property
    def type_prefix(self) -> str:
        return "" if self.repo_type == "model" else self.repo_type + "s/"

    @property
    def canonical(self) -> str:
        tail = f"/{_escape(self.path)}" if self.path else ""
        # refs/pr/N and refs/convert/X keep their slashes (parse() knows them); any other
        # revision has its "/" encoded, so "@a%2Fb/f" and "@a/b/f" stay two different keys.
        special = HF_SPECIAL_REV.fullmatch(self.revision + "/")
        rev = _escape(self.revision, slash=bool(special))
        query = "&".join(
            [f"include={quote(p, safe=_PATTERN_SAFE)}" for p in self.include]
            + [f"exclude={quote(p, safe=_PATTERN_SAFE)}" for p in self.exclude]
        )
        return f"hf://{self.registry}/{self.type_prefix}{self.repo_id}@{rev}{tail}" + (
            f"?{query}" if query else ""
        )

    @property
    def filtered(self) -> bool:
        return bool(self.include or self.exclude)

    def wants(self, path: str) -> bool:
        """Whether the repository file ``path`` is selected, as huggingface_hub's
        ``allow_patterns``/``ignore_patterns`` select: ``fnmatchcase`` on the path in the
        repository, where ``*`` matches ``/`` too."""
        if self.include and not any(fnmatchcase(path, p) for p in self.include):
            return False
        return not any(fnmatchcase(path, p) for p in self.exclude)

    @property
    def quoted_revision(self) -> str:
        return quote(self.revision, safe="")

    scheme = "hf"


@dataclass(frozen=True)
class HTTPRef:
    url: str  # canonical, without userinfo, fragment or query credentials
    userinfo: str | None = field(repr=False)  # "user:pass" from the URL: Basic credentials
    signed: str | None = field(default=None, repr=False)  # the URL with its query credentials

    @property
    def canonical(self) -> str:
        return self.url

    @property
    def fetch_url(self) -> str:
        """The URL to send upstream: the canonical one plus any query credentials."""
        return self.signed or self.url

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def file_name(self) -> str:
        name = posixpath.basename(unquote(urlsplit(self.url).path))
        try:
            return safe_name(name)
        except UnsafeName:
            return "download"

    scheme = "http"


Ref = "OCIRef | HFRef | HTTPRef"


def _param_names(query: str) -> list[str]:
    return [unquote(p.split("=", 1)[0]).strip().lower() for p in query.split("&")]


def has_query_credentials(query: str) -> bool:
    return any(n in QUERY_CREDENTIALS for n in _param_names(query))


def strip_query_credentials(query: str) -> str:
    """``query`` without its credential parameters (and, then, what they sign along)."""
    if not has_query_credentials(query):
        return query
    parts = query.split("&")
    return "&".join(
        p
        for p, n in zip(parts, _param_names(query))
        if n not in QUERY_CREDENTIALS and n not in QUERY_SIGNING
    )


def hide_query_credentials(text: str) -> str:
    """``text`` (a URL, or a request target ``/path?query``) without query credentials."""
    head, q, rest = text.partition("?")
    query, hash_, fragment = rest.partition("#")
    if not q or not has_query_credentials(query):
        return text
    return f"{head}?{strip_query_credentials(query)}{hash_}{fragment}"


class QueryCredentialFilter:
    """For loggers that are not ours (urllib3 logs request targets at DEBUG).

    A filter as :mod:`logging` takes one (an object with ``filter``), not a subclass of its
    Filter: this module is loaded by commands that never import :mod:`logging`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                hide_query_credentials(a) if isinstance(a, str) else a for a in record.args
            )
        return True


def redact(url: str) -> str:
    """``url`` without userinfo and query (signed CDN URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    # A URL may come from upstream (a redirect's Location): nothing in it reaches a message
    # or a terminal but printable ASCII, and not much of it.
    shown = quote(shown, safe=_PUNCTUATION)
    return shown if len(shown) <= 300 else shown[:297] + "..."
