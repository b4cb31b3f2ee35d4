"""The disk budget (issue 13, DESIGN 9): LRU eviction before a pull writes, pins and holds.

Every test pulls real files from a real nginx, each with its own contents (so no two
entries share a blob unless the test means them to), and checks ``verify`` after each step.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from peers import tmpfs

from nekko_sm import cli
from nekko_sm import config as cfg
from nekko_sm.api import make_server
from nekko_sm.api_http import encode_url
from nekko_sm.errors import ConfigError, EntryNotFound, InsufficientStorage
from nekko_sm.service import Service
from nekko_sm.store import Store

KIB = 1024
MIB = 1 << 20


def _svc(cache: Path, **flags) -> Service:
    return Service(cfg.build({"cache_dir": str(cache), "jobs": "1", **flags}, {}))


def _pull_all(cache: Path, urls: list[str]) -> None:
    """Pull every one of ``urls`` into ``cache`` (no budget), the service closed after."""
    with closing(_svc(cache)) as svc:
        for u in urls:
            svc.pull(u)


def _start_serve(pyz: Path, cache: Path, sock: Path, *flags: str) -> subprocess.Popen:
    """``serve`` in a process of its own on the Unix socket ``sock``, once the socket is there
    (stderr piped, as text)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(pyz),
            "--cache-dir",
            str(cache),
            *flags,
            "--address",
            f"unix:{sock}",
            "serve",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=60)
        raise
    return proc


def _files(nginx, prefix: str, n: int, size: int) -> list[str]:
    """``n`` files of ``size`` bytes, each with contents no other test file has."""
    return [nginx.put(f"{prefix}-{i}.bin", os.urandom(size)) for i in range(n)]


def _blob_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "blobs" / "sha256").iterdir())


def _verified(svc: Service) -> None:
    assert svc.store.verify() == [], "verify found damage"


def _amount(message: str, what: str) -> float:
    """The bytes a 507's message says are ``what`` (pinned, held): "300.6 KiB pinned"."""
    m = re.search(r"([\d.]+) (B|KiB|MiB|GiB|TiB) " + what, message)
    assert m, f"the message does not say how much is {what}: {message}"
    return float(m.group(1)) * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(m.group(2))


def _cached(svc: Service) -> set[str]:
    return {e["url"] for e in svc.list() if e["state"] == "complete"}


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("0", 0),
        ("123", 123),
        ("123B", 123),
        ("1K", KIB),
        ("1k", KIB),
        ("1Ki", KIB),
        ("1KiB", KIB),
        ("1KB", KIB),
        ("1.5G", 3 << 29),
        ("2TiB", 2 << 40),
        ("3 MB", 3 * MIB),
    ],
)
def test_sizes_parse_as_powers_of_1024(text, want):
    assert cfg.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "x", "1.5", "-1", "1X", "1KBB", "1e3", "1iB", "K", "1 K i B"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ConfigError):
        cfg.parse_size(text, "--max-cache-size")


