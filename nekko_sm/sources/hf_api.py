"""Asking the Hugging Face Hub: where, with which token, a file's metadata, a tree, a commit.

This module owns every question nekko-sm puts to the Hub's API and how it reads the answers,
as ``huggingface_hub`` does: the endpoint and the token a repository gets (HF_TOKEN only to
the HF_ENDPOINT's host, and only for the repositories NEKKO_HF_TOKEN_REPOS allows), a file's
metadata from a ``HEAD`` of its ``resolve`` URL (same-host redirects followed with the token,
another host's not: ``X-Linked-Etag``, ``X-Linked-Size``, ``X-Xet-Hash``, ``X-Repo-Commit``;
a CDN's or the Xet bridge's own ``ETag`` is never taken for the sha256), a revision resolved
to its commit, the paged recursive tree listing (``Link: rel="next"``, directories and
``xetHash`` ignored), and :func:`hub_error`, the one translator of the Hub's errors (its
``X-Error-Code``, the anonymous ``401`` of a private or missing repository, the ``429`` rate
limit's bucket and when to retry).  It never downloads a file's bytes and never writes to the
store: that is :mod:`nekko_sm.sources.hf`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from nekko_sm import retrying
from nekko_sm.errors import (
    Forbidden,
    GatedRepo,
    NekkoError,
    PullTooLarge,
    Unauthorized,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.httpio import content_range
from nekko_sm.refs import HFRef, redact, safe_name
from nekko_sm.sources.base import Job
from nekko_sm.transfer import MAX_REDIRECTS, REDIRECT_STATUSES, default_error

log = logging.getLogger("nekko_sm.sources.hf")

MAX_TREE_PAGES = 10_000

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")
_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)
_API_PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}


# -- errors ------------------------------------------------------------------------------


def repo_name(ref: HFRef) -> str:
    kind = "" if ref.repo_type == "model" else f"{ref.repo_type} "
    return f"{kind}{ref.registry}/{ref.repo_id}"


def _token_hint() -> str:
    return "pass a token (credentials or HF_TOKEN)"


def hub_error(
    ref: HFRef,
    path: str | None = None,
    authenticated: bool = False,
    size: int | None = None,
) -> Callable[[int, str, bytes, Mapping[str, str]], NekkoError]:
    """The Hub's error translator for requests about ``ref`` (and file ``path``)."""
    repo = repo_name(ref)

    def translate(status: int, url: str, body: bytes, headers: Mapping[str, str]) -> NekkoError:
        err = _translate(status, url, body, headers)
        err.context["hf_code"] = headers.get("X-Error-Code") or ""
        return err

    def _translate(status: int, url: str, body: bytes, headers: Mapping[str, str]) -> NekkoError:
        code = headers.get("X-Error-Code") or ""
        message = headers.get("X-Error-Message") or ""
        if code == "GatedRepo":
            if authenticated:
                return GatedRepo(
                    f"{repo} is gated and the token has no access to it: accept"
                    " its conditions on the Hub with the token's account",
                    upstream_status=status,
                )
            return GatedRepo(
                f"{repo} is gated: accept its conditions on the Hub and pass a"
                " token (credentials or HF_TOKEN)",
                upstream_status=status,
            )
        if code == "RepoNotFound" or (
            status == 401
            and not authenticated
            and not code
            and message.startswith("Invalid username or password")
        ):
            # Anonymous callers get 401 "Invalid username or password." (often without a
            # code) for a private repository and for one that does not exist alike.
            if authenticated:
                return UpstreamNotFound(
                    f"repository {repo} not found (or the token cannot see it)",
                    upstream_status=status,
                )
            return UpstreamNotFound(
                f"repository {repo} not found, or it is private: {_token_hint()}",
                upstream_status=status,
            )
        if code == "RevisionNotFound":
            return UpstreamNotFound(
                f"revision {ref.revision!r} not found in {repo}", upstream_status=status
            )
        if code == "EntryNotFound":
            what = f"file {path!r}" if path else "path"
            return UpstreamNotFound(
                f"{what} not found in {repo} at revision {ref.revision!r}", upstream_status=status
            )
        if status == 401 and (
            message.startswith(("Invalid credentials", "Invalid username")) or authenticated
        ):
            return Unauthorized(f"{ref.registry} refused the token: invalid credentials (401)")
        if message == "Access to this resource is disabled.":
            return Forbidden(f"{repo} is disabled on the Hub (403)")
        if status == 429:
            rl = retrying.parse(headers)
            named = rl.bucket if rl and rl.bucket in ("api", "resolvers", "pages") else None
            bucket = (
                (
                    f"its {named!r} rate limit is used up"
                    if named
                    else "its rate limit is"
                    " used up"  # a bucket name the Hub does not use is not echoed
                )
                if rl
                else ""
            )
            bucket = (
                (
                    bucket
                    + (
                        f" ({rl.quota} requests per {rl.window} s)"
                        if rl.quota and rl.window
                        else ""
                    )
                    + f"; try again in {rl.reset} s"
                )
                if rl
                else "too many requests"
            )
            more = "" if authenticated else "; a token raises the limits"
            return UpstreamUnavailable(
                f"{ref.registry} answered 429 for {redact(url)}: {bucket}{more}",
                retry_after=retrying.wait_hint(status, headers),
            )
        if status == 400 and urlsplit(url).netloc.lower() != ref.registry:
            # The CDN or the Xet bridge: a GET of a huge file without Range (we always send
            # one past MAX_SPAN), or a file too large for the bridge even in ranges.
            big = f" ({size:,} bytes)" if size else ""
            return UpstreamError(
                f"{redact(url)} refused {path or 'the file'}{big} with 400: the Hub's download"
                " bridge does not serve files this large over plain HTTP (only the Xet"
                " protocol does, e.g. `hf download` with hf_xet); see huggingface/xet-core#592"
            )
        return default_error(status, url, body, headers)

    return translate


