"""The store's contract: commit, resume, mismatch, concurrent writers, index, gc, verify."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nekko_sm.errors import (
    CacheCorrupt,
    InsufficientStorage,
    IntegrityError,
    InvalidDigest,
    SizeMismatch,
)
from nekko_sm.store import (
    MT_OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    Lease,
    Store,
    check_digest,
    sha256_digest,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache").init()


def _manifest(store: Store, layers: list[bytes]) -> Descriptor:
    descs = []
    for data in layers:
        d = store.put_bytes(data)
        descs.append({"mediaType": "application/octet-stream", "digest": d, "size": len(data)})
    cfg = store.put_bytes(b"{}")
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg, "size": 2},
        "layers": descs,
    }
    raw = json.dumps(doc).encode()
    return Descriptor(MT_OCI_MANIFEST, store.put_bytes(raw), len(raw))


def test_layout_files(store):
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    idx = json.loads((store.root / "index.json").read_text())
    assert idx["schemaVersion"] == 2 and idx["manifests"] == []


def test_commit_makes_read_only_blob(store):
    data = os.urandom(3 << 20)
    with store.writer("x") as w:
        w.write(data)
        desc = w.commit(sha256_digest(data))
    path = store.blob_path(desc.digest)
    assert path.read_bytes() == data
    assert desc.size == len(data)
    assert not os.stat(path).st_mode & 0o222
    assert list(store.ingest_dir.iterdir()) == [store.leases_dir]  # ingest cleaned up


def test_digest_mismatch_commits_nothing(store):
    with store.writer("x") as w:
        w.write(b"hello")
        with pytest.raises(IntegrityError):
            w.commit(sha256_digest(b"other"))
    assert list(store.blobs()) == []
    assert store.partial_size("x") == 0


def test_size_mismatch_commits_nothing(store):
    with store.writer("x", expected_size=10) as w:
        w.write(b"hello")
        with pytest.raises(SizeMismatch):
            w.commit()
    assert list(store.blobs()) == []


def test_more_bytes_than_promised_refused(store):
    with store.writer("x", expected_size=4) as w, pytest.raises(SizeMismatch):
        w.write(b"hello")


def test_resume_keeps_and_rehashes_partial(store):
    data = os.urandom(1 << 20)
    with store.writer("ref") as w:
        w.write(data[:1000])
        w.save_state(validator='"e1"')
    # a new writer (after a crash, say) sees the partial and its state
    with store.writer("ref") as w:
        assert w.offset == 1000
        assert w.state["validator"] == '"e1"'
        w.write(data[1000:])
        desc = w.commit(sha256_digest(data))
    assert store.blob_path(desc.digest).read_bytes() == data


def test_partial_longer_than_expected_starts_over(store):
    with store.writer("ref") as w:
        w.write(b"x" * 100)
    with store.writer("ref", expected_size=10) as w:
        assert w.offset == 0


def test_reset_starts_over(store):
    with store.writer("ref") as w:
        w.write(b"garbage")
        w.reset()
        w.write(b"good")
        desc = w.commit(sha256_digest(b"good"))
    assert store.blob_path(desc.digest).read_bytes() == b"good"


def test_extra_hashers_cover_resumed_bytes(store):
    data = b"abc" * 1000
    make = lambda: hashlib.sha1(b"blob %d\0" % len(data))
    with store.writer("g", extra_hashers={"git": make}) as w:
        w.write(data[:500])
    with store.writer("g", extra_hashers={"git": make}) as w:
        w.write(data[500:])
        assert w.hexdigest("git") == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_same_blob_from_two_threads_written_once(store):
    data = os.urandom(1 << 20)
    digest = sha256_digest(data)
    writes = []

    def worker():
        with store.writer(digest) as w:
            if store.has_blob(digest):
                return
            writes.append(1)
            time.sleep(0.2)
            w.write(data)
            w.commit(digest)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writes == [1]
    assert store.blob_path(digest).read_bytes() == data


_CHILD = r"""
import os, sys, json
sys.path.insert(0, sys.argv[1])
from nekko_sm.store import Store, Descriptor, MT_OCI_MANIFEST, sha256_digest
store = Store(sys.argv[2]).init()
for i in range(int(sys.argv[4])):
    shared = b"shared-layer" * 1000
    own = (sys.argv[3] + str(i)).encode() * 1000
    for data in (shared, own):
        d = sha256_digest(data)
        with store.writer(d) as w:
            if not store.has_blob(d):
                w.reset(); w.write(data); w.commit(d)
    m = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "layers": [
        {"mediaType": "x", "digest": sha256_digest(shared), "size": len(shared)},
        {"mediaType": "x", "digest": sha256_digest(own), "size": len(own)}]}).encode()
    md = store.put_bytes(m)
    store.put_entry("http://h/%s/%d" % (sys.argv[3], i), Descriptor(MT_OCI_MANIFEST, md, len(m)))
