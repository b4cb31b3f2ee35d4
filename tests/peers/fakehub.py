"""A faithful fake of the Hugging Face Hub and of its LFS CDN, for tests and benchmarks.

Two ``ThreadingHTTPServer`` instances (HTTP/1.1, keep-alive), both bound to 127.0.0.1:

* the Hub at ``hub.endpoint`` = ``http://127.0.0.1:PORT``;
* the CDN at ``hub.cdn_endpoint`` = ``http://localhost:PORT2`` (another host name, so a client
  must treat it as a different origin and must not send it ``Authorization``).

What it answers, as the real Hub does (checked against the official ``huggingface_hub`` client in
``tests/test_fakehub_fidelity.py``):

* ``HEAD``/``GET /{repo_id}/resolve/{rev}/{path}`` (``/datasets/…``, ``/spaces/…`` for other repo
  types).  ``rev`` is a branch, a tag, a 40-hex commit, or ``refs/pr/N`` (percent-encoded as one
  segment, or not).

  - regular (git) file: ``307`` with a *relative* ``Location`` to
    ``/api/resolve-cache/{models|datasets|spaces}/{repo_id}/{commit}/{path}?…&etag=…`` (the Hub does
    this since 2025; set ``hub.resolve_cache = False`` for the older direct ``200``), which answers
    ``200`` with the bytes, ``ETag: "<git blob sha1>"``, ``X-Repo-Commit``, ``Content-Length``,
    ``Accept-Ranges`` (``206`` for a ``Range``).  Text files of 1 kB..10 MB are sent
    ``Content-Encoding: gzip``, chunked, when the client accepts gzip, as CloudFront in front of the
    Hub does (and then a ``Range`` is ignored: ``200``).  ``hub.gzip_text = False`` turns that off.
  - LFS file: ``302`` (``hub.lfs_redirect_status = 307`` for the other answer the Hub gives) with
    an absolute ``Location`` on the CDN host (signed query that expires, about an hour),
    ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size``, ``X-Repo-Commit``.  Its ``ETag`` and
    ``Content-Length`` describe the redirect body, NOT the file: a client must use the
    ``X-Linked-*`` headers.  In the Xet era (``hub.xet``, the default) the ``Location`` is the
    Xet bridge (``/xet-bridge-us/{repo hash}/{xet hash}``, cas-bridge.xethub.hf.co on the Hub)
    and the answer also carries ``X-Xet-Hash`` and ``Link: <…/xet-read-token/{commit}>;
    rel="xet-auth", <…/v1/reconstructions/{xet hash}>; rel="xet-reconstruction-info"``;
    ``hub.xet = False`` is the older LFS CDN (``/repos/…/{sha256}``, cdn-lfs.hf.co).
    ``hub.strip_headers`` drops headers from resolve answers as a CloudFront cache hit may
    (``X-Linked-Size``, ``X-Xet-Hash``, …; ``Content-Length`` of a HEAD).
* the CDN and the bridge: ``GET``/``HEAD`` of the signed URL, ``Range`` (``206``/``416``) and
  ``If-Range``; ``400`` to any request with ``Authorization``; ``403`` for a bad or expired
  signature (``hub.expire_signatures()``); ``400`` to a GET without ``Range`` of a file over
  ``hub.max_unranged_size`` (50 GB), and from the bridge to any request for a file over
  ``hub.bridge_max_size`` (unset: the bridge's trouble with very large files).  The CDN's
  ``ETag`` is an S3-style MD5, the bridge's the Xet hash (computed with ``hf_xet`` when it is
  installed): never the sha256.  ``/v1/…`` and ``/v2/…`` (the CAS API) answer ``501``.
* rate limits: every Hub answer carries ``RateLimit: "BUCKET";r=LEFT;t=RESET`` and
  ``RateLimit-Policy: "fixed window";"BUCKET";q=QUOTA;w=WINDOW`` for its bucket (``resolvers``
  for /resolve/ and the resolve cache, ``api`` for /api/, ``pages`` for the rest), counted in a
  fixed window; over the quota, ``429`` without ``Retry-After``.  Quotas are generous unless a
  test sets them (``hub.set_rate_limit``).
* fault toggles per file (``hub.set_fault``: ``corrupt``, ``drop_after`` once, ``ignore_range``),
  and injected ``429``/``5xx`` with ``Retry-After`` (``hub.inject_errors``).
* errors with ``X-Error-Code``/``X-Error-Message`` and a JSON ``{"error": …}`` body: ``RepoNotFound``
  (``401`` "Invalid username or password." to anonymous callers, without the code when
  ``hub.anonymous_401_code = False``, as the Hub often answers; ``404`` to authenticated ones,
  also for private repos the token cannot see), ``RevisionNotFound`` (404), ``EntryNotFound`` (404, with ``X-Repo-Commit``),
  ``GatedRepo`` (``401`` anonymous, ``403`` authenticated without access; only files are gated,
  the repo info and tree stay public as on the Hub), and ``401`` with
  ``X-Error-Message: Invalid credentials in Authorization header`` (no code) for an unknown token.
* ``GET /api/{models|datasets|spaces}/{repo_id}[/revision/{rev}]`` (repo info, ``?blobs=true`` for
  sizes and LFS info), ``…/tree/{rev}[/{path}]?recursive=…&expand=…`` (paginated with an absolute
  ``Link: <…&cursor=…>; rel="next"``, 1,000 entries a page, directories mixed in; LFS entries
  carry ``xetHash``, 64 asterisks for callers who may not read a gated repo's files or with
  ``hub.hide_xet_hashes``), ``…/refs``, ``…/xet-read-token/{rev}`` (``casUrl``, ``accessToken``,
  ``exp`` and the ``X-Xet-Cas-Url``/``X-Xet-Access-Token``/``X-Xet-Token-Expiration`` headers).
* ``307`` with a relative ``Location`` for renamed repos (``hub.add_alias``).

Not modelled: the Xet CAS protocol itself (reconstruction terms, xorbs, chunk dedup): a Xet
client must fall back to the bridge (huggingface_hub with ``HF_HUB_DISABLE_XET``).

Sources: huggingface_hub's ``file_download.py`` (metadata, redirects, X-Linked-*, Xet data,
50 GB), ``utils/_http.py`` (RateLimit parsing, 401/429 handling), ``utils/_xet.py`` (token
endpoint and headers), ``hf_api.py`` (tree listing, ``xetHash``); the Hub's rate-limit docs
(huggingface.co/docs/hub/rate-limits: buckets, 5-minute windows) and huggingface_hub#3553
(the header format); the Xet spec's file-id page (X-Xet-Hash on the resolve redirect);
xet-core#592 (the bridge's 400 on very large files); huggingface_hub#4741 (proxies stripping
HEAD headers) and #2991 (Range for files over 50 GB).

Usable outside pytest (``start_fakehub()``, the benchmark does); under pytest the session-scoped
fixture ``fakehub`` starts one (register with ``pytest_plugins = ["peers.fakehub"]`` or import it).
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlencode

try:  # the benchmark imports this module without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_LFS_THRESHOLD",
    "GOOD_TOKEN",
    "NOACCESS_TOKEN",
    "Blob",
    "FakeHub",
    "LoggedRequest",
    "git_blob_sha1",
    "lfs_pointer",
    "start_fakehub",
]

GOOD_TOKEN = "hf_good"
"""A valid token with access to every repository (private ones, and gated ones as if accepted)."""
NOACCESS_TOKEN = "hf_noaccess"
"""A valid token of a user who can see public repos only (not private ones, not gated files)."""

DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
_TYPE_PLURAL = {"model": "models", "dataset": "datasets", "space": "spaces"}
_PLURAL_TYPE = {v: k for k, v in _TYPE_PLURAL.items()}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HEX40 = re.compile(r"[0-9a-f]{40}")
_BASE_TIME = 1700000000  # commit dates are deterministic: base + 60 s per commit depth
_TEXT_SUFFIXES = (
    ".json",
    ".txt",
    ".md",
    ".csv",
    ".tsv",
    ".yaml",
    ".yml",
    ".py",
    ".jinja",
    ".html",
    ".js",
    ".css",
    ".xml",
    ".jsonl",
    ".cfg",
    ".ini",
    ".toml",
)
_GZIP_MIN, _GZIP_MAX = 1000, 10_000_000  # what CloudFront compresses
_CHUNK = 1 << 20
_HUB_EXPOSE = (
    "X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,X-Total-Count,ETag,Link,"
    "Accept-Ranges,Content-Range,X-Linked-Size,X-Linked-ETag,X-Xet-Hash"
)


# --------------------------------------------------------------------------------------------
# git objects


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: ``sha1(b"blob %d\\0" % len + data)``."""
    h = hashlib.sha1(b"blob %d\x00" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git in place of an LFS file."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
        sha256.encode(),
        size,
    )


