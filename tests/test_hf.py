"""hf:// through the service and the CLI, against the fake Hub and its CDN (tests/peers/fakehub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from peers.fakehub import GOOD_TOKEN, NOACCESS_TOKEN, FakeHub, start_fakehub

from nekko_sm import config as cfg
from nekko_sm.credentials import Credentials
from nekko_sm.errors import (
    GatedRepo,
    IntegrityError,
    Unauthorized,
    UnsafeName,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from nekko_sm.service import Service
from nekko_sm.sources import hf
from nekko_sm.sources.base import A_HF_COMMIT, A_SOURCE_URL
from nekko_sm.store import TITLE
from nekko_sm.transfer import Transfer

ROOT = Path(__file__).resolve().parent.parent

CONFIG_V1 = json.dumps({"model_type": "tiny", "layers": list(range(400))}).encode()  # > 1 kB
CONFIG_V2 = json.dumps({"model_type": "tiny", "layers": list(range(500))}).encode()
README = b"# tiny model\n"
TOKENIZER = b'{"vocab": ["a", "b"]}'
GGUF = b"GGUF" + hashlib.sha256(b"gguf").digest() * 3000  # LFS by suffix, ~96 kB
SAFETENSORS = hashlib.sha256(b"st").digest() * 2000  # LFS by suffix, 64 kB
PR_FILE = b"only in the pull request\n"
TRAIN = b"text,label\n" + b"hello,1\n" * 500


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_of(n: int, seed: bytes) -> bytes:
    """``n`` bytes unique to ``seed`` (faults are keyed by content: keep tests apart)."""
    return b"".join(hashlib.sha256(seed + b"%d" % i).digest() for i in range(n // 32 + 1))[:n]


@pytest.fixture(scope="module")
def hub():
    """This module's own fake Hub; three tree entries per page, so listings paginate."""
    h = start_fakehub(tree_page_size=3)
    first = h.add_repo(
        "acme/tiny-model",
        files={
            "config.json": CONFIG_V1,
            "README.md": README,
            "tokenizer/tokenizer.json": TOKENIZER,
            "model.Q4_K_M.gguf": GGUF,
            "weights/model.safetensors": SAFETENSORS,
        },
    )
    h.add_tag("acme/tiny-model", "v1.0", first)
    h.add_commit("acme/tiny-model", {"config.json": CONFIG_V2})
    h.add_pr("acme/tiny-model", {"pr.txt": PR_FILE})
    h.add_repo("acme/corpus", repo_type="dataset", files={"data/train.csv": TRAIN})
    h.add_repo(
        "acme/gated-model",
        files={"config.json": b'{"gated": true}', "model.safetensors": blob_of(5000, b"gated")},
        gated=True,
    )
    h.add_repo("acme/private-model", files={"secret.txt": b"s3cret"}, private=True)
    h.add_repo("acme/one-file", files={"only.gguf": blob_of(3000, b"one")})
    yield h
    h.close()


@pytest.fixture(autouse=True)
def no_authorization_at_the_cdn(hub: FakeHub):
    """After every test: no request to the CDN ever carried Authorization."""
    hub.clear_faults()
    hub.clear_log()
    yield
    leaked = [r for r in hub.log("cdn") if r.has_authorization]
    assert not leaked, "Authorization was sent to the CDN"
    encodings = {r.request_headers.get("Accept-Encoding") for r in hub.log()}
    assert encodings <= {"identity"}, encodings
    hub.clear_faults()


def make_config(tmp_path, hub: FakeHub | None, env: dict | None = None, **flags):
    environ = dict(env or {})
    if hub is not None:
        environ.setdefault("HF_ENDPOINT", hub.endpoint)
    return cfg.build({"cache_dir": str(tmp_path / "cache"), **flags}, environ)


def make_service(config, attempts: int = 6) -> Service:
    return Service(
        config, transfer=Transfer(config, read_timeout=5.0, attempts=attempts, backoff=0.01)
    )


