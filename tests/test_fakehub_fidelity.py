"""The fake Hub (tests/peers/hub.py) against the official huggingface_hub client, and quick
direct-HTTP checks of its fault toggles.

If huggingface_hub accepts what the fake serves (headers, redirects, errors, pagination), the fake is
close enough to the real Hub for nekko-sm's own Hugging Face client to be tested against it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from peers import require_module
from peers.fakehub import GOOD_TOKEN, NOACCESS_TOKEN, FakeHub, git_blob_sha1, start_fakehub

pytestmark = pytest.mark.hub_fidelity

# --------------------------------------------------------------------------------------------
# content

LFS_THRESHOLD = 4096
CONFIG = json.dumps(
    {"model_type": "fake", "hidden": list(range(300))}
).encode()  # > 1 kB: gzip-able
README = b"# fidelity\n"
WEIGHTS = hashlib.sha256(b"w").digest() * 2000  # 64 kB, LFS by size and by suffix
GGUF = b"GGUF" + bytes(range(256)) * 40  # LFS by suffix
TOKENIZER = b'{"v": 1}'
DEEP = b"deep file"


def _v(n: int) -> bytes:
    return b"version %d " % n + b"." * 10000  # LFS by size (threshold 4096)


@pytest.fixture(scope="module")
def hub():
    """This module's own fake Hub (its toggles and log do not leak into other modules)."""
    h = start_fakehub()
    yield h
    h.close()


@pytest.fixture(scope="module")
def repos(hub: FakeHub):
    files = {
        "config.json": CONFIG,
        "README.md": README,
        "tokenizer.json": TOKENIZER,
        "weights/model.safetensors": WEIGHTS,
        "weights/q4/model.Q4_K_M.gguf": GGUF,
        "a/b/c/deep.txt": DEEP,
    }
    first = hub.add_repo(
        "fid/model", files={**files, "data.bin": _v(1)}, lfs_threshold=LFS_THRESHOLD
    )
    second = hub.add_commit("fid/model", {"data.bin": _v(2)})
    hub.add_tag("fid/model", "v1.0", first)
    dev = hub.add_commit(
        "fid/model", {"data.bin": _v(3), "README.md": b"dev readme\n"}, branch="dev"
    )
    pr = hub.add_pr("fid/model", {"data.bin": _v(4)})
    hub.add_repo("fid/data", repo_type="dataset", files={"train/part-0.csv": b"a,b\n1,2\n" * 300})
    hub.add_repo("fid/gated", files={"config.json": CONFIG, "w.safetensors": WEIGHTS}, gated=True)
    hub.add_repo("fid/private", files={"secret.txt": b"s3cret"}, private=True)
    hub.add_alias("fid/old-name", "fid/model")
    return {"first": first, "second": second, "dev": dev, "pr": pr, "files": files}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """huggingface_hub, isolated from the machine's HF config (its own HF_HOME, no token)."""
    require_module("huggingface_hub")
    home = tmp_path_factory.mktemp("hf_home")
    mp = pytest.MonkeyPatch()
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
    ):
        mp.delenv(var, raising=False)
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub
    from huggingface_hub import constants

    # constants are read once at import (another test module may have imported it first)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    yield huggingface_hub
    mp.undo()


@pytest.fixture()
def dl(hf, hub: FakeHub, tmp_path):
    """hf_hub_download against the fake, into a fresh cache, anonymous unless token= is given."""

    def download(repo_id, filename, **kw):
        kw.setdefault("token", False)
        return Path(
            hf.hf_hub_download(repo_id, filename, endpoint=hub.endpoint, cache_dir=tmp_path, **kw)
        )

    return download


@pytest.fixture(autouse=True)
def wire_invariants(request, hub: FakeHub):
    """After every client test: no Authorization ever reached the CDN, no Xet header was sent."""
    hub.clear_log()
    hub.clear_faults()
    hub.tree_page_size = 1000
    yield
    if request.node.name.startswith("test_direct_"):
        hub.clear_log()
        return
    log = hub.log()
    assert not [r for r in log if r.server == "cdn" and r.has_authorization], (
        "Authorization sent to the CDN"
    )
    for r in log:
        names = [k.lower() for k, _ in r.response_headers]
        assert not [n for n in names if n.startswith("x-xet")], r
        link = (r.response_header("Link") or "").lower()
        assert "xet" not in link, r


