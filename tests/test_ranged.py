"""One large blob over several connections (issue 5): ranges, resume, fallbacks."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from nekko_sm import config as cfg
from nekko_sm import ranged
from nekko_sm.errors import Cancelled, IntegrityError
from nekko_sm.store import Store
from nekko_sm.transfer import Transfer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 1 MiB so a few MiB exercise many ranges."""
    monkeypatch.setattr(ranged, "MIN_PART", 1 << 20)
    monkeypatch.setattr(ranged, "MIN_PARALLEL", 2 << 20)


def make(tmp_path, jobs=8):
    config = cfg.build({"cache_dir": str(tmp_path / "cache"), "jobs": str(jobs)}, {})
    return Store(config.cache_dir).init(), Transfer(config, read_timeout=2, backoff=0.01)


def fetch(store, transfer, url, ref="x", expected_digest=None, **kw):
    with store.writer(ref, expected_size=kw.get("expected_size")) as w:
        transfer.download(url, w, **kw)
        return w.commit(expected_digest)


def test_big_file_comes_over_several_connections(tmp_path, nginx, small_parts):
    data = os.urandom(12 << 20)
    url = nginx.put("ranged.bin", data)
    store, transfer = make(tmp_path)
    nginx.clear_log()
    desc = fetch(store, transfer, url)
    assert desc.digest == sha(data)
    log = [r for r in nginx.access_log() if "ranged.bin" in r["uri"]]
    assert len(log) >= 8
    assert len({r["connection"] for r in log}) >= 4  # really several connections
    assert sum(r["body_bytes_sent"] for r in log if r["status"] == 206) >= len(data) - (1 << 20)
    assert len([r for r in log if not r["range"]]) == 1  # only the first request is open-ended


def test_known_size_goes_ranged_from_the_first_request(tmp_path, nginx, small_parts):
    data = os.urandom(6 << 20)
    url = nginx.put("known.bin", data)
    store, transfer = make(tmp_path)
    nginx.clear_log()
    desc = fetch(store, transfer, url, expected_size=len(data), immutable=True)
    assert desc.digest == sha(data)
    assert all(r["status"] == 206 for r in nginx.requests_for("known.bin"))


def test_server_ignoring_ranges_falls_back_to_one_stream(tmp_path, faulty, small_parts):
    data = os.urandom(6 << 20)
    url = faulty.add("norange.bin", data, ignore_range=True)
    store, transfer = make(tmp_path)
    assert fetch(store, transfer, url).digest == sha(data)
    assert faulty.body_bytes("norange.bin") <= 2 * len(data)


def test_a_dropped_part_resumes_from_where_it_broke(tmp_path, faulty, small_parts):
    data = os.urandom(8 << 20)
    url = faulty.add("drop.bin", data, drop_after=300_000, drop_times=3)
    store, transfer = make(tmp_path)
    assert fetch(store, transfer, url).digest == sha(data)
    # No byte fetched twice, beyond what dropped connections had in flight and what the
    # open-ended first answer had in flight when it was closed after its part.
    assert faulty.body_bytes("drop.bin", all_statuses=True) <= len(data) + 3 * 300_000 + (4 << 20)


def test_content_changing_midway_restarts_cleanly(tmp_path, faulty, small_parts):
    data = os.urandom(6 << 20)
    url = faulty.add("changing.bin", data, change_etag_after=3)
    store, transfer = make(tmp_path)
    desc = fetch(store, transfer, url)
    new = bytes(b ^ 0x5A for b in data)
    assert desc.digest == sha(new)  # never a mix of old and new parts


def test_wrong_bytes_in_a_part_are_caught_at_commit(tmp_path, faulty, small_parts):
    data = os.urandom(6 << 20)
    url = faulty.add("corrupt.bin", data, corrupt=True)
    store, transfer = make(tmp_path)
    with pytest.raises(IntegrityError):
        fetch(store, transfer, url, expected_digest=sha(data), expected_size=len(data),
              immutable=True)
    assert list(store.blobs()) == []


def test_interrupted_ranged_download_resumes_only_what_is_missing(tmp_path, faulty, small_parts):
    data = os.urandom(8 << 20)
    url = faulty.add("resume.bin", data)
    store, transfer = make(tmp_path, jobs=2)
    cancel = threading.Event()
    seen = []

    def progress(n):
        seen.append(n)
        if sum(seen) >= 3 << 20:
            cancel.set()

    w = store.writer("r", expected_size=len(data), cancel=cancel)
    try:
        with pytest.raises(Cancelled):
            transfer.download(url, w, expected_size=len(data), progress=progress, immutable=True)
    finally:
        w.close()
    assert w.state.get("ranged")
    got_before = faulty.body_bytes("resume.bin", all_statuses=True)
    faulty.clear_requests()
    store2, transfer2 = make(tmp_path, jobs=4)
    faulty.add("resume.bin", data)  # healthy now
    with store2.writer("r", expected_size=len(data)) as w2:
        assert w2.offset >= 2 << 20
        transfer2.download(url, w2, expected_size=len(data), immutable=True)
        assert w2.commit(sha(data)).digest == sha(data)
    again = faulty.body_bytes("resume.bin", all_statuses=True)
    assert again <= len(data) - (2 << 20)
    assert got_before + again <= len(data) + (2 << 20)


def test_max_span_splits_one_huge_response(tmp_path, nginx, small_parts):
    data = os.urandom(5 << 20)
    url = nginx.put("span.bin", data)
    store, transfer = make(tmp_path, jobs=1)
    nginx.clear_log()
    desc = fetch(store, transfer, url, expected_size=len(data), max_span=1 << 20)
    assert desc.digest == sha(data)
    sizes = [r["body_bytes_sent"] for r in nginx.requests_for("span.bin")]
    assert max(sizes) <= 1 << 20 and len(sizes) >= 5


def test_part_size_choice():
    assert ranged.part_size_for(1 << 30, 8) == 32 << 20
    assert ranged.part_size_for(100 << 30, 8) == 1 << 30
    assert ranged.part_size_for(60 << 30, 8, max_span=50 << 30) <= 50 << 30
    assert ranged.part_size_for(20 << 20, 8) == ranged.MIN_PART


def test_concurrent_big_downloads_share_one_connection_budget(tmp_path, nginx, small_parts):
    """Four big blobs at once with --jobs 4: 4 own connections + at most 3 extra, not 16."""
    store, transfer = make(tmp_path, jobs=4)
    blobs = [os.urandom(6 << 20) for _ in range(4)]
    urls = [nginx.put(f"budget-{i}.bin", b) for i, b in enumerate(blobs)]
    lock = threading.Lock()
    now = peak = 0
    real_open = transfer.open

    def counting_open(*a, **kw):
        nonlocal now, peak
        resp, final = real_open(*a, **kw)
        with lock:
            now += 1
            peak = max(peak, now)
        real_release = resp.release_conn

        def release():
            nonlocal now
            with lock:
                now -= 1
            real_release()
            resp.release_conn = real_release

        resp.release_conn = release
        return resp, final

    transfer.open = counting_open
    results = {}

    def one(i):
        results[i] = fetch(store, transfer, urls[i], ref=f"b{i}", expected_size=len(blobs[i]),
                           immutable=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].digest for i in range(4)] == [sha(b) for b in blobs]
    assert peak <= 4 + 3, peak
    assert transfer.extra_connections.acquire(blocking=False)  # the budget was given back
