"""One large blob over several connections (issue 5): ranges, resume, fallbacks."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from nekko_sm import config as cfg
from nekko_sm import ranged, ranged_control, ranged_parts
from nekko_sm.errors import Cancelled, IntegrityError
from nekko_sm.store import Store, frontier
from nekko_sm.transfer import Transfer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 1 MiB so a few MiB exercise many ranges."""
    monkeypatch.setattr(ranged_parts, "MIN_PART", 1 << 20)
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


def test_a_dropped_part_resumes_from_where_it_broke(tmp_path, faulty, small_parts, caplog):
    data = os.urandom(8 << 20)
    url = faulty.add("drop.bin", data, drop_after=300_000, drop_times=3)
    store, transfer = make(tmp_path)
    with caplog.at_level("WARNING", logger="nekko_sm"):
        assert fetch(store, transfer, url).digest == sha(data)
    # each wait is one line that says which part broke, and why
    waits = [r.getMessage() for r in caplog.records if "; try " in r.getMessage()]
    assert waits and all(": part at byte " in w and "drop.bin" in w for w in waits), waits
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
        fetch(
            store, transfer, url, expected_digest=sha(data), expected_size=len(data), immutable=True
        )
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
    assert ranged_parts.part_size_for(1 << 30, 8) == 32 << 20
    assert ranged_parts.part_size_for(100 << 30, 8) == 1 << 30
    assert ranged_parts.part_size_for(60 << 30, 8, max_span=50 << 30) <= 50 << 30
    assert ranged_parts.part_size_for(20 << 20, 8) == ranged_parts.MIN_PART


def count_connections(transfer) -> dict:
    """Make ``transfer`` count the answers open at once; ``["peak"]`` is the most."""
    lock = threading.Lock()
    seen = {"now": 0, "peak": 0}
    real_open = transfer.open

    def counting_open(*a, **kw):
        resp, final = real_open(*a, **kw)
        with lock:
            seen["now"] += 1
            seen["peak"] = max(seen["peak"], seen["now"])
        real_release = resp.release_conn

        def release():
            with lock:
                seen["now"] -= 1
            real_release()
            resp.release_conn = real_release

        resp.release_conn = release
        return resp, final

    transfer.open = counting_open
    return seen


def test_concurrent_big_downloads_share_one_connection_budget(tmp_path, nginx, small_parts):
    """Four big blobs at once with --jobs 4: 4 own connections + at most 3 extra, not 16."""
    store, transfer = make(tmp_path, jobs=4)
    blobs = [os.urandom(6 << 20) for _ in range(4)]
    urls = [nginx.put(f"budget-{i}.bin", b) for i, b in enumerate(blobs)]
    seen = count_connections(transfer)
    results = {}

    def one(i):
        results[i] = fetch(
            store, transfer, urls[i], ref=f"b{i}", expected_size=len(blobs[i]), immutable=True
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].digest for i in range(4)] == [sha(b) for b in blobs]
    peak = seen["peak"]
    assert peak <= 4 + 3, peak
    assert transfer.extra_connections.acquire(blocking=False)  # the budget was given back


# -- adaptive connections (issue 11) -------------------------------------------------------


class _NoThread:
    """Stands in for threading.Thread in ranged: workers exist, nothing runs."""

    def __init__(self, *a, **kw):
        pass

    def start(self):
        pass

    def is_alive(self):
        return False

    def join(self):
        pass


class _FakeWriter:
    def __init__(self, total, part):
        self.state = {"ranged": {"total": total, "parts": ranged_parts.plan(total, part)}}
        self.busy = 0.0

    def hash_stats(self):
        return 0, self.busy

    def advance(self, frontier):
        pass


class _FakeTransfer:
    def __init__(self, jobs=8):
        self.extra_connections = threading.Semaphore(jobs - 1)
        self.connection_cap = ranged_control.connection_cap(jobs)
        self.more_connections = threading.Semaphore(self.connection_cap - jobs)
        self.connection_memory = {}
        self.attempts = 3