# -- where and with what -------------------------------------------------------------------


def endpoint_host(job: Job) -> str:
    return urlsplit(job.config.hf_endpoint).netloc.lower()


def base_url(job: Job, ref: HFRef) -> str:
    endpoint = job.config.hf_endpoint.rstrip("/")
    if endpoint_host(job) == ref.registry:
        return endpoint
    scheme = "http" if job.config.is_insecure(ref.registry) else "https"
    return f"{scheme}://{ref.registry}"


def auth_header(job: Job, ref: HFRef) -> str | None:
    """The caller's credentials, else HF_TOKEN, which goes only to the HF_ENDPOINT's host:
    with HF_ENDPOINT a mirror, to the mirror, never to huggingface.co nor to any other
    registry a URL names; with NEKKO_HF_TOKEN_REPOS, only for the repositories it names (the
    node's token is a policy, not a gift to every caller)."""
    if job.credentials is not None:
        return job.credentials.header
    token = job.config.hf_token
    if token and ref.registry == endpoint_host(job) and node_token_allowed(job.config, ref):
        return f"Bearer {token}"
    return None


def node_token_allowed(config, ref: HFRef) -> bool:
    """May HF_TOKEN be used for ``ref``'s repository (NEKKO_HF_TOKEN_REPOS patterns)?"""
    patterns = config.hf_token_repos
    if not patterns:
        return True
    names = (ref.repo_id, f"{ref.repo_type}s/{ref.repo_id}")
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def resolve_url(base: str, ref: HFRef, path: str, revision: str | None = None) -> str:
    rev = quote(revision, safe="") if revision else ref.quoted_revision
    return f"{base}/{ref.type_prefix}{ref.repo_id}/resolve/{rev}/{quote(path)}"


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    return scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(scheme)


def _unquote_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    return value.removeprefix("W/").strip('"') or None


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


# -- one file's metadata ---------------------------------------------------------------------


@dataclass
class FileMeta:
    commit: str | None
    etag: str | None  # the file's sha256 (LFS) or git blob id; never a CDN's own ETag
    size: int | None
    location: str  # where the bytes are (the CDN or the Xet bridge for LFS files)
    redirected: bool = False  # to another host: an LFS (or Xet) file
    xet_hash: str | None = None

    @property
    def sha256(self) -> str | None:
        return self.etag if self.etag and SHA256_HEX.match(self.etag) else None

    @property
    def git_oid(self) -> str | None:
        return self.etag if self.etag and SHA1_HEX.match(self.etag) else None