"""


def test_two_processes_commit_same_and_different_blobs(store):
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(ROOT), str(store.root), name, "15"])
        for name in ("a", "b")
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    urls = sorted(d.annotations[REF_NAME] for d in store.entries())
    assert urls == sorted(f"http://h/{n}/{i}" for n in "ab" for i in range(15))
    assert store.verify() == []
    assert not list(store.ingest_dir.glob("*/data"))


def test_index_entries_replace_and_remove(store):
    d1 = _manifest(store, [b"one"])
    d2 = _manifest(store, [b"two"])
    store.put_entry("u1", d1)
    store.put_entry("u1", d2)
    store.put_entry("u2", d1)
    assert store.get_entry("u1").digest == d2.digest
    assert len(store.entries()) == 2
    assert store.remove_entry("u1").digest == d2.digest
    assert store.remove_entry("u1") is None
    assert [d.annotations[REF_NAME] for d in store.entries()] == ["u2"]


def test_put_entry_refuses_uncommitted_blob(store):
    with pytest.raises(CacheCorrupt):
        store.put_entry("u", Descriptor(MT_OCI_MANIFEST, "sha256:" + "0" * 64, 3))


def test_corrupt_index_is_reported(store):
    """index.json is read when a cache is opened: a file that is not ours is merged in,
    so one that does not parse is reported, not silently replaced."""
    (store.root / "index.json").write_text("{not json")
    with pytest.raises(CacheCorrupt):
        Store(store.root).entries()


def test_gc_keeps_what_entries_and_leases_reach(store):
    keep = _manifest(store, [b"shared", b"a-only"])
    gone = _manifest(store, [b"shared", b"b-only"])
    store.put_entry("a", keep)
    store.put_entry("b", gone)
    store.remove_entry("b")
    leased = store.put_bytes(b"in flight")
    with Lease(store) as lease:
        lease.add(leased)
        report = store.gc()
        assert store.has_blob(leased)
    freed = set(report.blobs_freed)
    assert sha256_digest(b"b-only") in freed and gone.digest in freed
    assert store.has_blob(sha256_digest(b"shared"))
    assert store.has_blob(sha256_digest(b"a-only"))
    assert store.verify() == []
    # the lease is released now: its blob is free to go
    assert leased in store.gc().blobs_freed


def test_gc_ignores_leases_of_dead_processes(store):
    d = store.put_bytes(b"orphan")
    (store.leases_dir / "dead-1").write_text(d + "\n")  # no one holds its lock
    assert d in store.gc().blobs_freed
    assert not (store.leases_dir / "dead-1").exists()


def test_gc_dry_run_frees_nothing(store):
    d = store.put_bytes(b"orphan")
    report = store.gc(dry_run=True)
    assert report.blobs_freed == [d]
    assert store.has_blob(d)


def test_gc_removes_stale_partials_but_not_live_ones(store):
    with store.writer("stale") as w:
        w.write(b"abc")
    live = store.writer("live")
    live.write(b"xyz")
    live.save_state(validator="v")  # flushes
    try:
        report = store.gc()
        assert len(report.partials_freed) == 1
        assert store.partial_size("stale") == 0
        assert store.partial_size("live") == 3
    finally:
        live.close()


def test_gc_keeps_partials_an_interrupted_pull_will_resume(store):
    with store.writer("url:http://h/f") as w:
        w.write(b"half of it")
    pulls = store.ingest_dir / "pulls"
    pulls.mkdir()
    (pulls / "p.json").write_text(json.dumps({"url": "http://h/f", "ingest": ["url:http://h/f"]}))
    (pulls / "p.lock").write_text("")
    assert store.gc().partials_freed == []
    assert store.partial_size("url:http://h/f") == 10 and (pulls / "p.json").exists()
    # a week later nobody resumed it: stale
    assert len(store.gc(partial_max_age=-1).partials_freed) == 1
    assert store.partial_size("url:http://h/f") == 0


def test_verify_finds_and_repairs_damage(store):
    d = _manifest(store, [b"layer"])
    store.put_entry("u", d)
    path = store.blob_path(sha256_digest(b"layer"))
    os.chmod(path, 0o644)
    path.write_bytes(b"LAYER")
    problems = store.verify()
    assert problems == [(sha256_digest(b"layer"), "digest mismatch")]
    store.verify(repair=True)
    assert not path.exists()
    assert store.get_entry("u") is None  # the entry that needed it is dropped
    assert store.verify() == []


def test_views_are_links_to_blobs(store):
    d1 = store.put_bytes(b"weights")
    d2 = store.put_bytes(b"tok")
    view = store.make_view("hf://x", [("model.bin", d1), ("tokenizer/tok.json", d2)])
    assert (view / "model.bin").read_bytes() == b"weights"
    assert (view / "tokenizer" / "tok.json").read_bytes() == b"tok"
    assert (view / "model.bin").is_symlink()
    store.remove_view("hf://x")
    assert not view.exists()


def test_ensure_space_refuses_what_cannot_fit(store):
    with pytest.raises(InsufficientStorage):
        store.ensure_space(1 << 60)
    store.ensure_space(1)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256:abc",
        "md5:" + "0" * 32,
        "sha256:" + "G" * 64,
        "sha256:" + "0" * 64 + "/../x",
        None,
    ],
)
def test_bad_digests_are_refused(bad):
    with pytest.raises(InvalidDigest):
        check_digest(bad)


def test_out_of_order_writes_hash_behind_the_frontier(store):
    data = os.urandom(5 << 20)
    parts = [(3 << 20, 5 << 20), (0, 1 << 20), (1 << 20, 3 << 20)]
    with store.writer("r", expected_size=len(data)) as w:
        w.preallocate(len(data))
        w.save_state(ranged={"total": len(data), "parts": []})
        done = 0
        for start, end in parts:
            w.pwrite(data[start:end], start)
            if start == done:
                done = end
                if done == 1 << 20:
                    w.advance(done)
        w.advance(len(data))
        desc = w.commit(sha256_digest(data))
    assert store.blob_path(desc.digest).read_bytes() == data


def test_ranged_partial_resumes_from_its_part_map(store):
    data = os.urandom(4 << 20)
    half = 2 << 20
    with store.writer("r", expected_size=len(data)) as w:
        w.preallocate(len(data))
        w.pwrite(data[:half], 0)
        w.pwrite(data[3 << 20 :], 3 << 20)
        w.sync()
        w.save_state(
            ranged={
                "total": len(data),
                "parts": [[0, half, half], [half, 3 << 20, half], [3 << 20, 4 << 20, 4 << 20]],
            }
        )
    with store.writer("r", expected_size=len(data)) as w:
        assert w.offset == half  # the contiguous prefix, re-hashed in the background
        w.pwrite(data[half : 3 << 20], half)
        w.advance(len(data))
        desc = w.commit(sha256_digest(data))
    assert desc.digest == sha256_digest(data)


def test_ranged_commit_with_a_gap_is_refused(store):
    with store.writer("r", expected_size=100) as w:
        w.preallocate(100)
        w.save_state(ranged={"total": 100, "parts": [[0, 100, 50]]})
        w.pwrite(b"x" * 50, 0)
        w.advance(50)
        with pytest.raises(SizeMismatch):
            w.commit()
    assert list(store.blobs()) == []


def test_preallocate_beyond_the_disk_is_insufficient_storage(store):
    with store.writer("huge") as w, pytest.raises(InsufficientStorage):
        w.preallocate(1 << 60)