@dataclass(frozen=True)
class Blob:
    """One file's content as the Hub knows it."""

    data: bytes
    sha256: str
    lfs: bool
    git_oid: str  # sha1 of the git blob: of the pointer file for an LFS file
    pointer: bytes | None  # the LFS pointer, None for a regular file

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        """What the Hub reports as the file's ETag (without quotes): sha256 if LFS, else git sha1."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def cdn_etag(self) -> str:
        """The CDN's own ETag (an S3-style MD5), computed once: per request it would make a
        ranged client's 32 requests per GiB measure the fake instead of the client."""
        md5 = self.__dict__.get("_md5")
        if md5 is None:
            md5 = hashlib.md5(self.data).hexdigest()
            object.__setattr__(self, "_md5", md5)
        return md5

    @property
    def xet_hash(self) -> str:
        """The file's Xet hash (64 hex), as the Hub's ``X-Xet-Hash`` and the bridge's ``ETag``
        carry it: computed by ``hf_xet`` when installed, else a stand-in of the same shape
        (keyed BLAKE2b) that is, like the real one, never the sha256."""
        xh = self.__dict__.get("_xet")
        if xh is None:
            xh = _xet_hash(self.data)
            object.__setattr__(self, "_xet", xh)
        return xh

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        if lfs:
            pointer = lfs_pointer(sha256, len(data))
            return cls(data, sha256, True, git_blob_sha1(pointer), pointer)
        return cls(data, sha256, False, git_blob_sha1(data), None)


def _xet_hash(data: bytes) -> str:
    try:
        import hf_xet  # the official implementation, when installed
    except ImportError:
        hf_xet = None
    if hf_xet is not None:
        import os
        import tempfile

        fd, name = tempfile.mkstemp(prefix="fakehub-xet-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return hf_xet.hash_files([name])[0].hash
        finally:
            os.unlink(name)
    return hashlib.blake2b(data, digest_size=32, key=b"fakehub-xet-standin").hexdigest()


def _git_tree_oids(files: dict[str, Blob]) -> dict[str, str]:
    """Git tree object ids of every directory ("" is the root), computed as git does."""
    children: dict[str, dict[str, tuple[bool, str]]] = {"": {}}
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent, name = "/".join(parts[: i - 1]), parts[i - 1]
            children.setdefault(parent, {})[name] = (True, "/".join(parts[:i]))
            children.setdefault("/".join(parts[:i]), {})
        children.setdefault("/".join(parts[:-1]), {})[parts[-1]] = (False, path)
    oids: dict[str, str] = {}

    def tree_oid(d: str) -> str:
        if d in oids:
            return oids[d]
        entries = []
        for name, (is_dir, full) in children[d].items():
            if is_dir:
                entries.append(
                    (name + "/", b"40000 %s\x00" % name.encode() + bytes.fromhex(tree_oid(full)))
                )
            else:
                oid = files[full].git_oid
                entries.append((name, b"100644 %s\x00" % name.encode() + bytes.fromhex(oid)))
        body = b"".join(e for _, e in sorted(entries, key=lambda e: e[0].encode()))
        oids[d] = hashlib.sha1(b"tree %d\x00" % len(body) + body).hexdigest()
        return oids[d]

    for d in list(children):
        tree_oid(d)
    return oids


@dataclass
class Commit:
    sha: str
    files: dict[str, Blob]
    parent: str | None
    message: str
    timestamp: int
    tree_oids: dict[str, str]

    @property
    def date(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.timestamp))

    def directories(self) -> list[str]:
        return sorted(d for d in self.tree_oids if d)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    gated: object  # False, "auto" or "manual"
    private: bool
    lfs_threshold: int
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[str, str] = field(default_factory=dict)  # "refs/pr/1" -> commit

    def is_lfs(self, path: str, data: bytes) -> bool:
        return len(data) > self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev in self.prs:
            return self.prs[rev]
        if rev.startswith("refs/heads/"):
            return self.branches.get(rev[len("refs/heads/") :])
        if rev.startswith("refs/tags/"):
            return self.tags.get(rev[len("refs/tags/") :])
        if _HEX40.fullmatch(rev) and rev in self.commits:
            return rev
        return None

    def last_commit_for(self, commit: Commit, path: str, is_dir: bool) -> Commit:
        """The newest commit in ``commit``'s history that changed ``path`` (file or directory)."""

        def key(c: Commit):
            return (
                c.tree_oids.get(path)
                if is_dir
                else (c.files[path].git_oid if path in c.files else None)
            )

        cur, want = commit, key(commit)
        while cur.parent is not None:
            parent = self.commits[cur.parent]
            if key(parent) != want:
                break
            cur = parent
        return cur


# --------------------------------------------------------------------------------------------
# faults and the request log


@dataclass
class Fault:
    corrupt: bool = False  # serve wrong bytes of the right length (one byte flipped mid-file)
    drop_after: int | None = None  # once: close the connection after N body bytes
    ignore_range: bool = False  # answer 200 with everything to a Range request


