"""Hugging Face Hub client: one file, or a whole repository at one commit.

What it asks the Hub, as ``huggingface_hub`` does:

* a file's metadata: ``HEAD {base}/{prefix}{repo}/resolve/{rev}/{path}`` with
  ``Accept-Encoding: identity``; same-host (relative) redirects are followed with the
  token, a redirect to another host (the LFS CDN) is not: that answer carries the file's
  ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``.  ``X-Repo-Commit`` names the commit.
* a repository: ``GET /api/{models|datasets|spaces}/{repo}/revision/{rev}`` for the commit,
  then ``GET /api/…/tree/{commit}?recursive=true``, following ``Link: <…>; rel="next"``.

Bytes always come from the ``resolve`` URL pinned to the commit, through
:meth:`Transfer.download`, which follows the redirect to the CDN without the token,
resumes with ``Range`` and asks the Hub again when a signed CDN URL has expired.

Integrity: an LFS file is verified against its sha256 (and its ingest is keyed by that
digest, so every pull of the same bytes shares one download); a regular git file against
its git blob id, ``sha1(b"blob SIZE\\0" + bytes)``; both against their size.

Errors: one translator, :func:`hub_error`, reads the Hub's ``X-Error-Code``.
"""

from __future__ import annotations

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

from nekko_sm.errors import (
    Cancelled,
    Forbidden,
    GatedRepo,
    IntegrityError,
    NekkoError,
    PullTooLarge,
    Unauthorized,
    UpstreamError,
    UpstreamNotFound,
)
from nekko_sm.refs import HF_DEFAULT, HFRef, redact, safe_name
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
from nekko_sm.transfer import MAX_REDIRECTS, REDIRECT_STATUSES, default_error

log = logging.getLogger("nekko_sm.sources.hf")

FILE_ARTIFACT_TYPE = "application/vnd.nekko.hf.file.v1"
REPO_ARTIFACT_TYPE = "application/vnd.nekko.hf.repo.v1"  # in base.DIRECTORY_ARTIFACT_TYPES

# The Hub's CDN refuses to send more than this in one response: bigger files are fetched
# in successive Range requests of at most this many bytes (a module constant tests lower).
MAX_SPAN = 50 * 1000**3

MAX_TREE_PAGES = 10_000

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.IGNORECASE)
_API_PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}


# -- errors ------------------------------------------------------------------------------


def _repo_name(ref: HFRef) -> str:
    kind = "" if ref.repo_type == "model" else f"{ref.repo_type} "
    return f"{kind}{ref.registry}/{ref.repo_id}"


def hub_error(ref: HFRef, path: str | None = None, authenticated: bool = False,
              ) -> Callable[[int, str, bytes, Mapping[str, str]], NekkoError]:
    """The Hub's error translator for requests about ``ref`` (and file ``path``)."""
    repo = _repo_name(ref)

    def translate(status: int, url: str, body: bytes, headers: Mapping[str, str]) -> NekkoError:
        code = headers.get("X-Error-Code") or ""
        message = headers.get("X-Error-Message") or ""
        if code == "GatedRepo":
            if authenticated:
                return GatedRepo(f"{repo} is gated and the token has no access to it: accept"
                                 " its conditions on the Hub with the token's account",
                                 upstream_status=status)
            return GatedRepo(f"{repo} is gated: accept its conditions on the Hub and pass a"
                             " token (credentials or HF_TOKEN)", upstream_status=status)
        if code == "RepoNotFound":
            hint = ("" if authenticated else
                    "; a private repository needs a token (credentials or HF_TOKEN)")
            return UpstreamNotFound(f"repository {repo} not found{hint}",
                                    upstream_status=status)
        if code == "RevisionNotFound":
            return UpstreamNotFound(f"revision {ref.revision!r} not found in {repo}",
                                    upstream_status=status)
        if code == "EntryNotFound":
            what = f"file {path!r}" if path else "path"
            return UpstreamNotFound(f"{what} not found in {repo} at revision {ref.revision!r}",
                                    upstream_status=status)
        if status == 401 and message.startswith("Invalid credentials"):
            return Unauthorized(f"{ref.registry} refused the token: invalid credentials (401)")
        if message == "Access to this resource is disabled.":
            return Forbidden(f"{repo} is disabled on the Hub (403)")
        return default_error(status, url, body, headers)

    return translate


# -- where and with what -------------------------------------------------------------------