def file_metadata(job: Job, ref: HFRef, url: str, auth: str | None) -> FileMeta:
    """HEAD the resolve URL: follow same-host redirects (with the token), stop at another host.

    ``HEAD {base}/{prefix}{repo}/resolve/{rev}/{path}`` with ``Accept-Encoding: identity``;
    same-host (relative) redirects are followed with the token (a git file's ``307`` to
    ``/api/resolve-cache/…``, whose ``Content-Length`` is the redirect body's, not the
    file's), a redirect to another host (the LFS CDN, or the Xet bridge
    ``cas-bridge.xethub.hf.co``, 302 or 307) is not: that answer carries the file's
    ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and, for Xet-stored files,
    ``X-Xet-Hash`` and ``Link: <…>; rel="xet-auth"``.  ``X-Repo-Commit`` names the commit.
    The CDN's or the bridge's own ``ETag`` (an MD5, or the Xet hash) is never taken for the
    sha256.  When a cache in front of the Hub stripped ``X-Linked-Size``/``X-Linked-Etag``,
    the tree listing of the file's directory says them (``size``, ``lfs.oid``)."""
    errors = hub_error(ref, ref.path, auth is not None)
    origin = _origin(url)
    commit = None
    for _ in range(MAX_REDIRECTS + 1):
        r = job.transfer.request(
            "HEAD",
            url,
            headers={"Accept-Encoding": "identity"},
            auth=auth if _origin(url) == origin else None,
            follow_redirects=False,
        )
        commit = r.headers.get("X-Repo-Commit") or commit
        location = r.headers.get("Location")
        redirect = r.status in REDIRECT_STATUSES and bool(location)
        if not redirect and not 200 <= r.status < 300:
            err = errors(r.status, url, b"", r.headers)
            if commit and SHA1_HEX.match(commit):  # an EntryNotFound names the commit
                err.context["commit"] = commit
            raise err
        if redirect:
            target = urljoin(url, location)
            if urlsplit(target).scheme not in ("http", "https"):
                raise UpstreamError(f"{redact(url)} redirected to a non-http URL")
            if _origin(target) == _origin(url):
                url = target
                continue
            log.debug("%s: bytes are at %s", redact(url), redact(target))
        xet = _unquote_etag(r.headers.get("X-Xet-Hash"))
        etag = _unquote_etag(r.headers.get("X-Linked-Etag"))
        if etag is None and not redirect:
            # A direct answer's ETag is the file's (git blob id, or a mirror's sha256), but
            # never when it is the Xet hash; a redirect's own ETag describes its body.
            etag = _unquote_etag(r.headers.get("ETag"))
            etag = None if etag == xet else etag
        return FileMeta(
            commit=commit,
            etag=etag,
            size=_int(
                r.headers.get("X-Linked-Size")
                or (None if redirect else r.headers.get("Content-Length"))
            ),
            location=urljoin(url, location) if redirect else url,
            redirected=redirect,
            xet_hash=xet,
        )
    raise UpstreamError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")


def probe_size(job: Job, url: str) -> int | None:
    """The size of the file at the CDN ``url``: ``Content-Range`` of a one-byte ranged GET."""
    r = job.transfer.request("GET", url, headers={"Range": "bytes=0-0"}, limit=1 << 16)
    if r.status == 206:
        return content_range(r.headers.get("Content-Range"))[1]
    return None


@dataclass
class TreeFile:
    path: str
    size: int
    git_oid: str | None  # a regular file's git blob id (None for LFS files)
    sha256: str | None  # an LFS file's oid


