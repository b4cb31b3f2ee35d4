"""Hugging Face Hub client: one file, a directory, or a whole repository at one commit.

What it asks the Hub, as ``huggingface_hub`` does:

* a file's metadata: ``HEAD {base}/{prefix}{repo}/resolve/{rev}/{path}`` with
  ``Accept-Encoding: identity``; same-host (relative) redirects are followed with the
  token (a git file's ``307`` to ``/api/resolve-cache/…``, whose ``Content-Length`` is the
  redirect body's, not the file's), a redirect to another host (the LFS CDN, or the Xet
  bridge ``cas-bridge.xethub.hf.co``, 302 or 307) is not: that answer carries the file's
  ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and, for Xet-stored files,
  ``X-Xet-Hash`` and ``Link: <…>; rel="xet-auth"``.  ``X-Repo-Commit`` names the commit.
  The CDN's or the bridge's own ``ETag`` (an MD5, or the Xet hash) is never taken for the
  sha256.  When a cache in front of the Hub stripped ``X-Linked-Size``/``X-Linked-Etag``,
  the tree listing of the file's directory says them (``size``, ``lfs.oid``).
* a repository or a directory: ``GET /api/{models|datasets|spaces}/{repo}/revision/{rev}``
  for the commit, then ``GET /api/…/tree/{commit}[/{dir}]?recursive=true``, following the
  absolute ``Link: <…&cursor=…>; rel="next"`` (1,000 entries a page, directories mixed in;
  ``xetHash``, sometimes 64 asterisks, is not used).

Bytes always come from the ``resolve`` URL pinned to the commit, through
:meth:`Transfer.download`, which follows the redirect to the CDN without the token,
resumes with ``Range`` (and asks in spans of at most :data:`MAX_SPAN`, as the CDN refuses
range-less answers over 50 GB) and asks the Hub again when a signed CDN URL has expired.

Integrity: an LFS file is verified against its sha256 (and its ingest is keyed by that
digest, so every pull of the same bytes shares one download); a regular git file against
its git blob id, ``sha1(b"blob SIZE\\0" + bytes)``; both against their size.  A verified git
file's sha256 is remembered (:mod:`nekko_sm.sources.hf_oids`), so the next pull of the
repository, at any commit, fetches only the files that changed.

Errors: one translator, :func:`hub_error`, reads the Hub's ``X-Error-Code`` (and what the
Hub says without one: ``401 Invalid username or password.`` to an anonymous caller means a
private or missing repository; ``429`` names the rate-limit bucket and when to retry).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import posixpath
import re
import threading
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from nekko_sm import retrying
from nekko_sm.errors import (
    Cancelled,
    Forbidden,
    GatedRepo,
    IntegrityError,
    NekkoError,
    PullTooLarge,
    SizeMismatch,
    Unauthorized,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.httpio import content_range
from nekko_sm.models.hfcache import HFEntry, HFFile
from nekko_sm.refs import HFRef, redact, safe_name
from nekko_sm.sources.base import (
    A_ETAG,
    A_HF_COMMIT,
    A_SOURCE_URL,
    FileItem,
    Job,
    PullResult,
    check_names,
    store_artifact,
)
from nekko_sm.sources.hf_oids import GitOids
from nekko_sm.transfer import MAX_REDIRECTS, REDIRECT_STATUSES, default_error

log = logging.getLogger("nekko_sm.sources.hf")

FILE_ARTIFACT_TYPE = "application/vnd.nekko.hf.file.v1"
REPO_ARTIFACT_TYPE = "application/vnd.nekko.hf.repo.v1"  # in base.DIRECTORY_ARTIFACT_TYPES

# The Hub's CDN refuses to send more than this in one response: bigger files are fetched
# in successive Range requests of at most this many bytes (a module constant tests lower).
MAX_SPAN = 50 * 1000**3

MAX_TREE_PAGES = 10_000

# A git file up to this size comes in one request into memory and goes to the store in one
# write: no resume state for bytes a retry fetches again in less time than the state costs
# (config files, tokenizers, code: a repository of many small files is mostly this).
SMALL_FILE = 64 * 1024

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)
_API_PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}


# -- errors ------------------------------------------------------------------------------


def _repo_name(ref: HFRef) -> str:
    kind = "" if ref.repo_type == "model" else f"{ref.repo_type} "
    return f"{kind}{ref.registry}/{ref.repo_id}"


def _token_hint() -> str:
    return "pass a token (credentials or HF_TOKEN)"


def hub_error(ref: HFRef, path: str | None = None, authenticated: bool = False,
              size: int | None = None,
              ) -> Callable[[int, str, bytes, Mapping[str, str]], NekkoError]:
    """The Hub's error translator for requests about ``ref`` (and file ``path``)."""
    repo = _repo_name(ref)

    def translate(status: int, url: str, body: bytes, headers: Mapping[str, str]) -> NekkoError:
        err = _translate(status, url, body, headers)
        err.context["hf_code"] = headers.get("X-Error-Code") or ""
        return err

    def _translate(status: int, url: str, body: bytes, headers: Mapping[str, str]) -> NekkoError:
        code = headers.get("X-Error-Code") or ""
        message = headers.get("X-Error-Message") or ""
        if code == "GatedRepo":
            if authenticated:
                return GatedRepo(f"{repo} is gated and the token has no access to it: accept"
                                 " its conditions on the Hub with the token's account",
                                 upstream_status=status)
            return GatedRepo(f"{repo} is gated: accept its conditions on the Hub and pass a"
                             " token (credentials or HF_TOKEN)", upstream_status=status)
        if code == "RepoNotFound" or (status == 401 and not authenticated and not code
                                      and message.startswith("Invalid username or password")):
            # Anonymous callers get 401 "Invalid username or password." (often without a
            # code) for a private repository and for one that does not exist alike.
            if authenticated:
                return UpstreamNotFound(f"repository {repo} not found (or the token cannot"
                                        " see it)", upstream_status=status)
            return UpstreamNotFound(f"repository {repo} not found, or it is private:"
                                    f" {_token_hint()}", upstream_status=status)
        if code == "RevisionNotFound":
            return UpstreamNotFound(f"revision {ref.revision!r} not found in {repo}",
                                    upstream_status=status)
        if code == "EntryNotFound":
            what = f"file {path!r}" if path else "path"
            return UpstreamNotFound(f"{what} not found in {repo} at revision {ref.revision!r}",
                                    upstream_status=status)
        if status == 401 and (message.startswith(("Invalid credentials", "Invalid username"))
                              or authenticated):
            return Unauthorized(f"{ref.registry} refused the token: invalid credentials (401)")
        if message == "Access to this resource is disabled.":
            return Forbidden(f"{repo} is disabled on the Hub (403)")
        if status == 429:
            rl = retrying.parse(headers)
            named = rl.bucket if rl and rl.bucket in ("api", "resolvers", "pages") else None
            bucket = (f"its {named!r} rate limit is used up" if named else "its rate limit is"
                      " used up"  # a bucket name the Hub does not use is not echoed
                      ) if rl else ""
            bucket = (bucket
                      + (f" ({rl.quota} requests per {rl.window} s)" if rl.quota and rl.window
                         else "")
                      + f"; try again in {rl.reset} s") if rl else "too many requests"
            more = "" if authenticated else "; a token raises the limits"
            return UpstreamUnavailable(f"{ref.registry} answered 429 for {redact(url)}:"
                                       f" {bucket}{more}",
                                       retry_after=retrying.wait_hint(status, headers))
        if status == 400 and urlsplit(url).netloc.lower() != ref.registry:
            # The CDN or the Xet bridge: a GET of a huge file without Range (we always send
            # one past MAX_SPAN), or a file too large for the bridge even in ranges.
            big = f" ({size:,} bytes)" if size else ""
            return UpstreamError(
                f"{redact(url)} refused {path or 'the file'}{big} with 400: the Hub's download"
                " bridge does not serve files this large over plain HTTP (only the Xet"
                " protocol does, e.g. `hf download` with hf_xet); see huggingface/xet-core#592")
        return default_error(status, url, body, headers)

    return translate