@pytest.fixture
def svc(tmp_path, hub):
    s = make_service(make_config(tmp_path, hub))
    yield s
    s.close()


def manifest_of(svc: Service, entry: dict) -> dict:
    desc = svc.store.get_entry(entry["url"])
    return json.loads(svc.store.read_blob(desc.digest))


def cache_state(svc: Service) -> tuple:
    return set(svc.store.blobs()), [d.annotations for d in svc.store.entries()]


def host(hub: FakeHub) -> str:
    return hub.endpoint.split("://", 1)[1]


# -- single files --------------------------------------------------------------------------


def test_git_file_at_root(svc, hub):
    entry, created = svc.pull("hf:///acme/tiny-model/config.json")
    assert created
    assert entry["url"] == f"hf://{host(hub)}/acme/tiny-model@main/config.json"
    assert entry["digest"] == sha(CONFIG_V2)
    assert entry["path"] == str(svc.store.blob_path(sha(CONFIG_V2)))
    assert Path(entry["path"]).read_bytes() == CONFIG_V2
    assert [f["name"] for f in entry["files"]] == ["config.json"]
    m = manifest_of(svc, entry)
    commit = hub.commit_sha("acme/tiny-model")
    assert m["artifactType"] == hf.FILE_ARTIFACT_TYPE
    assert m["annotations"][A_HF_COMMIT] == commit
    assert m["annotations"][A_SOURCE_URL] == (
        f"{hub.endpoint}/acme/tiny-model/resolve/{commit}/config.json"
    )
    assert m["layers"][0]["annotations"] == {TITLE: "config.json"}
    # metadata asked with HEAD (identity encoding), then the bytes pinned to the commit
    hub_log = hub.log("hub")
    assert hub_log[0].method == "HEAD" and hub_log[0].path.endswith("/resolve/main/config.json")
    assert hub_log[0].request_headers.get("Accept-Encoding") == "identity"
    gets = [r for r in hub_log if r.method == "GET"]
    assert gets and gets[0].path == f"/acme/tiny-model/resolve/{commit}/config.json"
    # second pull: nothing asked of the Hub
    hub.clear_log()
    again, created = svc.pull("hf:///acme/tiny-model@main/config.json")
    assert not created and again["last_used"] > entry["last_used"]  # a use (DESIGN 9)
    assert {**again, "last_used": 0} == {**entry, "last_used": 0}
    assert hub.log() == []


def test_lfs_file_in_subfolder_comes_from_the_cdn(svc, hub):
    entry, _ = svc.pull("hf:///acme/tiny-model/weights/model.safetensors")
    assert entry["digest"] == sha(SAFETENSORS)
    assert Path(entry["path"]).read_bytes() == SAFETENSORS
    assert entry["files"][0]["name"] == "model.safetensors"
    cdn = hub.log("cdn")
    assert [r.method for r in cdn] == ["GET"]
    assert manifest_of(svc, entry)["layers"][0]["annotations"][TITLE] == "model.safetensors"


def test_token_goes_to_the_hub_never_to_the_cdn(tmp_path, hub):
    s = make_service(make_config(tmp_path, hub))
    try:
        entry, _ = s.pull(
            "hf:///acme/tiny-model/model.Q4_K_M.gguf", credentials=Credentials.make(GOOD_TOKEN)
        )
    finally:
        s.close()
    assert entry["digest"] == sha(GGUF)
    assert all(r.has_authorization for r in hub.log("hub"))
    assert hub.log("cdn") and not any(r.has_authorization for r in hub.log("cdn"))


@pytest.mark.parametrize("rev", ["main", "v1.0", "COMMIT", "refs/pr/1"])
def test_every_revision_form(svc, hub, rev):
    first = hub.commit_sha("acme/tiny-model", "v1.0")
    if rev == "COMMIT":
        rev = first
    want = {"main": CONFIG_V2, first: CONFIG_V1, "v1.0": CONFIG_V1, "refs/pr/1": CONFIG_V2}[rev]
    entry, _ = svc.pull(f"hf:///acme/tiny-model@{rev}/config.json")
    assert entry["url"] == f"hf://{host(hub)}/acme/tiny-model@{rev}/config.json"
    assert Path(entry["path"]).read_bytes() == want
    commit = hub.commit_sha("acme/tiny-model", rev)
    assert manifest_of(svc, entry)["annotations"][A_HF_COMMIT] == commit
    head = hub.log("hub")[0]
    assert head.path.split("/resolve/")[1] == rev.replace("/", "%2F") + "/config.json"


