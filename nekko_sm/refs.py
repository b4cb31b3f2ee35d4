"""Parse and canonicalise the three URL schemes (DESIGN section 3).

The canonical URL is the cache key: the same content asked for in two spellings is one
entry.  Parsing never touches the network.
"""

from __future__ import annotations

import logging
import posixpath
import re
import string
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from nekko_sm.errors import InvalidReference, UnsafeName, UnsupportedScheme

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
HF_DEFAULT = "huggingface.co"

_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_OCI_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$"
)
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HF_SPECIAL_REV = re.compile(r"^(refs/pr/[0-9]+|refs/convert/[A-Za-z0-9_.-]+)(?:/|$)")
_URL_SAFE = "/%:@!$&'()*+,;=~-._"  # RFC 3986 pchar, "/" and existing %-escapes
_HF_REPO_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}
# What a pattern keeps as is in the canonical query; anything else is percent-encoded.
_PATTERN_SAFE = "*?[]!/:@,;-._~"
MAX_PATTERNS = 256

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


def _shown(url: str) -> str:
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


def _check_host(host: str, url: str) -> str:
    if not _HOST.match(host):
        shown = "with credentials" if "@" in host else repr(host)
        raise InvalidReference(f"bad registry host {shown} in {_shown(url)}")
    port = host.rsplit(":", 1)[1] if ":" in host and not host.endswith("]") else None
    if port is not None and not (0 < int(port) < 65536):
        raise InvalidReference(f"port out of range in {_shown(url)}")
    return host.lower()


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
        special = _HF_SPECIAL_REV.fullmatch(self.revision + "/")
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


def parse(url: str, hf_endpoint: str = "https://huggingface.co") -> OCIRef | HFRef | HTTPRef:
    if not isinstance(url, str) or not url.strip():
        raise InvalidReference("the url is empty")
    url = url.strip()
    if any(ord(c) < 32 or c == "\x7f" for c in url) or len(url) > 8192:
        raise InvalidReference("the url contains control characters or is too long")
    try:
        url.encode("utf-8")  # a lone surrogate (JSON "\ud800", undecodable argv) is no URL
    except UnicodeEncodeError:
        raise InvalidReference("the url is not valid Unicode text") from None
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise UnsupportedScheme(
            f"unsupported url {_shown(url)[:100]}: use oci://, hf://,"
            " huggingface://, http:// or https://"
        )
    if scheme == "oci":
        return parse_oci(url)
    if scheme in ("hf", "huggingface"):
        return parse_hf(url, hf_endpoint)
    if scheme in ("http", "https"):
        return parse_http(url)
    raise UnsupportedScheme(
        f"unsupported scheme {scheme!r}: use oci://, hf://, huggingface://, http:// or https://"
    )


_OCI_PLATFORM = re.compile(r"^(?:all|[a-z0-9_.-]+/[a-z0-9_.-]+(?:/[a-z0-9_.-]+)?)$")


def parse_oci(url: str) -> OCIRef:
    rest = url.split("://", 1)[1]
    rest, query_sep, query = rest.partition("?")
    platform = None
    if query_sep:
        key, _, value = query.partition("=")
        value = value.lower()
        if key != "platform" or not _OCI_PLATFORM.match(value):
            raise InvalidReference(
                f"{_shown(url)}: the only query an oci:// URL takes is"
                " ?platform=all or ?platform=os/arch[/variant]"
            )
        platform = value
    if "/" not in rest:
        raise InvalidReference(f"{_shown(url)}: expected oci://REGISTRY/REPOSITORY[:TAG|@DIGEST]")
    registry, name = rest.split("/", 1)
    registry = _check_host(registry, url)
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    digest = tag = None
    if "@" in name:
        name, digest = name.split("@", 1)
        if not _OCI_DIGEST.match(digest):
            raise InvalidReference(f"{_shown(url)}: digest must be sha256:<64 lowercase hex>")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidReference(f"{_shown(url)}: bad tag {tag!r}")
    if not name or not all(_REPO_COMPONENT.match(c) for c in name.split("/")):
        raise InvalidReference(
            f"{_shown(url)}: bad repository name {name!r} (lowercase letters, digits, . _ - and /)"
        )
    if registry == DOCKER_HUB and "/" not in name:
        name = "library/" + name
    if digest:
        tag = None
    elif tag is None:
        tag = "latest"
    return OCIRef(registry, name, tag, digest, platform)