# -- where and with what -------------------------------------------------------------------


def _endpoint_host(job: Job) -> str:
    return urlsplit(job.config.hf_endpoint).netloc.lower()


def base_url(job: Job, ref: HFRef) -> str:
    endpoint = job.config.hf_endpoint.rstrip("/")
    if _endpoint_host(job) == ref.registry:
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
    if token and ref.registry == _endpoint_host(job) and node_token_allowed(job.config, ref):
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


def _oids(job: Job, ref: HFRef) -> GitOids:
    return GitOids(job.store.root, ref.registry, ref.repo_type, ref.repo_id)


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
        return self.etag if self.etag and _SHA256.match(self.etag) else None

    @property
    def git_oid(self) -> str | None:
        return self.etag if self.etag and _SHA1.match(self.etag) else None


def file_metadata(job: Job, ref: HFRef, url: str, auth: str | None) -> FileMeta:
    """HEAD the resolve URL: follow same-host redirects (with the token), stop at another host."""
    errors = hub_error(ref, ref.path, auth is not None)
    origin = _origin(url)
    commit = None
    for _ in range(MAX_REDIRECTS + 1):
        r = job.transfer.request("HEAD", url, headers={"Accept-Encoding": "identity"},
                                 auth=auth if _origin(url) == origin else None,
                                 follow_redirects=False)
        commit = r.headers.get("X-Repo-Commit") or commit
        location = r.headers.get("Location")
        redirect = r.status in REDIRECT_STATUSES and bool(location)
        if not redirect and not 200 <= r.status < 300:
            err = errors(r.status, url, b"", r.headers)
            if commit and _SHA1.match(commit):  # an EntryNotFound names the commit
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
            commit=commit, etag=etag,
            size=_int(r.headers.get("X-Linked-Size")
                      or (None if redirect else r.headers.get("Content-Length"))),
            location=urljoin(url, location) if redirect else url,
            redirected=redirect, xet_hash=xet,
        )
    raise UpstreamError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")