def _err(hf, name):
    return getattr(hf.errors, name)


# --------------------------------------------------------------------------------------------
# huggingface_hub against the fake


def test_regular_file(hf, dl, hub, repos):
    path = dl("fid/model", "config.json")
    assert path.read_bytes() == CONFIG
    assert path.parent.name == repos["second"]  # snapshots/<commit>/config.json
    meta = hf.get_hf_file_metadata(
        hf.hf_hub_url("fid/model", "config.json", endpoint=hub.endpoint), token=False
    )
    assert meta.etag == git_blob_sha1(CONFIG)
    assert meta.commit_hash == repos["second"]
    assert meta.size == len(CONFIG)
    assert meta.xet_file_data is None
    # the Hub's relative 307 to /api/resolve-cache/ was followed
    assert [r.status for r in hub.log() if r.method == "HEAD"][:2] == [307, 200]
    # the client asks for gzip on GET: the text file came compressed and chunked, and was decoded
    (get,) = [r for r in hub.log() if r.method == "GET"]
    assert get.response_header("Content-Encoding") == "gzip"
    assert get.response_header("Content-Length") is None


def test_lfs_file_in_subfolder(hf, dl, hub, repos):
    path = dl("fid/model", "model.safetensors", subfolder="weights", token=GOOD_TOKEN)
    assert path.read_bytes() == WEIGHTS
    blob_name = Path(os.path.realpath(path)).name
    assert (
        blob_name == hashlib.sha256(WEIGHTS).hexdigest()
    )  # the cache blob is named by the LFS oid
    log = hub.log()
    cdn = [r for r in log if r.server == "cdn"]
    assert cdn and all(r.host.startswith("localhost:") for r in cdn)
    assert all(
        r.has_authorization for r in log if r.server == "hub"
    )  # the token went to the Hub only
    meta = hf.get_hf_file_metadata(
        hf.hf_hub_url("fid/model", "weights/q4/model.Q4_K_M.gguf", endpoint=hub.endpoint),
        token=False,
    )
    assert meta.etag == hashlib.sha256(GGUF).hexdigest() and meta.size == len(GGUF)
    assert meta.location.startswith(hub.cdn_endpoint + "/")


@pytest.mark.parametrize(
    "revision, version",
    [("main", 2), ("dev", 3), ("v1.0", 1), ("first", 1), ("second", 2), ("refs/pr/1", 4)],
)
def test_revisions(dl, repos, revision, version):
    rev = repos[revision] if revision in ("first", "second") else revision
    assert dl("fid/model", "data.bin", revision=rev).read_bytes() == _v(version)


def test_dataset_file(dl, hub):
    path = dl("fid/data", "train/part-0.csv", repo_type="dataset")
    assert path.read_bytes() == b"a,b\n1,2\n" * 300
    assert any(r.path.startswith("/datasets/fid/data/resolve/main/") for r in hub.log())


def test_gated_repo(hf, dl):
    with pytest.raises(_err(hf, "GatedRepoError")) as anon:
        dl("fid/gated", "config.json")
    assert anon.value.response.status_code == 401
    with pytest.raises(_err(hf, "GatedRepoError")) as noaccess:
        dl("fid/gated", "config.json", token=NOACCESS_TOKEN)
    assert noaccess.value.response.status_code == 403
    assert dl("fid/gated", "w.safetensors", token=GOOD_TOKEN).read_bytes() == WEIGHTS


def test_gated_repo_metadata_is_public(hf, hub):
    api = hf.HfApi(endpoint=hub.endpoint, token=False)
    info = api.model_info("fid/gated")
    assert info.gated == "auto" and sorted(s.rfilename for s in info.siblings) == [
        "config.json",
        "w.safetensors",
    ]


def test_private_and_missing_repos(hf, dl):
    repo_not_found = _err(hf, "RepositoryNotFoundError")
    for repo, token, status in [
        ("fid/nope", False, 401),  # anonymous: 401, as the Hub does not confirm existence
        ("fid/nope", GOOD_TOKEN, 404),
        ("fid/private", False, 401),
        ("fid/private", NOACCESS_TOKEN, 404),
    ]:
        with pytest.raises(repo_not_found) as e:
            dl(repo, "secret.txt", token=token)
        assert type(e.value) is repo_not_found and e.value.response.status_code == status
    assert dl("fid/private", "secret.txt", token=GOOD_TOKEN).read_bytes() == b"s3cret"


