"""The Hub as it is in 2026, not only as it was: rate limits, the Xet-era redirect headers, the
error shapes it really sends, partial pulls (include/exclude, a directory), no re-download of
unchanged git files, mirrors, and the retry lines a person sees (issue 15).

Against the fake Hub (tests/peers/fakehub.py), whose new behaviour tests/test_fakehub_fidelity.py
checks with the official huggingface_hub client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peers.fakehub import GOOD_TOKEN, NOACCESS_TOKEN, FakeHub, git_blob_sha1, start_fakehub
from test_fleet import _post
from test_hf import ROOT, blob_of, cli, host, make_config, make_service, sha

from nekko_sm import retrying
from nekko_sm.api import make_server
from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    IntegrityError,
    InvalidReference,
    NekkoError,
    Unauthorized,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.refparse import parse, with_patterns
from nekko_sm.refs import HFRef
from nekko_sm.sources import hf, hf_api
from nekko_sm.sources.hf_oids import GitOids
from nekko_sm.transfer import USER_AGENT

QUANTS = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0"]


@pytest.fixture(scope="module")
def hub():
    h = start_fakehub()
    h.add_repo(
        "real/gguf",
        files={
            **{f"model-{q}.gguf": blob_of(3000 + i, q.encode()) for i, q in enumerate(QUANTS)},
            "README.md": b"# quants\n",
            "config.json": b'{"q": true}',
            "tokenizer/tokenizer.json": b'{"vocab": []}',
            "tokenizer/special.json": b"{}",
        },
    )
    h.add_repo("real/private", files={"secret.txt": b"s3cret"}, private=True)
    yield h
    h.close()


@pytest.fixture(autouse=True)
def reset(hub: FakeHub):
    hub.clear_faults()
    hub.clear_log()
    yield
    assert not [r for r in hub.log("cdn") if r.has_authorization], "Authorization at the CDN"
    hub.clear_faults()
    hub.xet, hub.lfs_redirect_status, hub.strip_headers = True, 302, set()
    hub.max_unranged_size, hub.bridge_max_size = 50 * 1000**3, None
    hub.anonymous_401_code, hub.hide_xet_hashes = True, False
    for bucket in ("api", "resolvers", "pages"):
        hub.set_rate_limit(bucket, 1_000_000)


@pytest.fixture
def svc(tmp_path, hub):
    s = make_service(make_config(tmp_path, hub))
    yield s
    s.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Every wait nekko-sm makes (retries and pacing), recorded; really slept (capped)."""
    got: list[float] = []

    def sleep(delay: float) -> None:
        got.append(delay)
        time.sleep(min(delay, 3.0))

    monkeypatch.setattr(retrying, "sleep", sleep)
    return got


def resolves(hub: FakeHub, method: str = "GET") -> list:
    return [r for r in hub.log("hub") if r.method == method and "/resolve/" in r.path]


def names(entry: dict) -> list[str]:
    return sorted(f["name"] for f in entry["files"])


# -- 1. rate limits and the connection left in a bad state --------------------------------------


def test_head_429_without_retry_after_waits_t_and_succeeds(svc, hub, sleeps):
    """The Hub's 429 names the window's end in RateLimit t=, not in Retry-After.  (Before: the
    retried HEAD reused a connection whose last answer was never read, and every try failed
    with ('Connection aborted.', ResponseNotReady('Request-sent')).)"""
    hub.inject_errors("hub", status=429, count=2, reset=1, path_contains="/resolve/")
    entry, _ = svc.pull("hf:///real/gguf/README.md")
    assert Path(entry["path"]).read_bytes() == b"# quants\n"
    heads = [r for r in hub.log("hub") if r.method == "HEAD"]
    assert [r.status for r in heads[:3]] == [429, 429, 307]
    assert heads[0].response_header("Retry-After") is None
    assert sleeps[:2] == [1 + retrying.MARGIN] * 2  # t, not a blind backoff


