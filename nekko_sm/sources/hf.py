"""Hugging Face Hub client: one file, a directory, or a whole repository at one commit.

Bytes always come from the ``resolve`` URL pinned to the commit, through
:meth:`Transfer.download`, which follows the redirect to the CDN without the token,
resumes with ``Range`` (and asks in spans of at most :data:`MAX_SPAN`, as the CDN refuses
range-less answers over 50 GB) and asks the Hub again when a signed CDN URL has expired.

Integrity: an LFS file is verified against its sha256 (and its ingest is keyed by that
digest, so every pull of the same bytes shares one download); a regular git file against
its git blob id, ``sha1(b"blob SIZE\\0" + bytes)``; both against their size.  A verified git
file's sha256 is remembered (:mod:`nekko_sm.sources.hf_oids`), so the next pull of the
repository, at any commit, fetches only the files that changed.

This module owns the bytes and the entry: which files a pull wants, their downloads and
verification, and the artifact manifest and Hugging Face view that name them.  It never
asks the Hub's API itself: metadata, tree listings, commits and the error translator are
:mod:`nekko_sm.sources.hf_api`'s.
"""

from __future__ import annotations

import hashlib
import posixpath
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from urllib.parse import quote

from nekko_sm.errors import Cancelled, IntegrityError, SizeMismatch, UpstreamNotFound
from nekko_sm.models.hfcache import HFEntry, HFFile
from nekko_sm.record import replace
from nekko_sm.refs import HFRef, redact
from nekko_sm.sources.base import (
    A_ETAG,
    A_HF_COMMIT,
    A_SOURCE_URL,
    EitherSet,
    FileItem,
    Job,
    PullResult,
    check_names,
    file_result,
    store_artifact,
)
from nekko_sm.sources.hf_api import (
    SHA1_HEX,
    TreeFile,
    auth_header,
    base_url,
    endpoint_host,
    file_metadata,
    hub_error,
    list_files,
    probe_size,
    repo_name,
    resolve_commit,
    resolve_url,
    tree_entry,
)
from nekko_sm.sources.hf_oids import GitOids

FILE_ARTIFACT_TYPE = "application/vnd.nekko.hf.file.v1"
REPO_ARTIFACT_TYPE = "application/vnd.nekko.hf.repo.v1"  # in base.DIRECTORY_ARTIFACT_TYPES

# The Hub's CDN refuses to send more than this in one response: bigger files are fetched
# in successive Range requests of at most this many bytes (a module constant tests lower).
MAX_SPAN = 50 * 1000**3

# A git file up to this size comes in one request into memory and goes to the store in one
# write: no resume state for bytes a retry fetches again in less time than the state costs
# (config files, tokenizers, code: a repository of many small files is mostly this).
SMALL_FILE = 64 * 1024


def _oids(job: Job, ref: HFRef) -> GitOids:
    return GitOids(job.store, ref.registry, ref.repo_type, ref.repo_id)


# -- bytes ---------------------------------------------------------------------------------


def fetch(
    job: Job,
    url: str,
    auth: str | None,
    errors,
    size: int | None,
    sha256: str | None,
    git_oid: str | None,
    expected: str | None = None,
    count_total: bool = True,
    oids: GitOids | None = None,
) -> tuple[str, int]:
    """Make sure the file at ``url`` is a verified blob; returns (digest, size).

    ``sha256`` is what the Hub vouches for (an LFS oid), or what a verified download of the
    git blob ``git_oid`` hashed to (``oids``); only such a digest may select a blob the store
    has.  ``expected`` (the caller's) is checked against it, or against the bytes."""
    if sha256 is None and oids is not None:
        known = oids.lookup(git_oid, size)
        sha256 = known[len("sha256:") :] if known else None
    vouched = None
    if sha256 is not None:
        vouched = "sha256:" + sha256
        if expected is not None and expected != vouched:
            raise IntegrityError(
                f"{redact(url)} has digest {vouched} on the Hub, not the {expected} asked for"
            )
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
        job.transfer.download(
            url,
            w,
            auth=auth,
            expected_size=size,
            immutable=vouched is not None or git_oid is not None,
            errors=errors,
            progress=job.progress.add,
            on_total=on_total,
            max_span=MAX_SPAN,
        )
        if hashers and w.offset == size and w.hexdigest("git") != git_oid:
            w.discard()
            raise IntegrityError(
                f"{redact(url)}: content has git blob id {w.hexdigest('git')},"
                f" expected {git_oid}; nothing was stored"
            )
        desc = w.commit(expected, job.lease)
    if hashers and oids is not None and git_oid is not None:
        # Verified above against the Hub's git id; the digest is the store's own hash.
        oids.record(git_oid, desc.digest, desc.size)
    return desc.digest, desc.size