def probe_size(job: Job, url: str) -> int | None:
    """The size of the file at the CDN ``url``: ``Content-Range`` of a one-byte ranged GET."""
    r = job.transfer.request("GET", url, headers={"Range": "bytes=0-0"}, limit=1 << 16)
    if r.status == 206:
        return content_range(r.headers.get("Content-Range"))[1]
    return None


# -- bytes ---------------------------------------------------------------------------------


def fetch(job: Job, url: str, auth: str | None, errors, size: int | None,
          sha256: str | None, git_oid: str | None, expected: str | None = None,
          count_total: bool = True, oids: GitOids | None = None) -> tuple[str, int]:
    """Make sure the file at ``url`` is a verified blob; returns (digest, size).

    ``sha256`` is what the Hub vouches for (an LFS oid), or what a verified download of the
    git blob ``git_oid`` hashed to (``oids``); only such a digest may select a blob the store
    has.  ``expected`` (the caller's) is checked against it, or against the bytes."""
    if sha256 is None and oids is not None:
        known = oids.lookup(git_oid, size)
        sha256 = known[len("sha256:"):] if known else None
    vouched = None
    if sha256 is not None:
        vouched = "sha256:" + sha256
        if expected is not None and expected != vouched:
            raise IntegrityError(f"{redact(url)} has digest {vouched} on the Hub,"
                                 f" not the {expected} asked for")
        expected = vouched
    if vouched is not None:
        job.lease.add(vouched)  # lease first, so gc cannot free it between check and use
        if size is not None and job.store.has_blob(vouched, size):
            return vouched, size

    if git_oid is not None and size is not None and size <= min(SMALL_FILE, MAX_SPAN):
        if count_total and job.progress.total is None:
            job.progress.expect(size)
        digest = _fetch_small(job, url, auth, errors, size, git_oid, expected)
        if oids is not None:
            oids.record(git_oid, digest, size)  # verified by _fetch_small
        return digest, size

    hashers = None
    if vouched is not None:
        ingest_ref = vouched
    elif git_oid is not None:
        ingest_ref = f"hf-git:{git_oid}"
    elif expected is not None:
        ingest_ref = expected
    else:
        ingest_ref = f"hf-url:{url}"
    if git_oid is not None and size is not None:
        header = b"blob %d\x00" % size
        hashers = {"git": lambda: hashlib.sha1(header, usedforsecurity=False)}

    def on_total(total: int | None, offset: int) -> None:
        if total is not None:
            if count_total and job.progress.total is None:
                job.progress.expect(total)
                job.progress.add(offset)
            job.ensure_space(total - offset, redact(url), offset)

    with job.writer(ingest_ref, size, hashers) as w:
        if vouched and size is not None and job.store.has_blob(vouched, size):
            return vouched, size  # someone else committed it while we waited for the lock
        job.transfer.download(url, w, auth=auth, expected_size=size,
                              immutable=vouched is not None or git_oid is not None,
                              errors=errors, progress=job.progress.add, on_total=on_total,
                              max_span=MAX_SPAN)
        if hashers and w.offset == size and w.hexdigest("git") != git_oid:
            w.discard()
            raise IntegrityError(f"{redact(url)}: content has git blob id {w.hexdigest('git')},"
                                 f" expected {git_oid}; nothing was stored")
        desc = w.commit(expected, job.lease)
    if hashers and oids is not None and git_oid is not None:
        # Verified above against the Hub's git id; the digest is the store's own hash.
        oids.record(git_oid, desc.digest, desc.size)
    return desc.digest, desc.size