def test_bad_token(hf, dl):
    with pytest.raises(_err(hf, "HfHubHTTPError")) as e:
        dl("fid/model", "config.json", token="hf_bad")
    assert not isinstance(e.value, _err(hf, "RepositoryNotFoundError"))
    assert e.value.response.status_code == 401
    assert (
        e.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    )


def test_missing_revision_and_entry(hf, dl, hub, repos):
    with pytest.raises(_err(hf, "RevisionNotFoundError")):
        dl("fid/model", "config.json", revision="no-such-branch")
    with pytest.raises(_err(hf, "EntryNotFoundError")) as e:
        dl("fid/model", "no/such/file.txt")
    assert e.value.response.headers["X-Repo-Commit"] == repos["second"]
    with pytest.raises(_err(hf, "RevisionNotFoundError")):
        hf.HfApi(endpoint=hub.endpoint, token=False).model_info("fid/model", revision="nope")


def test_renamed_repo(hf, dl, hub):
    assert dl("fid/old-name", "config.json").read_bytes() == CONFIG
    assert dl("fid/old-name", "weights/model.safetensors").read_bytes() == WEIGHTS
    redirects = [r for r in hub.log() if r.status == 307 and r.path.startswith("/fid/old-name/")]
    assert redirects and all(
        r.response_header("Location").startswith("/fid/model/") for r in redirects
    )
    assert hf.HfApi(endpoint=hub.endpoint, token=False).model_info("fid/old-name").id == "fid/model"