def _fetch_for(monkeypatch, transfer, jobs=8, total=1 << 30, part=8 << 20):
    monkeypatch.setattr(ranged, "_Thread", _NoThread)
    writer = _FakeWriter(total, part)
    f = ranged.RangedFetch(
        transfer,
        "http://cdn.test/big",
        writer,
        auth=None,
        headers=None,
        validator=None,
        errors=None,
        progress=None,
        connections=jobs,
    )
    f._spawn(own=True)
    f._settle_until = 0.0
    return f, writer


def _drive(f, writer, per_connection, link, hashing=0.1, seconds=3.0):
    """Run the controller against a model: each connection brings ``per_connection``
    bytes/s, all of them together at most ``link``; the hasher is busy ``hashing``."""
    now = 0.0
    while now < seconds and not f._frozen:
        now += ranged.TICK
        alive = [w for w in f._workers if w.alive]
        rate = min(link, per_connection * len(alive))
        for w in alive:
            w.got += int(rate / len(alive) * ranged.TICK) or 1
        writer.busy += hashing * ranged.TICK
        f._adapt(now)
        with f._lock:  # workers over the target leave at their next part boundary
            for w in [w for w in f._workers if w.alive][f.target :]:
                f._leave(w)
    return f.target


def test_a_per_connection_limit_grows_to_the_cap(monkeypatch):
    f, writer = _fetch_for(monkeypatch, _FakeTransfer(jobs=8))
    assert f.target == 1  # one stream first
    assert _drive(f, writer, per_connection=20 << 20, link=10 << 30) == 32
    assert f._frozen


def test_a_link_one_stream_fills_drops_back_to_one(monkeypatch):
    f, writer = _fetch_for(monkeypatch, _FakeTransfer(jobs=8))
    assert _drive(f, writer, per_connection=500 << 20, link=520 << 20) == 1
    tried = max(f._rates)  # it did try more (16: what would fill the hasher), which did not pay
    assert tried > 0 and f._rates[tried] < f._rates[0] * ranged_control.GAIN


def test_growth_stops_where_the_rate_stops_rising(monkeypatch):
    f, writer = _fetch_for(monkeypatch, _FakeTransfer(jobs=8))
    # From one stream straight to 16 (1.25 / 10% hasher: what would keep it busy), then 32
    # did not pay: back to 16.
    assert _drive(f, writer, per_connection=20 << 20, link=200 << 20) == 16


def test_no_more_connections_when_hashing_is_the_limit(monkeypatch):
    f, writer = _fetch_for(monkeypatch, _FakeTransfer(jobs=8))
    assert _drive(f, writer, per_connection=20 << 20, link=10 << 30, hashing=0.95) == 1
    assert len(f._workers) == 1  # not even tried


def test_growth_stays_within_the_transfers_budget(monkeypatch):
    transfer = _FakeTransfer(jobs=8)
    for _ in range(20):  # other downloads hold most of the spare connections
        assert transfer.more_connections.acquire(
            blocking=False
        ) or transfer.extra_connections.acquire(blocking=False)
    f, writer = _fetch_for(monkeypatch, transfer)
    got = _drive(f, writer, per_connection=20 << 20, link=10 << 30)
    assert got == 12  # 1 own + the 11 the others left free
    assert not transfer.more_connections.acquire(blocking=False)


def test_a_small_blob_keeps_the_connections_it_starts_with(monkeypatch):
    f, _ = _fetch_for(monkeypatch, _FakeTransfer(jobs=8), total=ranged_control.GROW_MIN - 1)
    assert f.target == 8 and f._frozen and not f.adaptive


def test_an_origin_starts_where_it_settled_before(monkeypatch):
    transfer = _FakeTransfer(jobs=8)
    transfer.connection_memory[("http", "cdn.test", 80)] = 16
    f, _ = _fetch_for(monkeypatch, transfer)
    assert f.target == 16 and f._frozen


def test_joining_connections_take_untouched_parts_from_a_lone_stream(monkeypatch):
    f, _ = _fetch_for(monkeypatch, _FakeTransfer(jobs=8), total=64 << 20)  # 8 parts
    lone = f._workers[0]
    first = f._claim(lone)
    assert first is f.parts[0] and all(p.owner is lone for p in f.parts)  # the whole run
    assert f._run_end(lone, first) == 64 << 20  # in one request
    f.target = 3
    others = [ranged_parts.Worker(f"w{i}", None) for i in range(2)]
    f._active += 2
    got = [f._claim(w) for w in others]
    assert got == f.parts[1:3]  # nearest the frontier
    first.next = first.end
    assert f._go_on(lone, first, first.end, 64 << 20) is None  # the lone stream stops there
    again = f._claim(lone)  # and takes up the first part no one has
    assert again is f.parts[3] and f.parts[4].owner is None


