"""The seam between the service and the sources.

A source turns a parsed reference into verified blobs in the store (through
:class:`Job`) and returns a :class:`PullResult`: the descriptor ``index.json`` should
point at, the entry's digest and its files.  Sources never touch ``index.json``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Callable

from nekko_sm.config import Config
from nekko_sm.credentials import Credentials
from nekko_sm.errors import ManifestInvalid, PullTooLarge
from nekko_sm.record import dataclass, field
from nekko_sm.store import (
    EMPTY_JSON,
    MT_EMPTY,
    MT_OCI_MANIFEST,
    TITLE,
    Descriptor,
    Lease,
    Store,
)

if TYPE_CHECKING:  # not imported to run: `status` and `path` need neither
    from nekko_sm.models.hfcache import HFEntry
    from nekko_sm.transfer import Transfer

# Annotations nekko-sm writes on the manifests it makes and on index.json entries.
A_SOURCE_URL = "io.nekko.source.url"
A_ETAG = "io.nekko.source.etag"
A_HF_COMMIT = "io.nekko.hf.commit"
A_DIGEST = "io.nekko.digest"  # the entry's "digest" (file sha256, or the image digest resolved)
A_PLATFORM = "io.nekko.platform"
A_ORIGINAL = "io.nekko.source.digest"
# An OCI entry whose files are not its manifest's layers as they are (DESIGN section 8):
A_FORMAT = "io.nekko.format"  # the packaging: modelpack, docker-model, kitops, ollama, ...
A_MODEL = "io.nekko.model"  # the view name of the file an engine loads (a GGUF)
FILES_ARTIFACT_TYPE = "application/vnd.nekko.files.v1"

# Artifact types whose entry is always a directory of named links, even with one file.
DIRECTORY_ARTIFACT_TYPES = frozenset({"application/vnd.nekko.hf.repo.v1"})


def human(n: int) -> str:
    """``2199023255552`` -> ``2 TiB``: sizes in messages."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return (
                f"{size:.0f} {unit}"
                if unit == "bytes" or size == int(size)
                else f"{size:.1f} {unit}"
            )
        size /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Bytes done and expected for one pull; shared by every caller waiting on it.

    With a ``limit`` (--max-pull-size), a pull whose expected total passes it is refused
    before its bytes are fetched, and one whose bytes pass it (a body of unknown length)
    is cut off: PullTooLarge either way."""

    def __init__(
        self,
        sink: Callable[[int], None] | None = None,
        limit: int | None = None,
        what: str = "the pull",
    ) -> None:
        self._lock = threading.Lock()
        self._sink = sink
        self.limit = limit
        self.what = what
        self.total: int | None = None
        self.done = 0
        self.deduplicated = 0  # bytes the cache already had (counted in done, not downloaded)

    def _too_large(self, n: int, known: bool) -> PullTooLarge:
        if known:
            return PullTooLarge(
                f"{self.what} is {human(n)}, more than the {human(self.limit or 0)}"
                " this node allows (--max-pull-size): refused, nothing fetched"
            )
        return PullTooLarge(
            f"{self.what} passed the {human(self.limit or 0)} this node allows"
            " (--max-pull-size) with no size given up front: stopped, the"
            " partial download dropped"
        )

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            over = self.limit is not None and self.done > self.limit
        if self._sink is not None:
            self._sink(n)
        if over:
            raise self._too_large(self.done, known=False)

    def skip(self, n: int) -> None:
        """``n`` bytes need no download: the cache already has them."""
        with self._lock:
            self.done += n
            self.deduplicated += n

    def expect(self, n: int) -> None:
        with self._lock:
            self.total = (self.total or 0) + n
            total = self.total
        if self.limit is not None and total > self.limit:
            raise self._too_large(total, known=True)


class EitherSet:
    """Looks like a threading.Event to whoever only asks ``is_set``: set when any of
    ``events`` is (a pull's cancel, or the first failure among its downloads)."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


@dataclass
class Job:
    """Everything a source needs for one pull."""

    config: Config
    store: Store
    transfer: Transfer
    lease: Lease
    credentials: Credentials | None = None
    digest: str | None = None  # expected digest from the caller
    platform: str | None = None  # from the caller; None = config's
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Progress = field(default_factory=Progress)
    on_ingest: Callable[[str], None] = lambda ref: None  # records resumable ingest refs
    # Makes room for (nbytes, what, resumed) before writing: the disk budget (budget.py).
    room: Callable[[int, str, int], None] | None = None
    # Blobs stored on a guess that the entry does not name (unpack): freed after the lease.
    spare: list = field(default_factory=list)

    def ensure_space(self, nbytes: int, what: str, resumed: int = 0) -> None:
        """Before writing ``nbytes`` more (``resumed`` are in a partial already): 507 if
        they cannot fit, after evicting what the budget allows."""
        if self.room is None:
            self.store.ensure_space(nbytes, what)
        else:
            self.room(nbytes, what, resumed)

    def writer(self, ref: str, expected_size: int | None = None, extra_hashers=None):
        self.on_ingest(ref)
        return self.store.writer(ref, expected_size, self.cancel, extra_hashers)


@dataclass
class FileItem:
    name: str  # safe relative path
    digest: str
    size: int
    media_type: str = "application/octet-stream"
    etag: str | None = None  # the source's name for the bytes (HF: sha256, or git blob id)


@dataclass
class PullResult:
    manifest: Descriptor  # what index.json points at
    digest: str  # the entry's digest (DESIGN section 5)
    files: list  # [FileItem]
    platform: str | None = None
    format: str | None = None  # OCI: how the manifest packages its files (A_FORMAT)
    model: str | None = None  # the name in ``files`` of the file an engine loads
    files_manifest: Descriptor | None = None  # lists ``files`` when the layers are not them
    unpacked: list = field(default_factory=list)  # digests of the tar layers unpacked
    hf_view: HFEntry | None = None  # what the Hugging Face cache view shows of the entry


def store_artifact(
    job: Job, files: list, artifact_type: str, annotations: dict | None = None
) -> Descriptor:
    """Wrap committed blobs in an OCI artifact manifest (empty config, a titled layer each)."""
    config_digest = job.store.put_bytes(EMPTY_JSON, job.lease)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": MT_EMPTY,
            "digest": config_digest,
            "size": len(EMPTY_JSON),
            "data": "e30=",
        },
        "layers": [
            {
                "mediaType": f.media_type,
                "digest": f.digest,
                "size": f.size,
                "annotations": {TITLE: f.name, **({A_ETAG: f.etag} if f.etag else {})},
            }
            for f in files
        ],
    }
    if annotations:
        manifest["annotations"] = {k: v for k, v in annotations.items() if v is not None}
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = job.store.put_bytes(data, job.lease)
    return Descriptor(MT_OCI_MANIFEST, digest, len(data), artifact_type=artifact_type)