def test_snapshot_download(hf, hub, repos, tmp_path):
    hub.tree_page_size = 3
    folder = Path(
        hf.snapshot_download("fid/model", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    )
    assert folder.name == repos["second"]
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert got == {**repos["files"], "data.bin": _v(2)}
    trees = [r for r in hub.log() if "/tree/" in r.path]
    assert len(trees) >= 3 and any("cursor=" in r.query for r in trees)


def test_snapshot_download_pr(hf, hub, tmp_path):
    folder = Path(
        hf.snapshot_download(
            "fid/model",
            revision="refs/pr/1",
            endpoint=hub.endpoint,
            cache_dir=tmp_path,
            token=False,
        )
    )
    assert (folder / "data.bin").read_bytes() == _v(4)


def test_list_repo_tree_pagination(hf, hub, repos):
    hub.tree_page_size = 3
    api = hf.HfApi(endpoint=hub.endpoint, token=False)
    entries = list(api.list_repo_tree("fid/model", recursive=True))
    files = {e.path: e for e in entries if isinstance(e, hf.hf_api.RepoFile)}
    dirs = {e.path for e in entries if isinstance(e, hf.hf_api.RepoFolder)}
    assert dirs == {"a", "a/b", "a/b/c", "weights", "weights/q4"}
    assert set(files) == set(repos["files"]) | {"data.bin"}
    w = files["weights/model.safetensors"]
    assert w.size == len(WEIGHTS) and w.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert (
        w.lfs.size == len(WEIGHTS)
        and w.blob_id == hub.blob("fid/model", w.path).git_oid != w.lfs.sha256
    )
    assert w.lfs.pointer_size == len(hub.blob("fid/model", w.path).pointer)
    c = files["config.json"]
    assert c.lfs is None and c.blob_id == git_blob_sha1(CONFIG) and c.size == len(CONFIG)
    pages = [r for r in hub.log() if "/tree/" in r.path]
    assert len(pages) == -(-len(entries) // 3)
    # not recursive, a sub-folder, expand=True (last commit, security status)
    top = {e.path for e in api.list_repo_tree("fid/model")}
    assert top == {"a", "weights", "README.md", "config.json", "tokenizer.json", "data.bin"}
    sub = {e.path for e in api.list_repo_tree("fid/model", "weights", recursive=True)}
    assert sub == {"weights/model.safetensors", "weights/q4", "weights/q4/model.Q4_K_M.gguf"}
    expanded = {e.path: e for e in api.list_repo_tree("fid/model", expand=True)}
    assert expanded["data.bin"].last_commit.oid == repos["second"]
    assert expanded["config.json"].last_commit.oid == repos["first"]
    with pytest.raises(_err(hf, "EntryNotFoundError")):
        list(api.list_repo_tree("fid/model", "nope"))


def test_repo_info_and_refs(hf, hub, repos):
    api = hf.HfApi(endpoint=hub.endpoint, token=False)
    info = api.model_info("fid/model", files_metadata=True)
    assert info.sha == repos["second"]
    sib = {s.rfilename: s for s in info.siblings}
    assert sib["weights/model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert sib["config.json"].size == len(CONFIG) and sib["config.json"].lfs is None
    assert api.repo_info("fid/model", revision="v1.0").sha == repos["first"]
    assert api.repo_info("fid/data", repo_type="dataset").sha
    refs = api.list_repo_refs("fid/model", include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {
        "main": repos["second"],
        "dev": repos["dev"],
    }
    assert [t.target_commit for t in refs.tags] == [repos["first"]]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]


def test_retry_after_dropped_connection(dl, hub):
    """The official client retries a CDN download cut mid-body (it sleeps 1 s first).  It asks for
    a Range only from what it had flushed to disk: it reads 10 MB chunks, so here it starts over."""
    hub.set_fault("fid/model", "weights/q4/model.Q4_K_M.gguf", drop_after=5000)
    assert dl("fid/model", "weights/q4/model.Q4_K_M.gguf").read_bytes() == GGUF
    cdn = [r for r in hub.log() if r.server == "cdn"]
    assert [(r.dropped, r.bytes_sent) for r in cdn] == [(True, 5000), (False, len(GGUF))]
    assert cdn[1].range is None and cdn[1].status == 200


# --------------------------------------------------------------------------------------------
# the fake itself, over plain HTTP


def _req(url, method="GET", headers=None, conn=None):
    u = urlsplit(url)
    c = conn or http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        c.request(method, u.path + ("?" + u.query if u.query else ""), headers=headers or {})
        r = c.getresponse()
        body = r.read()
    finally:
        if conn is None:
            c.close()
    return r, body


def _cdn_url(hub, repo_id, path):
    r, _ = _req(hub.resolve_url(repo_id, path), "HEAD")
    assert r.status == 302, r.status
    return r.getheader("Location")


def test_direct_lfs_redirect_headers(hub, repos):
    r, body = _req(hub.resolve_url("fid/model", "weights/model.safetensors"))
    assert r.status == 302
    assert r.getheader("X-Linked-Etag") == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert r.getheader("X-Linked-Size") == str(len(WEIGHTS))
    assert r.getheader("X-Repo-Commit") == repos["second"]
    assert r.getheader("ETag").startswith('W/"')  # the redirect body's, not the file's
    assert int(r.getheader("Content-Length")) == len(body) != len(WEIGHTS)
    assert r.getheader("Location").startswith(hub.cdn_endpoint + "/repos/")


def test_direct_cdn_range_auth_and_faults(hub, repos):
    url = _cdn_url(hub, "fid/model", "weights/model.safetensors")
    r, body = _req(url, headers={"Range": "bytes=10-19"})
    assert r.status == 206 and body == WEIGHTS[10:20]
    assert r.getheader("Content-Range") == f"bytes 10-19/{len(WEIGHTS)}"
    r, _ = _req(url, headers={"Range": f"bytes={len(WEIGHTS)}-"})
    assert r.status == 416 and r.getheader("Content-Range") == f"bytes */{len(WEIGHTS)}"
    r, body = _req(url, headers={"Range": "bytes=10-", "If-Range": '"not-the-etag"'})
    assert r.status == 200 and body == WEIGHTS
    r, _ = _req(url, headers={"Authorization": "Bearer " + GOOD_TOKEN})
    assert r.status == 400

    hub.set_fault("fid/model", "weights/model.safetensors", corrupt=True)
    r, body = _req(url)
    assert r.status == 200 and len(body) == len(WEIGHTS) and body != WEIGHTS
    hub.set_fault("fid/model", "weights/model.safetensors", corrupt=False, ignore_range=True)
    r, body = _req(url, headers={"Range": "bytes=10-19"})
    assert r.status == 200 and body == WEIGHTS
    hub.clear_faults()

    hub.set_fault("fid/model", "weights/model.safetensors", drop_after=1000)
    with pytest.raises(http.client.IncompleteRead) as e:
        _req(url)
    assert len(e.value.partial) == 1000
    r, body = _req(url)  # once
    assert r.status == 200 and body == WEIGHTS


def test_direct_expired_signatures(hub):
    old = _cdn_url(hub, "fid/model", "weights/model.safetensors")
    assert _req(old)[0].status == 200
    hub.expire_signatures()
    r, body = _req(old)
    assert r.status == 403 and b"Request has expired" in body
    new = _cdn_url(hub, "fid/model", "weights/model.safetensors")
    assert new != old and _req(new)[0].status == 200
    tampered = new.replace("/repos/", "/repos/x")
    assert _req(tampered)[0].status == 403


def test_direct_regular_file_gzip_and_keepalive(hub, repos):
    c = http.client.HTTPConnection("127.0.0.1", urlsplit(hub.endpoint).port, timeout=10)
    r, _ = _req(hub.resolve_url("fid/model", "config.json"), "HEAD", conn=c)
    assert r.status == 307
    loc = r.getheader("Location")
    assert loc.startswith(
        "/api/resolve-cache/models/fid/model/{}/config.json?".format(repos["second"])
    )
    r, body = _req(hub.endpoint + loc, conn=c)  # same connection: keep-alive
    assert r.status == 200 and body == CONFIG
    assert r.getheader("ETag") == f'"{git_blob_sha1(CONFIG)}"'
    assert r.getheader("X-Repo-Commit") == repos["second"]
    r, body = _req(
        hub.endpoint + loc, headers={"Accept-Encoding": "gzip", "Range": "bytes=0-9"}, conn=c
    )
    assert (
        r.status == 200
        and r.getheader("Content-Encoding") == "gzip"
        and r.getheader("Content-Length") is None
    )
    assert gzip.decompress(body) == CONFIG
    r, body = _req(hub.endpoint + loc, headers={"Range": "bytes=0-9"}, conn=c)
    assert r.status == 206 and body == CONFIG[:10]
    hub.resolve_cache = False
    try:
        r, body = _req(hub.resolve_url("fid/model", "README.md"), conn=c)
        assert r.status == 200 and body == README
    finally:
        hub.resolve_cache = True
    c.close()


def test_direct_errors(hub):
    cases = [
        (hub.resolve_url("fid/nope", "x"), {}, 401, "RepoNotFound"),
        (
            hub.resolve_url("fid/nope", "x"),
            {"Authorization": "Bearer " + GOOD_TOKEN},
            404,
            "RepoNotFound",
        ),
        (hub.resolve_url("fid/model", "x", revision="nope"), {}, 404, "RevisionNotFound"),
        (hub.resolve_url("fid/model", "nope.txt"), {}, 404, "EntryNotFound"),
        (hub.resolve_url("fid/gated", "config.json"), {}, 401, "GatedRepo"),
        (
            hub.resolve_url("fid/gated", "config.json"),
            {"Authorization": "Bearer " + NOACCESS_TOKEN},
            403,
            "GatedRepo",
        ),
        (
            hub.resolve_url("fid/model", "config.json"),
            {"Authorization": "Bearer hf_bad"},
            401,
            None,
        ),
    ]
    for url, headers, status, code in cases:
        r, body = _req(url, headers=headers)
        assert (r.status, r.getheader("X-Error-Code")) == (status, code), url
        assert json.loads(body)["error"] == r.getheader("X-Error-Message")
    hub.inject_errors("hub", status=503, retry_after=2)
    r, _ = _req(hub.resolve_url("fid/model", "config.json"))
    assert r.status == 503 and r.getheader("Retry-After") == "2"
    assert _req(hub.resolve_url("fid/model", "README.md"))[0].status == 307


def test_direct_tree_link_header(hub):
    hub.tree_page_size = 3
    url = hub.endpoint + "/api/models/fid/model/tree/main?recursive=true&expand=false"
    seen = []
    while url:
        r, body = _req(url)
        assert r.status == 200
        seen += json.loads(body)
        link = r.getheader("Link")
        url = None
        if link:
            assert link.startswith(
                "<" + hub.endpoint + "/api/models/fid/model/tree/main?"
            ) and link.endswith('>; rel="next"')
            url = link[1 : link.index(">")]
            assert "recursive=true" in url and "cursor=" in url
    lfs = [e for e in seen if "lfs" in e]
    assert {e["path"] for e in lfs} == {
        "data.bin",
        "weights/model.safetensors",
        "weights/q4/model.Q4_K_M.gguf",
    }
    assert all(
        set(e["lfs"]) == {"oid", "size", "pointerSize"} and e["size"] == e["lfs"]["size"]
        for e in lfs
    )