def test_budget_options_flag_env_default(tmp_path):
    c = cfg.build({"cache_dir": str(tmp_path)}, {})
    assert (c.max_cache_size, c.min_free_space, c.min_free_percent) == (None, None, None)
    env = {"NEKKO_MAX_CACHE_SIZE": "2G", "NEKKO_MIN_FREE_SPACE": "10%"}
    c = cfg.build({"cache_dir": str(tmp_path)}, env)
    assert (c.max_cache_size, c.min_free_space, c.min_free_percent) == (2 << 30, None, 10.0)
    c = cfg.build({"cache_dir": str(tmp_path), "max_cache_size": "1M", "min_free_space": "5G"}, env)
    assert (c.max_cache_size, c.min_free_space, c.min_free_percent) == (MIB, 5 << 30, None)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-cache-size", "lots", "ls"],
        ["--min-free-space", "150%", "ls"],
        ["--min-free-space=-3G", "ls"],
        ["ls", "--max-cache-size=1.5"],
    ],
)
def test_bad_budget_values_exit_2_before_anything_starts(argv, capsys, tmp_path):
    assert cli.main(["--cache-dir", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--max-cache-size" in err or "--min-free-space" in err)
    assert not (tmp_path / "c" / "nekko.db").exists()


def test_bad_budget_env_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("NEKKO_MAX_CACHE_SIZE", "ten gigs")
    assert cli.main(["ls"]) == 2
    assert "NEKKO_MAX_CACHE_SIZE" in capsys.readouterr().err


# -- eviction --------------------------------------------------------------------------------------


def test_lru_order_is_respected(tmp_path, nginx):
    """With room for three files, the fourth evicts the least recently used, not the oldest."""
    urls = _files(nginx, "lru", 5, 200 * KIB)
    with closing(_svc(tmp_path / "cache", max_cache_size="700K")) as svc:
        for u in urls[:3]:
            svc.pull(u)
            _verified(svc)
        svc.pull(urls[0])  # a use: urls[1] is now the least recently used
        svc.pull(urls[3])
        assert _cached(svc) == {urls[0], urls[2], urls[3]}
        _verified(svc)
        svc.use(urls[2])  # `path` is a use too
        svc.pull(urls[4])
        assert _cached(svc) == {urls[2], urls[3], urls[4]}
        _verified(svc)
        # Two files and their small artifact manifests (the empty config is shared).
        assert svc.budget.evictions == 2
        assert 400 * KIB < svc.budget.bytes_evicted < 404 * KIB
        assert _blob_bytes(svc.store.root) <= 700 * KIB


def test_status_get_and_ls_are_not_use(tmp_path, nginx):
    urls = _files(nginx, "notuse", 3, 300 * KIB)
    with closing(_svc(tmp_path / "cache", max_cache_size="700K")) as svc:
        svc.pull(urls[0])
        svc.pull(urls[1])
        before = svc.status(urls[0])["last_used"]
        svc.status(urls[0])
        svc.list()
        assert svc.status(urls[0])["last_used"] == before
        svc.pull(urls[2])
        assert _cached(svc) == {urls[1], urls[2]}


def test_pinned_and_held_entries_survive_any_number_of_pulls(tmp_path, nginx):
    pinned, held, *rest = _files(nginx, "keep", 12, 150 * KIB)
    # 4 files and their manifests
    with closing(_svc(tmp_path / "cache", max_cache_size="610K")) as svc:
        svc.pull(pinned, pin=True)
        svc.pull(held, hold=3600)
        assert svc.status(pinned)["pinned"] is True
        assert svc.status(held)["held_until"] > time.time() + 3500
        for u in rest:  # room for two more at a time: ten pulls cycle through it
            svc.pull(u)
            assert {pinned, held} <= _cached(svc)
            _verified(svc)
        assert svc.budget.evictions == len(rest) - 2
        assert _cached(svc) == {pinned, held, *rest[-2:]}


def test_pull_that_cannot_fit_gets_507_and_changes_nothing(tmp_path, nginx):
    small = _files(nginx, "fit", 2, 200 * KIB)
    pinned = nginx.put("fit-pinned.bin", os.urandom(300 * KIB))
    big = nginx.put("fit-big.bin", os.urandom(600 * KIB))
    with closing(_svc(tmp_path / "cache", max_cache_size="800K")) as svc:
        svc.pull(pinned, pin=True)
        for u in small:
            svc.pull(u)
        before = {e["url"]: e for e in svc.list()}
        blobs = sorted(p.name for p in (svc.store.blobs_dir).iterdir())
        with pytest.raises(InsufficientStorage) as e:
            svc.pull(big)
        assert e.value.status == 507 and e.value.exit_code == 1
        msg = e.value.message
        assert 300 * KIB < _amount(msg, "pinned") < 302 * KIB  # the file and its manifest
        assert _amount(msg, "held") == 0 and "free on disk" in msg
        assert {e["url"]: e for e in svc.list()} == before  # nothing evicted, nothing added
        assert sorted(p.name for p in svc.store.blobs_dir.iterdir()) == blobs
        assert svc.budget.evictions == 0
        assert svc.store.partial_size("url:" + big) == 0  # refused before writing a byte
        _verified(svc)


def test_shared_blobs_are_kept_and_not_counted_as_freed(tmp_path, nginx):
    """Evicting one of two entries with the same bytes frees nothing; the other stays whole."""
    data = os.urandom(300 * KIB)
    a, b = nginx.put("same-a.bin", data), nginx.put("same-b.bin", data)
    other = nginx.put("same-other.bin", os.urandom(300 * KIB))
    with closing(_svc(tmp_path / "cache", max_cache_size="700K")) as svc:
        svc.pull(a)
        svc.pull(b)  # the same blob: the cache holds 300 KiB
        svc.pull(other)  # fits beside it
        assert _cached(svc) == {a, b, other}
        third = nginx.put("same-third.bin", os.urandom(300 * KIB))
        svc.pull(third)  # must free 200 KiB: a (frees nothing), then b (frees the blob)
        assert _cached(svc) == {other, third}
        _verified(svc)


def test_post_pin_hold_and_use_through_the_api(tmp_path, nginx):
    urls = _files(nginx, "api", 4, 200 * KIB)
    service = _svc(tmp_path / "cache", max_cache_size="500K")
    srv = make_server(service, cfg.parse_address("127.0.0.1:0"))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = srv.server_address[1]

    def post(body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/content/", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out

    def get(path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        out = conn.getresponse().read().decode()
        conn.close()
        return out

    try:
        status, e = post({"url": urls[0], "pin": True})
        assert status == 201 and e["pinned"] is True and e["held_until"] is None
        status, e = post({"url": urls[1]})
        assert status == 201 and e["pinned"] is False and e["last_used"] > 0
        status, e = post({"url": urls[1], "hold": 60})  # already cached: 200, and held
        assert status == 200 and time.time() + 50 < e["held_until"] <= time.time() + 60
        first = e["last_used"]
        status, e = post({"url": urls[1]})  # a use moves last_used, in the next GET too
        assert e["last_used"] > first
        assert json.loads(get("/content/" + encode_url(urls[1])))["last_used"] == e["last_used"]
        status, e = post({"url": urls[0], "pin": False})
        assert status == 200 and e["pinned"] is False
        status, e = post({"url": urls[0], "pin": True})
        # Both protected: a third file cannot fit, and says why.
        status, e = post({"url": urls[2]})
        assert status == 507 and e["error"]["code"] == "insufficient-storage"
        assert 200 * KIB < _amount(e["error"]["message"], "pinned") < 202 * KIB
        assert 200 * KIB < _amount(e["error"]["message"], "held") < 202 * KIB
        for bad in (
            {"url": urls[2], "pin": "yes"},
            {"url": urls[2], "hold": -1},
            {"url": urls[2], "hold": "10"},
            {"url": urls[2], "hold": True},
        ):
            status, e = post(bad)
            assert status == 400, bad
        metrics = get("/metrics")
        assert "\nnekko_cache_budget_bytes 512000\n" in metrics
        assert "\nnekko_evictions_total 0\n" in metrics
        service.store.set_pin(urls[0], False)
        status, e = post({"url": urls[2]})
        assert status == 201
        metrics = get("/metrics")
        assert "\nnekko_evictions_total 1\n" in metrics
        evicted = int(
            re.search(r"^nekko_evicted_bytes_total (\d+)$", metrics, re.MULTILINE).group(1)
        )
        assert 200 * KIB < evicted < 202 * KIB  # the file and its manifest
        _verified(service)
    finally:
        srv.shutdown()
        srv.server_close()
        service.close()


def test_cli_pin_unpin_pull_pin_hold_and_ls(tmp_path, nginx, capsys):
    urls = _files(nginx, "cli", 2, 100 * KIB)
    cache = str(tmp_path / "cache")

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(["--cache-dir", cache, *argv])
        return code, capsys.readouterr().out

    assert run("pull", "--pin", urls[0])[0] == 0
    assert run("pull", "--hold", "120", urls[1])[0] == 0
    _, out = run("ls")
    lines = {ln.split()[-1]: ln for ln in out.splitlines()}
    assert "pinned" in lines[urls[0]] and "held-until=" in lines[urls[1]]
    _, out = run("ls", "--json")
    entries = {e["url"]: e for e in json.loads(out)}
    assert entries[urls[0]]["pinned"] is True and entries[urls[1]]["pinned"] is False
    assert entries[urls[1]]["held_until"] > time.time() + 100
    for e in entries.values():
        assert isinstance(e["last_used"], float) and e["last_used"] != int(e["last_used"])
    assert run("unpin", urls[0]) == (0, f"unpinned {urls[0]}\n")
    assert run("pin", urls[1]) == (0, f"pinned {urls[1]}\n")
    assert run("pin", nginx.url + "/files/never-pulled.bin")[0] == 4
    assert run("unpin", nginx.url + "/files/never-pulled.bin")[0] == 4
    before = json.loads(run("ls", "--json")[1])[0]["last_used"]
    assert run("path", urls[0])[0] == 0  # a use
    after = {e["url"]: e for e in json.loads(run("ls", "--json")[1])}
    assert after[urls[0]]["last_used"] > before
    assert run("pull", "--hold", "soon", urls[0])[0] == 2


def test_pins_and_use_survive_a_restart(tmp_path, nginx):
    urls = _files(nginx, "restart", 3, 200 * KIB)
    cache = tmp_path / "cache"
    with closing(_svc(cache, max_cache_size="500K")) as svc:
        svc.pull(urls[0], pin=True)
        svc.pull(urls[1])
    with closing(_svc(cache, max_cache_size="500K")) as svc:
        assert svc.status(urls[0])["pinned"] is True
        svc.pull(urls[2])
        assert _cached(svc) == {urls[0], urls[2]}


def test_stale_partials_go_first(tmp_path, faulty):
    """An interrupted download's partial is evicted before any entry."""
    keep = faulty.add("stale-keep.bin", os.urandom(200 * KIB))
    with closing(_svc(tmp_path / "cache", max_cache_size="700K")) as svc:
        svc.pull(keep)
        w = svc.store.writer("url:http://127.0.0.1:1/abandoned.bin")
        w.write(os.urandom(300 * KIB))
        w.sync()
        w.save_state(etag='"abandoned"')
        w.close()  # unlocked: no live pull holds it
        assert svc.store.partials_size() >= 300 * KIB
        svc.pull(faulty.add("stale-new.bin", os.urandom(250 * KIB)))
        assert keep in _cached(svc)
        assert svc.store.partial_size("url:http://127.0.0.1:1/abandoned.bin") == 0
        assert svc.budget.evictions == 1
        _verified(svc)


def test_lowering_the_budget_and_gc_shrinks_the_cache(tmp_path, nginx, capsys):
    urls = _files(nginx, "shrink", 6, 100 * KIB)
    cache = tmp_path / "cache"
    with closing(_svc(cache)) as svc:
        for u in urls:
            svc.pull(u)
        svc.store.set_pin(urls[0], True)
        svc.use(urls[1])
    assert _blob_bytes(cache) >= 600 * KIB
    assert cli.main(["--cache-dir", str(cache), "--max-cache-size", "350K", "gc"]) == 0
    out = capsys.readouterr().out
    assert "evicted 3 entries" in out, out
    with closing(_svc(cache)) as svc:
        assert _cached(svc) == {urls[0], urls[1], urls[5]}  # pinned, used, newest
        _verified(svc)
    assert _blob_bytes(cache) <= 350 * KIB
    assert cli.main(["--cache-dir", str(cache), "verify"]) == 0


def test_serve_brings_the_cache_within_budget_at_start(tmp_path, nginx, pyz):
    urls = _files(nginx, "serve", 4, 100 * KIB)
    cache = tmp_path / "cache"
    _pull_all(cache, urls)
    proc = _start_serve(pyz, cache, tmp_path / "api.sock", "--max-cache-size", "250K")
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err.count("evicted entry") == 2, err
    with closing(_svc(cache)) as svc:
        assert _cached(svc) == set(urls[2:])
        _verified(svc)


def test_no_budget_evicts_nothing(tmp_path, nginx):
    urls = _files(nginx, "unlimited", 5, 100 * KIB)
    with closing(_svc(tmp_path / "cache")) as svc:
        for u in urls:
            svc.pull(u)
        assert _cached(svc) == set(urls)
        assert not svc.budget.enabled and svc.budget.enforce().evicted == []


def test_entry_being_pulled_elsewhere_is_not_evicted(tmp_path, nginx):
    """An entry another process is pulling again (its pull lock held) is never a candidate."""
    urls = _files(nginx, "busy", 3, 300 * KIB)
    with closing(_svc(tmp_path / "cache", max_cache_size="700K")) as svc:
        svc.pull(urls[0])
        svc.pull(urls[1])
        from nekko_sm.store import FileLock

        lock = FileLock(svc._pull_paths(urls[0])[1])
        lock.acquire()  # as another process's pull of urls[0] would
        try:
            svc.pull(urls[2])
        finally:
            lock.release()
        assert _cached(svc) == {urls[0], urls[2]}


def test_unknown_budget_pin_of_absent_entry_is_404(tmp_path):
    with closing(_svc(tmp_path / "cache")) as svc, pytest.raises(EntryNotFound):
        svc.pin("http://127.0.0.1:1/none.bin")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the disk, other processes, crashes ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (root only; CI runs as root)."""
    with tmpfs(tmp_path / "small", "64m", "the --min-free-space tests") as mnt:
        yield mnt


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# The cache's own small files (nekko.db and its log, index.json) are not counted: they may
# take this much of what --min-free-space keeps.
_BOOKKEEPING = 2 * MIB


@pytest.mark.parametrize("setting, keep", [("24M", 24 * MIB), ("40%", int(0.4 * 64 * MIB))])
def test_min_free_space_on_a_small_disk_keeps_that_much_free(small_disk, nginx, setting, keep):
    urls = _files(nginx, f"disk-{setting[:-1]}", 10, 6 * MIB)  # 60 MiB through a 64 MiB disk
    with closing(_svc(small_disk / "cache", min_free_space=setting)) as svc:
        for u in urls:
            svc.pull(u)
            assert _free(small_disk) >= keep - _BOOKKEEPING, "less free than --min-free-space"
            _verified(svc)
        assert urls[-1] in _cached(svc) and urls[0] not in _cached(svc)
        assert svc.budget.evictions >= 10 - (64 * MIB - keep) // (6 * MIB)
        too_big = nginx.put(f"disk-{setting[:-1]}-big.bin", os.urandom(48 * MIB))
        before = _cached(svc)
        with pytest.raises(InsufficientStorage) as e:
            svc.pull(too_big)  # can never leave that much free: refused, nothing evicted
        assert "free on disk" in e.value.message
        assert _cached(svc) == before
        _verified(svc)


@pytest.fixture(scope="module")
def slow_nginx(tmp_path_factory):
    """nginx at 1 MB/s per connection, so a pull in one process outlasts one in another."""
    from peers.nginx import start_nginx

    peer = start_nginx(tmp_path_factory.mktemp("slow-nginx"), limit_rate="1m")
    yield peer
    peer.stop()


def test_cli_and_serve_share_one_budget(tmp_path, nginx, slow_nginx, pyz):
    """A CLI pull while serve pulls: the CLI counts serve's reservation and evicts for it,
    never the partial serve is writing; afterwards the cache is within the budget."""
    cache = tmp_path / "cache"
    a, b = (nginx.put(f"share-{n}.bin", os.urandom(1536 * KIB)) for n in "ab")
    c_data = os.urandom(6 * MIB)
    c = slow_nginx.put("share-c.bin", c_data)  # about five seconds
    d = nginx.put("share-d.bin", os.urandom(1536 * KIB))
    budget = ["--max-cache-size", "9300K"]  # B, C, D (9 MiB) and their manifests
    for u in (a, b):
        subprocess.run(
            [sys.executable, str(pyz), "--cache-dir", str(cache), *budget, "pull", u],
            check=True,
            capture_output=True,
        )
    sock = tmp_path / "api.sock"
    proc = _start_serve(pyz, cache, sock, *budget)
    try:
        deadline = time.monotonic() + 60
        posted = _unix_post(sock, {"url": c, "async": True})
        assert posted[0] == 202
        # Wait until serve has reserved (its lease says so) and started writing.
        store = Store(cache)
        while not any(r for _, r in store.live_leases().values()):
            assert time.monotonic() < deadline, "serve never reserved room for its pull"
            time.sleep(0.02)
        r = subprocess.run(
            [sys.executable, str(pyz), "--cache-dir", str(cache), *budget, "-v", "1", "pull", d],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert _unix_get(sock, c)[0] == 206, "serve's pull ended before the CLI's: no overlap"
        assert (
            f"evicted entry {a}" in r.stderr and b not in r.stderr
        )  # LRU, and only what was needed
        assert "evicted partial" not in r.stderr  # never serve's live download
        while _unix_get(sock, c)[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline + 60
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "evicted" not in err  # serve had room: the CLI made it before
    with closing(_svc(cache)) as svc:
        assert _cached(svc) == {b, c, d}
        assert Path(svc.status(c)["path"]).read_bytes() == c_data
        _verified(svc)
    assert _blob_bytes(cache) <= 9300 * KIB


def _unix_request(sock: Path, method: str, path: str, body: bytes | None = None):
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(60)
            self.sock.connect(str(sock))

    conn = Conn("localhost")
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def _unix_post(sock: Path, body: dict):
    return _unix_request(sock, "POST", "/content/", json.dumps(body).encode())


def _unix_get(sock: Path, url: str):
    return _unix_request(sock, "GET", "/content/" + encode_url(url))


@pytest.mark.slow
def test_sigkill_during_eviction_leaves_a_consistent_cache(tmp_path, nginx, pyz):
    cache = tmp_path / "cache"
    urls = [nginx.put(f"kill-evict-{i}.bin", os.urandom(4 * KIB + i)) for i in range(80)]
    _pull_all(cache, urls)
    import random

    rng = random.Random(20261202)
    killed = 0
    for budget in ("250K", "170K", "100K", "40K"):
        count = Store(cache).count_entries()
        proc = subprocess.Popen(
            [sys.executable, str(pyz), "--cache-dir", str(cache), "--max-cache-size", budget, "gc"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while Store(cache).count_entries() >= count and proc.poll() is None:
            assert time.monotonic() < deadline, "gc never started evicting"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        if proc.wait(timeout=10) == -signal.SIGKILL:
            killed += 1
        s = Store(cache)
        assert s.verify() == [], "a kill during eviction broke the cache"
        for desc in s.entries():
            assert s.has_blob(desc.digest, desc.size)
        doc = json.loads((cache / "index.json").read_text())
        assert isinstance(doc["manifests"], list)
        s.close()
    assert killed >= 2, "the kills all came after gc had finished: nothing was tested"
    assert cli.main(["--cache-dir", str(cache), "--max-cache-size", "40K", "gc"]) == 0
    assert _blob_bytes(cache) <= 40 * KIB
    assert cli.main(["--cache-dir", str(cache), "verify"]) == 0
    with closing(_svc(cache)) as svc:
        kept = _cached(svc)
        assert kept and kept == set(urls[-len(kept) :])  # never used again: the newest stay
        again, created = svc.pull(urls[0])  # an evicted URL comes back whole
        assert created and Path(again["path"]).stat().st_size == 4 * KIB


def test_an_image_makes_room_from_its_descriptors(tmp_path, nginx, registry, seeded):
    """An OCI pull declares its missing blobs' sizes before fetching: the LRU file goes, the
    image fits; with a budget too small for the image, 507 and nothing evicted."""
    info = seeded["public/single:v1"]
    # its blobs, and as much again for the files unpacked from its layers (DESIGN 8)
    image = 2 * sum(d["size"] for d in info.layers) + (info.config_size or 0) + info.size
    old, new = _files(nginx, "oci-room", 2, max(image // 2, 64 * KIB))
    budget = image + 2 * max(image // 2, 64 * KIB) - 1024  # not room for all three

    def svc_for(cache: Path, size: int) -> Service:
        config = cfg.build(
            {
                "cache_dir": str(cache),
                "insecure_registry": [registry.host],
                "platform": "linux/amd64",
                "max_cache_size": str(size),
            },
            {},
        )
        return Service(config)

    with closing(svc_for(tmp_path / "cache", budget)) as svc:
        svc.pull(old)
        svc.pull(new)
        registry.reset()
        _, created = svc.pull(info.url)
        assert created and _cached(svc) == {new, info.url}
        _verified(svc)
    with closing(svc_for(tmp_path / "small", image // 2)) as svc:
        with pytest.raises(InsufficientStorage):
            svc.pull(info.url)
        assert _cached(svc) == set() and svc.budget.evictions == 0
        assert not any(svc.store.has_blob(d["digest"]) for d in info.layers)
        _verified(svc)


def test_a_hub_repository_makes_room_from_the_hub_sizes(tmp_path, nginx, fakehub):
    """A whole repository asks once for all its missing files (then each file's ask is
    inside that): the LRU file goes, the repository fits, and its files are whole."""
    files = {f"shard-{i}.safetensors": os.urandom(120 * KIB) for i in range(3)}
    fakehub.add_repo("budget/three-shards", files=files)
    old, new = _files(nginx, "hf-room", 2, 150 * KIB)
    config = cfg.build(
        {"cache_dir": str(tmp_path / "cache"), "max_cache_size": "560K"},
        {"HF_ENDPOINT": fakehub.endpoint},
    )
    with closing(Service(config)) as svc:
        svc.pull(old)
        svc.pull(new)
        entry, created = svc.pull("hf:///budget/three-shards")
        assert created and _cached(svc) == {new, entry["url"]}
        assert svc.budget.evictions == 1
        for name, data in files.items():
            assert (Path(entry["path"]) / name).read_bytes() == data
        _verified(svc)
    config = cfg.build(
        {"cache_dir": str(tmp_path / "small"), "max_cache_size": "300K"},
        {"HF_ENDPOINT": fakehub.endpoint},
    )
    with closing(Service(config)) as svc:
        with pytest.raises(InsufficientStorage):
            svc.pull("hf:///budget/three-shards")  # 360 KiB of files: refused up front
        assert not any(svc.store.has_blob(sha(d)) for d in files.values())
        _verified(svc)


def test_an_entry_whose_blobs_a_live_pull_leased_is_not_evicted_in_vain(tmp_path, nginx):
    """An entry all of whose blobs a pull in flight has leased frees nothing: it is kept,
    the next one in LRU order goes instead, and the leased blobs stay on disk."""
    urls = _files(nginx, "leased", 3, 300 * KIB)
    with closing(_svc(tmp_path / "cache", max_cache_size="700K")) as svc:
        first, _ = svc.pull(urls[0])
        svc.pull(urls[1])
        from nekko_sm.store import Lease

        with Lease(svc.store) as lease:  # as a live pull of the same image would
            for digest in svc.store.reach_of(urls[0]):  # its file and manifest
                lease.add(digest)
            svc.pull(urls[2])
            assert _cached(svc) == {urls[0], urls[2]}  # urls[1] went, though newer
            assert svc.store.has_blob(first["digest"])
        _verified(svc)


def test_a_hold_that_ended_protects_nothing(tmp_path, nginx):
    urls = _files(nginx, "expired", 3, 300 * KIB)
    with closing(_svc(tmp_path / "cache", max_cache_size="700K")) as svc:
        svc.pull(urls[0], hold=3600)
        svc.pull(urls[1])
        svc.store.set_hold(urls[0], time.time() - 1)  # as if the hour had passed
        svc.pull(urls[2])
        assert _cached(svc) == {urls[1], urls[2]}