def _fetch_small(job: Job, url: str, auth: str | None, errors, size: int, git_oid: str,
                 expected: str | None) -> str:
    """A small git file: one GET (retried whole), checked against its git blob id and size
    (and ``expected``), then stored in one write."""
    job.ensure_space(size, redact(url))
    r = job.transfer.request("GET", url, auth=auth, limit=max(size, 1 << 16))  # or an error
    if r.status != 200:
        raise errors(r.status, r.url, r.data, r.headers)
    if len(r.data) != size:
        raise SizeMismatch(f"{redact(url)}: got {len(r.data)} bytes, expected {size};"
                           " nothing was stored")
    got = hashlib.sha1(b"blob %d\x00" % size + r.data, usedforsecurity=False).hexdigest()
    if got != git_oid:
        raise IntegrityError(f"{redact(url)}: content has git blob id {got}, expected"
                             f" {git_oid}; nothing was stored")
    digest = job.store.put_bytes(r.data, job.lease, expected)  # checks ``expected``
    job.progress.add(size)
    return digest


# -- pull ------------------------------------------------------------------------------------


def pull(job: Job, ref: HFRef) -> PullResult:
    if not ref.path or ref.filtered:
        return _pull_tree(job, ref)
    try:
        return _pull_file(job, ref)
    except UpstreamNotFound as e:
        if e.context.get("hf_code") != "EntryNotFound" or not e.context.get("commit"):
            raise
        # Not a file: a directory names its sub-tree (else the file's error stands).
        try:
            return _pull_tree(job, ref, e.context["commit"])  # type: ignore[arg-type]
        except UpstreamNotFound as again:
            if again.context.get("hf_code") == "EntryNotFound":
                raise e from None
            raise


def _pull_file(job: Job, ref: HFRef) -> PullResult:
    base = base_url(job, ref)
    auth = auth_header(job, ref)
    meta = file_metadata(job, ref, resolve_url(base, ref, ref.path), auth)
    commit = meta.commit if meta.commit and _SHA1.match(meta.commit) else None
    # Pin the download to the commit the metadata describes: a branch may move meanwhile.
    url = resolve_url(base, ref, ref.path, commit)
    size, sha256, git_oid = meta.size, meta.sha256, meta.git_oid
    if size is None or (meta.redirected and sha256 is None):
        # A cache in front of the Hub stripped X-Linked-Size/X-Linked-Etag (or a proxy the
        # Content-Length of a HEAD): the tree listing of the file's directory says them.
        entry = tree_entry(job, ref, base, commit or ref.revision, ref.path, auth)
        if entry is not None:
            size = entry.size if size is None else size
            sha256 = sha256 or entry.sha256
            git_oid = git_oid or entry.git_oid
        if size is None and meta.redirected:
            size = probe_size(job, meta.location)
    digest, size = fetch(job, url, auth, hub_error(ref, ref.path, auth is not None, size),
                         size, sha256, git_oid, expected=job.digest, oids=_oids(job, ref))
    files = [FileItem(posixpath.basename(ref.path), digest, size)]
    manifest = store_artifact(job, files, FILE_ARTIFACT_TYPE, {
        A_SOURCE_URL: url, A_HF_COMMIT: commit, A_ETAG: meta.etag})
    view = _view(job, ref, commit, [HFFile(ref.path, digest, size, git_oid or sha256 or "")])
    return PullResult(manifest, digest, files, hf_view=view)


