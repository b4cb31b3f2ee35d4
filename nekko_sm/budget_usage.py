"""What the disk budget counts (DESIGN section 9), measured under its lock: the bytes of the
blobs entries reach (the database's running total), the reservations of the pulls in flight
(their live leases), what those pulls have written so far (their partials and the blobs they
committed with no entry yet), the partial downloads no live pull holds or will resume
(stale: the first to evict), and the file system's free space and size.  It only reads:
deciding, planning and evicting are :mod:`nekko_sm.budget`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nekko_sm.entries import lock_held
from nekko_sm.store import NOT_PARTIALS, FileLock, Store, key_for, read_file


@dataclass
class Partial:
    """A partial download under ``ingest/``."""

    name: str
    path: Path
    nbytes: int  # on disk (blocks: a ranged download preallocates)
    mtime: float


@dataclass
class Usage:
    """What the cache holds and the disk has, at one moment (under the budget lock)."""

    entries: int  # bytes of the blobs some entry reaches, each once
    reserved: int  # what the pulls in flight reserved, together
    written: int  # what they have written so far (live partials, blobs no entry names yet)
    stale: list[Partial]  # partials no live pull holds or will resume
    free: int  # bytes free on the file system (for unprivileged users)
    disk: int  # size of the file system
    leased: set[str] = field(default_factory=set)  # every digest a live pull leased
    reservations: dict[str, int] = field(default_factory=dict)  # lease name -> bytes

    @property
    def in_flight(self) -> int:
        return max(self.reserved, self.written)

    @property
    def used(self) -> int:
        """The bytes the budget counts: blobs/ and ingest/, reservations in full."""
        return self.entries + self.in_flight + sum(p.nbytes for p in self.stale)


def measure(store: Store) -> Usage:
    """What ``store`` holds and its disk has, now (a read of the total, the leases, ingest/
    and statvfs); the caller holds the budget lock for a decision on it."""
    leases = store.live_leases()
    leased: set[str] = set()
    for digests, _ in leases.values():
        leased |= digests
    live_wanted = _wanted_by_live_pulls(store.ingest_dir / "pulls")
    stale: list[Partial] = []
    written = 0
    try:
        names = os.listdir(store.ingest_dir)
    except FileNotFoundError:
        names = []
    for name in names:
        if name in NOT_PARTIALS or name.startswith("."):
            continue
        d = store.ingest_dir / name
        nbytes, mtime = _dir_bytes(d)
        if nbytes is None:
            continue
        lock = FileLock(d / "lock")
        if not lock.acquire(blocking=False):
            written += nbytes  # a live writer's: inside its pull's reservation
            continue
        lock.release()
        if name in live_wanted:
            written += nbytes  # a live pull will resume it
        else:
            stale.append(Partial(name, d, nbytes, mtime))
    counted = store.blob_counts(leased)
    for digest in leased - set(counted):  # committed by a live pull, no entry yet
        try:
            written += store.blob_path(digest).stat().st_size
        except (FileNotFoundError, ValueError):
            pass
    st = os.statvfs(store.root)
    stale.sort(key=lambda p: p.mtime)
    return Usage(
        entries=store.blob_bytes(),
        reserved=sum(r for _, r in leases.values()),
        written=written,
        stale=stale,
        free=st.f_bavail * st.f_frsize,
        disk=st.f_blocks * st.f_frsize,
        leased=leased,
        reservations={k: r for k, (_, r) in leases.items()},
    )


def _wanted_by_live_pulls(pulls_dir: Path) -> set[str]:
    """Ingest directories a pull now running (its ``pulls/KEY.lock`` held) lists."""
    import json

    out: set[str] = set()
    for record in pulls_dir.glob("*.json"):
        if not lock_held(record.with_suffix(".lock")):
            continue  # an interrupted pull: its partials are stale for the budget
        try:
            refs = json.loads(read_file(record, 1 << 20)).get("ingest", [])
        except (OSError, ValueError, AttributeError):
            continue
        out.update(key_for(str(r)) for r in refs if isinstance(r, str))
    return out


def _dir_bytes(d: Path) -> tuple[int | None, float]:
    """(bytes on disk, newest mtime) of a partial download's files; None if not a directory."""
    total = 0
    newest = 0.0
    try:
        with os.scandir(d) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                # A sparse ranged download holds fewer blocks than its length.
                total += min(st.st_size, getattr(st, "st_blocks", 1 << 62) * 512)
                newest = max(newest, st.st_mtime)
    except (NotADirectoryError, FileNotFoundError):
        return None, 0.0
    return total, newest
