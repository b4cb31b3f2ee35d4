"""The fake Hub (tests/peers/hub.py) against the official huggingface_hub client, and quick
direct-HTTP checks of its fault toggles.

If huggingface_hub accepts what the fake serves (headers, redirects, errors, pagination, rate
limits, the Xet-era redirect to the bridge), the fake is close enough to the real Hub for
nekko-sm's own Hugging Face client to be tested against it.

The client runs with Xet downloads disabled (HF_HUB_DISABLE_XET, as behind a mirror): the fake
sends every Xet header and answers the xet-auth token request, but implements no CAS server, so
the official client parses the Xet data (checked below) and then downloads over plain HTTP from
the bridge, the fallback the real Hub keeps for every client without hf_xet.
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


@pytest.fixture(scope="module", autouse=True)
def repos(hub: FakeHub):
    """The repositories every test here reads (autouse: a test run alone, or first in a worker,
    finds them too, not only after a test that asked for them)."""
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
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)  # no CAS server here (module docstring)
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
    """After every client test: no Authorization ever reached the CDN or the bridge, every
    LFS redirect carried its Xet headers, and no CDN/bridge ETag was ever the sha256."""
    hub.clear_log()
    hub.clear_faults()
    hub.tree_page_size = 1000
    hub.xet, hub.lfs_redirect_status, hub.strip_headers = True, 302, set()
    hub.anonymous_401_code, hub.max_unranged_size = True, 50 * 1000**3
    yield
    stripped = {h.lower() for h in hub.strip_headers}
    hub.xet, hub.lfs_redirect_status, hub.strip_headers = True, 302, set()
    hub.anonymous_401_code, hub.max_unranged_size = True, 50 * 1000**3
    for bucket in ("api", "resolvers", "pages"):
        hub.set_rate_limit(bucket, 1_000_000)
    if request.node.name.startswith("test_direct_"):
        hub.clear_log()
        return
    log = hub.log()
    assert not [r for r in log if r.server == "cdn" and r.has_authorization], (
        "Authorization sent to the CDN"
    )
    shas = {b.sha256 for b in hub._lfs.values()}
    for r in log:
        if r.server == "cdn" and r.status in (200, 206):
            assert r.response_header("ETag").strip('"') not in shas, r
        if (
            r.server == "hub"
            and r.status in (302, 307)
            and "/xet-bridge-us/" in (r.response_header("Location") or "")
        ):
            assert "x-xet-hash" in stripped or r.response_header("X-Xet-Hash"), r
            assert 'rel="xet-auth"' in r.response_header("Link"), r


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
    assert meta.location.startswith(hub.cdn_endpoint + "/xet-bridge-us/")
    # the Xet data huggingface_hub reads from the redirect: the hash, and where its token is
    blob = hub.blob("fid/model", "weights/q4/model.Q4_K_M.gguf")
    assert meta.xet_file_data.file_hash == blob.xet_hash != blob.sha256
    assert meta.xet_file_data.refresh_route == (
        f"{hub.endpoint}/api/models/fid/model/xet-read-token/{repos['second']}"
    )


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


@pytest.mark.parametrize("status", [302, 307])
def test_lfs_redirect_302_or_307_to_the_bridge(dl, hub, status):
    hub.lfs_redirect_status = status
    assert dl("fid/model", "weights/model.safetensors").read_bytes() == WEIGHTS
    (redirect,) = [r for r in hub.log() if r.server == "hub" and r.method == "HEAD"]
    assert redirect.status == status
    cdn = [r for r in hub.log() if r.server == "cdn"]
    assert cdn and all(r.path.startswith("/xet-bridge-us/") for r in cdn)


def test_stripped_linked_headers_still_download(hf, dl, hub):
    """A cache in front of the Hub drops X-Linked-Size and X-Xet-Hash: the client does without."""
    hub.strip_headers = {"X-Linked-Size", "X-Xet-Hash"}
    url = hf.hf_hub_url("fid/model", "weights/model.safetensors", endpoint=hub.endpoint)
    meta = hf.get_hf_file_metadata(url, token=False)
    assert meta.size is None and meta.xet_file_data is None
    assert meta.etag == hashlib.sha256(WEIGHTS).hexdigest()  # X-Linked-Etag is still there
    assert dl("fid/model", "weights/model.safetensors").read_bytes() == WEIGHTS


def test_xet_read_token(hf, hub, repos):
    from huggingface_hub.utils._xet import refresh_xet_connection_info

    meta = hf.get_hf_file_metadata(
        hf.hf_hub_url("fid/model", "weights/model.safetensors", endpoint=hub.endpoint), token=False
    )
    info = refresh_xet_connection_info(file_data=meta.xet_file_data, headers={})
    assert info.endpoint == hub.cdn_endpoint and info.access_token.startswith("xet_")
    assert info.expiration_unix_epoch > 0
    (call,) = [r for r in hub.log() if "xet-read-token" in r.path]
    assert call.path == f"/api/models/fid/model/xet-read-token/{repos['second']}"
    assert json.loads(_req(hub.endpoint + call.path)[1])["casUrl"] == hub.cdn_endpoint
    # a gated repo's token needs access, as its files do
    with pytest.raises(_err(hf, "GatedRepoError")):
        refresh_xet_connection_info(
            file_data=type(meta.xet_file_data)(
                file_hash="0" * 64,
                refresh_route=f"{hub.endpoint}/api/models/fid/gated/xet-read-token/main",
            ),
            headers={},
        )


def test_tree_xet_hash(hf, hub):
    api = hf.HfApi(endpoint=hub.endpoint, token=False)
    from huggingface_hub.utils._xet import is_valid_xet_hash

    files = {
        e.path: e
        for e in api.list_repo_tree("fid/model", recursive=True)
        if isinstance(e, hf.hf_api.RepoFile)
    }
    w = files["weights/model.safetensors"]
    assert w.xet_hash == hub.blob("fid/model", w.path).xet_hash and is_valid_xet_hash(w.xet_hash)
    assert files["config.json"].xet_hash is None  # a git file is not in Xet
    gated = {e.path: e for e in api.list_repo_tree("fid/gated")}  # public listing, hidden hash
    assert gated["w.safetensors"].xet_hash == "*" * 64
    assert not is_valid_xet_hash(gated["w.safetensors"].xet_hash)
    assert gated["w.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()


def test_rate_limit_headers_and_429(hf, hub):
    """The official parser reads the fake's RateLimit headers; its backoff waits out a 429
    that has no Retry-After (t seconds, +1) and then succeeds."""
    from huggingface_hub.utils import http_backoff, parse_ratelimit_headers

    hub.set_rate_limit("api", 2, window=1)
    url = hub.endpoint + "/api/models/fid/model"
    first = http_backoff("GET", url)
    info = parse_ratelimit_headers(first.headers)
    assert (info.resource_type, info.remaining, info.limit, info.window_seconds) == ("api", 1, 2, 1)
    assert http_backoff("GET", url).status_code == 200
    hub.clear_log()
    third = http_backoff("GET", url, max_retries=3)  # over the quota: 429, waits, then 200
    assert third.status_code == 200
    statuses = [r.status for r in hub.log()]
    assert statuses[0] == 429 and statuses[-1] == 200
    too_many = hub.log()[0]
    assert too_many.response_header("Retry-After") is None
    assert too_many.response_header("RateLimit").startswith('"api";r=0;t=')
    res = [r for r in (_req(hub.resolve_url("fid/model", "README.md"), "HEAD")[0],)]
    assert parse_ratelimit_headers(dict(res[0].getheaders())).resource_type == "resolvers"
    # the error the official client shows for a 429 names the bucket
    hub.set_rate_limit("api", 0, window=60)
    with pytest.raises(_err(hf, "HfHubHTTPError")) as e:
        hf.HfApi(endpoint=hub.endpoint, token=False).model_info("fid/model")
    assert "'api' rate limit" in str(e.value) and "Retry after" in str(e.value)


def test_anonymous_401_without_error_code(hf, hub):
    hub.anonymous_401_code = False
    with pytest.raises(_err(hf, "HfHubHTTPError")) as e:
        hf.HfApi(endpoint=hub.endpoint, token=False).model_info("fid/private")
    assert e.value.response.status_code == 401
    assert e.value.response.headers.get("X-Error-Code") is None
    assert e.value.response.headers["X-Error-Message"] == "Invalid username or password."


def test_large_file_needs_ranges(hf, dl, hub, monkeypatch):
    """Over 50 GB the CDN answers only ranged GETs, and the official client refuses plain HTTP
    for such files (it needs hf_xet); scaled down here."""
    from huggingface_hub import constants

    hub.max_unranged_size = len(WEIGHTS) - 1
    monkeypatch.setattr(constants, "MAX_HTTP_DOWNLOAD_SIZE", len(WEIGHTS) - 1)
    with pytest.raises(ValueError, match="too large"):
        dl("fid/model", "weights/model.safetensors")


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
    assert r.getheader("Location").startswith(hub.cdn_endpoint + "/xet-bridge-us/")
    blob = hub.blob("fid/model", "weights/model.safetensors")
    assert r.getheader("X-Xet-Hash") == blob.xet_hash
    link = r.getheader("Link")
    assert f'/api/models/fid/model/xet-read-token/{repos["second"]}>; rel="xet-auth"' in link
    assert f'/v1/reconstructions/{blob.xet_hash}>; rel="xet-reconstruction-info"' in link
    r, _ = _req(r.getheader("Location"), "HEAD")  # the bridge: its ETag is the Xet hash
    assert r.status == 200 and r.getheader("ETag") == f'"{blob.xet_hash}"'
    hub.xet = False  # the older LFS CDN: an S3 MD5 ETag, no Xet header
    try:
        r, _ = _req(hub.resolve_url("fid/model", "weights/model.safetensors"))
        assert r.getheader("X-Xet-Hash") is None and "/repos/" in r.getheader("Location")
        r, _ = _req(r.getheader("Location"), "HEAD")
        assert r.getheader("ETag") == f'"{hashlib.md5(WEIGHTS).hexdigest()}"'
    finally:
        hub.xet = True


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
    tampered = new.replace("/xet-bridge-us/", "/xet-bridge-us/x")
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


def test_direct_range_less_get_of_a_huge_file(hub):
    hub.max_unranged_size = len(WEIGHTS) - 1
    try:
        url = _cdn_url(hub, "fid/model", "weights/model.safetensors")
        r, body = _req(url)
        assert r.status == 400 and b"Range" in body
        r, body = _req(url, headers={"Range": "bytes=0-"})
        assert r.status == 206 and body == WEIGHTS
        hub.bridge_max_size = len(WEIGHTS) - 1  # the bridge refuses even ranges
        assert _req(url, headers={"Range": "bytes=0-9"})[0].status == 400
    finally:
        hub.max_unranged_size, hub.bridge_max_size = 50 * 1000**3, None


def test_direct_resolve_cache_redirect_length_is_the_body(hub):
    r, body = _req(hub.resolve_url("fid/model", "config.json"))
    assert r.status == 307 and r.getheader("Location").startswith("/api/resolve-cache/")
    assert int(r.getheader("Content-Length")) == len(body) != len(CONFIG)


def test_direct_tree_pages_of_1000_with_directories(hub):
    hub.add_repo("fid/wide", files={f"d{i % 7}/f{i}.txt": b"%d" % i for i in range(2100)})
    url = hub.endpoint + "/api/models/fid/wide/tree/main?recursive=true"
    pages = []
    while url:
        r, body = _req(url)
        pages.append(json.loads(body))
        link = r.getheader("Link")
        url = link[1 : link.index(">")] if link else None
        assert url is None or (url.startswith(hub.endpoint + "/") and "cursor=" in url)
    assert [len(p) for p in pages] == [1000, 1000, 107]
    kinds = {e["type"] for p in pages for e in p}
    assert kinds == {"file", "directory"}