def _view(job: Job, ref: HFRef, commit: str | None, files: list) -> HFEntry | None:
    """What the Hugging Face cache view shows of this pull (DESIGN section 8): only for the
    default endpoint (the one HF_ENDPOINT names), and only with every file's ETag known."""
    if ref.registry != _endpoint_host(job) or not commit or not all(f.etag for f in files):
        return None
    return HFEntry(ref.canonical, ref.repo_type, ref.repo_id, ref.revision, commit,
                   tuple(files))


@dataclass
class TreeFile:
    path: str
    size: int
    git_oid: str | None  # a regular file's git blob id (None for LFS files)
    sha256: str | None  # an LFS file's oid


def resolve_commit(job: Job, ref: HFRef, base: str, auth: str | None) -> str:
    url = f"{base}/api/{_API_PLURAL[ref.repo_type]}/{ref.repo_id}/revision/{ref.quoted_revision}"
    r = job.transfer.request("GET", url, auth=auth)
    if r.status != 200:
        raise hub_error(ref, None, auth is not None)(r.status, r.url, r.data, r.headers)
    try:
        sha = json.loads(r.data)["sha"]
    except (ValueError, KeyError, TypeError):
        sha = None
    if not isinstance(sha, str) or not _SHA1.match(sha):
        raise UpstreamError(f"{redact(url)}: the Hub's answer names no commit")
    return sha


def list_files(job: Job, ref: HFRef, base: str, commit: str, auth: str | None,
               path: str = "", recursive: bool = True) -> list:
    """Every file of the repository (under ``path``) at ``commit``, pages followed;
    directories are skipped.  A missing directory raises UpstreamNotFound."""
    sub = "/" + quote(path) if path else ""
    url: str | None = (f"{base}/api/{_API_PLURAL[ref.repo_type]}/{ref.repo_id}/tree/"
                       f"{quote(commit, safe='')}{sub}" + ("?recursive=true" if recursive else ""))
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
                raise UpstreamError(f"{redact(url)}: the tree listing has an entry without"
                                    " a path or a size")  # said, not echoed (finding 9)
            name = safe_name(name)
            lfs: dict = item["lfs"] if isinstance(item.get("lfs"), dict) else {}
            sha256 = lfs.get("oid") if isinstance(lfs.get("oid"), str) else None
            oid = item.get("oid") if isinstance(item.get("oid"), str) else None
            # "xetHash" (64 hex, or 64 asterisks where the Hub hides it) is no sha256: unused.
            out[name] = TreeFile(
                name, size,
                git_oid=oid if oid and _SHA1.match(oid) and not lfs else None,
                sha256=sha256 if sha256 and _SHA256.match(sha256) else None,
            )
            if len(out) > job.config.max_pull_files:  # files per repository
                raise PullTooLarge(f"{_repo_name(ref)} has more than {job.config.max_pull_files}"
                                   " files, the most one pull may have on this node"
                                   " (--max-pull-files): refused, nothing fetched")
        m = _LINK_NEXT.search(r.headers.get("Link") or "")
        url = urljoin(url, m.group(1)) if m else None
    return [out[k] for k in sorted(out)]