def _endpoint_host(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidReference(f"HF_ENDPOINT must be an http(s) URL, not {endpoint!r}")
    return parts.netloc.lower()


def hf_pattern(pattern: object, url: str = "") -> str:
    """One include/exclude pattern in its canonical form: a backslash is a "/", a trailing
    "/" means everything below ("dir/" is "dir/*", as huggingface_hub reads it), leading
    "/" are dropped (repository paths have none)."""
    where = f" in {_shown(url)}" if url else ""
    if not isinstance(pattern, str):
        raise InvalidReference(f"an include/exclude pattern must be a string{where}")
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidReference(f"an include/exclude pattern is not valid Unicode{where}") from None
    if any(ord(c) < 32 or c == "\x7f" for c in pattern) or len(pattern) > 1024:
        raise InvalidReference(
            f"bad include/exclude pattern {pattern[:100]!r}{where}: control characters or too long"
        )
    p = pattern.replace("\\", "/")
    if p.endswith("/"):
        p += "*"
    p = p.lstrip("/")
    if not p:
        raise InvalidReference(f"empty include/exclude pattern{where}")
    return p


def _patterns(values, what: str, url: str = "") -> tuple:
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise InvalidReference(f'"{what}" must be a list of patterns')
    out = tuple(sorted({hf_pattern(v, url) for v in values}))
    if len(out) > MAX_PATTERNS:
        raise InvalidReference(f'at most {MAX_PATTERNS} "{what}" patterns')
    return out


def _hf_query(query: str, url: str) -> tuple[tuple, tuple]:
    """``include=P&exclude=Q…`` (each repeatable, any order) of an hf:// URL."""
    got: dict[str, list] = {"include": [], "exclude": []}
    for item in query.split("&"):
        if not item:
            continue
        key, eq, value = item.partition("=")
        try:
            key, value = unquote(key, errors="strict"), unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise InvalidReference(f"{_shown(url)}: the query is not UTF-8") from None
        if key not in got or not eq:
            raise InvalidReference(
                f"{_shown(url)}: unknown query {key[:40]!r}; an hf:// URL"
                " takes only include=PATTERN and exclude=PATTERN"
            )
        got[key].append(value)
    return (_patterns(got["include"], "include", url), _patterns(got["exclude"], "exclude", url))


def with_patterns(
    url: str, include=None, exclude=None, hf_endpoint: str = "https://huggingface.co"
) -> str:
    """``url`` with more include/exclude patterns (a pull's "include"/"exclude" fields),
    as its canonical URL; patterns belong to hf:// URLs only."""
    if not include and not exclude:
        return url
    ref = parse(url, hf_endpoint)
    if not isinstance(ref, HFRef):
        raise InvalidReference("include/exclude patterns apply to hf:// URLs only")
    inc = _patterns(list(ref.include) + list(_patterns(include or [], "include")), "include")
    exc = _patterns(list(ref.exclude) + list(_patterns(exclude or [], "exclude")), "exclude")
    return replace(ref, include=inc, exclude=exc).canonical


def parse_hf(url: str, hf_endpoint: str = "https://huggingface.co") -> HFRef:
    rest = url.split("://", 1)[1]
    rest = rest.split("#", 1)[0]
    rest, _, query = rest.partition("?")
    first, _, tail = rest.partition("/")
    if first == "":
        registry = _endpoint_host(hf_endpoint)
    elif ("." in first or ":" in first or first == "localhost") and "@" not in first:
        registry = _check_host(first, url)
    else:  # the Hub's own hf://org/name/file spelling
        registry = _endpoint_host(hf_endpoint)
        tail = rest
    if registry in ("hf.co", "www.huggingface.co"):
        registry = HF_DEFAULT
    segs = [s for s in tail.split("/") if s != ""]
    repo_type = "model"
    if segs and segs[0] in _HF_REPO_TYPES:
        repo_type = _HF_REPO_TYPES[segs.pop(0)]
    if len(segs) < 2:
        raise InvalidReference(f"{_shown(url)}: expected hf://REGISTRY/ORG/NAME[@REV][/PATH]")
    org, name = segs[0], segs[1]
    rest_segs = segs[2:]
    revision = "main"
    if "@" in org:
        raise InvalidReference(f"{_shown(url)}: '@' belongs after the repository name")
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = unquote(revision)
        joined = "/".join([revision] + rest_segs)
        m = _HF_SPECIAL_REV.match(joined)
        if m:
            revision = m.group(1)
            rest_segs = [s for s in joined[len(revision) :].split("/") if s]
        if (
            not revision
            or ".." in revision
            or any(c in " \\" or ord(c) < 32 or c == "\x7f" for c in revision)
        ):
            raise InvalidReference(f"{_shown(url)}: bad revision {revision!r}")
    if repo_type == "model" and org in _HF_REPO_TYPES:  # the Hub's own URLs reserve them
        raise InvalidReference(
            f"{_shown(url)}: {org!r} is not an organisation; a"
            f" {_HF_REPO_TYPES[org]} is hf://REGISTRY/{org}/ORG/NAME"
        )
    for part in (org, name):
        if not _HF_NAME.match(part) or ".." in part:
            raise InvalidReference(f"{_shown(url)}: bad repository name {org}/{name}")
    path = ""
    if rest_segs:
        path = safe_name(unquote("/".join(rest_segs)))
    include, exclude = _hf_query(query, url)
    return HFRef(registry, repo_type, f"{org}/{name}", revision, path, include, exclude)


def parse_http(url: str) -> HTTPRef:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        reason = "bad host or port" if "@" in str(e) else str(e)  # never echo userinfo
        raise InvalidReference(f"bad url {_shown(url)}: {reason}") from None
    if not parts.hostname:
        raise InvalidReference(f"{_shown(url)} has no host")
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = f"{host}:{port}"
    userinfo = None
    if "@" in parts.netloc:
        userinfo = unquote(parts.netloc.rsplit("@", 1)[0])
    # Percent-encode what a URL cannot hold as is (spaces, non-ASCII), as urllib3 would on
    # the wire: "a b" and "a%20b" are one key, and the canonical form re-parses to itself.
    path = quote(parts.path or "/", safe=_URL_SAFE)
    query = quote(parts.query, safe=_URL_SAFE + "?")
    kept = strip_query_credentials(query)
    signed = urlunsplit((scheme, host, path, query, "")) if kept != query else None
    return HTTPRef(urlunsplit((scheme, host, path, kept, "")), userinfo, signed)


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


class QueryCredentialFilter(logging.Filter):
    """For loggers that are not ours (urllib3 logs request targets at DEBUG)."""

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
    shown = quote(shown, safe=string.punctuation)
    return shown if len(shown) <= 300 else shown[:297] + "..."