def test_pull_request_file(svc, hub):
    entry, _ = svc.pull("hf:///acme/tiny-model@refs/pr/1/pr.txt")
    assert Path(entry["path"]).read_bytes() == PR_FILE


def test_dataset_file(svc, hub):
    entry, _ = svc.pull("hf:///datasets/acme/corpus/data/train.csv")
    assert entry["url"] == f"hf://{host(hub)}/datasets/acme/corpus@main/data/train.csv"
    assert Path(entry["path"]).read_bytes() == TRAIN
    assert hub.log("hub")[0].path == "/datasets/acme/corpus/resolve/main/data/train.csv"


def test_spellings_are_one_entry(svc, hub):
    e1, created = svc.pull("hf://acme/tiny-model/README.md")  # the Hub's own spelling
    assert created and Path(e1["path"]).read_bytes() == README
    for url in (
        f"hf://{host(hub)}/acme/tiny-model/README.md",
        "hf:///acme/tiny-model/README.md",
        "huggingface:///acme//tiny-model@main/README.md",
    ):
        e2, created = svc.pull(url)
        assert not created and e2["url"] == e1["url"]


def test_explicit_registry_needs_insecure_for_plain_http(tmp_path, hub):
    url = f"hf://{host(hub)}/acme/tiny-model/README.md"
    s = make_service(make_config(tmp_path, None, insecure_registry=[host(hub)]))
    try:
        entry, _ = s.pull(url)
        assert Path(entry["path"]).read_bytes() == README
    finally:
        s.close()
    # without --insecure-registry it speaks https, which the fake does not
    s = make_service(make_config(tmp_path / "2", None), attempts=1)
    try:
        with pytest.raises(UpstreamUnavailable):
            s.pull(url)
    finally:
        s.close()


def test_hf_token_only_goes_to_the_default_endpoint(tmp_path, hub):
    # HF_ENDPOINT is the fake: HF_TOKEN is sent to it
    s = make_service(make_config(tmp_path, hub, env={"HF_TOKEN": GOOD_TOKEN}))
    try:
        s.pull("hf:///acme/private-model/secret.txt")
    finally:
        s.close()
    assert all(r.has_authorization for r in hub.log("hub"))
    # another registry named in the URL does not get the default endpoint's token
    hub.clear_log()
    s = make_service(make_config(tmp_path / "2", None, insecure_registry=[host(hub)]))
    try:
        s.pull(f"hf://{host(hub)}/acme/tiny-model/README.md")
    finally:
        s.close()
    assert not any(r.has_authorization for r in hub.log())


# -- whole repositories ----------------------------------------------------------------------


def test_whole_repository(svc, hub):
    entry, _ = svc.pull("hf:///acme/tiny-model")
    commit = hub.commit_sha("acme/tiny-model")
    assert entry["url"] == f"hf://{host(hub)}/acme/tiny-model@main"
    view = Path(entry["path"])
    assert view.is_dir() and view == svc.store.view_path(entry["url"])
    want = {
        "README.md": README,
        "config.json": CONFIG_V2,
        "model.Q4_K_M.gguf": GGUF,
        "tokenizer/tokenizer.json": TOKENIZER,
        "weights/model.safetensors": SAFETENSORS,
    }
    assert sorted(f["name"] for f in entry["files"]) == sorted(want)
    for name, data in want.items():
        assert (view / name).is_symlink()
        assert (view / name).read_bytes() == data
    m = manifest_of(svc, entry)
    assert m["artifactType"] == hf.REPO_ARTIFACT_TYPE
    assert m["annotations"][A_HF_COMMIT] == commit
    assert sorted(layer["annotations"][TITLE] for layer in m["layers"]) == sorted(want)
    assert entry["digest"] == svc.store.get_entry(entry["url"]).digest
    assert entry["size"] == sum(len(d) for d in want.values())
    # the listing paginated (5 files + 2 directories, 3 per page) and was pinned to the commit
    trees = [r for r in hub.log("hub") if "/tree/" in r.path]
    assert len(trees) == 3 and all(r.path.endswith(f"/tree/{commit}") for r in trees)
    resolves = [r for r in hub.log("hub") if "/resolve/" in r.path]
    assert resolves and all(f"/resolve/{commit}/" in r.path for r in resolves)