@dataclass
class LoggedRequest:
    server: str  # "hub" or "cdn"
    method: str
    host: str  # the Host header the client sent
    path: str  # raw path, without the query
    query: str
    has_authorization: bool
    range: str | None
    status: int
    request_headers: dict[str, str]
    response_headers: list[tuple[str, str]]
    bytes_sent: int = 0
    dropped: bool = False

    def response_header(self, name: str) -> str | None:
        for k, v in self.response_headers:
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class _Injected:
    server: str
    status: int
    count: int
    retry_after: int | None
    path_contains: str | None
    reset: int | None = None  # a 429's RateLimit t=


# --------------------------------------------------------------------------------------------
# the fake


class FakeHub:
    """The state of the fake Hub and CDN, and the API tests use to fill and steer it."""

    def __init__(self, tree_page_size: int = 1000, tree_page_size_expand: int = 50):
        self.tree_page_size = tree_page_size
        self.tree_page_size_expand = tree_page_size_expand
        self.resolve_cache = True
        self.gzip_text = True
        # Xet era (2025-): LFS files redirect to the Xet bridge with X-Xet-Hash and Link
        # rel="xet-auth"/"xet-reconstruction-info"; False = the older LFS CDN (MD5 ETag).
        self.xet = True
        self.lfs_redirect_status = 302  # the Hub also answers 307 at times
        self.strip_headers: set[str] = set()  # what a cache in front of the Hub drops
        self.max_unranged_size = 50 * 1000**3  # a GET without Range of more: 400
        self.bridge_max_size: int | None = None  # the bridge's 400 even with ranges
        self.anonymous_401_code = True  # False: anonymous 401s carry no X-Error-Code
        self.hide_xet_hashes = False  # True: every tree xetHash is 64 asterisks
        # Fixed-window rate limits per bucket (quota, window seconds), counted for all
        # callers alike; generous by default so a test session never reaches them
        # (set_rate_limit sets real ones).  The Hub's anonymous quotas: api 500,
        # resolvers 3000, pages 100 per 300 s.
        self.rate_limits: dict[str, tuple[int, int]] = {
            "api": (100_000, 300),
            "resolvers": (1_000_000, 300),
            "pages": (10_000, 300),
        }
        self._windows: dict[str, list] = {}  # bucket -> [start, count]
        self.tokens: dict[str, set | None] = {GOOD_TOKEN: None, NOACCESS_TOKEN: set()}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.aliases: dict[tuple[str, str], str] = {}
        self.requests: list[LoggedRequest] = []
        self._lfs: dict[str, Blob] = {}  # sha256 -> blob, what the CDN serves
        self._xet: dict[str, Blob] = {}  # xet hash -> blob, what the bridge serves
        self._faults: dict[str, Fault] = {}  # sha256 -> fault
        self._injected: list[_Injected] = []
        self._signatures: dict[str, tuple[str, int, int]] = {}  # sig -> (path, expires, generation)
        self._generation = 0
        self._serial = 0
        self._lock = threading.RLock()
        self._hub_server: ThreadingHTTPServer | None = None
        self._cdn_server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.endpoint = ""
        self.cdn_endpoint = ""

    # ---- life cycle

    def start(self) -> FakeHub:
        self._hub_server = _Server(("127.0.0.1", 0), _Handler, self, "hub")
        self._cdn_server = _Server(("127.0.0.1", 0), _Handler, self, "cdn")
        self.endpoint = f"http://127.0.0.1:{self._hub_server.server_address[1]}"
        self.cdn_endpoint = f"http://localhost:{self._cdn_server.server_address[1]}"
        for srv in (self._hub_server, self._cdn_server):
            t = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
            )
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        for srv in (self._hub_server, self._cdn_server):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(5)
        self._threads = []

    def __enter__(self) -> FakeHub:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- content

    def add_repo(
        self,
        repo_id: str,
        repo_type: str = "model",
        files: dict[str, bytes] | None = None,
        branch: str = "main",
        gated: object = False,
        private: bool = False,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        message: str | None = None,
    ) -> str:
        """Create (or replace) a repository with one commit on ``branch``; returns its sha."""
        repo_type = _norm_type(repo_type)
        if gated is True:
            gated = "auto"
        with self._lock:
            self.repos[(repo_type, repo_id)] = Repo(
                repo_type, repo_id, gated, private, lfs_threshold
            )
            return self._commit(
                repo_type,
                repo_id,
                files or {},
                None,
                message or f"Initial commit of {repo_id}",
                branch=branch,
            )

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes | None],
        branch: str = "main",
        repo_type: str = "model",
        message: str | None = None,
        parent: str | None = None,
    ) -> str:
        """A commit on ``branch`` (created from ``parent`` or main if new) adding/replacing ``files``
        (``None`` deletes a path). Returns the commit sha."""
        repo_type = _norm_type(repo_type)
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            if parent is None:
                parent = repo.branches.get(branch) or repo.branches.get("main")
            return self._commit(
                repo_type, repo_id, files, parent, message or f"Update on {branch}", branch=branch
            )

    def add_tag(
        self, repo_id: str, tag: str, commit: str | None = None, repo_type: str = "model"
    ) -> str:
        with self._lock:
            repo = self._repo(_norm_type(repo_type), repo_id)
            commit = commit or repo.branches["main"]
            if commit not in repo.commits:
                raise KeyError(commit)
            repo.tags[tag] = commit
            return commit

    def add_pr(self, repo_id: str, files: dict[str, bytes | None], repo_type: str = "model") -> str:
        """Open a pull request with one commit on top of main; returns its ref ``refs/pr/N``."""
        repo_type = _norm_type(repo_type)
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            ref = f"refs/pr/{len(repo.prs) + 1}"
            sha = self._commit(
                repo_type, repo_id, files, repo.branches["main"], f"PR {ref}", branch=None
            )
            repo.prs[ref] = sha
            return ref

    def add_alias(self, old_repo_id: str, new_repo_id: str, repo_type: str = "model") -> None:
        """``old_repo_id`` was renamed: answer 307 with a relative Location to the new name."""
        with self._lock:
            self.aliases[(_norm_type(repo_type), old_repo_id)] = new_repo_id

    def add_token(self, token: str, repos: list[str] | None = None) -> None:
        """A valid token; ``repos=None`` sees everything, else only those private/gated repos."""
        with self._lock:
            self.tokens[token] = None if repos is None else set(repos)

    def blob(
        self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model"
    ) -> Blob:
        repo = self._repo(_norm_type(repo_type), repo_id)
        sha = repo.resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return repo.commits[sha].files[path]

    def commit_sha(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        sha = self._repo(_norm_type(repo_type), repo_id).resolve(revision)
        if sha is None:
            raise KeyError(revision)
        return sha

    def resolve_url(
        self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model"
    ) -> str:
        """The URL huggingface_hub would ask for this file."""
        return "{}/{}{}/resolve/{}/{}".format(
            self.endpoint,
            _URL_PREFIX[_norm_type(repo_type)],
            repo_id,
            quote(revision, safe=""),
            quote(path),
        )

    # ---- faults

    def set_fault(
        self,
        repo_id: str | None = None,
        path: str | None = None,
        *,
        revision: str = "main",
        repo_type: str = "model",
        sha256: str | None = None,
        corrupt: bool | None = None,
        drop_after: int | None = None,
        ignore_range: bool | None = None,
    ) -> None:
        """Fault toggles for one file's bytes, wherever they are served (CDN or Hub).

        ``corrupt``: one byte flipped mid-file, same length, until cleared.  ``drop_after=N``: the
        next response carrying this file's bytes closes the connection after N body bytes (once).
        ``ignore_range``: Range requests get 200 with the whole file."""
        if sha256 is None:
            sha256 = self.blob(repo_id or "", path or "", revision, repo_type).sha256
        with self._lock:
            f = self._faults.setdefault(sha256, Fault())
            if corrupt is not None:
                f.corrupt = corrupt
            if drop_after is not None:
                f.drop_after = drop_after
            if ignore_range is not None:
                f.ignore_range = ignore_range

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._injected.clear()

    def inject_errors(
        self,
        server: str = "hub",
        status: int = 503,
        count: int = 1,
        retry_after: int | None = None,
        path_contains: str | None = None,
        reset: int | None = None,
    ) -> None:
        """The next ``count`` requests to ``server`` ("hub"/"cdn") whose path contains
        ``path_contains`` answer ``status`` (with ``Retry-After`` if given).  A Hub 429
        carries ``RateLimit: "BUCKET";r=0;t=RESET`` (``reset``, else ``retry_after``, else 60)
        and, as on the Hub, no ``Retry-After`` unless ``retry_after`` is given."""
        with self._lock:
            self._injected.append(
                _Injected(server, status, count, retry_after, path_contains, reset)
            )

    def set_rate_limit(self, bucket: str, quota: int, window: int = 300) -> None:
        """A fixed window of ``window`` seconds holding ``quota`` requests of ``bucket``
        ("api", "resolvers", "pages"); the window starts (again) now."""
        with self._lock:
            self.rate_limits[bucket] = (quota, window)
            self._windows.pop(bucket, None)

    def _count(self, bucket: str) -> tuple[int, int, int, int, bool]:
        """Count one request of ``bucket``: (remaining, reset_in, quota, window, over)."""
        quota, window = self.rate_limits.get(bucket, (10**9, 300))
        now = time.time()
        with self._lock:
            w = self._windows.get(bucket)
            if w is None or now >= w[0] + window:
                w = self._windows[bucket] = [now, 0]
            w[1] += 1
            reset = max(1, int(w[0] + window - now + 0.999))
            return max(0, quota - w[1]), reset, quota, window, w[1] > quota

    def expire_signatures(self) -> None:
        """Every CDN URL handed out so far answers 403 "Request has expired" from now on; the Hub
        hands out fresh ones."""
        with self._lock:
            self._generation += 1

    @property
    def expired(self) -> bool:
        return self._generation > 0

    @expired.setter
    def expired(self, value: bool) -> None:
        if value:
            self.expire_signatures()

    # ---- log

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def log(self, server: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if server is None or r.server == server]

    # ---- internals

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        return self.repos[(repo_type, repo_id)]

    def _commit(
        self,
        repo_type: str,
        repo_id: str,
        changes: dict[str, bytes | None],
        parent: str | None,
        message: str,
        branch: str | None,
    ) -> str:
        repo = self._repo(repo_type, repo_id)
        files = dict(repo.commits[parent].files) if parent else {}
        for path, data in changes.items():
            path = path.strip("/")
            if data is None:
                files.pop(path, None)
                continue
            if isinstance(data, str):
                data = data.encode()
            blob = Blob.make(bytes(data), repo.is_lfs(path, data))
            files[path] = blob
            if blob.lfs:
                self._lfs[blob.sha256] = blob
                self._xet[blob.xet_hash] = blob
        depth, p = 0, parent
        while p is not None:
            depth, p = depth + 1, repo.commits[p].parent
        ts = _BASE_TIME + 60 * depth
        oids = _git_tree_oids(files)
        body = b"tree %s\n" % oids[""].encode()
        if parent:
            body += b"parent %s\n" % parent.encode()
        sig = b"Fake Hub <fakehub@example.invalid> %d +0000" % ts
        body += b"author %s\ncommitter %s\n\n%s\n" % (sig, sig, message.encode())
        sha = hashlib.sha1(b"commit %d\x00" % len(body) + body).hexdigest()
        repo.commits[sha] = Commit(sha, files, parent, message, ts, oids)
        if branch is not None:
            repo.branches[branch] = sha
        return sha

    def _sign(self, repo: Repo, blob: Blob, filename: str) -> str:
        rh = hashlib.sha256((_URL_PREFIX[repo.repo_type] + repo.repo_id).encode()).hexdigest()
        if self.xet:  # cas-bridge.xethub.hf.co/xet-bridge-us/{repo hash}/{xet hash}
            path = f"/xet-bridge-us/{rh[:24]}/{blob.xet_hash}"
        else:  # cdn-lfs.hf.co/repos/{..}/{..}/{repo hash}/{sha256}
            path = f"/repos/{rh[:2]}/{rh[2:4]}/{rh}/{blob.sha256}"
        name = filename.rsplit("/", 1)[-1]
        disposition = "inline; filename*=UTF-8''{}; filename=\"{}\";".format(
            quote(name),
            name.replace('"', ""),
        )
        expires = int(time.time()) + 3600
        with self._lock:
            self._serial += 1
            sig = (
                base64.urlsafe_b64encode(
                    hashlib.sha256(
                        b"%s|%d|%d|%s"
                        % (path.encode(), expires, self._serial, secrets.token_bytes(8))
                    ).digest()
                )
                .decode()
                .rstrip("=")
            )
            self._signatures[sig] = (path, expires, self._generation)
        query = urlencode(
            [
                ("response-content-disposition", disposition),
                ("Expires", str(expires)),
                ("Signature", sig),
                ("Key-Pair-Id", "KFAKEHUBCDN00"),
            ]
        )
        return f"{self.cdn_endpoint}{path}?{query}"

    def _take_injected(self, server: str, path: str) -> _Injected | None:
        with self._lock:
            for inj in self._injected:
                if (
                    inj.server == server
                    and inj.count > 0
                    and (not inj.path_contains or inj.path_contains in path)
                ):
                    inj.count -= 1
                    return inj
        return None


def _bucket(path: str) -> str:
    """The Hub's rate-limit bucket of a request path: every URL with a /resolve/ segment
    (and the resolve cache it redirects to) is a resolver, /api/ the API, the rest pages."""
    if "/resolve/" in path or path.startswith("/api/resolve-cache/"):
        return "resolvers"
    return "api" if path.startswith("/api/") else "pages"


def _norm_type(repo_type: str | None) -> str:
    repo_type = repo_type or "model"
    repo_type = _PLURAL_TYPE.get(repo_type, repo_type)
    if repo_type not in _TYPE_PLURAL:
        raise ValueError(f"repo_type must be model, dataset or space, not {repo_type!r}")
    return repo_type


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, addr, handler, hub: FakeHub, role: str):
        self.hub = hub
        self.role = role
        super().__init__(addr, handler)


