"""The API's front door (``api_front``): one thread answers the common requests of every
connection, hands the rest to a handler thread with what it read, and holds idle
connections without a thread each (issue 11, item 5)."""

from __future__ import annotations

import json
import socket
import threading

from test_api import content
from test_bounds import closed_by_server, connect_from, wait_until
from test_security import make_service, running_api

from nekko_sm import connlimit


def read_answers(
    sock: socket.socket, count: int, to_head: tuple[int, ...] = ()
) -> list[tuple[int, bytes, bytes]]:
    """``count`` answers from ``sock``: (status, head, body), bodies by Content-Length but
    for the answers to HEAD requests (their numbers in ``to_head``)."""
    data = b""
    answers = []
    sock.settimeout(30)
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body_len = 0 if len(answers) in to_head else length
            if len(data) >= end + 4 + body_len:
                answers.append((int(head.split(b" ")[1]), head, data[end + 4 : end + 4 + body_len]))
                data = data[end + 4 + body_len :]
                continue
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed after {len(answers)} answers"
        data += chunk
    return answers


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def pulled(api, nginx, name: str) -> tuple[str, bytes]:
    url = nginx.put(name, name.encode() * 10)
    status, _, _ = api.call("POST", "/content/", {"url": url})
    assert status == 201
    status, _, text = api.call("GET", content(url))
    assert status == 200
    wait_until(lambda: api.server._handlers == 0, timeout=30)  # the POST's thread is done
    return url, text.encode()


def test_pipelined_hits_on_one_connection_take_no_handler_thread(tmp_path, nginx):
    with running_api(make_service(tmp_path)) as api:
        url, entry = pulled(api, nginx, "front-hit.bin")
        s = connect_from(api.port, "127.0.0.1")
        try:
            s.sendall(get(content(url)) + get("/healthz") + get(content(url), "HEAD"))
            answers = read_answers(s, 3, to_head=(2,))
            assert [a[0] for a in answers] == [200, 200, 200]
            assert answers[0][2] == entry
            assert b'"status":"ok"' in answers[1][2]
            assert (
                answers[2][2] == b"" and f"Content-Length: {len(entry)}".encode() in answers[2][1]
            )
            assert api.server._handlers == 0  # answered by the front door, no thread
            for _ in range(50):  # and keeps doing so, keep-alive
                s.sendall(get(content(url)))
                assert read_answers(s, 1)[0][2] == entry
            assert api.server._handlers == 0
        finally:
            s.close()


def test_a_request_it_does_not_answer_goes_to_a_handler_and_back(tmp_path, nginx):
    with running_api(make_service(tmp_path)) as api:
        url, entry = pulled(api, nginx, "front-handoff.bin")
        unknown = content(nginx.url + "/files/front-never-pulled.bin")
        s = connect_from(api.port, "127.0.0.1")
        try:
            # three requests in one packet: the second is the handler's (a 404), and it gets
            # the third's bytes too, which the front door had read already
            s.sendall(get(content(url)) + get(unknown) + get(content(url)))
            answers = read_answers(s, 3)
            assert [a[0] for a in answers] == [200, 404, 200]
            assert answers[0][2] == entry == answers[2][2]
            assert b'"not-found"' in answers[1][2]
            # the handler gave the connection back: no thread waits on it, and it is served
            wait_until(lambda: api.server._handlers == 0, timeout=30)
            s.sendall(get(unknown) + get(content(url)))
            assert [a[0] for a in read_answers(s, 2)] == [404, 200]
            wait_until(lambda: api.server._handlers == 0, timeout=30)
            assert api.server._clients == {"127.0.0.1": 1}  # counted once, all along
        finally:
            s.close()
        wait_until(lambda: not api.server._clients, timeout=30)