def test_repository_at_a_tag_and_lfs_dedup(svc, hub):
    single, _ = svc.pull("hf:///acme/tiny-model/model.Q4_K_M.gguf")
    hub.clear_log()
    entry, _ = svc.pull("hf:///acme/tiny-model@v1.0")
    view = Path(entry["path"])
    assert (view / "config.json").read_bytes() == CONFIG_V1
    assert hub.log("cdn") and all(
        sha(GGUF)[7:] not in r.path for r in hub.log("cdn")
    )  # already in the store: not fetched
    assert (view / "model.Q4_K_M.gguf").resolve() == Path(single["path"]).resolve()


def test_repository_at_a_pull_request(svc, hub):
    entry, _ = svc.pull("hf:///acme/tiny-model@refs/pr/1")
    assert (Path(entry["path"]) / "pr.txt").read_bytes() == PR_FILE
    assert manifest_of(svc, entry)["annotations"][A_HF_COMMIT] == hub.commit_sha(
        "acme/tiny-model", "refs/pr/1"
    )
    assert hub.log("hub")[0].path == "/api/models/acme/tiny-model/revision/refs%2Fpr%2F1"


def test_repository_with_one_file_is_a_directory(svc, hub):
    entry, _ = svc.pull("hf:///acme/one-file")
    view = Path(entry["path"])
    assert view.is_dir() and (view / "only.gguf").read_bytes() == blob_of(3000, b"one")
    assert entry["files"][0]["name"] == "only.gguf"


def test_repository_failure_stops_the_rest_and_commits_nothing(tmp_path, hub):
    files = {f"f{i}.bin": blob_of(2000, b"stop%d" % i) for i in range(6)}
    hub.add_repo("acme/stops", files=files)
    hub.set_fault("acme/stops", "f0.bin", corrupt=True)
    s = make_service(make_config(tmp_path, hub, jobs="1"))
    try:
        before = cache_state(s)
        with pytest.raises(IntegrityError):
            s.pull("hf:///acme/stops")
        assert cache_state(s) == before
    finally:
        s.close()
    asked = {r.path.rsplit("/", 1)[1] for r in hub.log("hub") if "/resolve/" in r.path}
    assert asked == {"f0.bin"}


def test_unsafe_name_in_listing_is_refused(svc, hub):
    hub.add_repo("acme/evil", files={"ok.txt": b"ok", "a/../../evil.txt": b"evil"})
    with pytest.raises(UnsafeName) as e:
        svc.pull("hf:///acme/evil")
    assert e.value.status == 400


# -- errors ----------------------------------------------------------------------------------


def test_gated_without_token(svc, hub):
    for url in ("hf:///acme/gated-model/config.json", "hf:///acme/gated-model"):
        with pytest.raises(GatedRepo) as e:
            svc.pull(url)
        assert e.value.status == 403 and e.value.code == "gated-repo"
        assert "acme/gated-model is gated" in e.value.message
        assert "accept its conditions" in e.value.message


def test_gated_with_token_without_access(svc, hub):
    with pytest.raises(GatedRepo) as e:
        svc.pull("hf:///acme/gated-model/config.json", credentials=Credentials.make(NOACCESS_TOKEN))
    assert e.value.status == 403 and "no access" in e.value.message