class _Done(Exception):
    """The response has been sent (or the connection dropped)."""


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _parse_range(value: str | None, size: int):
    """(start, end) inclusive, "unsatisfiable", or None to ignore the header."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multiple ranges or garbage: allowed to answer 200
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
        if m.group(2) and end < start:
            return None  # syntactically invalid: ignored
        if start >= size:
            return "unsatisfiable"
        return start, min(end, size - 1)
    n = int(m.group(2))
    if n == 0 or size == 0:
        return "unsatisfiable"
    return max(0, size - n), size - 1


def _accepts_gzip(value: str | None) -> bool:
    for part in (value or "").split(","):
        bits = [b.strip() for b in part.split(";")]
        if bits[0].lower() in ("gzip", "*"):
            q = [b for b in bits[1:] if b.lower().startswith("q=")]
            try:
                return not q or float(q[0][2:]) > 0
            except ValueError:
                return False
    return False


# --------------------------------------------------------------------------------------------
# the HTTP side


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
    # holds a small body until the client's delayed ACK (~40 ms a request), which no real
    # server does and which would make the benchmark measure that.
    disable_nagle_algorithm = True
    server_version = "fakehub"
    sys_version = ""
    timeout = 120
    server: _Server

    def log_message(self, format, *args):
        pass

    def version_string(self) -> str:
        return "fakehub"

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # ---- plumbing

    def _handle(self) -> None:
        hub = self.server.hub
        self._status = 0
        self._resp_headers: list[tuple[str, str]] = []
        self._entry: LoggedRequest | None = None
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        raw_path, _, self._query = self.path.partition("?")
        self._raw_path = raw_path
        self._limit = None
        try:
            if self.server.role == "hub":
                self._limit = (_bucket(raw_path), *hub._count(_bucket(raw_path)))
            inj = hub._take_injected(self.server.role, raw_path)
            if inj is not None:
                self._injected_error(inj)
            if self._limit is not None and self._limit[5]:
                # Over the quota: 429, usually without Retry-After (RateLimit says when).
                self._json(
                    429,
                    {
                        "error": f"You have exceeded the {self._limit[0]!r} rate"
                        " limit. Retry later or pass a token."
                    },
                )
            if self.server.role == "cdn":
                self._cdn()
            else:
                self._hub()
        except _Done:
            pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self._log_entry().dropped = True
        finally:
            self._log_entry()

    def _log_entry(self) -> LoggedRequest:
        """The log entry of this request, appended when the headers go out (before the client can
        see the response, so a test reading the log right after its request finds it)."""
        if self._entry is None:
            self._entry = LoggedRequest(
                server=self.server.role,
                method=self.command,
                host=self.headers.get("Host", ""),
                path=self._raw_path,
                query=self._query,
                has_authorization=self.headers.get("Authorization") is not None,
                range=self.headers.get("Range"),
                status=self._status,
                request_headers={k: v for k, v in self.headers.items()},
                response_headers=list(self._resp_headers),
            )
            with self.server.hub._lock:
                self.server.hub.requests.append(self._entry)
        return self._entry

    def end_headers(self) -> None:
        self._log_entry()
        super().end_headers()

    def _write(self, data) -> None:
        self._log_entry().bytes_sent += len(data)
        self.wfile.write(data)

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def send_header(self, keyword, value):
        hub = self.server.hub
        if (
            hub.strip_headers
            and self.server.role == "hub"
            and ("/resolve/" in self._raw_path or self._raw_path.startswith("/api/resolve-cache/"))
        ):
            strip = {h.lower() for h in hub.strip_headers}
            k = keyword.lower()
            if k in strip and (k != "content-length" or self.command == "HEAD"):
                return  # a cache in front of the Hub dropped it (the body keeps its framing)
        self._resp_headers.append((keyword, str(value)))
        super().send_header(keyword, value)

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self._write(body)
        raise _Done()

    def _request_id(self) -> str:
        return f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)}"

    def _hub_headers(self) -> list[tuple[str, str]]:
        bucket, remaining, reset, quota, window, _ = self._limit or ("api", 0, 300, 0, 300, 0)
        return [
            ("X-Powered-By", "huggingface-moon"),
            ("X-Request-Id", self._request_id()),
            ("RateLimit", f'"{bucket}";r={remaining};t={reset}'),
            ("RateLimit-Policy", f'"fixed window";"{bucket}";q={quota};w={window}'),
            ("Access-Control-Allow-Origin", "https://huggingface.co"),
            ("Access-Control-Expose-Headers", _HUB_EXPOSE),
            ("Vary", "Origin, Accept"),
        ]

    def _json(self, status: int, obj, extra: list[tuple[str, str]] | None = None) -> None:
        body = json.dumps(obj).encode()
        headers = (
            self._hub_headers()
            + [("Content-Type", "application/json; charset=utf-8")]
            + (extra or [])
        )
        self._reply(status, headers, body)

    def _error(
        self,
        status: int,
        message: str,
        code: str | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = [("X-Error-Message", message)]
        if code:
            headers.insert(0, ("X-Error-Code", code))
        if status == 401:
            headers.append(
                ("WWW-Authenticate", 'Bearer realm="Authentication required", charset="UTF-8"')
            )
        self._json(status, {"error": message}, headers + (extra or []))

    def _injected_error(self, inj: _Injected) -> None:
        extra: list[tuple[str, str]] = []
        if inj.retry_after is not None:
            extra.append(("Retry-After", str(inj.retry_after)))
        if self.server.role == "cdn":
            code = "SlowDown" if inj.status in (429, 503) else "InternalError"
            self._xml_error(inj.status, code, "Injected error", extra)
        if inj.status == 429:  # the bucket is empty: RateLimit says r=0 and when it resets
            t = inj.reset if inj.reset is not None else (inj.retry_after or 60)
            bucket, _, _, quota, window, _ = self._limit or ("api", 0, 0, 3000, 300, 0)
            self._limit = (bucket, 0, t, quota, window, True)
            self._json(429, {"error": "Too many requests"}, extra)
        self._json(inj.status, {"error": f"Injected error {inj.status}"}, extra)

    def _xml_error(
        self, status: int, code: str, message: str, extra: list[tuple[str, str]] | None = None
    ) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
        ).encode()
        self._reply(
            status,
            [("Content-Type", "application/xml"), ("X-Cache", "Error from cloudfront")]
            + (extra or []),
            body,
        )

    # ---- serving file bytes (Hub and CDN)

    def _serve_bytes(
        self,
        blob: Blob,
        headers: list[tuple[str, str]],
        etag: str,
        last_modified: str,
        allow_gzip: bool,
    ) -> None:
        hub = self.server.hub
        with hub._lock:
            fault = hub._faults.get(blob.sha256)
            fault = Fault(fault.corrupt, fault.drop_after, fault.ignore_range) if fault else Fault()
        data = blob.data
        if fault.corrupt and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        size = len(data)
        headers = headers + [
            ("Accept-Ranges", "bytes"),
            ("ETag", etag),
            ("Last-Modified", last_modified),
        ]

        if allow_gzip and _accepts_gzip(self.headers.get("Accept-Encoding")):
            self._send_gzip(data, headers, fault, blob)
        rng = None if fault.ignore_range else _parse_range(self.headers.get("Range"), size)
        if_range = self.headers.get("If-Range")
        if (
            rng is not None
            and if_range is not None
            and if_range.strip() not in (etag, last_modified)
        ):
            rng = None  # the representation changed (or a foreign validator): whole file, 200
        if rng == "unsatisfiable":
            self._reply(
                416,
                [(k, v) for k, v in headers if k != "Content-Type"]
                + [
                    ("Content-Range", f"bytes */{size}"),
                    ("Content-Type", "text/plain; charset=utf-8"),
                ],
                b"",
            )
        if rng is None:
            status, start, end = 200, 0, size - 1
        else:
            status, (start, end) = 206, rng  # type: ignore[misc]
            headers = headers + [("Content-Range", f"bytes {start}-{end}/{size}")]
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "HEAD":
            raise _Done()
        self._write_body(memoryview(data)[start : end + 1], fault, blob)
        raise _Done()

    def _take_drop(self, fault: Fault, blob: Blob) -> int | None:
        """The bytes to send before dropping the connection, once: the fault is used up."""
        limit = None
        if fault.drop_after is not None:
            with self.server.hub._lock:
                f = self.server.hub._faults.get(blob.sha256)
                if f is not None and f.drop_after is not None:
                    limit, f.drop_after = f.drop_after, None
        return limit

    def _write_body(self, body, fault: Fault, blob: Blob) -> None:
        limit = self._take_drop(fault, blob)
        if limit is not None and limit < len(body):
            body = body[:limit]
        for i in range(0, len(body), _CHUNK):
            self._write(body[i : i + _CHUNK])
        if limit is not None:
            self._drop()

    def _drop(self) -> None:
        self._log_entry().dropped = True
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Done()

    def _send_gzip(
        self, data: bytes, headers: list[tuple[str, str]], fault: Fault, blob: Blob
    ) -> None:
        body = gzip.compress(data, mtime=0)
        self.send_response(200)
        for k, v in headers:
            if k == "Vary":
                v = v + ", Accept-Encoding"
            self.send_header(k, v)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            raise _Done()
        limit = self._take_drop(fault, blob)
        if limit is not None:
            body = body[:limit]
        for pos in range(0, len(body), 16384):
            piece = body[pos : pos + 16384]
            self._write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if limit is not None:
            self._drop()
        self._write(b"0\r\n\r\n")
        raise _Done()

    # ---- the CDN

    def _cdn(self) -> None:
        hub = self.server.hub
        if self._raw_path.startswith(("/v1/", "/v2/")):  # the CAS API a Xet client talks to
            self._reply(
                501,
                [("Content-Type", "text/plain; charset=utf-8")],
                b"the fake Hub does not implement the Xet CAS API",
            )
        if self.headers.get("Authorization") is not None:
            self._xml_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query "
                "string parameter or the Authorization header should be specified",
            )
        if self.command not in ("GET", "HEAD"):
            self._xml_error(
                405,
                "MethodNotAllowed",
                "The specified method is not allowed against this resource.",
            )
        q = dict(parse_qsl(self._query, keep_blank_values=True))
        sig = q.get("Signature", "")
        with hub._lock:
            issued = hub._signatures.get(sig)
            generation = hub._generation
        try:
            expires = int(q.get("Expires", ""))
        except ValueError:
            expires = -1
        if issued is None or issued[0] != self._raw_path or issued[1] != expires:
            self._xml_error(403, "AccessDenied", "Access denied")
        if issued[2] < generation or time.time() > expires:
            self._xml_error(403, "AccessDenied", "Request has expired")
        key = self._raw_path.rsplit("/", 1)[-1]
        bridge = self._raw_path.startswith("/xet-bridge-us/")
        blob = (hub._xet if bridge else hub._lfs).get(key)
        if blob is None:
            self._xml_error(404, "NoSuchKey", "The specified key does not exist.")
        if bridge and hub.bridge_max_size is not None and blob.size > hub.bridge_max_size:
            self._reply(400, [("Content-Type", "text/plain; charset=utf-8")], b"Bad Request")
        if (
            self.command == "GET"
            and not self.headers.get("Range")
            and (blob.size > hub.max_unranged_size)
        ):
            # Over 50 GB the CDN and the bridge answer only ranged GETs.
            self._xml_error(
                400,
                "InvalidRequest",
                f"Range header required for objects over {hub.max_unranged_size} bytes",
            )
        # The bridge's ETag is the Xet hash, the CDN's an S3 MD5: NEVER the sha256.
        etag = f'"{blob.xet_hash}"' if bridge else f'"{blob.cdn_etag}"'
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Disposition", q.get("response-content-disposition", "inline")),
            ("X-Cache", "Miss from cloudfront"),
            ("Via", "1.1 fakehub.cloudfront.net (CloudFront)"),
            ("X-Amz-Cf-Pop", "FAKE50-C1"),
        ]
        self._serve_bytes(blob, headers, etag, _http_date(_BASE_TIME), allow_gzip=False)

    # ---- the Hub

    def _hub(self) -> None:
        segs = [s for s in self._raw_path.split("/")]
        if not segs or segs[0] != "":
            self._error(400, "Bad request")
        segs = segs[1:]
        if self.command not in ("GET", "HEAD"):
            self._error(405, "Method not allowed")
        if segs and segs[0] == "api":
            self._api(segs[1:])
        # /[datasets|spaces/]repo_id/resolve/rev/path
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = _PLURAL_TYPE[segs[0]], segs[1:]
        for n in (2, 1):
            if len(segs) > n + 1 and segs[n] == "resolve":
                repo_id = "/".join(unquote(s) for s in segs[:n])
                self._maybe_alias(repo_type, repo_id)
                rev, rest = _split_rev(segs[n + 1 :])
                self._resolve(
                    repo_type, repo_id, rev, "/".join(unquote(s) for s in rest), via_cache=False
                )
        self._not_found()

    def _not_found(self) -> None:
        self._error(404, "Sorry, we can't find the page you are looking for.")

    def _maybe_alias(self, repo_type: str, repo_id: str) -> None:
        hub = self.server.hub
        new = hub.aliases.get((repo_type, repo_id))
        if new is None:
            return
        path = self._raw_path
        for old in (quote(repo_id, safe="/"), repo_id):
            needle = "/" + old
            i = path.find(needle + "/")
            if i < 0 and path.endswith(needle):
                i = len(path) - len(needle)
            if i >= 0:
                path = path[:i] + "/" + quote(new, safe="/") + path[i + len(needle) :]
                break
        location = path + ("?" + self._query if self._query else "")
        body = (f"Temporary Redirect. Redirecting to {location}").encode()
        self._reply(
            307,
            self._hub_headers()
            + [("Location", location), ("Content-Type", "text/plain; charset=utf-8")],
            body,
        )

    def _auth(self) -> tuple[bool, str | None]:
        """(authenticated, token); answers 401 for an unknown token."""
        value = self.headers.get("Authorization")
        if value is None:
            return False, None
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token not in self.server.hub.tokens:
            self._error(401, "Invalid credentials in Authorization header")
        return True, token

    def _repo_for(self, repo_type: str, repo_id: str, files: bool) -> Repo:
        """The repo if the caller may read it (its files, if ``files``), else answer the error."""
        hub = self.server.hub
        authed, token = self._auth()
        repo = hub.repos.get((repo_type, repo_id))
        grants = hub.tokens.get(token) if token else set()
        allowed = authed and (grants is None or repo_id in (grants or ()))
        self._allowed = bool(allowed) or (repo is not None and not repo.gated and not repo.private)
        if repo is None or (repo.private and not allowed):
            if not authed:
                code = "RepoNotFound" if hub.anonymous_401_code else None
                self._error(401, "Invalid username or password.", code)
            self._error(404, "Repository not found", "RepoNotFound")
        if files and repo.gated and not allowed:
            kind = {"model": "model", "dataset": "dataset", "space": "space"}[repo_type]
            if not authed:
                self._error(
                    401,
                    f"Access to {kind} {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                    "GatedRepo",
                )
            self._error(
                403,
                "Access to {} {} is restricted and you are not in the authorized list. "
                "Visit {}/{}{} to ask for access.".format(
                    kind, repo_id, "https://huggingface.co", _URL_PREFIX[repo_type], repo_id
                ),
                "GatedRepo",
            )
        return repo

    def _commit_for(self, repo: Repo, rev: str) -> Commit:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str, via_cache: bool) -> None:
        hub = self.server.hub
        repo = self._repo_for(repo_type, repo_id, files=True)
        commit = self._commit_for(repo, rev)
        blob = commit.files.get(path)
        commit_hdr = [("X-Repo-Commit", commit.sha)]
        if blob is None:
            self._error(404, "Entry not found", "EntryNotFound", commit_hdr)
        base = self._hub_headers() + commit_hdr
        if blob.lfs:
            location = hub._sign(repo, blob, path)
            status = hub.lfs_redirect_status
            word = "Found" if status == 302 else "Temporary Redirect"
            body = (f"{word}. Redirecting to {location}").encode()
            headers = base + [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Location", location),
                ("Accept-Ranges", "bytes"),
                ("X-Linked-Size", str(blob.size)),
                ("X-Linked-ETag", f'"{blob.sha256}"'),
                ("ETag", f'W/"{len(body):x}-{hashlib.sha1(body).hexdigest()[:27]}"'),
            ]
            if hub.xet:
                plural = _TYPE_PLURAL[repo_type]
                auth = f"{hub.endpoint}/api/{plural}/{repo_id}/xet-read-token/{commit.sha}"
                recon = f"{hub.cdn_endpoint}/v1/reconstructions/{blob.xet_hash}"
                headers += [
                    ("X-Xet-Hash", blob.xet_hash),
                    ("Link", f'<{auth}>; rel="xet-auth", <{recon}>; rel="xet-reconstruction-info"'),
                ]
            self._reply(status, headers, body)
        if hub.resolve_cache and not via_cache:
            location = "/api/resolve-cache/{}/{}/{}/{}?{}=&etag={}".format(
                _TYPE_PLURAL[repo_type],
                repo_id,
                commit.sha,
                quote(path),
                quote(f"/{_URL_PREFIX[repo_type]}{repo_id}/resolve/{rev}/{path}", safe=""),
                quote(f'"{blob.git_oid}"', safe=""),
            )
            body = (f"Temporary Redirect. Redirecting to {location}").encode()
            self._reply(
                307,
                base
                + [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Location", location),
                    ("Accept-Ranges", "bytes"),
                ],
                body,
            )
        name = path.rsplit("/", 1)[-1]
        ctype = (
            "text/plain; charset=utf-8"
            if name.endswith(_TEXT_SUFFIXES)
            else "application/octet-stream"
        )
        headers = base + [
            ("Content-Type", ctype),
            (
                "Content-Disposition",
                f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
            ),
            (
                "Cache-Control",
                "public, max-age=31536000, immutable" if via_cache else "private, max-age=0",
            ),
            ("Via", "1.1 fakehub.cloudfront.net (CloudFront)"),
            ("X-Cache", "Miss from cloudfront"),
        ]
        allow_gzip = (
            hub.gzip_text and name.endswith(_TEXT_SUFFIXES) and _GZIP_MIN <= blob.size <= _GZIP_MAX
        )
        self._serve_bytes(
            blob, headers, f'"{blob.git_oid}"', _http_date(commit.timestamp), allow_gzip
        )

    # ---- /api

    def _api(self, segs: list[str]) -> None:
        if len(segs) >= 4 and segs[0] == "resolve-cache" and segs[1] in _PLURAL_TYPE:
            repo_type, rest = _PLURAL_TYPE[segs[1]], segs[2:]
            # {repo_id (1 or 2 segments)}/{commit}/{path}
            for n in (2, 1):
                if len(rest) > n + 1 and _HEX40.fullmatch(rest[n]):
                    repo_id = "/".join(unquote(s) for s in rest[:n])
                    self._maybe_alias(repo_type, repo_id)
                    self._resolve(
                        repo_type,
                        repo_id,
                        rest[n],
                        "/".join(unquote(s) for s in rest[n + 1 :]),
                        True,
                    )
            self._not_found()
        if len(segs) < 2 or segs[0] not in _PLURAL_TYPE:
            self._not_found()
        repo_type, rest = _PLURAL_TYPE[segs[0]], segs[1:]
        subpaths = (
            "revision",
            "tree",
            "refs",
            "resolve",
            "paths-info",
            "commits",
            "xet-read-token",
        )
        if len(rest) >= 2 and rest[1] not in subpaths:
            repo_id, rest = "/".join(unquote(s) for s in rest[:2]), rest[2:]
        else:
            repo_id, rest = unquote(rest[0]), rest[1:]
        if rest and rest[-1] == "" and len(rest) == 1:
            rest = []
        self._maybe_alias(repo_type, repo_id)
        if not rest:
            self._repo_info(repo_type, repo_id, "main")
        if rest[0] == "revision" and len(rest) >= 2:
            rev, extra = _split_rev(rest[1:])
            if extra and extra != [""]:
                self._not_found()
            self._repo_info(repo_type, repo_id, rev)
        if rest[0] == "tree" and len(rest) >= 2:
            rev, extra = _split_rev(rest[1:])
            self._tree(repo_type, repo_id, rev, "/".join(unquote(s) for s in extra).strip("/"))
        if rest[0] == "refs" and len(rest) == 1:
            self._refs(repo_type, repo_id)
        if rest[0] == "xet-read-token" and len(rest) >= 2:
            rev, extra = _split_rev(rest[1:])
            self._xet_token(repo_type, repo_id, rev)
        self._not_found()

    def _xet_token(self, repo_type: str, repo_id: str, rev: str) -> None:
        """A short-lived token for the CAS server (the Xet protocol's first step); the fake
        names a CAS URL but does not implement the reconstruction API behind it."""
        hub = self.server.hub
        repo = self._repo_for(repo_type, repo_id, files=True)
        self._commit_for(repo, rev)
        exp = int(time.time()) + 3600
        token = "xet_" + secrets.token_urlsafe(24)
        cas = hub.cdn_endpoint
        self._json(
            200,
            {"casUrl": cas, "exp": exp, "accessToken": token},
            [
                ("X-Xet-Cas-Url", cas),
                ("X-Xet-Access-Token", token),
                ("X-Xet-Token-Expiration", str(exp)),
            ],
        )

    def _params(self) -> dict[str, str]:
        return dict(parse_qsl(self._query, keep_blank_values=True))

    def _repo_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._repo_for(repo_type, repo_id, files=False)
        commit = self._commit_for(repo, rev)
        blobs = self._params().get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            b = commit.files[path]
            s: dict = {"rfilename": path}
            if blobs:
                s.update({"blobId": b.git_oid, "size": b.size})
                if b.lfs:
                    s["lfs"] = {
                        "sha256": b.sha256,
                        "size": b.size,
                        "pointerSize": len(b.pointer or b""),
                    }
            siblings.append(s)
        first = min(repo.commits.values(), key=lambda c: c.timestamp)
        info = {
            "_id": hashlib.sha1((f"{repo_type}/{repo_id}").encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": first.date,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(b.size for b in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            info["library_name"] = None
            info["spaces"] = []
        elif repo_type == "space":
            info["sdk"] = "static"
        if info["author"] is None:
            del info["author"]
        self._json(200, info)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_for(repo_type, repo_id, files=False)
        out = {
            "branches": [
                {"name": n, "ref": "refs/heads/" + n, "targetCommit": c}
                for n, c in sorted(repo.branches.items())
            ],
            "converts": [],
            "tags": [
                {"name": n, "ref": "refs/tags/" + n, "targetCommit": c}
                for n, c in sorted(repo.tags.items())
            ],
        }
        if self._params().get("include_prs", "").lower() in ("1", "true"):
            out["pullRequests"] = [
                {"name": r[len("refs/") :], "ref": r, "targetCommit": c}
                for r, c in sorted(repo.prs.items())
            ]
        self._json(200, out)

    def _tree(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        hub = self.server.hub
        repo = self._repo_for(repo_type, repo_id, files=False)
        commit = self._commit_for(repo, rev)
        params = self._params()
        recursive = params.get("recursive", "").lower() in ("1", "true")
        expand = params.get("expand", "").lower() in ("1", "true")
        if path and path not in commit.tree_oids:
            if path in commit.files:
                msg = f'"{path}" is a file, not a directory'
            else:
                msg = f'"{path}" does not exist on "{rev}"'
            self._error(404, msg, "EntryNotFound", [("X-Repo-Commit", commit.sha)])
        entries = list(_walk(commit, path, recursive))
        page_size = hub.tree_page_size
        if expand:
            page_size = min(page_size, hub.tree_page_size_expand)
        offset = 0
        cursor = params.get("cursor")
        if cursor:
            try:
                offset = int(json.loads(base64.urlsafe_b64decode(cursor + "==").decode())["offset"])
            except (ValueError, KeyError, TypeError):
                self._error(400, "Invalid cursor")
        page = entries[offset : offset + page_size]
        out = []
        for is_dir, p in page:
            if is_dir:
                e: dict = {"type": "directory", "oid": commit.tree_oids[p], "size": 0, "path": p}
            else:
                b = commit.files[p]
                e = {"type": "file", "oid": b.git_oid, "size": b.size, "path": p}
                if b.lfs and hub.xet:
                    # hidden (64 asterisks) from callers who may not read a gated repo's files
                    hidden = hub.hide_xet_hashes or not self._allowed
                    e["xetHash"] = "*" * 64 if hidden else b.xet_hash
                if b.lfs:
                    e["lfs"] = {
                        "oid": b.sha256,
                        "size": b.size,
                        "pointerSize": len(b.pointer or b""),
                    }
            if expand:
                lc = repo.last_commit_for(commit, p, is_dir)
                e["lastCommit"] = {"id": lc.sha, "title": lc.message, "date": lc.date}
                if not is_dir:
                    e["securityFileStatus"] = {
                        "status": "safe",
                        "avScan": {"virusFound": False, "virusNames": None},
                        "pickleImportScan": None,
                    }
            out.append(e)
        extra = []
        if offset + page_size < len(entries):
            nxt = (
                base64.urlsafe_b64encode(json.dumps({"offset": offset + page_size}).encode())
                .decode()
                .rstrip("=")
            )
            q = [(k, v) for k, v in parse_qsl(self._query, keep_blank_values=True) if k != "cursor"]
            q.append(("cursor", nxt))
            extra.append(("Link", f'<{hub.endpoint}{self._raw_path}?{urlencode(q)}>; rel="next"'))
        self._json(200, out, extra)


def _split_rev(segs: list[str]) -> tuple[str, list[str]]:
    """The revision (one percent-encoded segment, or an unencoded ``refs/pr/N``) and the rest."""
    if len(segs) >= 3 and segs[0] == "refs" and segs[1] in ("pr", "heads", "tags", "convert"):
        return f"refs/{unquote(segs[1])}/{unquote(segs[2])}", segs[3:]
    return unquote(segs[0]), segs[1:]


def _walk(commit: Commit, base: str, recursive: bool) -> Iterator[tuple[bool, str]]:
    """(is_dir, path) under ``base``: each level in name order, a directory before its content."""
    prefix = base + "/" if base else ""
    names: dict[str, bool] = {}
    for p in commit.files:
        if p.startswith(prefix):
            head, sep, _ = p[len(prefix) :].partition("/")
            names[head] = names.get(head, False) or bool(sep)
    for name in sorted(names):
        full = prefix + name
        yield names[name], full
        if names[name] and recursive:
            yield from _walk(commit, full, True)


def start_fakehub(tree_page_size: int = 1000) -> FakeHub:
    """Start a fake Hub and CDN on 127.0.0.1 (free ports); ``hub.close()`` stops them."""
    return FakeHub(tree_page_size=tree_page_size).start()


if pytest is not None:

    @pytest.fixture(scope="session")
    def fakehub() -> Iterator[FakeHub]:
        """One fake Hub for the session. Tests share it: give repos unique names, and reset what
        you toggle (``hub.clear_faults()``, ``hub.clear_log()``, ``hub.tree_page_size``)."""
        hub = start_fakehub()
        try:
            yield hub
        finally:
            hub.close()