def _fetch_small(
    job: Job, url: str, auth: str | None, errors, size: int, git_oid: str, expected: str | None
) -> str:
    """A small git file: one GET (retried whole), checked against its git blob id and size
    (and ``expected``), then stored in one write."""
    job.ensure_space(size, redact(url))
    r = job.transfer.request("GET", url, auth=auth, limit=max(size, 1 << 16))  # or an error
    if r.status != 200:
        raise errors(r.status, r.url, r.data, r.headers)
    if len(r.data) != size:
        raise SizeMismatch(
            f"{redact(url)}: got {len(r.data)} bytes, expected {size}; nothing was stored"
        )
    got = hashlib.sha1(b"blob %d\x00" % size + r.data, usedforsecurity=False).hexdigest()
    if got != git_oid:
        raise IntegrityError(
            f"{redact(url)}: content has git blob id {got}, expected {git_oid}; nothing was stored"
        )
    # Checks ``expected``; the pull fsyncs blobs/ once before it names the file (sync_blobs).
    digest = job.store.put_small(r.data, job.lease, expected)
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
    commit = meta.commit if meta.commit and SHA1_HEX.match(meta.commit) else None
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
    oids = _oids(job, ref)
    digest, size = fetch(
        job,
        url,
        auth,
        hub_error(ref, ref.path, auth is not None, size),
        size,
        sha256,
        git_oid,
        expected=job.digest,
        oids=oids,
    )
    oids.flush()
    job.store.sync_blobs()  # a small file was renamed into blobs/ without it (_fetch_small)
    view = _view(job, ref, commit, [HFFile(ref.path, digest, size, git_oid or sha256 or "")])
    return file_result(
        job,
        FileItem(posixpath.basename(ref.path), digest, size),
        FILE_ARTIFACT_TYPE,
        {A_SOURCE_URL: url, A_HF_COMMIT: commit, A_ETAG: meta.etag},
        view,
    )


def _view(job: Job, ref: HFRef, commit: str | None, files: list) -> HFEntry | None:
    """What the Hugging Face cache view shows of this pull (DESIGN section 8): only for the
    default endpoint (the one HF_ENDPOINT names), and only with every file's ETag known."""
    if ref.registry != endpoint_host(job) or not commit or not all(f.etag for f in files):
        return None
    return HFEntry(ref.canonical, ref.repo_type, ref.repo_id, ref.revision, commit, tuple(files))


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
            raise UpstreamNotFound(
                f"no directory {ref.path!r} in {repo_name(ref)} at revision {ref.revision!r}",
                hf_code="EntryNotFound",
            ) from e
        raise
    tree = [f for f in listed if ref.wants(f.path)]
    check_names((f.path for f in tree), ref.canonical)  # before any byte (finding 8)
    if not tree and ref.filtered:
        raise UpstreamNotFound(
            f"no file of {repo_name(ref)}"
            f"{'/' + ref.path if ref.path else ''} at revision"
            f" {ref.revision!r} matches {ref.canonical.partition('?')[2]}"
        )
    oids = _oids(job, ref)
    for i, f in enumerate(tree):
        if f.sha256 is None and f.git_oid is not None:
            known = oids.lookup(f.git_oid, f.size)  # verified earlier: no download needed
            if known:
                tree[i] = replace(f, sha256=known[len("sha256:") :])
    missing = [
        f for f in tree if not (f.sha256 and job.store.has_blob("sha256:" + f.sha256, f.size))
    ]
    job.progress.expect(sum(f.size for f in tree))
    job.progress.skip(sum(f.size for f in tree) - sum(f.size for f in missing))
    job.ensure_space(sum(f.size for f in missing), ref.canonical)

    failed = threading.Event()
    sub = replace(job, cancel=EitherSet(job.cancel, failed))  # type: ignore[arg-type]
    results: dict[str, tuple[str, int]] = {}

    def one(f: TreeFile) -> None:
        if failed.is_set() or job.cancel.is_set():
            return
        try:
            results[f.path] = fetch(
                sub,
                resolve_url(base, ref, f.path, commit),
                auth,
                hub_error(ref, f.path, auth is not None, f.size),
                f.size,
                f.sha256,
                f.git_oid,
                count_total=False,
                oids=oids,
            )
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(
        max_workers=max(1, min(job.config.jobs, len(tree) or 1)), thread_name_prefix="hf"
    ) as pool:
        futures = [pool.submit(one, f) for f in tree]
        wait(futures, return_when=FIRST_EXCEPTION)
        for fut in futures:
            fut.cancel()
        wait(futures)
    oids.flush()  # what the downloads learned, even when one of them failed
    errors = [x for x in (fut.exception() for fut in futures if not fut.cancelled()) if x]
    if errors:
        # The first failure, not the cancellations it caused in the other downloads.
        raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
    if job.cancel.is_set():
        raise Cancelled(f"pull of {ref.canonical} was cancelled")
    job.store.sync_blobs()  # the small files' renames (_fetch_small), once for all

    prefix = ref.path + "/" if ref.path else ""
    files = [
        FileItem(f.path[len(prefix) :], *results[f.path], etag=f.git_oid or f.sha256) for f in tree
    ]
    where = f"/{quote(ref.path)}" if ref.path else ""
    manifest = store_artifact(
        job,
        files,
        REPO_ARTIFACT_TYPE,
        {
            A_SOURCE_URL: f"{base}/{ref.type_prefix}{ref.repo_id}/tree/{commit}{where}",
            A_HF_COMMIT: commit,
        },
    )
    if job.digest is not None and job.digest != manifest.digest:
        raise IntegrityError(
            f"{ref.canonical} resolved to {manifest.digest}, not the {job.digest} asked for"
        )
    view = _view(
        job,
        ref,
        commit,
        [HFFile(f.path, *results[f.path], f.git_oid or f.sha256 or "") for f in tree],
    )
    return PullResult(manifest, manifest.digest, files, hf_view=view)