def test_a_post_split_across_packets_reaches_its_handler_whole(tmp_path, nginx):
    with running_api(make_service(tmp_path)) as api:
        url = nginx.put("front-post.bin", b"posted in two pieces")
        body = json.dumps({"url": url}).encode()
        head = (
            "POST /content/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        s = connect_from(api.port, "127.0.0.1")
        try:
            s.sendall(head + body[:7])
            # the front door hands it on with the first 7 bytes of the body ...
            wait_until(lambda: api.server._handlers == 1, timeout=30)
            s.sendall(body[7:] + get(content(url)))  # ... and the handler reads the rest
            answers = read_answers(s, 2)
            assert [a[0] for a in answers] == [201, 200]
            assert b"posted" not in answers[1][2] and url.encode() in answers[1][2]
        finally:
            s.close()


def test_http_1_0_and_connection_close_are_answered_then_closed(tmp_path, nginx):
    with running_api(make_service(tmp_path)) as api:
        url, entry = pulled(api, nginx, "front-close.bin")
        for request in (
            f"GET {content(url)} HTTP/1.0\r\n\r\n".encode(),
            get(content(url), extra="Connection: close\r\n"),
        ):
            s = connect_from(api.port, "127.0.0.1")
            try:
                s.sendall(request)
                status, _, body = read_answers(s, 1)[0]
                assert status == 200 and body == entry
                s.settimeout(10)
                assert s.recv(1) == b""  # closed by the server after the answer
            finally:
                s.close()


def test_a_client_that_does_not_read_holds_up_nobody(tmp_path, nginx):
    with running_api(make_service(tmp_path)) as api:
        url, entry = pulled(api, nginx, "front-slow-reader.bin")
        n = 20_000  # answers (~14 MB) far beyond what the socket buffers hold
        slow = connect_from(api.port, "127.0.0.1")
        try:
            sender = threading.Thread(target=slow.sendall, args=(get(content(url)) * n,))
            sender.start()
            front = api.server.front
            # the front door has answers it cannot send (it stops reading that connection) ...
            wait_until(lambda: any(c.out is not None for c in list(front._conns.values())))
            assert api.healthy()  # ... and others are served all the same
            answers = read_answers(slow, n)
            sender.join(30)
            assert all(a[0] == 200 and a[2] == entry for a in answers)
        finally:
            slow.close()


def test_past_max_idle_the_longest_idle_connection_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(connlimit, "MAX_IDLE", 8)
    with running_api(make_service(tmp_path)) as api:
        idle = []
        try:
            for _ in range(8):  # accepted, and given to the front door, in this order
                idle.append(connect_from(api.port, "127.0.0.1"))
            wait_until(lambda: api.server._clients.get("127.0.0.1") == 8, timeout=30)
            assert api.healthy()  # a ninth connection is served ...
            wait_until(lambda: closed_by_server(idle[0]), timeout=30)  # ... the oldest went
            assert not any(closed_by_server(s) for s in idle[2:])
        finally:
            for s in idle:
                s.close()


def test_an_entry_never_rendered_is_rendered_by_a_handler_not_the_front(
    tmp_path, nginx, monkeypatch
):
    # Rendering writes the rendering to the database, and a write may wait on another
    # process's lock: never on the thread that answers every connection.
    with running_api(make_service(tmp_path)) as api:
        url, entry = pulled(api, nginx, "front-render.bin")
        store = api.service.store
        store._index.db.execute("UPDATE entries SET info = NULL WHERE key = ?", (url,))
        api.service.catalog._answers_revision = -1  # as if taken over from an index.json
        writers: list[str] = []
        real = store.set_entry_info
        monkeypatch.setattr(
            store,
            "set_entry_info",
            lambda rows: (writers.append(threading.current_thread().name), real(rows))[1],
        )
        s = connect_from(api.port, "127.0.0.1")
        try:
            s.sendall(get(content(url)) + get(content(url)))
            answers = read_answers(s, 2)
        finally:
            s.close()
        assert [a[0] for a in answers] == [200, 200]
        assert answers[0][2] == entry == answers[1][2]
        assert len(writers) == 1 and writers[0] != "api front", writers