def test_gated_with_credentials_and_with_hf_token(tmp_path, hub):
    s = make_service(make_config(tmp_path, hub))
    try:
        entry, _ = s.pull(
            "hf:///acme/gated-model/model.safetensors", credentials=Credentials.make(GOOD_TOKEN)
        )
        assert entry["digest"] == sha(blob_of(5000, b"gated"))
    finally:
        s.close()
    s = make_service(make_config(tmp_path / "2", hub, env={"HF_TOKEN": GOOD_TOKEN}))
    try:
        entry, _ = s.pull("hf:///acme/gated-model")
        assert (Path(entry["path"]) / "config.json").read_bytes() == b'{"gated": true}'
    finally:
        s.close()


def test_invalid_token(svc, hub):
    with pytest.raises(Unauthorized) as e:
        svc.pull("hf:///acme/tiny-model/README.md", credentials=Credentials.make("hf_bogus"))
    assert e.value.status == 401


@pytest.mark.parametrize(
    "url, words",
    [
        ("hf:///acme/no-such-model/config.json", ["acme/no-such-model", "private"]),
        ("hf:///acme/no-such-model", ["acme/no-such-model", "private"]),
        ("hf:///acme/private-model/secret.txt", ["acme/private-model", "token"]),
        ("hf:///acme/tiny-model@nope/config.json", ["'nope'", "acme/tiny-model"]),
        ("hf:///acme/tiny-model@nope", ["'nope'", "acme/tiny-model"]),
        ("hf:///acme/tiny-model/missing.bin", ["'missing.bin'", "acme/tiny-model"]),
        ("hf:///datasets/acme/corpus/data/missing.csv", ["'data/missing.csv'", "dataset"]),
    ],
)
def test_not_found_names_what(svc, hub, url, words):
    with pytest.raises(UpstreamNotFound) as e:
        svc.pull(url)
    assert e.value.status == 404
    for w in words:
        assert w in e.value.message
    assert svc.store.entries() == []


def test_missing_repo_with_token_is_404_too(svc, hub):
    with pytest.raises(UpstreamNotFound) as e:
        svc.pull("hf:///acme/no-such-model/x", credentials=Credentials.make(GOOD_TOKEN))
    assert "acme/no-such-model" in e.value.message


# -- integrity and faults ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["corrupt.gguf", "corrupt.txt"])  # LFS (CDN) and git (Hub)
def test_corrupted_bytes_are_refused(svc, hub, name):
    repo = "acme/corrupt-" + name.split(".")[1]
    hub.add_repo(repo, files={name: blob_of(20000, name.encode())})
    hub.set_fault(repo, name, corrupt=True)
    before = cache_state(svc)
    with pytest.raises(IntegrityError) as e:
        svc.pull(f"hf:///{repo}/{name}")
    assert e.value.status == 502
    assert cache_state(svc) == before
    assert [p for p in svc.store.ingest_dir.iterdir() if p.name not in ("leases", "pulls")] == []
    hub.clear_faults()
    entry, _ = svc.pull(f"hf:///{repo}/{name}")
    assert Path(entry["path"]).read_bytes() == blob_of(20000, name.encode())


def test_digest_asked_for_is_checked(svc, hub):
    with pytest.raises(IntegrityError):
        svc.pull("hf:///acme/tiny-model/model.Q4_K_M.gguf", digest=sha(b"other"))
    assert hub.log("cdn") == []
    entry, _ = svc.pull("hf:///acme/tiny-model/model.Q4_K_M.gguf", digest=sha(GGUF))
    assert entry["digest"] == sha(GGUF)


@pytest.mark.parametrize("name", ["drop.gguf", "drop.txt"])
def test_dropped_connection_resumes_with_range(svc, hub, name):
    repo = "acme/drop-" + name.split(".")[1]
    data = blob_of(300_000, name.encode())
    hub.add_repo(repo, files={name: data})
    hub.set_fault(repo, name, drop_after=100_000)
    entry, _ = svc.pull(f"hf:///{repo}/{name}")
    assert Path(entry["path"]).read_bytes() == data
    server = "cdn" if name.endswith(".gguf") else "hub"
    served = [r for r in hub.log(server) if r.method == "GET" and r.status in (200, 206)]
    assert served[0].dropped and served[0].range is None
    assert served[1].status == 206 and served[1].range == "bytes=100000-"