def base_url(job: Job, ref: HFRef) -> str:
    endpoint = job.config.hf_endpoint.rstrip("/")
    if urlsplit(endpoint).netloc.lower() == ref.registry:
        return endpoint
    scheme = "http" if job.config.is_insecure(ref.registry) else "https"
    return f"{scheme}://{ref.registry}"


def auth_header(job: Job, ref: HFRef) -> str | None:
    """The caller's credentials, else HF_TOKEN, which goes only to the default endpoint's
    host (or huggingface.co itself), never to some other registry the URL names."""
    if job.credentials is not None:
        return job.credentials.header
    token = job.config.hf_token
    if token and ref.registry in (urlsplit(job.config.hf_endpoint).netloc.lower(), HF_DEFAULT):
        return f"Bearer {token}"
    return None


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
    etag: str | None
    size: int | None
    location: str  # where the bytes are (the CDN for LFS files)

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
            raise errors(r.status, url, b"", r.headers)
        if redirect:
            target = urljoin(url, location)
            if urlsplit(target).scheme not in ("http", "https"):
                raise UpstreamError(f"{redact(url)} redirected to a non-http URL")
            if _origin(target) == _origin(url):
                url = target
                continue
        if redirect:
            log.debug("%s: bytes are at %s", redact(url), redact(urljoin(url, location)))
        return FileMeta(
            commit=commit,
            etag=_unquote_etag(r.headers.get("X-Linked-Etag") or r.headers.get("ETag")),
            size=_int(r.headers.get("X-Linked-Size")
                      or (None if redirect else r.headers.get("Content-Length"))),
            location=urljoin(url, location) if redirect else url,
        )
    raise UpstreamError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")


# -- bytes ---------------------------------------------------------------------------------


def fetch(job: Job, url: str, auth: str | None, errors, size: int | None,
          sha256: str | None, git_oid: str | None, expected: str | None = None,
          count_total: bool = True) -> tuple[str, int]:
    """Make sure the file at ``url`` is a verified blob; returns (digest, size)."""
    # Only a digest the Hub vouches for (an LFS file's sha256) may answer from the cache
    # without a download; a caller's ``expected`` only checks the bytes the Hub serves.
    trusted = None
    if sha256 is not None:
        trusted = "sha256:" + sha256
        if expected is not None and expected != trusted:
            raise IntegrityError(f"{redact(url)} has digest {trusted} on the Hub,"
                                 f" not the {expected} asked for")
        expected = trusted
        job.lease.add(trusted)  # lease first, so gc cannot free it between check and use
        if size is not None and job.store.has_blob(trusted, size):
            return trusted, size

    hashers = None
    if trusted is not None:
        ingest_ref = trusted
    elif git_oid is not None:
        ingest_ref = f"hf-git:{git_oid}"
    else:
        ingest_ref = f"hf-url:{url}"
    if git_oid is not None and sha256 is None and size is not None:
        header = b"blob %d\x00" % size
        hashers = {"git": lambda: hashlib.sha1(header, usedforsecurity=False)}

    def on_total(total: int | None, offset: int) -> None:
        if total is not None:
            if count_total and job.progress.total is None:
                job.progress.expect(total)
                job.progress.add(offset)
            job.store.ensure_space(total - offset, redact(url))

    with job.writer(ingest_ref, size, hashers) as w:
        if trusted is not None and size is not None and job.store.has_blob(trusted, size):
            return trusted, size  # someone else committed it while we waited for the lock
        job.transfer.download(url, w, auth=auth, expected_size=size,
                              immutable=trusted is not None or git_oid is not None,
                              errors=errors, progress=job.progress.add, on_total=on_total,
                              max_span=MAX_SPAN)
        if hashers and w.offset == size and w.hexdigest("git") != git_oid:
            w.discard()
            raise IntegrityError(f"{redact(url)}: content has git blob id {w.hexdigest('git')},"
                                 f" expected {git_oid}; nothing was stored")
        desc = w.commit(expected, job.lease)
    return desc.digest, desc.size


# -- pull ------------------------------------------------------------------------------------


def pull(job: Job, ref: HFRef) -> PullResult:
    if ref.path:
        return _pull_file(job, ref)
    return _pull_repo(job, ref)


