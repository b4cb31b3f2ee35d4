"""Threads, descriptors and connections are bounded; a trickle cannot hold a worker (issue 9,
finding 6).

* 500 slow pulls were 1,001 threads and 2,506 fds: pulls now run on a fixed pool of workers
  (``flight_table.PULL_WORKERS``) with a queue (``MAX_QUEUED_PULLS``, then 503 busy); a queued pull
  is still one shared flight, and cancelling it ends it at once.
* 400 idle connections were 400 threads, and under a thread limit ``/healthz`` stopped
  answering: the API keeps at most ``connlimit.MAX_HANDLERS`` handler threads and
  ``MAX_PER_CLIENT`` connections per client; over either, a connection gets a short answer
  from one overflow thread (200 for ``/healthz``, 503 busy otherwise), and idle keep-alive
  connections give their threads back while the server is saturated.
* A server that trickles (its headers, or its body) is given up: headers within
  ``httpio.HEADER_TIMEOUT``, bodies at ``LOW_SPEED_LIMIT`` bytes/s over ``LOW_SPEED_TIME``.

Everything on 127.0.0.1 (nginx with ``limit_rate``, and raw-socket servers of the test's own);
every loop is bounded.  The limits' constants are lowered where a test would otherwise wait.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from peers.nginx import running_nginx
from test_security import running_api

from nekko_sm import config as cfg
from nekko_sm import connlimit, flight_table, httpio
from nekko_sm.api import Handler as ApiHandler
from nekko_sm.errors import Busy, Cancelled, UpstreamTooSlow, UpstreamUnavailable
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer


def make_service(tmp_path: Path, attempts: int = 6, **flags) -> Service:
    config = cfg.build(
        {"cache_dir": str(tmp_path / "cache"), "address": "127.0.0.1:0", **flags}, {}
    )
    return Service(
        config, transfer=Transfer(config, read_timeout=5.0, attempts=attempts, backoff=0.01)
    )


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(condition, timeout: float = 60.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(step)


@pytest.fixture(scope="module")
def slow_nginx(tmp_path_factory):
    """nginx at 4 KiB/s per connection: a 64 KiB file takes 16 s."""
    with running_nginx(tmp_path_factory.mktemp("slow-nginx"), limit_rate="4k") as peer:
        yield peer


# --------------------------------------------------------------------------------------------
# pulls: a fixed pool and a queue


def test_500_slow_pulls_use_a_bounded_pool(tmp_path, nginx, slow_nginx):
    svc = make_service(tmp_path)
    try:
        svc.pull(nginx.put("bounds/warm.bin", os.urandom(1000)))  # pools, workers, imports
        base_threads, base_fds = threading.active_count(), fds()
        body = os.urandom(64 << 10)
        urls = [slow_nginx.put(f"bounds/slow-{i:03d}.bin", body) for i in range(500)]
        flights = [svc.start(u)[0] for u in urls]
        assert all(f is not None for f in flights)
        wait_until(lambda: sum(f.progress.done > 0 for f in flights) >= flight_table.PULL_WORKERS)
        threads, files = 0, 0
        for _ in range(20):  # the peak over a second
            threads = max(threads, threading.active_count() - base_threads)
            files = max(files, fds() - base_fds)
            time.sleep(0.05)
        # A worker, a hasher and a connection or two per running pull; nothing per queued one.
        assert threads <= 3 * flight_table.PULL_WORKERS, f"{threads} more threads for 500 pulls"
        assert files <= 10 * flight_table.PULL_WORKERS, f"{files} more fds for 500 pulls"
        assert sum(f.progress.done > 0 for f in flights) <= flight_table.PULL_WORKERS

        last = flights[-1]
        assert svc.start(urls[-1])[0] is last  # a queued pull is still one shared flight
        assert svc.status(urls[-1])["state"] == "downloading"
        svc.remove(urls[-1], wait=0)  # cancelling a queued pull ends it now, not in its turn
        assert last.future.done()
        with pytest.raises(Cancelled):
            last.future.result()
    finally:
        svc.close()
    assert all(f.future.done() for f in flights)
    assert svc.store.verify() == []


def test_a_full_queue_is_refused_with_503(tmp_path, slow_nginx, monkeypatch):
    monkeypatch.setattr(flight_table, "PULL_WORKERS", 2)
    monkeypatch.setattr(flight_table, "MAX_QUEUED_PULLS", 3)
    svc = make_service(tmp_path)
    try:
        body = os.urandom(64 << 10)
        urls = [slow_nginx.put(f"bounds/queue-{i}.bin", body) for i in range(6)]
        for u in urls[:2]:
            svc.start(u)
        wait_until(lambda: len(svc._workers) == 0)  # both taken by the two workers
        for u in urls[2:5]:
            svc.start(u)
        assert len(svc._workers) == 3
        with pytest.raises(Busy) as e:
            svc.start(urls[5])
        assert e.value.status == 503 and e.value.code == "busy"
        assert svc.start(urls[4])[0] is not None  # joining one already queued is fine
    finally:
        svc.close()


# --------------------------------------------------------------------------------------------
# connections: bounded handler threads, per-client limit, /healthz always


def connect_from(port: int, source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def closed_by_server(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_400_idle_connections_neither_take_400_threads_nor_stop_healthz(tmp_path, monkeypatch):
    # The end waits for the idle connections to be closed: after 3 s, not 60 (and those of
    # the overflow, if any, after 1 s, not 5).
    monkeypatch.setattr(connlimit, "OVERFLOW_TIMEOUT", 1.0)
    monkeypatch.setattr(ApiHandler, "timeout", 3.0)
    with running_api(make_service(tmp_path)) as api:
        base = threading.active_count()
        idle = []
        grown = 0
        try:
            for i in range(400):  # from 50 addresses: under the per-client limit
                idle.append(connect_from(api.port, f"127.0.0.{2 + i % 50}"))
                grown = max(grown, threading.active_count() - base)
            assert grown <= connlimit.MAX_HANDLERS + 2, f"{grown} threads for 400 connections"
            status, doc = get(api.port, "/healthz", "127.0.0.200")
            assert status == 200 and doc["status"] == "ok"
            # A real request is served too (idle connections hold no thread).
            for _ in range(50):
                status, doc = get(api.port, "/content/", "127.0.0.201")
                if status == 200:
                    break
                assert status == 503 and doc["error"]["code"] == "busy"
                time.sleep(0.2)
            assert status == 200

            def all_closed() -> bool:
                nonlocal grown
                grown = max(grown, threading.active_count() - base)
                return all(closed_by_server(s) for s in idle)

            wait_until(all_closed, timeout=60)  # timed out, by the front door or the overflow
            assert grown <= connlimit.MAX_HANDLERS + 2, f"{grown} threads for 400 connections"
            assert api.healthy()
        finally:
            for s in idle:
                s.close()


def test_one_client_gets_a_bounded_number_of_connections(tmp_path):
    with running_api(make_service(tmp_path)) as api:
        mine = []
        try:
            for _ in range(connlimit.MAX_PER_CLIENT):
                mine.append(connect_from(api.port, "127.0.0.9"))
            wait_until(lambda: api.server._clients.get("127.0.0.9") == connlimit.MAX_PER_CLIENT)
            status, doc = get(api.port, "/content/", "127.0.0.9")
            assert status == 503 and doc["error"]["code"] == "busy"
            assert "from one client" in doc["error"]["message"]
            status, doc = get(api.port, "/healthz", "127.0.0.9")  # liveness, whatever
            assert status == 200
            status, _ = get(api.port, "/content/", "127.0.0.10")  # other clients: served
            assert status == 200
        finally:
            for s in mine:
                s.close()
        wait_until(lambda: not api.server._clients.get("127.0.0.9"))
        assert get(api.port, "/content/", "127.0.0.9")[0] == 200


# --------------------------------------------------------------------------------------------
# a trickle, in the headers or in the body


@contextlib.contextmanager
def dribbler(
    head: bytes, body: bytes, byte_every: float, dribble: str, connections: int, fast_after: float
):
    """A raw HTTP server of our own: per connection, reads the request, then sends ``head``
    and ``body`` with one byte of the ``dribble`` part ("head" or "body") every
    ``byte_every`` seconds, the rest at once after ``fast_after`` seconds (bounded);
    serves at most ``connections`` connections.  Yields (url, connections seen)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    seen: list[int] = []
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                slow, rest = (head, body) if dribble == "head" else (body, b"")
                if dribble == "body":
                    conn.sendall(head)
                start = time.monotonic()
                for i in range(len(slow)):
                    if stop.is_set() or time.monotonic() - start > fast_after:
                        conn.sendall(slow[i:])
                        break
                    conn.sendall(slow[i : i + 1])
                    time.sleep(byte_every)
                conn.sendall(rest)
            except OSError:
                return

    def serve() -> None:
        workers = []
        while not stop.is_set() and len(seen) < connections:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            seen.append(1)
            t = threading.Thread(target=one, args=(conn,), daemon=True)
            t.start()
            workers.append(t)
        for t in workers:
            t.join(30)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/file.bin", seen
    finally:
        stop.set()
        t.join(30)
        srv.close()