def test_expired_cdn_url_asks_the_hub_again(svc, hub):
    data = blob_of(10_000, b"expired")
    hub.add_repo("acme/expired", files={"e.gguf": data})
    hub.expire_signatures()  # URLs handed out before are dead; fresh ones work
    hub.inject_errors("cdn", status=403, count=1)  # the one we are handed first has expired
    entry, _ = svc.pull("hf:///acme/expired/e.gguf")
    assert Path(entry["path"]).read_bytes() == data
    assert [r.status for r in hub.log("cdn")] == [403, 200]
    gets = [r for r in hub.log("hub") if r.method == "GET" and "/resolve/" in r.path]
    assert len(gets) == 2  # asked the origin for a fresh signed URL


def test_big_file_is_fetched_in_ranges(svc, hub, monkeypatch):
    monkeypatch.setattr(hf, "MAX_SPAN", 4096)
    data = blob_of(10_000, b"big")
    hub.add_repo("acme/big", files={"big.gguf": data})
    hub.set_fault("acme/big", "big.gguf", drop_after=1000)
    entry, _ = svc.pull("hf:///acme/big/big.gguf")
    assert Path(entry["path"]).read_bytes() == data
    spans = []
    for r in hub.log("cdn"):
        first, last = r.range[len("bytes=") :].split("-")
        spans.append((int(first), int(last)))
    assert all(last - first < 4096 for first, last in spans)  # no answer over the span
    assert all(r.bytes_sent <= 4096 for r in hub.log("cdn"))
    assert any(first % 4096 for first, _ in spans)  # the dropped part resumed where it broke


def test_one_lfs_blob_in_two_repos_is_downloaded_once(tmp_path, hub):
    data = blob_of(50_000, b"shared")
    hub.add_repo("acme/share-a", files={"w.gguf": data})
    hub.add_repo("acme/share-b", files={"w.gguf": data, "x.txt": b"x"})
    s = make_service(make_config(tmp_path, hub))
    try:
        a, _ = s.pull("hf:///acme/share-a/w.gguf")
        b, _ = s.pull("hf:///acme/share-b")
    finally:
        s.close()
    assert (Path(b["path"]) / "w.gguf").resolve() == Path(a["path"]).resolve()
    assert len([r for r in hub.log("cdn") if r.method == "GET"]) == 1


