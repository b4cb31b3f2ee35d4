"""The cache's metadata (issue 11): nekko.db, reference counts, index.json by group commit.

Contract of store/db.py and store/index.py, and of gc.py's free/verify on top of them:
counts change with entries, removal frees exactly what no one else needs and no lease
holds, index.json follows the database and is repaired at open, an old cache is taken
over without losing an entry, and the interpreter without sqlite3 gets one clear line.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from nekko_sm import config as cfg
from nekko_sm.errors import CacheCorrupt, ConfigError
from nekko_sm.service import Service
from nekko_sm.store import MT_OCI_INDEX, MT_OCI_MANIFEST, REF_NAME, Descriptor, Lease, Store
from nekko_sm.store import db as db_module
from nekko_sm.store.layout import sha256_digest

ROOT = Path(__file__).resolve().parent.parent
LEGACY = Path(__file__).resolve().parent / "data" / "legacy-cache.tar.gz"


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "cache").init()
    yield s
    s.close()


def _manifest(store: Store, layers: list[bytes], platform: dict | None = None) -> Descriptor:
    descs = [
        {"mediaType": "application/octet-stream", "digest": store.put_bytes(d), "size": len(d)}
        for d in layers
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": store.put_bytes(b"{}"),
            "size": 2,
        },
        "layers": descs,
    }
    raw = json.dumps(doc).encode()
    return Descriptor(MT_OCI_MANIFEST, store.put_bytes(raw), len(raw), platform=platform)


def _refs(store: Store, data: bytes) -> int:
    rows = store._index.db.query("SELECT refs FROM blobs WHERE digest = ?", (sha256_digest(data),))
    return rows[0][0] if rows else 0


def _index_urls(root: Path) -> list[str]:
    doc = json.loads((root / "index.json").read_bytes())
    return [d["annotations"][REF_NAME] for d in doc["manifests"]]


def _generation_of_file(root: Path) -> int:
    doc = json.loads((root / "index.json").read_bytes())
    return int(doc["annotations"]["io.nekko.index.generation"].split(".")[1])


# --------------------------------------------------------------------------------------------
# counts and removal


def test_counts_follow_entries_once_per_entry(store):
    a = _manifest(store, [b"shared", b"a-only", b"shared"])  # twice in one tree: counted once
    b = _manifest(store, [b"shared", b"b-only"])
    store.put_entry("a", a)
    store.put_entry("b", b)
    assert (_refs(store, b"shared"), _refs(store, b"a-only"), _refs(store, b"{}")) == (2, 1, 2)
    store.put_entry("a", b)  # a now points where b does: a's old blobs drop out
    assert (_refs(store, b"shared"), _refs(store, b"a-only"), _refs(store, b"b-only")) == (2, 0, 2)
    assert store.remove_entry("a").digest == b.digest
    assert _refs(store, b"b-only") == 1
    assert store.verify() == []


def test_free_deletes_exactly_what_only_it_used(store):
    a = _manifest(store, [b"shared", b"a-only"])
    b = _manifest(store, [b"shared", b"b-only"])
    store.put_entry("a", a)
    store.put_entry("b", b)
    orphan = store.put_bytes(b"nobody's")  # not an entry's: free leaves it to gc
    gone, report = store.free_entry("a")
    assert gone.digest == a.digest
    assert set(report.blobs_freed) == {a.digest, sha256_digest(b"a-only")}
    assert report.bytes_freed == a.size + len(b"a-only")
    for d in (b.digest, sha256_digest(b"shared"), sha256_digest(b"b-only"), orphan):
        assert store.has_blob(d)
    assert store.free_entry("a") == (None, report.__class__())
    assert store.verify() == []
    assert store.gc().blobs_freed == [orphan]


def test_free_keeps_what_a_live_pull_leased(store):
    a = _manifest(store, [b"in use by a pull"])
    store.put_entry("a", a)
    layer = sha256_digest(b"in use by a pull")
    with Lease(store) as lease:
        lease.add(layer)
        _, report = store.free_entry("a")
        assert layer not in report.blobs_freed and store.has_blob(layer)
        assert a.digest in report.blobs_freed
    assert not os.listdir(store.ingest_dir / "trash")
    assert store.gc().blobs_freed == [layer]  # the lease is gone: now it may go


def test_commit_refuses_what_a_removal_freed(store):
    a = _manifest(store, [b"layer"])
    raw = store.read_blob(a.digest)
    store.put_entry("a", a)
    store.free_entry("a")  # manifest, layer and config: no one else had them
    store.put_bytes(raw)  # a pull that leased nothing put the manifest back, not its layer
    with pytest.raises(CacheCorrupt, match="not in the cache"):
        store.put_entry("a", a)
    assert store.get_entry("a") is None


def test_verify_finds_and_repairs_wrong_counts(store):
    a = _manifest(store, [b"x"])
    store.put_entry("a", a)
    db = store._index.db
    db.execute("UPDATE blobs SET refs = 5 WHERE digest = ?", (sha256_digest(b"x"),))
    db.execute("INSERT INTO blobs (digest, refs) VALUES (?, 1)", ("sha256:" + "e" * 64,))
    db.execute("UPDATE entries SET reach = ? WHERE key = 'a'", (a.digest,))
    problems = dict(store.verify())
    assert problems[sha256_digest(b"x")] == "reference count 5, 1 entries reach it"
    assert problems["sha256:" + "e" * 64] == "reference count 1, 0 entries reach it"
    assert "reach of a is out of date" in problems[a.digest]
    store.verify(repair=True)
    assert store.verify() == []
    assert _refs(store, b"x") == 1


def test_a_crash_mid_removal_is_repaired_at_open(store):
    """Blobs moved to the trash by a removal that never committed go back; others go."""
    a = _manifest(store, [b"kept"])
    store.put_entry("a", a)
    store.close()
    trash = store.ingest_dir / "trash"
    trash.mkdir()
    kept = sha256_digest(b"kept")
    os.rename(store.blob_path(kept), trash / f"{kept[7:]}.123.456")  # its entry still counts it
    junk = store.put_bytes(b"freed, committed")
    os.rename(store.blob_path(junk), trash / f"{junk[7:]}.123.789")
    reopened = Store(store.root)
    assert reopened.verify() == []
    assert reopened.has_blob(kept) and not reopened.has_blob(junk)
    assert os.listdir(trash) == []
    reopened.close()


# --------------------------------------------------------------------------------------------
# index.json


def test_index_json_is_derived_and_stamped(store):
    for i in range(5):
        store.put_entry(f"u{i}", _manifest(store, [f"l{i}".encode()]))
    store.remove_entry("u3")
    store.flush()
    doc = json.loads((store.root / "index.json").read_bytes())
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == MT_OCI_INDEX
    assert _index_urls(store.root) == ["u0", "u1", "u2", "u4"]
    assert _generation_of_file(store.root) == store.generation() == 6
    assert [d.to_json() for d in store.entries()] == doc["manifests"]


def test_many_commits_one_rewrite(store, monkeypatch):
    writes = []
    real = store._index.file.write
    monkeypatch.setattr(store._index.file, "write", lambda *a: (writes.append(a[1]), real(*a)))
    descs = [_manifest(store, [f"layer {i}".encode()]) for i in range(40)]
    threads = [
        threading.Thread(target=store.put_entry, args=(f"u{i:02d}", d)) for i, d in enumerate(descs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.flush()
    assert _index_urls(store.root) == [f"u{i:02d}" for i in range(40)]
    assert 1 <= len(writes) < 40, writes  # grouped, and the last shows every commit
    assert writes[-1] == store.generation() == 40


def test_one_shot_process_leaves_index_json_current(tmp_path):
    cache = tmp_path / "cache"
    code = (
        "import sys, json; from nekko_sm.store import Store, Descriptor, MT_OCI_MANIFEST\n"
        "s = Store(sys.argv[1]).init()\n"
        "for i in range(3):\n"
        "    raw = json.dumps({'schemaVersion': 2, 'layers': [], 'n': i}).encode()\n"
        "    s.put_entry(f'u{i}', Descriptor(MT_OCI_MANIFEST, s.put_bytes(raw), len(raw)))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(cache)], check=True, cwd=ROOT, timeout=60)
    assert _index_urls(cache) == ["u0", "u1", "u2"]  # nobody called flush or close


def test_index_json_behind_after_a_kill_is_rebuilt_at_open(tmp_path):
    cache = tmp_path / "cache"
    code = (
        "import os, sys, json, signal; from nekko_sm.store import Store, Descriptor,"
        " MT_OCI_MANIFEST\n"
        "s = Store(sys.argv[1]).init()\n"
        "s._index._flusher.kick = lambda: None  # no rewrite before the kill\n"
        "raw = json.dumps({'schemaVersion': 2, 'layers': []}).encode()\n"
        "s.put_entry('u', Descriptor(MT_OCI_MANIFEST, s.put_bytes(raw), len(raw)))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=ROOT, timeout=60, check=False)
    assert r.returncode == -9
    assert _index_urls(cache) == []  # the commit is in the database only
    store = Store(cache)
    assert [d.annotations[REF_NAME] for d in store.entries()] == ["u"]
    assert _index_urls(cache) == ["u"]  # opening made it current
    store.close()


def test_missing_index_json_is_rebuilt(store):
    store.put_entry("u", _manifest(store, [b"x"]))
    store.close()
    (store.root / "index.json").unlink()
    Store(store.root).init().close()
    assert _index_urls(store.root) == ["u"]


def test_an_index_json_written_by_another_tool_is_merged(store):
    store.put_entry("ours", _manifest(store, [b"ours"]))
    store.flush()
    theirs = _manifest(store, [b"theirs"])
    store.close()
    doc = json.loads((store.root / "index.json").read_bytes())
    doc.pop("annotations")
    doc["manifests"].append({**theirs.to_json(), "annotations": {REF_NAME: "theirs"}})
    (store.root / "index.json").write_text(json.dumps(doc, indent=1))
    reopened = Store(store.root)
    assert sorted(d.annotations[REF_NAME] for d in reopened.entries()) == ["ours", "theirs"]
    assert _index_urls(store.root) == ["ours", "theirs"]
    assert reopened.verify() == []
    reopened.close()


def test_a_cache_made_before_the_database_loses_no_entry(tmp_path):
    """tests/data/legacy-cache.tar.gz was written by the previous release (see its script)."""
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path)
    cache = tmp_path / "cache"
    before = json.loads((cache / "index.json").read_bytes())["manifests"]
    assert not (cache / "nekko.db").exists() and len(before) == 5
    svc = Service(cfg.build({"cache_dir": str(cache)}, {}))
    try:
        assert [d.to_json() for d in svc.store.entries()] == before
        assert svc.store.verify() == []
        entries = {e["url"]: e for e in svc.list()}
        assert set(entries) == {d["annotations"][REF_NAME] for d in before}
        for e in entries.values():
            assert e["state"] == "complete"
            for f in e["files"]:
                assert Path(f["path"]).exists()
            assert Path(e["path"]).exists()
        multi = entries["oci://registry.test/legacy/multi:v1?platform=all"]
        assert sorted(f["name"] for f in multi["files"]) == [
            "linux-amd64/layer",
            "linux-amd64/shared",
            "linux-arm64/layer",
            "linux-arm64/shared",
        ]
        a = next(u for u in entries if u.endswith("/a.bin"))
        assert svc.remove(a)["blobs_freed"] == 1  # its manifest: the file is shared
        assert Path(entries[a + "?again"]["path"]).exists()
        assert svc.store.verify() == []
    finally:
        svc.close()
    doc = json.loads((cache / "index.json").read_bytes())
    assert len(doc["manifests"]) == 4 and "annotations" in doc


# --------------------------------------------------------------------------------------------
# use, pins, holds, aliases


def test_touch_pin_hold_and_eviction_order(store):
    t = time.time() + 1000  # later than the commits, which count as a use
    for i, name in enumerate(["a", "b", "c", "d"]):
        store.put_entry(name, _manifest(store, [name.encode()]))
        store.touch(name, t + i)
    generation, revision = store.generation(), store.revision()
    assert store.touch("b", t + 10) and not store.touch("nope", t)
    assert store.touch("b", t + 5)  # never goes back in time
    assert store.entry_record("b").last_used == t + 10
    # index.json does not change; the revision does, so cached answers show the new use
    assert store.generation() == generation and store.revision() > revision
    assert [r.key for r in store.eviction_candidates()] == ["a", "c", "d", "b"]
    assert store.set_pin("a") and store.set_hold("c", t + 100)
    assert store.revision() > revision and store.generation() == generation
    assert [r.key for r in store.eviction_candidates(now=t + 50)] == ["d", "b"]
    assert [r.key for r in store.eviction_candidates(now=t + 200, limit=1)] == ["c"]
    rec = store.entry_record("a")
    assert rec.pinned and rec.last_used == t and rec.held_until is None
    assert store.set_protected("d") and store.entry_record("d").protected
    # a new pull of a known URL keeps what the user said about it
    store.put_entry("a", _manifest(store, [b"a2"]))
    assert store.entry_record("a").pinned
    assert not store.set_pin("nope")


def test_revision_shows_this_process_at_once_others_within_watch_every(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    mine, other = Store(root).init(), Store(root).init()  # two openings: two "processes"
    looks: list[str] = []
    real = mine._index.db._connect

    def traced():
        conn = real()
        conn.set_trace_callback(lambda sql: looks.append(sql) if "data_version" in sql else None)
        return conn

    monkeypatch.setattr(mine._index.db, "_connect", traced)
    try:
        mine.put_entry("a", _manifest(mine, [b"a"]))
        before = mine.revision()
        looks.clear()
        start = time.monotonic()
        for _ in range(1000):  # no commit anywhere: asked 1,000 times, looked at rarely
            assert mine.revision() == before
        elapsed = time.monotonic() - start
        assert len(looks) <= 1 + elapsed / db_module.WATCH_EVERY, (len(looks), elapsed)
        assert mine.set_pin("a") and mine.revision() > before  # its own commit: at once
        before = mine.revision()
        assert other.set_pin("a", False)  # another's: within WATCH_EVERY
        time.sleep(db_module.WATCH_EVERY * 2)
        assert mine.revision() > before
    finally:
        mine.close()
        other.close()


def test_unique_size_is_what_removal_alone_frees(store):
    store.put_entry("a", _manifest(store, [b"shared!", b"mine"]))
    store.put_entry("b", _manifest(store, [b"shared!"]))
    a = store.get_entry("a")
    assert store.unique_size("a") == a.size + len(b"mine")
    assert store.free_entry("a")[1].bytes_freed == a.size + len(b"mine")


def test_aliases(store):
    d = sha256_digest(b"x")
    assert store.alias("git-sha1", "abc") is None
    store.set_alias("git-sha1", "abc", d)
    store.set_alias("git-sha1", "abc", d)
    assert store.alias("git-sha1", "abc") == d
    assert store.drop_alias("git-sha1", "abc") and store.alias("git-sha1", "abc") is None


# --------------------------------------------------------------------------------------------
# what the listing and removal read


def test_ls_status_and_rm_read_no_manifest(tmp_path, monkeypatch):
    svc = Service(cfg.build({"cache_dir": str(tmp_path / "cache")}, {}))
    try:
        store = svc.store
        for i in range(30):
            desc = _manifest(store, [f"file {i}".encode(), b"common"])
            svc._commit(f"http://h/{i}", _result(desc))

        def no_reads(*a, **k):
            raise AssertionError("a manifest was read")

        monkeypatch.setattr(store, "read_blob", no_reads)
        monkeypatch.setattr(svc.store._gc, "children", no_reads)
        svc.catalog._files_cache.clear()
        assert len(svc.list()) == 30
        assert svc.status("http://h/7")["state"] == "complete"
        assert svc.remove("http://h/7")["blobs_freed"] == 2  # its manifest and its file
        assert svc.store.count_entries() == 29
    finally:
        svc.close()


def test_ls_scans_one_covering_index_and_an_older_database_gets_its_sizes(tmp_path):
    root = tmp_path / "cache"
    svc = Service(cfg.build({"cache_dir": str(root)}, {}))
    try:
        for i in range(5):
            svc._commit(f"http://h/{i}", _result(_manifest(svc.store, [b"x" * (i + 1)])))
        svc.pin("http://h/3", True)
        before = svc.catalog.summaries()
        plan = svc.store._index.db.query(
            "EXPLAIN QUERY PLAN SELECT key, shown_size, pinned, held_until, last_used"
            " FROM entries INDEXED BY entries_listing ORDER BY key"
        )
        assert "COVERING INDEX entries_listing" in str(plan)
    finally:
        svc.close()
    assert [(r[0], r[2], r[3]) for r in before] == [
        (f"http://h/{i}", i + 1, i == 3) for i in range(5)
    ]
    # The same cache as a nekko-sm before schema 3 left it: no column, no listing index.
    con = sqlite3.connect(root / "nekko.db")
    con.executescript(
        "DROP INDEX entries_listing; DROP INDEX entries_unsized;"
        " ALTER TABLE entries DROP COLUMN shown_size; PRAGMA user_version = 2;"
    )
    con.close()
    svc = Service(cfg.build({"cache_dir": str(root)}, {}))
    try:
        assert len(svc.store.unsized_entries()) == 5  # migrated: the column is there, empty
        assert svc.catalog.summaries() == before
        assert svc.store.unsized_entries() == []  # given once, by the first listing
        assert svc.catalog.summaries() == before
    finally:
        svc.close()


def _result(desc: Descriptor):
    from nekko_sm.sources.base import PullResult

    return PullResult(desc, desc.digest, [])


# --------------------------------------------------------------------------------------------
# the database itself


def test_schema_is_versioned(store):
    db = store._index.db
    assert db.query("PRAGMA user_version")[0][0] == 3  # 2: budget totals, 3: the listing
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    store.close()
    con = sqlite3.connect(store.root / "nekko.db")
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="newer nekko-sm"):
        Store(store.root).entries()


def test_a_damaged_database_is_reported(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "nekko.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheCorrupt, match="nekko.db"):
        Store(cache).init()


_NO_SQLITE = "import sys; sys.modules['sqlite3'] = None; from nekko_sm.cli import main; "


@pytest.mark.parametrize("command", ["ls", "serve"])
def test_without_sqlite3_one_clear_line_and_exit_2(tmp_path, command):
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _NO_SQLITE + "sys.exit(main(sys.argv[1:]))",
            "--cache-dir",
            str(tmp_path / "c"),
            "--address",
            "127.0.0.1:0",
            command,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "sqlite3" in r.stderr, r.stderr


def test_without_sqlite3_the_service_refuses_with_bad_configuration(tmp_path):
    code = (
        _NO_SQLITE + "from nekko_sm.service import Service; from nekko_sm import config\n"
        "try:\n"
        "    Service(config.build({'cache_dir': sys.argv[1]}, {}))\n"
        "except Exception as e:\n"
        "    print(e.code, e.status)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert r.stdout.split() == ["bad-configuration", "500"], r.stderr


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-journal"])
def test_a_link_at_the_database_or_its_logs_is_refused_not_written_through(tmp_path, suffix):
    """SQLite follows links at the names it opens: a planted ``nekko.db-wal -> victim``
    would take our writes outside the cache (issue 9, finding 2)."""
    from nekko_sm.errors import UnsafeCachePath

    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(victim, cache / f"nekko.db{suffix}")
    with pytest.raises(UnsafeCachePath):
        Store(cache).init()
    assert victim.read_bytes() == b"root's file\n"
    os.unlink(cache / f"nekko.db{suffix}")
    Store(cache).init()  # once it is gone the cache opens as usual