def _pull_file(job: Job, ref: HFRef) -> PullResult:
    base = base_url(job, ref)
    auth = auth_header(job, ref)
    meta = file_metadata(job, ref, resolve_url(base, ref, ref.path), auth)
    commit = meta.commit if meta.commit and _SHA1.match(meta.commit) else None
    # Pin the download to the commit the metadata describes: a branch may move meanwhile.
    url = resolve_url(base, ref, ref.path, commit)
    digest, size = fetch(job, url, auth, hub_error(ref, ref.path, auth is not None),
                         meta.size, meta.sha256, meta.git_oid, expected=job.digest)
    files = [FileItem(posixpath.basename(ref.path), digest, size)]
    manifest = store_artifact(job, files, FILE_ARTIFACT_TYPE, {
        A_SOURCE_URL: url, A_HF_COMMIT: commit, A_ETAG: meta.etag})
    return PullResult(manifest, digest, files)


@dataclass
class TreeFile:
    path: str
    size: int
    git_oid: str | None
    sha256: str | None


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


def list_files(job: Job, ref: HFRef, base: str, commit: str, auth: str | None) -> list:
    """Every file of the repository at ``commit`` (directories skipped), pages followed."""
    url: str | None = (f"{base}/api/{_API_PLURAL[ref.repo_type]}/{ref.repo_id}/tree/{commit}"
                       "?recursive=true")
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
        for e in entries:
            if not isinstance(e, dict) or e.get("type") != "file":
                continue
            path, size = e.get("path"), e.get("size")
            if not isinstance(path, str) or not isinstance(size, int) or size < 0:
                raise UpstreamError(f"{redact(url)}: the tree listing has an entry without"
                                    " a path or a size")  # said, not echoed (finding 9)
            name = safe_name(path)
            lfs = e["lfs"] if isinstance(e.get("lfs"), dict) else {}
            sha256 = lfs.get("oid") if isinstance(lfs.get("oid"), str) else None
            oid = e.get("oid") if isinstance(e.get("oid"), str) else None
            out[name] = TreeFile(
                name, size,
                git_oid=oid if oid and _SHA1.match(oid) and sha256 is None else None,
                sha256=sha256 if sha256 and _SHA256.match(sha256) else None,
            )
            if len(out) > job.config.max_pull_files:  # files per repository
                raise PullTooLarge(f"{_repo_name(ref)} has more than {job.config.max_pull_files}"
                                   " files, the most one pull may have on this node"
                                   " (--max-pull-files): refused, nothing fetched")
        m = _LINK_NEXT.search(r.headers.get("Link") or "")
        url = urljoin(url, m.group(1)) if m else None
    return [out[k] for k in sorted(out)]


class _EitherSet:
    """Set when either event is: the pull's cancel, or the first failure among the files."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _pull_repo(job: Job, ref: HFRef) -> PullResult:
    base = base_url(job, ref)
    auth = auth_header(job, ref)
    commit = resolve_commit(job, ref, base, auth)
    tree = list_files(job, ref, base, commit, auth)
    check_names((f.path for f in tree), ref.canonical)  # before any byte (finding 8)
    missing = [f for f in tree
               if not (f.sha256 and job.store.has_blob("sha256:" + f.sha256, f.size))]
    job.progress.expect(sum(f.size for f in tree))
    job.progress.add(sum(f.size for f in tree) - sum(f.size for f in missing))
    job.store.ensure_space(sum(f.size for f in missing), ref.canonical)

    failed = threading.Event()
    sub = replace(job, cancel=_EitherSet(job.cancel, failed))  # type: ignore[arg-type]
    results: dict[str, tuple[str, int]] = {}

    def one(f: TreeFile) -> None:
        if failed.is_set() or job.cancel.is_set():
            return
        try:
            results[f.path] = fetch(
                sub, resolve_url(base, ref, f.path, commit), auth,
                hub_error(ref, f.path, auth is not None), f.size, f.sha256, f.git_oid,
                count_total=False)
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

    files = [FileItem(f.path, *results[f.path]) for f in tree]
    manifest = store_artifact(job, files, REPO_ARTIFACT_TYPE, {
        A_SOURCE_URL: f"{base}/{ref.type_prefix}{ref.repo_id}/tree/{commit}",
        A_HF_COMMIT: commit})
    if job.digest is not None and job.digest != manifest.digest:
        raise IntegrityError(f"{ref.canonical} resolved to {manifest.digest},"
                             f" not the {job.digest} asked for")
    return PullResult(manifest, manifest.digest, files)