def tree_entry(job: Job, ref: HFRef, base: str, commit: str, path: str,
               auth: str | None) -> TreeFile | None:
    """The tree listing's entry of one file (its directory's listing, not recursive)."""
    try:
        files = list_files(job, ref, base, commit, auth, posixpath.dirname(path), False)
    except (UpstreamNotFound, UpstreamError):
        return None
    return next((f for f in files if f.path == path), None)


class _EitherSet:
    """Set when either event is: the pull's cancel, or the first failure among the files."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _pull_tree(job: Job, ref: HFRef, commit: str | None = None) -> PullResult:
    """The whole repository, or the directory ``ref.path``, less what the patterns drop."""
    base = base_url(job, ref)
    auth = auth_header(job, ref)
    if commit is None:
        commit = resolve_commit(job, ref, base, auth)
    try:
        listed = list_files(job, ref, base, commit, auth, ref.path)
    except UpstreamNotFound as e:
        if ref.path and e.context.get("hf_code") == "EntryNotFound":
            raise UpstreamNotFound(f"no directory {ref.path!r} in {_repo_name(ref)} at"
                                   f" revision {ref.revision!r}", hf_code="EntryNotFound") from e
        raise
    tree = [f for f in listed if ref.wants(f.path)]
    check_names((f.path for f in tree), ref.canonical)  # before any byte (finding 8)
    if not tree and ref.filtered:
        raise UpstreamNotFound(f"no file of {_repo_name(ref)}"
                               f"{'/' + ref.path if ref.path else ''} at revision"
                               f" {ref.revision!r} matches {ref.canonical.partition('?')[2]}")
    oids = _oids(job, ref)
    for i, f in enumerate(tree):
        if f.sha256 is None and f.git_oid is not None:
            known = oids.lookup(f.git_oid, f.size)  # verified earlier: no download needed
            if known:
                tree[i] = replace(f, sha256=known[len("sha256:"):])
    missing = [f for f in tree
               if not (f.sha256 and job.store.has_blob("sha256:" + f.sha256, f.size))]
    job.progress.expect(sum(f.size for f in tree))
    job.progress.skip(sum(f.size for f in tree) - sum(f.size for f in missing))
    job.ensure_space(sum(f.size for f in missing), ref.canonical)

    failed = threading.Event()
    sub = replace(job, cancel=_EitherSet(job.cancel, failed))  # type: ignore[arg-type]
    results: dict[str, tuple[str, int]] = {}

    def one(f: TreeFile) -> None:
        if failed.is_set() or job.cancel.is_set():
            return
        try:
            results[f.path] = fetch(
                sub, resolve_url(base, ref, f.path, commit), auth,
                hub_error(ref, f.path, auth is not None, f.size), f.size, f.sha256, f.git_oid,
                count_total=False, oids=oids)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=max(1, min(job.config.jobs, len(tree) or 1)),
                            thread_name_prefix="hf") as pool:
        futures = [pool.submit(one, f) for f in tree]
        wait(futures, return_when=FIRST_EXCEPTION)
        for fut in futures:
            fut.cancel()
        wait(futures)
    errors = [x for x in (fut.exception() for fut in futures if not fut.cancelled()) if x]
    if errors:
        # The first failure, not the cancellations it caused in the other downloads.
        raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
    if job.cancel.is_set():
        raise Cancelled(f"pull of {ref.canonical} was cancelled")

    prefix = ref.path + "/" if ref.path else ""
    files = [FileItem(f.path[len(prefix):], *results[f.path], etag=f.git_oid or f.sha256)
             for f in tree]
    where = f"/{quote(ref.path)}" if ref.path else ""
    manifest = store_artifact(job, files, REPO_ARTIFACT_TYPE, {
        A_SOURCE_URL: f"{base}/{ref.type_prefix}{ref.repo_id}/tree/{commit}{where}",
        A_HF_COMMIT: commit})
    if job.digest is not None and job.digest != manifest.digest:
        raise IntegrityError(f"{ref.canonical} resolved to {manifest.digest},"
                             f" not the {job.digest} asked for")
    view = _view(job, ref, commit, [HFFile(f.path, *results[f.path], f.git_oid or f.sha256
                                           or "") for f in tree])
    return PullResult(manifest, manifest.digest, files, hf_view=view)