def resolve_commit(job: Job, ref: HFRef, base: str, auth: str | None) -> str:
    """The commit ``ref.revision`` names:
    ``GET /api/{models|datasets|spaces}/{repo}/revision/{rev}``."""
    url = f"{base}/api/{_API_PLURAL[ref.repo_type]}/{ref.repo_id}/revision/{ref.quoted_revision}"
    r = job.transfer.request("GET", url, auth=auth)
    if r.status != 200:
        raise hub_error(ref, None, auth is not None)(r.status, r.url, r.data, r.headers)
    try:
        sha = json.loads(r.data)["sha"]
    except (ValueError, KeyError, TypeError):
        sha = None
    if not isinstance(sha, str) or not SHA1_HEX.match(sha):
        raise UpstreamError(f"{redact(url)}: the Hub's answer names no commit")
    return sha


def list_files(
    job: Job,
    ref: HFRef,
    base: str,
    commit: str,
    auth: str | None,
    path: str = "",
    recursive: bool = True,
) -> list:
    """Every file of the repository (under ``path``) at ``commit``, pages followed;
    directories are skipped.  A missing directory raises UpstreamNotFound.

    ``GET /api/{models|datasets|spaces}/{repo}/tree/{commit}[/{dir}]?recursive=true``,
    following the absolute ``Link: <…&cursor=…>; rel="next"`` (1,000 entries a page,
    directories mixed in; ``xetHash``, sometimes 64 asterisks, is not used)."""
    sub = "/" + quote(path) if path else ""
    url: str | None = (
        f"{base}/api/{_API_PLURAL[ref.repo_type]}/{ref.repo_id}/tree/"
        f"{quote(commit, safe='')}{sub}" + ("?recursive=true" if recursive else "")
    )
    origin = _origin(base)
    errors = hub_error(ref, None, auth is not None)
    out: dict[str, TreeFile] = {}
    seen: set = set()
    pages = 0
    while url:
        if url in seen or pages >= MAX_TREE_PAGES:
            raise UpstreamError(f"{redact(url)}: the tree listing does not end")
        seen.add(url)
        pages += 1
        r = job.transfer.request("GET", url, auth=auth if _origin(url) == origin else None)
        if r.status != 200:
            raise errors(r.status, r.url, r.data, r.headers)
        try:
            entries = json.loads(r.data)
        except ValueError as err:
            raise UpstreamError(f"{redact(url)}: the tree listing is not JSON") from err
        if not isinstance(entries, list):
            raise UpstreamError(f"{redact(url)}: the tree listing is not a list")
        for item in entries:
            if not isinstance(item, dict) or item.get("type") != "file":
                continue  # directories (and whatever else) are mixed in
            name, size = item.get("path"), item.get("size")
            if not isinstance(name, str) or not isinstance(size, int) or size < 0:
                raise UpstreamError(
                    f"{redact(url)}: the tree listing has an entry without a path or a size"
                )  # said, not echoed (finding 9)
            name = safe_name(name)
            lfs: dict = item["lfs"] if isinstance(item.get("lfs"), dict) else {}
            sha256 = lfs.get("oid") if isinstance(lfs.get("oid"), str) else None
            oid = item.get("oid") if isinstance(item.get("oid"), str) else None
            # "xetHash" (64 hex, or 64 asterisks where the Hub hides it) is no sha256: unused.
            out[name] = TreeFile(
                name,
                size,
                git_oid=oid if oid and SHA1_HEX.match(oid) and not lfs else None,
                sha256=sha256 if sha256 and SHA256_HEX.match(sha256) else None,
            )
            if len(out) > job.config.max_pull_files:  # files per repository
                raise PullTooLarge(
                    f"{repo_name(ref)} has more than {job.config.max_pull_files}"
                    " files, the most one pull may have on this node"
                    " (--max-pull-files): refused, nothing fetched"
                )
        m = _LINK_NEXT.search(r.headers.get("Link") or "")
        url = urljoin(url, m.group(1)) if m else None
    return [out[k] for k in sorted(out)]


def tree_entry(
    job: Job, ref: HFRef, base: str, commit: str, path: str, auth: str | None
) -> TreeFile | None:
    """The tree listing's entry of one file (its directory's listing, not recursive)."""
    try:
        files = list_files(job, ref, base, commit, auth, posixpath.dirname(path), False)
    except (UpstreamNotFound, UpstreamError):
        return None
    return next((f for f in files if f.path == path), None)