def test_headers_dribbled_a_byte_at_a_time_are_given_up(tmp_path, monkeypatch):
    monkeypatch.setattr(httpio, "HEADER_TIMEOUT", 1.0)
    head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 60 + b"\r\nContent-Length: 5\r\n\r\n"
    with dribbler(head, b"hello", 0.1, "head", connections=10, fast_after=8) as (url, seen):
        svc = make_service(tmp_path, attempts=2)
        try:
            with pytest.raises(UpstreamUnavailable) as e:
                svc.pull(url)
            assert "no headers within 1 s" in e.value.message
            assert len(seen) <= 2 * (httpio.MAX_STALLS + 1)
            assert svc.store.verify() == []
        finally:
            svc.close()


def test_the_reaper_shuts_by_each_deadline_and_forgets_what_was_unwatched():
    """One thread shuts the sockets whose deadline passed; it is woken only for a deadline
    sooner than those it waits for, so a later one must still be met, an earlier one at
    once, and the many watched and unwatched (every request's) must not pile up."""
    reaper = httpio.Reaper()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for _ in range(1000):  # requests answered in time
            reaper.unwatch(reaper.watch(pairs[0][0], 60.0))
        assert len(reaper._heap) <= 2
        late = reaper.watch(pairs[0][0], 1.5)  # behind a long one: not woken for it
        long = reaper.watch(pairs[1][0], 60.0)
        soon = reaper.watch(pairs[2][0], 0.3)  # sooner than all: woken for it
        pairs[2][1].settimeout(10)
        assert pairs[2][1].recv(1) == b""  # shut within its deadline, not the long one's
        assert not reaper.unwatch(long)
        pairs[0][1].settimeout(10)
        assert pairs[0][1].recv(1) == b""
        assert reaper.unwatch(late) and reaper.unwatch(soon)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.fixture