def test_concurrent_pulls_sharing_a_blob_download_it_once(tmp_path, hub):
    data = blob_of(2_000_000, b"concurrent")
    urls = []
    for i in range(4):
        hub.add_repo(f"acme/conc-{i}", files={"w.safetensors": data, f"n{i}.txt": b"%d" % i})
        urls.append(f"hf:///acme/conc-{i}" if i % 2 else f"hf:///acme/conc-{i}/w.safetensors")
    s = make_service(make_config(tmp_path, hub))
    results: list = []
    try:
        threads = [threading.Thread(target=lambda u=u: results.append(s.pull(u)[0])) for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        s.close()
    assert len(results) == 4
    assert len([r for r in hub.log("cdn") if r.method == "GET"]) == 1
    assert s.store.verify() == []


def test_renamed_repository_is_followed(svc, hub):
    hub.add_alias("acme/old-tiny", "acme/tiny-model")
    entry, _ = svc.pull(
        "hf:///acme/old-tiny/model.Q4_K_M.gguf", credentials=Credentials.make(GOOD_TOKEN)
    )
    assert entry["digest"] == sha(GGUF)
    entry, _ = svc.pull("hf:///acme/old-tiny@v1.0")
    assert (Path(entry["path"]) / "config.json").read_bytes() == CONFIG_V1


def test_hub_answering_git_files_directly(svc, hub):
    hub.resolve_cache = False  # the Hub before 2025: 200 from /resolve, no resolve-cache hop
    try:
        entry, _ = svc.pull("hf:///acme/tiny-model/tokenizer/tokenizer.json")
    finally:
        hub.resolve_cache = True
    assert Path(entry["path"]).read_bytes() == TOKENIZER
    assert not [r for r in hub.log("hub") if "resolve-cache" in r.path]


# -- the CLI ---------------------------------------------------------------------------------


def cli(tmp_path, *args, **env):
    environ = dict(os.environ)
    environ.update(env)
    environ["PYTHONPATH"] = str(ROOT)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "nekko_sm", "--cache-dir", str(tmp_path / "cli-cache"), *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


def test_cli_pull(tmp_path, hub):
    r = cli(tmp_path, "pull", "hf:///acme/tiny-model/model.Q4_K_M.gguf", HF_ENDPOINT=hub.endpoint)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == GGUF
    r = cli(tmp_path, "pull", "--json", "hf:///acme/tiny-model", HF_ENDPOINT=hub.endpoint)
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert (Path(entry["path"]) / "tokenizer" / "tokenizer.json").read_bytes() == TOKENIZER


def test_cli_insecure_registry(tmp_path, hub):
    r = cli(
        tmp_path,
        "--insecure-registry",
        host(hub),
        "pull",
        f"hf://{host(hub)}/datasets/acme/corpus/data/train.csv",
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == TRAIN


def test_cli_gated_and_tokens(tmp_path, hub):
    url = "hf:///acme/gated-model/config.json"
    r = cli(tmp_path, "pull", url, HF_ENDPOINT=hub.endpoint)
    assert r.returncode == 1
    assert "acme/gated-model is gated: accept its conditions on the Hub" in r.stderr
    r = cli(tmp_path, "pull", "--credentials", GOOD_TOKEN, url, HF_ENDPOINT=hub.endpoint)
    assert r.returncode == 0, r.stderr
    r = cli(tmp_path / "2", "pull", url, HF_ENDPOINT=hub.endpoint, HF_TOKEN=GOOD_TOKEN)
    assert r.returncode == 0, r.stderr
    assert GOOD_TOKEN not in r.stdout + r.stderr


def test_cli_not_found(tmp_path, hub):
    r = cli(tmp_path, "pull", "hf:///acme/tiny-model@nope/config.json", HF_ENDPOINT=hub.endpoint)
    assert r.returncode == 1 and "'nope'" in r.stderr


def test_ranged_parts_reuse_the_cdn_url_until_it_expires(svc, hub, monkeypatch):
    """One Hub request for many parts (the real Hub rate-limits resolves); an expired
    signature sends the next part back to the Hub for a fresh URL."""
    monkeypatch.setattr(hf, "MAX_SPAN", 4096)
    data = blob_of(40_000, b"parts")
    hub.add_repo("acme/parts", files={"w.gguf": data})
    hub.clear_log()
    entry, _ = svc.pull("hf:///acme/parts/w.gguf")
    assert Path(entry["path"]).read_bytes() == data
    resolves = [r for r in hub.log("hub") if r.method == "GET" and "/resolve/" in r.path]
    cdn = [r for r in hub.log("cdn") if r.method == "GET"]
    assert len(cdn) >= 10 and len(resolves) <= 3, (len(resolves), len(cdn))
    assert not any(r.has_authorization for r in hub.log("cdn"))


def test_expired_cdn_url_mid_ranges_asks_the_hub_again(svc, hub, monkeypatch):
    monkeypatch.setattr(hf, "MAX_SPAN", 4096)
    data = blob_of(40_000, b"expiring")
    hub.add_repo("acme/expiring", files={"w.gguf": data})
    hub.inject_errors("cdn", status=403, count=2, path_contains="")
    entry, _ = svc.pull("hf:///acme/expiring/w.gguf")
    assert Path(entry["path"]).read_bytes() == data