def test_429_that_persists_names_the_bucket_and_when(tmp_path, hub, sleeps):
    hub.inject_errors("hub", status=429, count=50, reset=1, path_contains="/resolve/")
    s = make_service(make_config(tmp_path, hub), attempts=3)
    try:
        with pytest.raises(UpstreamUnavailable) as e:
            s.pull("hf:///real/gguf/README.md")
    finally:
        s.close()
    assert "'resolvers' rate limit is used up" in e.value.message  # the answer's bucket
    assert "try again in 1 s" in e.value.message and "a token raises the limits" in e.value.message
    assert e.value.status == 502 and sleeps == [1 + retrying.MARGIN] * 2


def test_pacing_before_the_bucket_runs_dry(tmp_path, hub, sleeps):
    """Eight LFS files against a quota of four resolves a second: nekko-sm spreads them out
    (RateLimit r= tells it how many are left) instead of running into 429s."""
    files = {f"w{i}.gguf": blob_of(2000, b"pace%d" % i) for i in range(8)}
    hub.add_repo("real/paced", files=files)
    hub.set_rate_limit("resolvers", 4, window=1)
    s = make_service(make_config(tmp_path, hub, jobs="4"))
    try:
        entry, _ = s.pull("hf:///real/paced")
    finally:
        s.close()
    assert names(entry) == sorted(files)
    assert [r.status for r in resolves(hub)].count(429) == 0
    assert [r for r in resolves(hub) if r.status == 302] and sleeps  # it waited, unasked


def test_retry_lines_on_a_terminal(tmp_path, hub):
    """Each wait prints one line on the terminal: what failed, the attempt, how long."""
    hub.inject_errors("hub", status=503, count=2, path_contains="/resolve/")
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=hub.endpoint)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nekko_sm",
            "--cache-dir",
            str(tmp_path / "c"),
            "pull",
            "hf:///real/gguf/config.json",
        ],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        cwd=tmp_path,
    )
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    stdout, _ = p.communicate(timeout=60)
    os.close(master)
    assert p.returncode == 0, out
    assert Path(stdout.decode().strip()).read_bytes() == b'{"q": true}'
    lines = [x for x in out.decode(errors="replace").replace("\r", "\n").splitlines() if "503" in x]
    assert len(lines) == 2, out
    assert "HEAD " in lines[0] and "/real/gguf/resolve/main/config.json" in lines[0]
    assert "try 2 of 6 in" in lines[0] and "try 3 of 6 in" in lines[1]


def test_dns_failure_is_said_plainly_and_at_once(tmp_path, monkeypatch, sleeps):
    """A name that does not resolve (a resolver stub here: no query leaves the machine)."""
    asked: list[str] = []

    def getaddrinfo(host, *args, **kw):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    s = make_service(make_config(tmp_path, None, env={"HF_ENDPOINT": "https://hub.invalid"}))
    try:
        with pytest.raises(UpstreamError) as e:
            s.pull("hf:///org/name/file.gguf")
    finally:
        s.close()
    assert not isinstance(e.value, UpstreamUnavailable)  # final: not retried
    assert "cannot resolve host 'hub.invalid'" in e.value.message
    assert asked == ["hub.invalid"] and sleeps == []


