"""Parse the three URL schemes into references (DESIGN section 3): ``oci://`` (registry,
repository, tag or digest, ``?platform=``), ``hf://`` and ``huggingface://`` (endpoint, repository
type, revision, path, ``include``/``exclude`` patterns) and ``http(s)://`` (userinfo and query
credentials kept apart from the key).  A bad URL is an :class:`~nekko_sm.errors.InvalidReference`
naming it without its secrets.  The references and their canonical forms are
:mod:`nekko_sm.refs`'s; parsing never touches the network.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from nekko_sm.errors import InvalidReference, UnsupportedScheme
from nekko_sm.record import replace
from nekko_sm.refs import (
    DOCKER_HUB,
    HF_DEFAULT,
    HF_SPECIAL_REV,
    HFRef,
    HTTPRef,
    OCIRef,
    safe_name,
    shown_url,
    strip_query_credentials,
)

_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_OCI_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL: never part of a URL
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_URL_SAFE = "/%:@!$&'()*+,;=~-._"  # RFC 3986 pchar, "/" and existing %-escapes
_HF_REPO_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}
MAX_PATTERNS = 256


def _check_host(host: str, url: str) -> str:
    if not _HOST.match(host):
        shown = "with credentials" if "@" in host else repr(host)
        raise InvalidReference(f"bad registry host {shown} in {shown_url(url)}")
    port = host.rsplit(":", 1)[1] if ":" in host and not host.endswith("]") else None
    if port is not None and not (0 < int(port) < 65536):
        raise InvalidReference(f"port out of range in {shown_url(url)}")
    return host.lower()


def parse(url: str, hf_endpoint: str = "https://huggingface.co") -> OCIRef | HFRef | HTTPRef:
    if not isinstance(url, str) or not url.strip():
        raise InvalidReference("the url is empty")
    url = url.strip()
    if len(url) > 8192 or _CONTROL.search(url):
        raise InvalidReference("the url contains control characters or is too long")
    try:
        url.encode("utf-8")  # a lone surrogate (JSON "\ud800", undecodable argv) is no URL
    except UnicodeEncodeError:
        raise InvalidReference("the url is not valid Unicode text") from None
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise UnsupportedScheme(
            f"unsupported url {shown_url(url)[:100]}: use oci://, hf://,"
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
                f"{shown_url(url)}: the only query an oci:// URL takes is"
                " ?platform=all or ?platform=os/arch[/variant]"
            )
        platform = value
    if "/" not in rest:
        raise InvalidReference(
            f"{shown_url(url)}: expected oci://REGISTRY/REPOSITORY[:TAG|@DIGEST]"
        )
    registry, name = rest.split("/", 1)
    registry = _check_host(registry, url)
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    digest = tag = None
    if "@" in name:
        name, digest = name.split("@", 1)
        if not _OCI_DIGEST.match(digest):
            raise InvalidReference(f"{shown_url(url)}: digest must be sha256:<64 lowercase hex>")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidReference(f"{shown_url(url)}: bad tag {tag!r}")
    if not name or not all(_REPO_COMPONENT.match(c) for c in name.split("/")):
        raise InvalidReference(
            f"{shown_url(url)}: bad repository name {name!r} (lowercase letters, digits, . _ - and /)"
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
    where = f" in {shown_url(url)}" if url else ""
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
            raise InvalidReference(f"{shown_url(url)}: the query is not UTF-8") from None
        if key not in got or not eq:
            raise InvalidReference(
                f"{shown_url(url)}: unknown query {key[:40]!r}; an hf:// URL"
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
        raise InvalidReference(f"{shown_url(url)}: expected hf://REGISTRY/ORG/NAME[@REV][/PATH]")
    org, name = segs[0], segs[1]
    rest_segs = segs[2:]
    revision = "main"
    if "@" in org:
        raise InvalidReference(f"{shown_url(url)}: '@' belongs after the repository name")
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = unquote(revision)
        joined = "/".join([revision] + rest_segs)
        m = HF_SPECIAL_REV.match(joined)
        if m:
            revision = m.group(1)
            rest_segs = [s for s in joined[len(revision) :].split("/") if s]
        if (
            not revision
            or ".." in revision
            or any(c in " \\" or ord(c) < 32 or c == "\x7f" for c in revision)
        ):
            raise InvalidReference(f"{shown_url(url)}: bad revision {revision!r}")
    if repo_type == "model" and org in _HF_REPO_TYPES:  # the Hub's own URLs reserve them
        raise InvalidReference(
            f"{shown_url(url)}: {org!r} is not an organisation; a"
            f" {_HF_REPO_TYPES[org]} is hf://REGISTRY/{org}/ORG/NAME"
        )
    for part in (org, name):
        if not _HF_NAME.match(part) or ".." in part:
            raise InvalidReference(f"{shown_url(url)}: bad repository name {org}/{name}")
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
        raise InvalidReference(f"bad url {shown_url(url)}: {reason}") from None
    if not parts.hostname:
        raise InvalidReference(f"{shown_url(url)} has no host")
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