def file_result(
    job: Job, item: FileItem, artifact_type: str, annotations: dict, hf_view: HFEntry | None = None
) -> PullResult:
    """A pull of one file: ``item`` wrapped in an artifact manifest of its own, annotated
    with what the source says of it, and the result naming both."""
    files = [item]
    manifest = store_artifact(job, files, artifact_type, annotations)
    return PullResult(manifest, item.digest, files, hf_view=hf_view)


# Characters that make a name read other than it is (Trojan Source, CVE-2021-42574): the
# bidirectional embeddings, overrides and isolates, and the implicit marks.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
NAME_MAX = 255  # bytes in one path component (every Linux file system's limit)
PATH_NAME_MAX = 3800  # bytes in a whole name: PATH_MAX 4096, less room for the cache's own


def check_names(names: Iterable[str], what: str) -> None:
    """Refuse (ManifestInvalid, before any byte is fetched) a set of file names that cannot
    be laid out as one view: two alike (also once Unicode-normalised, NFC, as macOS and
    ZFS would store them), a file beside a directory of its name (``x`` and ``x/y``), a
    component over 255 bytes or a name over 3,800, control or bidirectional characters.

    ``names`` are safe relative paths already (:func:`nekko_sm.refs.safe_name`)."""
    import unicodedata  # here: the cold commands check no names

    seen: dict[str, str] = {}
    dirs: set[str] = set()
    for name in names:
        key = unicodedata.normalize("NFC", name)
        if any(c in _BIDI or unicodedata.category(c) == "Cc" for c in name):
            raise ManifestInvalid(
                f"{what}: the file name {shown_name(name)} has control or bidirectional characters"
            )
        parts = key.split("/")
        if len(name.encode()) > PATH_NAME_MAX or any(len(p.encode()) > NAME_MAX for p in parts):
            raise ManifestInvalid(
                f"{what}: the file name {shown_name(name)} is too long"
                f" ({NAME_MAX} bytes a component, {PATH_NAME_MAX} in all)"
            )
        if key in seen:
            same = "" if seen[key] == name else " once Unicode-normalised"
            raise ManifestInvalid(f"{what}: two files are named {shown_name(name)}{same}")
        seen[key] = name
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = next((d for d in dirs if d in seen), None)
    if clash is not None:
        raise ManifestInvalid(f"{what}: {shown_name(clash)} is both a file and a directory")


def shown_name(name: str) -> str:
    """A name from upstream, for a message: escaped (no control or bidi character reaches a
    terminal) and cut short."""
    shown = ascii(name)
    return shown if len(shown) <= 80 else shown[:77] + "...'"