def test_temporary_dns_failure_is_retried_with_a_line(tmp_path, monkeypatch, sleeps, caplog):
    real = socket.getaddrinfo
    failures = [socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")]

    def getaddrinfo(host, *args, **kw):
        if failures:
            raise failures.pop()
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    s = make_service(
        make_config(tmp_path, None, env={"HF_ENDPOINT": "http://localhost:9"}), attempts=2
    )
    caplog.set_level(logging.WARNING, "nekko_sm")
    try:
        with pytest.raises(UpstreamUnavailable):  # then: nothing listens on port 9
            s.pull("hf:///org/name/f.txt")
    finally:
        s.close()
    assert any(
        "cannot resolve host 'localhost'" in r.getMessage() and "try 2 of 2" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_a_specific_user_agent(svc, hub):
    svc.pull("hf:///real/gguf/README.md")
    agents = {r.request_headers.get("User-Agent") for r in hub.log()}
    assert agents == {USER_AGENT} and USER_AGENT.startswith("nekko-sm/")


# -- 2. the Xet era ------------------------------------------------------------------------------


@pytest.mark.parametrize("xet, status", [(True, 302), (True, 307), (False, 302)])
def test_lfs_through_the_bridge_or_the_cdn(svc, hub, xet, status):
    hub.xet, hub.lfs_redirect_status = xet, status
    entry, _ = svc.pull("hf:///real/gguf/model-Q8_0.gguf")
    blob = hub.blob("real/gguf", "model-Q8_0.gguf")
    assert entry["digest"] == "sha256:" + blob.sha256
    (head,) = [r for r in hub.log("hub") if r.method == "HEAD"]
    assert head.status == status and bool(head.response_header("X-Xet-Hash")) == xet
    (get,) = hub.log("cdn")
    etag = get.response_header("ETag").strip('"')
    assert etag == (blob.xet_hash if xet else blob.cdn_etag) != blob.sha256


def test_stripped_linked_headers_fall_back_to_the_tree(svc, hub):
    """A cache hit at CloudFront may lack X-Linked-Size/X-Linked-Etag/X-Xet-Hash: the tree
    listing's size and lfs.oid take their place, and the bytes are still verified."""
    hub.strip_headers = {"X-Linked-Size", "X-Linked-Etag", "X-Xet-Hash"}
    name = "model-Q5_K_M.gguf"
    hub.set_fault("real/gguf", name, corrupt=True)
    with pytest.raises(IntegrityError):
        svc.pull(f"hf:///real/gguf/{name}")
    hub.clear_faults()
    hub.clear_log()
    entry, _ = svc.pull(f"hf:///real/gguf/{name}")
    assert entry["digest"] == "sha256:" + hub.blob("real/gguf", name).sha256
    (head,) = [r for r in hub.log("hub") if r.method == "HEAD"]
    assert head.response_header("X-Linked-Size") is None
    trees = [r for r in hub.log("hub") if "/tree/" in r.path]
    assert len(trees) == 1 and "recursive" not in trees[0].query


def test_no_size_anywhere_asks_the_cdn_with_a_range(svc, hub, monkeypatch):
    monkeypatch.setattr(hf, "tree_entry", lambda *a, **k: None)
    hub.strip_headers = {"X-Linked-Size", "X-Xet-Hash"}
    name = "model-Q4_K_S.gguf"
    entry, _ = svc.pull(f"hf:///real/gguf/{name}")
    assert entry["size"] == hub.blob("real/gguf", name).size
    assert hub.log("cdn")[0].range == "bytes=0-0"


def test_range_less_get_over_the_span_is_never_sent(svc, hub, monkeypatch):
    """Over 50 GB (scaled down) the CDN answers range-less GETs 400: ranges, always."""
    monkeypatch.setattr(hf, "MAX_SPAN", 1024)
    hub.max_unranged_size = 1024
    entry, _ = svc.pull("hf:///real/gguf/model-Q2_K.gguf")
    assert Path(entry["path"]).read_bytes() == blob_of(3000, b"Q2_K")
    assert hub.log("cdn") and all(r.range for r in hub.log("cdn"))


def test_the_bridge_refusing_a_huge_file_says_so(svc, hub):
    hub.bridge_max_size = 1000
    with pytest.raises(UpstreamError) as e:
        svc.pull("hf:///real/gguf/model-Q3_K_M.gguf")
    assert "does not serve files this large" in e.value.message
    assert "model-Q3_K_M.gguf" in e.value.message and "3,001 bytes" in e.value.message
    assert "Xet" in e.value.message


# -- 3. the error shapes the Hub really sends ------------------------------------------------------


@pytest.mark.parametrize("with_code", [True, False])
def test_anonymous_401_means_private_or_missing(svc, hub, with_code):
    hub.anonymous_401_code = with_code
    for url in ("hf:///real/private/secret.txt", "hf:///real/missing", "hf:///real/private"):
        with pytest.raises(UpstreamNotFound) as e:
            svc.pull(url)
        assert "or it is private: pass a token (credentials or HF_TOKEN)" in e.value.message


def test_a_token_that_cannot_see_it(svc, hub):
    with pytest.raises(UpstreamNotFound) as e:
        svc.pull("hf:///real/private/secret.txt", credentials=Credentials.make(NOACCESS_TOKEN))
    assert "not found (or the token cannot see it)" in e.value.message
    with pytest.raises(Unauthorized):
        svc.pull("hf:///real/private/secret.txt", credentials=Credentials.make("hf_nope"))


def test_resolve_cache_redirect_length_is_not_the_file_size(svc, hub):
    entry, _ = svc.pull("hf:///real/gguf/tokenizer/tokenizer.json")
    first = next(r for r in hub.log("hub") if r.method == "HEAD")
    assert first.status == 307 and first.response_header("Location").startswith("/api/")
    assert int(first.response_header("Content-Length")) != entry["size"] == len(b'{"vocab": []}')


def test_big_tree_pages_directories_and_hidden_xet_hashes(tmp_path, hub):
    files = {f"d{i % 5}/f{i:04}.txt": b"%d" % i for i in range(1100)}
    files.update({f"w/{i}.gguf": blob_of(100, b"big%d" % i) for i in range(3)})
    hub.add_repo("real/wide", files=files)
    hub.hide_xet_hashes = True
    s = make_service(make_config(tmp_path, hub))
    try:
        entry, _ = s.pull("hf:///real/wide?include=w/*&include=d1/f000*")
    finally:
        s.close()
    assert names(entry) == sorted(
        ["w/0.gguf", "w/1.gguf", "w/2.gguf", "d1/f0001.txt", "d1/f0006.txt"]
    )
    pages = [r for r in hub.log("hub") if "/tree/" in r.path]
    assert len(pages) == 2 and "cursor=" in pages[1].query  # 1,000 a page, Link followed


# -- 4. part of a repository -------------------------------------------------------------------


def test_include_fetches_only_those_files(svc, hub):
    entry, created = svc.pull("hf:///real/gguf?include=*Q4_K*")
    assert created
    assert entry["url"] == f"hf://{host(hub)}/real/gguf@main?include=*Q4_K*"
    assert names(entry) == ["model-Q4_K_M.gguf", "model-Q4_K_S.gguf"]
    fetched = {r.path.rsplit("/", 1)[1] for r in resolves(hub)}
    assert fetched == {"model-Q4_K_M.gguf", "model-Q4_K_S.gguf"}
    want = sum(hub.blob("real/gguf", n).size for n in fetched)
    assert sum(r.bytes_sent for r in hub.log("cdn")) == want


def test_two_patterns_two_entries_one_set_of_blobs(svc, hub):
    a, _ = svc.pull("hf:///real/gguf?include=*.gguf&exclude=*Q8*&exclude=*Q2*")
    hub.clear_log()
    b, created = svc.pull("hf:///real/gguf?include=*Q4_K_M*&include=*.json")
    assert created and a["url"] != b["url"]
    assert b["url"].endswith("?include=*.json&include=*Q4_K_M*")
    assert not [r for r in hub.log("cdn")]  # the Q4_K_M blob was there already
    shared = {f["digest"] for f in a["files"]} & {f["digest"] for f in b["files"]}
    assert shared == {"sha256:" + hub.blob("real/gguf", "model-Q4_K_M.gguf").sha256}
    # the same patterns in another order, or through the POST fields, are the same entry
    again, created = svc.pull(
        with_patterns(
            "hf:///real/gguf?include=*.json", ["*Q4_K_M*"], hf_endpoint=svc.config.hf_endpoint
        )
    )
    assert not created and again["url"] == b["url"]


def test_a_directory_path_pulls_its_sub_tree(svc, hub):
    entry, _ = svc.pull("hf:///real/gguf/tokenizer")
    assert entry["url"] == f"hf://{host(hub)}/real/gguf@main/tokenizer"
    view = Path(entry["path"])
    assert view.is_dir() and names(entry) == ["special.json", "tokenizer.json"]
    assert (view / "tokenizer.json").read_bytes() == b'{"vocab": []}'
    sub, _ = svc.pull("hf:///real/gguf/tokenizer?exclude=*special*")
    assert names(sub) == ["tokenizer.json"]


def test_nothing_matches_or_no_such_directory(svc, hub):
    with pytest.raises(UpstreamNotFound) as e:
        svc.pull("hf:///real/gguf?include=*Q6_K*")
    assert "matches include=*Q6_K*" in e.value.message
    with pytest.raises(UpstreamNotFound) as e:
        svc.pull("hf:///real/gguf/nope")
    assert "'nope' not found" in e.value.message
    with pytest.raises(UpstreamNotFound) as e:
        svc.pull("hf:///real/gguf/nope?include=*")
    assert "no directory 'nope'" in e.value.message
    assert svc.store.entries() == []


def test_patterns_are_for_hf_urls_only():
    with pytest.raises(InvalidReference):
        with_patterns("https://example.invalid/x", ["*"])
    with pytest.raises(InvalidReference):
        parse("hf://org/name?includes=*.gguf")  # a typo must not pull everything
    with pytest.raises(InvalidReference):
        with_patterns("hf://org/name", "*.gguf")  # a list, not a string
    with pytest.raises(InvalidReference):
        with_patterns("hf://org/name", [""])


def test_canonical_patterns():
    ref = parse("hf://org/name?exclude=b&include=z&include=a&include=a&exclude=dir/")
    assert (ref.include, ref.exclude) == (("a", "z"), ("b", "dir/*"))
    assert (
        ref.canonical
        == "hf://huggingface.co/org/name@main?include=a&include=z&exclude=b&exclude=dir/*"
    )
    odd = parse(with_patterns("hf://org/name", ["a&b=c #%+ é", "x\\y"]))
    assert odd.include == ("a&b=c #%+ é", "x/y")
    assert parse(odd.canonical) == odd
    assert ref.wants("dir/x/y") is False and ref.wants("a") is True and ref.wants("q") is False


PATTERN = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(deadline=None, max_examples=300, database=None)
@given(
    st.lists(PATTERN, max_size=4),
    st.lists(PATTERN, max_size=4),
    st.sampled_from(["hf://org/name", "hf:///org/name@v1/dir", "hf://h.io/datasets/o/n"]),
)
@example(["%"], ["&"], "hf://org/name")
@example(["a/"], ["/"], "hf://org/name")
def test_canonical_patterns_are_a_fixed_point(include, exclude, url):
    try:
        c = with_patterns(url, include, exclude, "http://127.0.0.1:9")
    except NekkoError:
        return
    ref = parse(c, "http://127.0.0.1:9")
    assert isinstance(ref, HFRef) and (ref.canonical == c or not (include or exclude))
    assert parse(ref.canonical, "http://127.0.0.1:9") == ref
    c = ref.canonical
    assert with_patterns(c, list(ref.include), list(ref.exclude), "http://127.0.0.1:9") == c


def test_api_and_cli_take_include_and_exclude(tmp_path, hub):
    r = cli(
        tmp_path,
        "pull",
        "--json",
        "--include",
        "*.json",
        "--include",
        "*Q2_K*",
        "--exclude",
        "tokenizer/*",
        "hf:///real/gguf",
        HF_ENDPOINT=hub.endpoint,
    )
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert names(entry) == ["config.json", "model-Q2_K.gguf"]
    assert entry["url"].endswith("?include=*.json&include=*Q2_K*&exclude=tokenizer/*")
    r = cli(tmp_path, "pull", "--include", "*", "https://example.invalid/f")
    assert r.returncode == 2 and "hf:// URLs only" in r.stderr

    config = make_config(tmp_path / "api", hub, address="127.0.0.1:0")
    service = make_service(config)
    server = make_server(service, config.address)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        status, got = _post(server, {"url": "hf:///real/gguf", "include": ["*Q3*"], "exclude": []})
        assert status == 201 and names(got) == ["model-Q3_K_M.gguf"]
        assert got["url"].endswith("@main?include=*Q3*")
        status, got = _post(server, {"url": "hf:///real/gguf", "include": "*Q3*"})
        assert status == 400 and got["error"]["code"] == "invalid-reference"
    finally:
        server.shutdown()
        server.server_close()
        service.close()


# -- 5. no needless downloads ----------------------------------------------------------------


def test_a_new_commit_with_one_changed_file_fetches_one_file(tmp_path, hub):
    files = {f"src/f{i}.py": b"print(%d)\n" % i * (20 + i) for i in range(8)}
    files["w.gguf"] = blob_of(5000, b"unchanged-lfs")
    hub.add_repo("real/evolving", files=files)
    s = make_service(make_config(tmp_path, hub))
    try:
        s.pull("hf:///real/evolving")
        changed = b"print('changed')\n"
        hub.add_commit("real/evolving", {"src/f3.py": changed})
        hub.clear_log()
        second, created = s.pull(f"hf:///real/evolving@{hub.commit_sha('real/evolving')}")
    finally:
        s.close()
    assert created and (Path(second["path"]) / "src/f3.py").read_bytes() == changed
    got = resolves(hub)
    assert [r.path.rsplit("/", 1)[1] for r in got] == ["f3.py"]
    file_bytes = sum(r.bytes_sent for r in hub.log() if r.path.startswith("/api/resolve-cache/"))
    assert file_bytes == len(changed) and hub.log("cdn") == []


def _config_at_a_new_commit(svc, hub, repo: str, config: bytes) -> tuple[dict, dict, bool]:
    """Pull ``repo``'s config.json, commit a change to another file, clear the Hub's log and
    pull config.json at the new commit: (first entry, second entry, created)."""
    hub.add_repo(repo, files={"config.json": config, "other.txt": b"1"})
    first, _ = svc.pull(f"hf:///{repo}/config.json")
    hub.add_commit(repo, {"other.txt": b"2"})
    hub.clear_log()
    again, created = svc.pull(f"hf:///{repo}@{hub.commit_sha(repo)}/config.json")
    return first, again, created


def test_a_git_file_at_a_new_commit_is_not_fetched_again(svc, hub):
    first, again, created = _config_at_a_new_commit(svc, hub, "real/single", b'{"a": 1}')
    assert created and again["digest"] == first["digest"]
    assert resolves(hub) == [] and [r.status for r in resolves(hub, "HEAD")] == [307]


def test_the_git_id_map_writes_nothing_through_a_link_in_the_cache(svc, hub, tmp_path):
    """The map was once files under CACHE/gitoids/, written through whatever was there: a
    planted ``gitoids -> /victim`` had root write into the victim.  It is in the database."""
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, svc.store.root / "gitoids")
    first, again, created = _config_at_a_new_commit(svc, hub, "real/linked", b'{"b": 2}')
    assert created and again["digest"] == first["digest"]
    assert resolves(hub) == []  # known from the map all the same
    assert list(victim.iterdir()) == []


def test_only_verified_bytes_make_a_mapping(svc, hub):
    data = b"the genuine config\n" * 10
    hub.add_repo("real/verify", files={"c.txt": data})
    oids = GitOids(svc.store, host(hub), "model", "real/verify")
    hub.set_fault("real/verify", "c.txt", corrupt=True)
    with pytest.raises(IntegrityError):
        svc.pull("hf:///real/verify/c.txt")
    assert oids.lookup(git_blob_sha1(data), len(data)) is None
    hub.clear_faults()
    with pytest.raises(IntegrityError):  # a caller's wrong digest creates no mapping either
        svc.pull("hf:///real/verify/c.txt", digest=sha(b"x" * len(data)))
    assert oids.lookup(git_blob_sha1(data), len(data)) is None
    entry, _ = svc.pull("hf:///real/verify/c.txt")
    assert oids.lookup(git_blob_sha1(data), len(data)) == entry["digest"] == sha(data)


def test_a_callers_digest_never_selects_a_blob(svc, hub):
    """A git file's sha256 is unknown to the Hub: a digest the caller passes must not make the
    entry point at some other blob of the same size the store holds (cache poisoning)."""
    genuine, other = b"A" * 64, b"B" * 64
    hub.add_repo("real/poison", files={"a.txt": genuine, "b.txt": other})
    svc.pull("hf:///real/poison/b.txt")  # the store now holds b's bytes
    hub.clear_log()
    with pytest.raises(IntegrityError):
        svc.pull("hf:///real/poison/a.txt", digest=sha(other))
    assert resolves(hub)  # it fetched a.txt to check, and refused
    assert svc.store.get_entry(svc.canonical("hf:///real/poison/a.txt")) is None


def test_mappings_are_per_repository(svc, hub):
    same = b"shared license text\n" * 5
    hub.add_repo("real/lic-a", files={"LICENSE": same})
    hub.add_repo("real/lic-b", files={"LICENSE": same})
    svc.pull("hf:///real/lic-a")
    hub.clear_log()
    svc.pull("hf:///real/lic-b")
    assert len(resolves(hub)) == 1  # b does not trust what a said


# -- 6. mirrors -------------------------------------------------------------------------------


def test_hf_token_goes_to_the_mirror_never_to_huggingface_co(tmp_path, hub):
    config = make_config(tmp_path, hub, env={"HF_TOKEN": GOOD_TOKEN})
    job = hf.Job(config, None, None, None)  # type: ignore[arg-type]
    mirror = parse("hf:///real/private", config.hf_endpoint)
    assert hf_api.auth_header(job, mirror) == f"Bearer {GOOD_TOKEN}"
    for url in ("hf://huggingface.co/org/name", "hf://hf.co/org/name", "hf://other.io/o/n"):
        assert hf_api.auth_header(job, parse(url, config.hf_endpoint)) is None, url
    hub_config = make_config(tmp_path, None, env={"HF_TOKEN": GOOD_TOKEN})
    job = hf.Job(hub_config, None, None, None)  # type: ignore[arg-type]
    assert hf_api.auth_header(job, parse("hf://hf.co/org/name")) == f"Bearer {GOOD_TOKEN}"
    s = make_service(config)
    try:
        entry, _ = s.pull("hf:///real/private/secret.txt")
    finally:
        s.close()
    assert entry["url"] == f"hf://{host(hub)}/real/private@main/secret.txt"  # keyed by mirror
    assert all(r.has_authorization for r in hub.log("hub"))


def test_from_a_mirror_back_to_the_hub_shares_the_blobs(tmp_path, hub):
    """Two endpoints with one repository: the second pull fetches no LFS byte again (one blob
    per sha256) and only the small git files (a mirror cannot vouch for the Hub's git ids)."""
    other = start_fakehub()
    try:
        files = {"m.gguf": blob_of(20_000, b"mirrored"), "config.json": b'{"m": 1}'}
        hub.add_repo("real/mirrored", files=files)
        other.add_repo("real/mirrored", files=files)
        s = make_service(make_config(tmp_path, hub, insecure_registry=[host(other)]))
        try:
            a, _ = s.pull("hf:///real/mirrored")
            b, _ = s.pull(f"hf://{host(other)}/real/mirrored")
        finally:
            s.close()
        assert a["url"] != b["url"] and sorted(f["digest"] for f in a["files"]) == sorted(
            f["digest"] for f in b["files"]
        )
        assert other.log("cdn") == []
        assert [
            r.path.rsplit("/", 1)[1]
            for r in other.log("hub")
            if r.method == "GET" and "/resolve/" in r.path
        ] == ["config.json"]
    finally:
        other.close()


def test_hashes_of_the_fake_are_what_they_claim(hub):
    blob = hub.blob("real/gguf", "model-Q8_0.gguf")
    assert blob.sha256 == hashlib.sha256(blob.data).hexdigest() != blob.xet_hash


def test_answers_that_cross_in_flight_leave_room_for_the_requests_still_flying():
    """Four parallel first requests against a quota of four: the first answer says three
    are left, but the three others in flight are counted by the server too, so a fifth
    waits for the window instead of earning a 429 (a flake of the test above, under load)."""
    from nekko_sm.retrying import Pacer

    pacer = Pacer()
    url = "https://hub.test/org/m/resolve/main/w.gguf"
    for _ in range(4):
        assert pacer.delay(url)[0] == 0.0  # nothing known yet
        pacer.sending(url)

    def answer(r: int) -> None:
        pacer.observe(url, {"RateLimit": f'"resolvers";r={r};t=1', "RateLimit-Policy": "q=4;w=1"})

    answer(3)  # three others still in flight: none left for a fifth
    wait, why = pacer.delay(url)
    assert wait > 0 and "0 requests left" in why
    pacer.observe(url, None)  # a request that got no answer lands too
    answer(2), answer(1), answer(0)
    assert pacer._flying == {}
