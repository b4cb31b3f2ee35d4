"""http(s) components through the service, against real nginx and our fault-injecting server."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from peers.nginx import BASIC_PASSWORD, BASIC_USER, BEARER_TOKEN

from nekko_sm import config as cfg
from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    EntryNotFound,
    IntegrityError,
    SizeMismatch,
    Unauthorized,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.service import Service
from nekko_sm.store import REF_NAME
from nekko_sm.transfer import Transfer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def svc(new_service):
    return new_service(transfer={"read_timeout": 2.0, "backoff": 0.05})


def test_pull_stores_raw_file_wrapped_in_artifact(svc, nginx):
    data = os.urandom(3 << 20)
    url = nginx.put("plain.bin", data)
    entry, created = svc.pull(url)
    assert created
    assert entry["state"] == "complete" and entry["digest"] == sha(data)
    assert entry["path"] == str(svc.store.blob_path(sha(data)))
    with open(entry["path"], "rb") as f:
        assert f.read() == data
    assert entry["files"] == [
        {"name": "plain.bin", "digest": sha(data), "size": len(data), "path": entry["path"]}
    ]
    manifest = json.loads(svc.store.read_blob(entry["manifest"]))
    assert manifest["artifactType"] == "application/vnd.nekko.file.v1"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert manifest["layers"][0]["annotations"] == {"org.opencontainers.image.title": "plain.bin"}
    assert manifest["annotations"]["io.nekko.source.url"] == url
    # second pull: nothing transferred
    nginx.clear_log()
    again, created = svc.pull(url)
    assert not created and again["last_used"] > entry["last_used"]  # a use (DESIGN 9)
    assert {**again, "last_used": 0} == {**entry, "last_used": 0}
    assert nginx.requests_for("plain.bin") == []


def test_same_bytes_two_urls_one_blob(svc, nginx):
    data = b"same bytes" * 1000
    e1, _ = svc.pull(nginx.put("same1.bin", data))
    e2, _ = svc.pull(nginx.put("same2.bin", data))
    assert e1["digest"] == e2["digest"]
    svc.remove(e1["url"])
    assert Path(e2["path"]).read_bytes() == data
    assert svc.store.verify() == []


def test_basic_and_bearer_credentials(svc, nginx):
    data = os.urandom(1000)
    nginx.put("secret.bin", data)
    with pytest.raises(Unauthorized):
        svc.pull(nginx.url + "/basic/secret.bin")
    creds = Credentials.make(
        base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode(), "basic"
    )
    entry, _ = svc.pull(nginx.url + "/basic/secret.bin", creds)
    assert entry["digest"] == sha(data)
    entry, _ = svc.pull(nginx.url + "/bearer/secret.bin", Credentials.make(BEARER_TOKEN))
    assert entry["digest"] == sha(data)


def test_userinfo_is_basic_credentials_and_not_the_key(svc, nginx):
    data = os.urandom(100)
    nginx.put("ui.bin", data)
    host = nginx.url.split("://")[1]
    entry, _ = svc.pull(f"http://{BASIC_USER}:{BASIC_PASSWORD}@{host}/basic/ui.bin")
    assert entry["url"] == f"http://{host}/basic/ui.bin"
    svc.store.flush()
    assert entry["url"] in (svc.store.root / "index.json").read_text()
    assert BASIC_PASSWORD not in (svc.store.root / "index.json").read_text()
    for name in ("nekko.db", "nekko.db-wal"):  # the entry is in one of them, no password
        assert BASIC_PASSWORD.encode() not in (svc.store.root / name).read_bytes()


def test_redirect_to_other_host_drops_authorization(svc, nginx):
    data = os.urandom(5000)
    nginx.put("redir.bin", data)
    nginx.clear_log()
    entry, _ = svc.pull(nginx.url + "/bearer-redirect/redir.bin", Credentials.make(BEARER_TOKEN))
    assert entry["digest"] == sha(data)
    log = nginx.access_log()
    cdn = [r for r in log if r["host"].startswith("localhost")]
    assert cdn and not any(r["authorization"] for r in cdn)
    assert any(r["authorization"] for r in log if r["uri"].startswith("/bearer-redirect/"))


def test_relative_redirect(svc, nginx):
    data = os.urandom(100)
    nginx.put("rel.bin", data)
    assert svc.pull(nginx.url + "/redirect-rel/rel.bin")[0]["digest"] == sha(data)


@pytest.mark.parametrize("status, err", [(404, UpstreamNotFound), (401, Unauthorized)])
def test_upstream_errors(svc, nginx, status, err):
    with pytest.raises(err):
        svc.pull(f"{nginx.url}/status/{status}")
    with pytest.raises(EntryNotFound):
        svc.status(f"{nginx.url}/status/{status}")
    assert svc.store.entries() == []


def test_dropped_connection_resumes_with_range(svc, faulty):
    data = os.urandom(2 << 20)
    url = faulty.add("drop.bin", data, drop_after=700_000, drop_times=2)
    entry, _ = svc.pull(url)
    assert entry["digest"] == sha(data)
    gets = [r for r in faulty.requests_for("drop.bin") if r.method == "GET"]
    assert [r.range for r in gets] == [None, "bytes=700000-", "bytes=1400000-"]
    assert all(r.if_range for r in gets[1:])
    assert faulty.body_bytes("drop.bin") == len(data)


def test_503_with_retry_after_is_retried(svc, faulty):
    data = b"x" * 1000
    url = faulty.add("busy.bin", data, statuses=[503, 429], retry_after="0")
    assert svc.pull(url)[0]["digest"] == sha(data)
    assert [r.status for r in faulty.requests_for("busy.bin")] == [503, 429, 200]


def test_persistent_5xx_gives_up(svc, faulty):
    url = faulty.add("down.bin", b"x", statuses=[500] * 20, retry_after="0")
    with pytest.raises(UpstreamUnavailable):
        svc.pull(url)


def test_short_body_against_content_length_is_not_committed(svc, faulty):
    data = os.urandom(10_000)
    url = faulty.add("liar.bin", data, lie_length=+500)
    with pytest.raises(SizeMismatch):
        svc.pull(url)
    assert svc.store.entries() == []
    assert list(svc.store.blobs()) == []


def test_expected_digest_refuses_wrong_bytes(svc, faulty):
    data = os.urandom(50_000)
    url = faulty.add("bad.bin", data, corrupt=True)
    with pytest.raises(IntegrityError):
        svc.pull(url, digest=sha(data))
    assert list(svc.store.blobs()) == []
    assert svc.store.entries() == []


def test_overlong_close_delimited_body_refused_against_digest(svc, faulty):
    data = os.urandom(10_000)
    url = faulty.add("long.bin", data, extra_bytes=100)
    with pytest.raises(IntegrityError):
        svc.pull(url, digest=sha(data))
    assert svc.store.entries() == []


def test_close_delimited_body_without_length(svc, faulty):
    data = os.urandom(10_000)
    url = faulty.add("nolen.bin", data, no_length=True)
    assert svc.pull(url)[0]["digest"] == sha(data)


def test_server_ignoring_range_restarts_cleanly(svc, faulty):
    data = os.urandom(1 << 20)
    url = faulty.add("norange.bin", data, ignore_range=True, drop_after=300_000)
    assert svc.pull(url)[0]["digest"] == sha(data)


def test_changed_content_restarts_via_if_range(svc, faulty):
    data = os.urandom(1 << 20)
    url = faulty.add("changing.bin", data, drop_after=400_000, change_etag_after=1)
    entry, _ = svc.pull(url)
    new = bytes(b ^ 0x5A for b in data)
    assert entry["digest"] == sha(new)  # never a mix of old and new bytes


def test_content_disposition_names_the_file(svc, faulty):
    url = faulty.add(
        "dl", b"abc", content_disposition='attachment; filename="../../evil/model.gguf"'
    )
    assert svc.pull(url)[0]["files"][0]["name"] == "model.gguf"


def test_concurrent_pulls_share_one_download(svc, faulty):
    data = os.urandom(1 << 20)
    url = faulty.add("shared.bin", data, stall_after=1000, stall_seconds=0.5)
    results = []

    def worker():
        results.append(svc.pull(url))

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 10 and all(e["digest"] == sha(data) for e, _ in results)
    assert len([r for r in faulty.requests_for("shared.bin") if r.method == "GET"]) == 1


def test_stalled_connection_is_replaced(svc, faulty):
    data = os.urandom(300_000)
    url = faulty.add("stall.bin", data, stall_after=100_000, stall_seconds=5)
    assert svc.pull(url)[0]["digest"] == sha(data)  # read timeout is 2 s in this fixture
    gets = [r for r in faulty.requests_for("stall.bin") if r.method == "GET"]
    assert gets[-1].range == "bytes=100000-"


def test_interrupted_entry_is_incomplete_then_resumes(svc, faulty, tmp_path):
    data = os.urandom(1 << 20)
    url = faulty.add("later.bin", data, drop_after=500_000, drop_times=1)
    url_down = faulty.add("later-down.bin", data, statuses=[503] * 50, retry_after="0")
    with pytest.raises(UpstreamUnavailable):
        svc.pull(url_down)
    st = svc.status(url_down)
    assert st["state"] == "incomplete"
    assert svc.pull(url)[0]["state"] == "complete"


def test_remove_unknown_is_not_found(svc):
    with pytest.raises(EntryNotFound):
        svc.remove("http://127.0.0.1:1/nothing")


def test_index_names_canonical_url(svc, nginx):
    url = nginx.put("canon.bin", b"c")
    svc.pull(url.replace("http://", "HTTP://") + "#frag")
    assert [d.annotations[REF_NAME] for d in svc.store.entries()] == [url]


def test_stalls_do_not_use_up_the_retry_budget(tmp_path, faulty):
    """Eight stalls in a row (more than the six attempts): each quiet connection is replaced."""
    config = cfg.build({"cache_dir": str(tmp_path / "c2"), "jobs": "1"}, {})
    s = Service(config, transfer=Transfer(config, read_timeout=0.3, backoff=0.01))
    try:
        data = os.urandom(200_000)
        url = faulty.add("quiet.bin", data, stall_after=10_000, stall_seconds=2, stall_times=8)
        assert s.pull(url)[0]["digest"] == sha(data)
        assert len([r for r in faulty.requests_for("quiet.bin") if r.method == "GET"]) == 9
    finally:
        s.close()