def test_an_idle_connection_splits_the_part_with_most_left(monkeypatch):
    f, _ = _fetch_for(monkeypatch, _FakeTransfer(jobs=8), total=128 << 20, part=64 << 20)
    f.target = 3
    a, b, c = f._workers[0], ranged_parts.Worker("b", None), ranged_parts.Worker("c", None)
    f._active += 2
    pa, pb = f._claim(a), f._claim(b)
    pa.next = pa.start + (4 << 20)
    pb.next = pb.start + (40 << 20)
    new = f._claim(c)
    assert new is not None and new.owner is c
    assert new.start == pa.end and new.start >= pa.next + ranged_parts.MARGIN  # a's part, behind a
    assert ranged_parts.MARGIN >= 2 * frontier.BUFFER  # a's read in flight cannot reach c's bytes
    spans = [(p.start, p.end) for p in f.parts]
    assert spans == sorted(spans) and spans[0][0] == 0 and spans[-1][1] == 128 << 20
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))  # the map still tiles the blob


def test_a_lone_stream_brings_a_big_blob_in_one_request(tmp_path, nginx, monkeypatch, small_parts):
    """While the controller keeps one stream, a big blob is one open-ended request, as
    curl would make it, and still saved as a part map (resumable)."""
    monkeypatch.setattr(ranged_control, "GROW_MIN", 8 << 20)
    monkeypatch.setattr(ranged_control, "PROBE", 3600.0)  # never decides to add connections
    data = os.urandom(24 << 20)
    url = nginx.put("lone.bin", data)
    store, transfer = make(tmp_path)
    nginx.clear_log()
    with store.writer("lone") as w:
        transfer.download(url, w)
        assert len(w.state["ranged"]["parts"]) > 1
        assert w.commit(sha(data)).digest == sha(data)
    log = nginx.requests_for("lone.bin")
    assert [(r["status"], r["range"]) for r in log] == [(200, "")]
    assert log[0]["body_bytes_sent"] == len(data)


def test_a_throttled_server_gets_more_connections_than_jobs(tmp_path, monkeypatch):
    """nginx at 4 MiB/s per connection, --jobs 2: the download grows past two connections
    (within the cap), the budgets are all given back and the count is remembered."""
    from peers.nginx import start_nginx

    monkeypatch.setattr(ranged_control, "GROW_MIN", 8 << 20)
    peer = start_nginx(tmp_path / "slow", limit_rate="4m")
    try:
        data = os.urandom(48 << 20)
        url = peer.put("slow.bin", data)
        store, transfer = make(tmp_path, jobs=2)
        seen = count_connections(transfer)
        assert fetch(store, transfer, url).digest == sha(data)
        assert 2 < seen["peak"] <= ranged_control.connection_cap(2)  # grew, within the cap
        remembered = transfer.connection_memory[("http", "127.0.0.1", peer.port)]
        assert 2 < remembered <= ranged_control.connection_cap(2)
        for sem, n in ((transfer.extra_connections, 1), (transfer.more_connections, 6)):
            assert all(sem.acquire(blocking=False) for _ in range(n))
    finally:
        peer.stop()


def test_the_first_step_goes_straight_to_what_would_fill_the_hasher(monkeypatch):
    """One stream at a per-connection limit with the hasher 10% busy: the first step is 16
    connections (not --jobs 8 and then 16), one measurement window sooner."""
    f, writer = _fetch_for(monkeypatch, _FakeTransfer(jobs=8))
    now = 0.0
    while not f._rates and now < 3.0:  # until the probe of one stream is measured
        now += ranged.TICK
        for w in [w for w in f._workers if w.alive]:
            w.got += int((20 << 20) * ranged.TICK)
        writer.busy += 0.1 * ranged.TICK
        f._adapt(now)
    assert list(f._rates) == [0] and f.target == 16