def low_speed(monkeypatch):
    """The body rule in seconds, not a minute: under 2,000 bytes/s over 2 s."""
    monkeypatch.setattr(httpio, "LOW_SPEED_TIME", 2.0)
    monkeypatch.setattr(httpio, "LOW_SPEED_LIMIT", 2000)


def test_a_body_trickled_below_the_rate_is_given_up_and_kept(tmp_path, low_speed):
    body = os.urandom(400)
    head = b'HTTP/1.1 200 OK\r\nContent-Length: 400\r\nETag: "t1"\r\n\r\n'
    with dribbler(head, body, 0.02, "body", connections=5, fast_after=8) as (url, seen):
        svc = make_service(tmp_path)
        try:
            with pytest.raises(UpstreamTooSlow) as e:
                svc.pull(url)
            assert e.value.status == 502 and e.value.code == "upstream-too-slow"
            assert len(seen) == 1, "a trickle is not retried"
            assert svc.status(url)["state"] == "incomplete"  # what came is kept for a resume
            assert svc.store.verify() == []
        finally:
            svc.close()


def test_a_trickled_small_answer_is_given_up(tmp_path, low_speed):
    body = b'{"schemaVersion": 2}' + b" " * 380
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    with dribbler(head, body, 0.02, "body", connections=5, fast_after=8) as (url, seen):
        config = cfg.build({"cache_dir": str(tmp_path / "cache")}, {})
        transfer = Transfer(config, read_timeout=5.0, backoff=0.01)
        try:
            with pytest.raises(UpstreamTooSlow):
                transfer.request("GET", url)  # a manifest, a token, a tree page
            assert len(seen) == 1
        finally:
            transfer.close()


def test_a_fast_server_is_not_affected(tmp_path, nginx, monkeypatch):
    monkeypatch.setattr(httpio, "LOW_SPEED_TIME", 1.0)
    monkeypatch.setattr(httpio, "HEADER_TIMEOUT", 5.0)
    data = os.urandom(3 << 20)
    svc = make_service(tmp_path)
    try:
        entry, _ = svc.pull(nginx.put("bounds/fast.bin", data))
        assert Path(entry["path"]).read_bytes() == data
    finally:
        svc.close()
