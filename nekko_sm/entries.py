"""What the cache answers about a URL: the entry JSON (files, path), its status, the list.

A complete entry's answer depends only on its descriptor and the manifests it names, and
blobs never change, so it is rendered once, when the pull commits, and kept with the
entry in the database (``info``): compact JSON whose ``path`` values are relative to the
cache root.  Answering is then a text substitution that puts the root in front of every
``"path":"`` (only a key can spell that: inside a JSON string a quote is escaped), with no
manifest read and no JSON parse; ``ls`` of 100,000 entries is one pass over the table.  An
entry without ``info`` (taken over from an ``index.json`` that had no database) is rendered
from its manifests on first use and remembered.

:class:`Catalog` also keeps the encoded answers of the complete entries the API was
asked for, keyed by the path text of the request, and drops them all when the store's
``revision`` moves (any process changed an entry, a pin or a hold): a cache hit is one
``PRAGMA data_version`` and a dictionary lookup.

Incomplete entries (a pull under way, or one interrupted that can resume) come from the
service's flights and failures and from ``ingest/pulls/KEY.json``; this module reads them,
the service writes them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from nekko_sm.access import A_PROTECTED
from nekko_sm.errors import EntryNotFound, NekkoError, UnsafeName
from nekko_sm.refs import safe_name
from nekko_sm.sources.base import (
    A_DIGEST,
    A_FORMAT,
    A_MODEL,
    A_PLATFORM,
    DIRECTORY_ARTIFACT_TYPES,
)
from nekko_sm.store import (
    A_FILES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_OCI_MANIFEST,
    TITLE,
    Descriptor,
    FileLock,
    Store,
    key_for,
    read_file,
)

# Encoded answers kept for the API, in two generations of at most half this many bytes
# each: a full young generation becomes the old one, whose answers move back when asked for
# again (the recently asked stay, in O(1) a request).  ~80,000 small entries fit; each
# costs its bytes plus about _ANSWER_OVERHEAD.
_MAX_ANSWER_BYTES = 64 << 20
_ANSWER_OVERHEAD = 200
_PATH_KEY = '"path":"'
_MODEL_KEY = '"model":"'


def pull_paths(pulls_dir: Path, key: str) -> tuple[Path, Path]:
    """The record (``KEY.json``) and lock of a pull of ``key`` under ``ingest/pulls/``."""
    k = key_for(key)
    return pulls_dir / f"{k}.json", pulls_dir / f"{k}.lock"


def is_single_file(desc: Descriptor, files: list) -> dict | None:
    """The one file of a single-file artifact entry, or of a model whose view is that one
    file and nothing else (DESIGN section 8), else None."""
    if (
        (desc.artifact_type or desc.annotations.get(A_FORMAT))
        and len(files) == 1
        and desc.media_type in MANIFEST_TYPES
        and desc.artifact_type not in DIRECTORY_ARTIFACT_TYPES
    ):
        return files[0]
    return None


class Catalog:
    """Entries as the API and CLI show them, over one store.

    ``live(key)`` is the service's view of a URL being pulled in this process: (progress
    of the flight or None, JSON of its last failure or None).
    """

    def __init__(
        self, store: Store, pulls_dir: Path, live: Callable[[str], tuple[Any, dict | None]]
    ) -> None:
        self.store = store
        self.pulls_dir = pulls_dir
        self._live = live
        root = str(store.root).rstrip("/") + "/"
        self._root_path = json.dumps(root)[1:-1]  # as a JSON string spells it
        self._files_cache: dict[str, list] = {}
        self._answers: dict[str, bytes] = {}  # the young generation
        self._old_answers: dict[str, bytes] = {}
        self._answers_revision = -1
        self._answers_bytes = 0  # of the young generation
        self._lock = threading.Lock()

    # -- rendering ------------------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.store.root))

    def files_of(self, desc: Descriptor) -> list:
        """The files of an entry: name, digest, size, path (relative to the cache root)."""
        listing = desc.annotations.get(A_FILES)
        cache_key = f"{desc.digest} {listing}" if listing else desc.digest
        cached = self._files_cache.get(cache_key)
        if cached is not None:
            return cached
        files: list = []
        if listing:  # unpacked: the view's files, listed in a manifest of their own
            files = self._manifest_files(Descriptor(MT_OCI_MANIFEST, listing, 0), "")
        elif desc.media_type in MANIFEST_TYPES:
            files = self._manifest_files(desc, "")
        elif desc.media_type in INDEX_TYPES:
            seen: set = set()
            listed: set = set()  # (digest, directory) done: an index may repeat one 2,000 times
            for child in self.store.children(desc):
                p = child.platform or {}
                if p.get("os") == "unknown" and p.get("architecture") == "unknown":
                    continue  # an attestation manifest (SBOM, provenance), not an image
                prefix = "-".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))
                try:  # the fields come from the registry: they must name one directory
                    prefix = safe_name(prefix) if "/" not in prefix else ""
                except UnsafeName:
                    prefix = ""
                prefix = (prefix or child.digest[7:19]) + "/"
                if (child.digest, prefix) in listed:
                    continue  # the same files under the same names: every one seen already
                listed.add((child.digest, prefix))
                for f in self._manifest_files(child, prefix):
                    if f["name"] not in seen:  # two children of one platform: first wins
                        seen.add(f["name"])
                        files.append(f)
        if len(self._files_cache) > 10_000:
            self._files_cache.clear()
        self._files_cache[cache_key] = files
        return files

    def _manifest_files(self, desc: Descriptor, prefix: str) -> list:
        try:
            doc = json.loads(self.store.read_blob(desc.digest))
        except (OSError, ValueError):
            return []
        out = []
        for layer in doc.get("layers") or []:
            if not isinstance(layer, dict):
                continue
            if not isinstance(layer.get("digest"), str):
                continue
            title = (layer.get("annotations") or {}).get(TITLE)
            name = layer["digest"].replace(":", "-")
            if title:
                try:
                    name = safe_name(title)
                except UnsafeName:
                    pass  # never a path outside the view: keep the digest name
            try:
                path = self._rel(self.store.blob_path(layer["digest"]))
            except NekkoError:  # not a sha256 digest: no file of ours
                continue
            out.append(
                {
                    "name": prefix + name,
                    "digest": layer.get("digest"),
                    "size": layer.get("size"),
                    "path": path,
                }
            )
        return out

    def template(self, key: str, desc: Descriptor) -> str:
        """The complete entry as compact JSON, paths relative to the cache root."""
        files = self.files_of(desc)
        single = is_single_file(desc, files)
        digest = desc.annotations.get(A_DIGEST, desc.digest)
        size = sum(f["size"] or 0 for f in files) if files else desc.size
        entry = {
            "url": key,
            "state": "complete",
            "digest": digest,
            "size": size,
            "downloaded": size,
            "path": single["path"] if single else self._rel(self.store.view_path(key)),
            "files": files,
        }
        if desc.digest != digest:
            entry["manifest"] = desc.digest
        if desc.annotations.get(A_PLATFORM):
            entry["platform"] = desc.annotations[A_PLATFORM]
        if desc.annotations.get(A_PROTECTED):
            entry["protected"] = True  # pulled with credentials (access.py)
        if desc.annotations.get(A_FORMAT):
            entry["format"] = desc.annotations[A_FORMAT]
        model = desc.annotations.get(A_MODEL)
        found = next((f for f in files if f["name"] == model), None) if model else None
        if model and found is not None:  # made absolute with the paths (_MODEL_KEY)
            entry["model"] = (
                found["path"] if single else self._rel(self.store.view_path(key) / model)
            )
        return json.dumps(entry, separators=(",", ":"))

    def _absolute(
        self, text: str, pinned: bool, held_until: float | None, last_used: float | None
    ) -> str:
        """The kept rendering made whole: absolute paths, and the entry's use (DESIGN 5)."""
        return (
            text[:-1]
            .replace(_PATH_KEY, _PATH_KEY + self._root_path)
            .replace(_MODEL_KEY, _MODEL_KEY + self._root_path)
            + _use_fields(pinned, held_until, last_used)
            + "}"
        )

    def text(self, key: str, render: bool = True) -> str | None:
        """The complete entry for ``key`` as JSON text, or None when there is none (or,
        without ``render``, when it was never rendered: that reads manifests and writes)."""
        row = self.store.entry_info(key)
        if row is None:
            return None
        info, pinned, held_until, last_used = row
        if info is None and not render:
            return None
        if info is None:  # taken over from an old index.json: render it once
            info = self._render(key)
            if info is None:
                return None
            self.store.set_entry_info([(key, info, shown_size(info))])
        return self._absolute(info, pinned, held_until, last_used)

    def entry(self, key: str) -> dict:
        """The complete entry for ``key``; EntryNotFound when there is none."""
        text = self.text(key)
        if text is None:
            raise EntryNotFound(f"{key} is not in the cache")
        return json.loads(text)

    def answer(
        self, token: str, resolve: Callable[[str], str], render: bool = True
    ) -> bytes | None:
        """The encoded answer to ``GET /content/TOKEN`` when it is a complete entry.

        ``resolve`` turns the token into the canonical URL (it raises on bad input);
        ``render=False``: None rather than render an entry (see :meth:`text`).
        """
        revision = self.store.revision()
        if revision != self._answers_revision:
            with self._lock:
                if revision != self._answers_revision:
                    self._answers, self._old_answers = {}, {}
                    self._answers_bytes = 0
                    self._answers_revision = revision
        answers = self._answers
        hit = answers.get(token)
        if hit is not None:
            return hit
        hit = self._old_answers.get(token)
        if hit is not None:  # asked again: back to the young generation
            self._keep(answers, token, hit)
            return hit
        text = self.text(resolve(token), render)
        if text is None:
            return None
        body = text.encode() + b"\n"
        self._keep(answers, token, body)
        return body

    def _keep(self, answers: dict, token: str, body: bytes) -> None:
        """Keep ``body`` in the young generation (unless the revision changed meanwhile)."""
        with self._lock:
            if self._answers is not answers:
                return
            cost = len(body) + len(token) + _ANSWER_OVERHEAD
            self._answers_bytes += cost
            if self._answers_bytes > _MAX_ANSWER_BYTES // 2:
                self._old_answers, self._answers = answers, {}
                self._answers_bytes = cost
                answers = self._answers
            answers[token] = body

    # -- status and list ------------------------------------------------------------------
    def status(self, key: str) -> dict:
        """The entry for ``key``: complete, incomplete (with progress), or EntryNotFound."""
        text = self.text(key)
        if text is not None:
            return json.loads(text)
        progress, failure = self._live(key)
        if progress is not None:
            return {
                "url": key,
                "state": "downloading",
                "downloaded": progress.done,
                "size": progress.total,
                "files": [],
                **_NO_USE,
            }
        record, lock_path = pull_paths(self.pulls_dir, key)
        try:
            state = json.loads(read_file(record, 1 << 20))
        except (OSError, ValueError):
            state = None
        if state is not None:
            busy = lock_held(lock_path)
            done = sum(self.store.partial_size(r) for r in state.get("ingest", []))
            entry: dict[str, Any] = {
                "url": key,
                "state": "downloading" if busy else "incomplete",
                "downloaded": done,
                "size": None,
                "files": [],
                **_NO_USE,
            }
            if failure is not None:
                entry["error"] = dict(failure)
            return entry
        if failure is not None:
            raise EntryNotFound(
                f"{key} is not in the cache: the last pull failed: {failure['message']}"
            )
        raise EntryNotFound(f"{key} is not in the cache")

    def _infos(self) -> Iterator[tuple[str, str, bool, float | None, float]]:
        """(key, template, pinned, held until, last used) of every complete entry by key;
        renders what has none yet."""
        missing: list[tuple[str, str, int | None]] = []
        for key, info, pinned, held_until, last_used in self.store.entry_infos():
            if info is None:
                info = self._render(key)
                if info is None:
                    continue
                missing.append((key, info, shown_size(info)))
            yield key, info, pinned, held_until, last_used
        self.store.set_entry_info(missing)

    def _render(self, key: str) -> str | None:
        """The rendering of ``key``'s entry made now (it had none), or None if it is gone."""
        desc = self.store.get_entry(key)
        return None if desc is None else self.template(key, desc)

    def _pending(self, seen: set[str]) -> Iterator[dict]:
        """The entries of pulls under way or interrupted, other than ``seen``."""
        for record in sorted(self.pulls_dir.glob("*.json")):
            try:
                url = json.loads(read_file(record, 1 << 20))["url"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if url not in seen:
                try:
                    yield self.status(url)
                except NekkoError:
                    pass

    def list_texts(self) -> list[str]:
        """Every entry as JSON text: the complete ones by URL, then pulls under way."""
        out: list[str] = []
        seen: set[str] = set()
        for key, info, pinned, held_until, last_used in self._infos():
            out.append(self._absolute(info, pinned, held_until, last_used))
            seen.add(key)
        out.extend(json.dumps(e, separators=(",", ":")) for e in self._pending(seen))
        return out

    def summaries(self) -> list[tuple[str, str, int | None, bool, float | None, float | None]]:
        """(url, state, size, pinned, held until, last used) of every entry, as
        :meth:`list_texts` orders them: one scan of a small index of the database, after
        giving the entries that have none their shown size (taken over, or older)."""
        sizes = []
        for key, info in self.store.unsized_entries():
            info = info if info is not None else self._render(key)
            if info is not None:
                sizes.append((key, info, shown_size(info)))
        self.store.set_entry_info(sizes)
        out: list[tuple[str, str, int | None, bool, float | None, float | None]] = [
            (key, "complete", size, bool(pinned), held_until, last_used)
            for key, size, pinned, held_until, last_used in self.store.entry_listing()
        ]
        seen = {row[0] for row in out}
        out.extend(
            (e["url"], e["state"], e.get("size"), False, None, None) for e in self._pending(seen)
        )
        return out

    def list(self) -> list:
        return [json.loads(t) for t in self.list_texts()]


# An entry not (yet) in the cache: not pinned, not held, never used.
_NO_USE: dict[str, Any] = {"pinned": False, "held_until": None, "last_used": None}


def shown_size(info: str) -> int:
    """The size of a rendered entry, read without parsing it: the rendering starts with
    ``url``, ``state`` and ``digest``, whose values hold no bare quote, so the first
    ``,"size":`` is the entry's own."""
    at = info.index(',"size":') + 8
    return int(info[at : info.index(",", at)])


def _use_fields(pinned: bool, held_until: float | None, last_used: float | None) -> str:
    """``,"pinned":…,"held_until":…,"last_used":…`` (epoch seconds, sub-second precision)."""
    return (
        ',"pinned":'
        + ("true" if pinned else "false")
        + ',"held_until":'
        + (repr(float(held_until)) if held_until is not None else "null")
        + ',"last_used":'
        + (repr(float(last_used)) if last_used is not None else "null")
    )


def lock_held(lock_path: Path) -> bool:
    """Is someone (this or another process) holding the flock at ``lock_path``?"""
    if not lock_path.exists():
        return False
    probe = FileLock(lock_path)
    if probe.acquire(blocking=False):
        probe.release()
        return False
    return True
