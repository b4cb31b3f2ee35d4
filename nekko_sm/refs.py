"""Parse and canonicalise the three URL schemes (DESIGN section 3).

The canonical URL is the cache key: the same content asked for in two spellings is one
entry.  Parsing never touches the network.
"""

from __future__ import annotations

import posixpath
import re
import string
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from nekko_sm.errors import InvalidReference, UnsafeName, UnsupportedScheme

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
HF_DEFAULT = "huggingface.co"

_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_OCI_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HF_SPECIAL_REV = re.compile(r"^(refs/pr/[0-9]+|refs/convert/[A-Za-z0-9_.-]+)(?:/|$)")
_URL_SAFE = "/%:@!$&'()*+,;=~-._"  # RFC 3986 pchar, "/" and existing %-escapes
_HF_REPO_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}


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
    path: str  # "" for the whole repository

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
        return f"hf://{self.registry}/{self.type_prefix}{self.repo_id}@{rev}{tail}"

    @property
    def quoted_revision(self) -> str:
        return quote(self.revision, safe="")

    scheme = "hf"


@dataclass(frozen=True)
class HTTPRef:
    url: str  # canonical, without userinfo or fragment
    userinfo: str | None  # "user:pass" from the URL, used as Basic credentials if none given

    @property
    def canonical(self) -> str:
        return self.url

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
        raise UnsupportedScheme(f"unsupported url {_shown(url)[:100]}: use oci://, hf://,"
                                " huggingface://, http:// or https://")
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
            raise InvalidReference(f"{_shown(url)}: the only query an oci:// URL takes is"
                                   " ?platform=all or ?platform=os/arch[/variant]")
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


def parse_hf(url: str, hf_endpoint: str = "https://huggingface.co") -> HFRef:
    rest = url.split("://", 1)[1]
    rest = rest.split("?", 1)[0].split("#", 1)[0]
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
            rest_segs = [s for s in joined[len(revision):].split("/") if s]
        if (not revision or ".." in revision
                or any(c in " \\" or ord(c) < 32 or c == "\x7f" for c in revision)):
            raise InvalidReference(f"{_shown(url)}: bad revision {revision!r}")
    if repo_type == "model" and org in _HF_REPO_TYPES:  # the Hub's own URLs reserve them
        raise InvalidReference(f"{_shown(url)}: {org!r} is not an organisation; a"
                               f" {_HF_REPO_TYPES[org]} is hf://REGISTRY/{org}/ORG/NAME")
    for part in (org, name):
        if not _HF_NAME.match(part) or ".." in part:
            raise InvalidReference(f"{_shown(url)}: bad repository name {org}/{name}")
    path = ""
    if rest_segs:
        path = safe_name(unquote("/".join(rest_segs)))
    return HFRef(registry, repo_type, f"{org}/{name}", revision, path)


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
    return HTTPRef(urlunsplit((scheme, host, path, query, "")), userinfo)


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
