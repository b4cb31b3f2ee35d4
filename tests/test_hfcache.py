"""The Hugging Face cache view, checked with the official huggingface_hub in offline mode
(DESIGN section 8): it finds a whole repository, a file at another revision, a dataset, and
no longer finds them once removed; the view's blobs are the store's blobs, not copies."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peers import modelpacks as mp

from nekko_sm.errors import UnsafeCachePath, UnsafeName
from nekko_sm.models.hfcache import HFCacheView, HFEntry, HFFile, repo_folder
from nekko_sm.store import Store

C1, C2, C3 = ("1" * 40), ("2" * 40), ("3" * 40)

_PROBE = r"""
import json, os, sys
from huggingface_hub import hf_hub_download, snapshot_download, scan_cache_dir
from huggingface_hub.errors import LocalEntryNotFoundError
out = []
for call in json.loads(sys.argv[1]):
    kind, kw = call
    try:
        if kind == "file":
            path = hf_hub_download(**kw)
            out.append({"path": path, "data": open(path, "rb").read().hex()})
        elif kind == "snapshot":
            path = snapshot_download(**kw)
            files = {}
            for root, _, names in os.walk(path):
                for n in names:
                    p = os.path.join(root, n)
                    files[os.path.relpath(p, path)] = open(p, "rb").read().hex()
            out.append({"path": path, "files": files})
        elif kind == "scan":
            info = scan_cache_dir()
            out.append({"warnings": [str(w) for w in info.warnings],
                        "repos": {r.repo_id: {"type": r.repo_type, "size": r.size_on_disk,
                                              "revisions": sorted(x.commit_hash for x in r.revisions),
                                              "refs": sorted(r.refs)}
                                  for r in info.repos}})
    except LocalEntryNotFoundError as e:
        out.append({"missing": type(e).__name__})
print(json.dumps(out))
"""


def probe(home: Path, *calls) -> list:
    """Ask the official huggingface_hub, offline, with HF_HOME=home."""
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(calls))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache").init()


def hf_files(store: Store, files: dict[str, bytes], lfs: tuple = ()) -> tuple:
    """Commit ``files`` to the store as an hf:// pull does; their ETags as the Hub gives them."""
    out = []
    for path, data in files.items():
        digest = store.put_bytes(data)
        etag = digest[7:] if path in lfs else git_sha1(data)
        out.append(HFFile(path, digest, len(data), etag))
    return tuple(out)


REPO = {
    "config.json": b'{"architectures": ["NekkoForCausalLM"]}',
    "model.safetensors": mp.safetensors_bytes({"w": [1.0, 2.0, 3.0]}),
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


def test_offline_huggingface_hub_finds_a_repo_a_file_at_another_revision_and_a_dataset(store):
    view = HFCacheView(store)
    files = hf_files(store, REPO, lfs=("model.safetensors",))
    view.add(HFEntry("hf://huggingface.co/org/name@main", "model", "org/name", "main", C1, files))
    v1 = hf_files(store, {"config.json": b'{"old": true}'})
    view.add(
        HFEntry("hf://huggingface.co/org/name@v1/config.json", "model", "org/name", "v1", C2, v1)
    )
    data = hf_files(store, {"data/train.csv": b"a,b\n1,2\n"})
    view.add(
        HFEntry(
            "hf://huggingface.co/datasets/org/set@main/data/train.csv",
            "dataset",
            "org/set",
            "main",
            C3,
            data,
        )
    )
    home = view.home
    got = probe(
        home,
        ["file", {"repo_id": "org/name", "filename": "config.json"}],
        ["file", {"repo_id": "org/name", "filename": "config.json", "revision": "v1"}],
        ["file", {"repo_id": "org/name", "filename": "model.safetensors", "revision": C1}],
        ["snapshot", {"repo_id": "org/name"}],
        ["snapshot", {"repo_id": "org/name", "revision": "v1"}],
        ["file", {"repo_id": "org/set", "filename": "data/train.csv", "repo_type": "dataset"}],
        ["scan", {}],
    )
    assert bytes.fromhex(got[0]["data"]) == REPO["config.json"]
    assert bytes.fromhex(got[1]["data"]) == b'{"old": true}'
    assert bytes.fromhex(got[2]["data"]) == REPO["model.safetensors"]
    assert {k: bytes.fromhex(v) for k, v in got[3]["files"].items()} == REPO
    assert got[3]["path"].endswith(f"models--org--name/snapshots/{C1}")
    assert list(got[4]["files"]) == ["config.json"]
    assert bytes.fromhex(got[5]["data"]) == b"a,b\n1,2\n"
    scan = got[6]
    assert scan["warnings"] == []
    assert scan["repos"]["org/name"]["revisions"] == [C1, C2]
    assert scan["repos"]["org/name"]["refs"] == ["main", "v1"]
    assert scan["repos"]["org/set"]["type"] == "dataset"
    # The engine reads the store's own bytes: the hub's blob IS the store's blob.
    sha = {f.path: f for f in files}["model.safetensors"]
    hub_blob = view.repo_dir("model", "org/name") / "blobs" / sha.etag
    assert os.stat(hub_blob).st_ino == os.stat(store.blob_path(sha.digest)).st_ino
    assert not hub_blob.is_symlink() and sha.etag == sha.digest[7:]
    link = view.repo_dir("model", "org/name") / "snapshots" / C1 / "tokenizer/tokenizer.json"
    assert os.readlink(link) == "../../../blobs/" + git_sha1(REPO["tokenizer/tokenizer.json"])
    assert not (view.repo_dir("model", "org/name") / "trees").exists()


def test_after_remove_it_is_no_longer_found_and_shared_pieces_stay(store):
    view = HFCacheView(store)
    repo = hf_files(store, REPO, lfs=("model.safetensors",))
    whole = HFEntry("hf://huggingface.co/org/name@main", "model", "org/name", "main", C1, repo)
    one = HFEntry(
        "hf://huggingface.co/org/name@main/config.json",
        "model",
        "org/name",
        "main",
        C1,
        tuple(f for f in repo if f.path == "config.json"),
    )
    pr = HFEntry(
        "hf://huggingface.co/org/name@refs/pr/1/config.json",
        "model",
        "org/name",
        "refs/pr/1",
        C2,
        tuple(f for f in repo if f.path == "config.json"),
    )
    for e in (whole, one, pr):
        view.add(e)
    ask = (
        ["file", {"repo_id": "org/name", "filename": "config.json"}],
        ["file", {"repo_id": "org/name", "filename": "model.safetensors"}],
        ["file", {"repo_id": "org/name", "filename": "config.json", "revision": "refs/pr/1"}],
    )

    assert view.remove(whole.url)  # the single file at the same commit keeps its link
    got = probe(view.home, *ask)
    assert bytes.fromhex(got[0]["data"]) == REPO["config.json"]
    assert got[1] == {"missing": "LocalEntryNotFoundError"}
    assert bytes.fromhex(got[2]["data"]) == REPO["config.json"]

    assert view.remove(pr.url)  # the blob two revisions share stays for the other one
    got = probe(view.home, *ask)
    assert bytes.fromhex(got[0]["data"]) == REPO["config.json"]
    assert got[2] == {"missing": "LocalEntryNotFoundError"}

    assert view.remove(one.url)
    got = probe(view.home, *ask, ["scan", {}])
    assert got[0] == got[1] == got[2] == {"missing": "LocalEntryNotFoundError"}
    assert got[3]["repos"] == {} and got[3]["warnings"] == []
    assert not view.repo_dir("model", "org/name").exists()
    assert not view.remove(one.url)
    # The store's blobs are untouched by the view's removal.
    assert all(store.has_blob(f.digest, f.size) for f in repo)


def test_a_ref_goes_back_to_the_newest_remaining_entry_of_that_revision(store):
    view = HFCacheView(store)
    old = hf_files(store, {"config.json": b'{"v": 1}'})
    new = hf_files(store, {"config.json": b'{"v": 2}'})
    view.add(
        HFEntry(
            "hf://huggingface.co/org/name@main/config.json#old",
            "model",
            "org/name",
            "main",
            C1,
            old,
        )
    )
    view.add(
        HFEntry(
            "hf://huggingface.co/org/name@main/config.json", "model", "org/name", "main", C2, new
        )
    )
    ref = view.repo_dir("model", "org/name") / "refs" / "main"
    assert ref.read_text() == C2
    view.remove("hf://huggingface.co/org/name@main/config.json")
    assert ref.read_text() == C1
    got = probe(view.home, ["file", {"repo_id": "org/name", "filename": "config.json"}])
    assert bytes.fromhex(got[0]["data"]) == b'{"v": 1}'


def test_pulling_a_moved_branch_again_leaves_nothing_of_the_old_commit(store):
    view = HFCacheView(store)
    url = "hf://huggingface.co/org/name@main/config.json"
    old = hf_files(store, {"config.json": b'{"v": 1}'})
    new = hf_files(store, {"config.json": b'{"v": 2}'})
    view.add(HFEntry(url, "model", "org/name", "main", C1, old))
    view.add(HFEntry(url, "model", "org/name", "main", C2, new))
    repo = view.repo_dir("model", "org/name")
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [C2]
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == [new[0].etag]
    assert (repo / "refs" / "main").read_text() == C2 and view.urls() == [url]
    got = probe(view.home, ["file", {"repo_id": "org/name", "filename": "config.json"}])
    assert bytes.fromhex(got[0]["data"]) == b'{"v": 2}'


def test_prune_drops_entries_the_index_no_longer_has(store):
    view = HFCacheView(store)
    files = hf_files(store, {"a.txt": b"a"})
    for rev, commit in (("main", C1), ("dev", C2)):
        view.add(
            HFEntry(
                f"hf://huggingface.co/org/name@{rev}/a.txt", "model", "org/name", rev, commit, files
            )
        )
    assert view.prune(["hf://huggingface.co/org/name@dev/a.txt"]) == [
        "hf://huggingface.co/org/name@main/a.txt"
    ]
    assert view.urls() == ["hf://huggingface.co/org/name@dev/a.txt"]
    assert not (view.repo_dir("model", "org/name") / "refs" / "main").exists()


def test_re_adding_relinks_a_blob_the_store_wrote_again(store):
    view = HFCacheView(store)
    (f,) = hf_files(store, {"a.txt": b"aaa"})
    entry = HFEntry(
        "hf://huggingface.co/org/name@main/a.txt", "model", "org/name", "main", C1, (f,)
    )
    view.add(entry)
    blob = view.repo_dir("model", "org/name") / "blobs" / f.etag
    # gc freed the store's blob and a later pull wrote it again: a new inode.
    os.chmod(store.blob_path(f.digest), 0o644)
    store.blob_path(f.digest).unlink()
    store.put_bytes(b"aaa")
    assert os.stat(blob).st_ino != os.stat(store.blob_path(f.digest)).st_ino
    view.add(entry)
    assert os.stat(blob).st_ino == os.stat(store.blob_path(f.digest)).st_ino


@pytest.mark.parametrize(
    "bad",
    [
        {"repo_id": "../../etc"},
        {"repo_id": "a/b/c"},
        {"repo_id": "a--b/c"},
        {"repo_type": "kernel"},
        {"revision": "../main"},
        {"commit": "main"},
        {"files": (HFFile("../x", "sha256:" + "0" * 64, 1, "0" * 40),)},
        {"files": (HFFile("x", "sha256:" + "0" * 64, 1, "../../etc/passwd"),)},
    ],
)
def test_bad_entries_are_refused_before_anything_is_written(store, bad):
    good = {
        "url": "hf://huggingface.co/org/name@main",
        "repo_type": "model",
        "repo_id": "org/name",
        "revision": "main",
        "commit": C1,
        "files": (),
    }
    view = HFCacheView(store)
    with pytest.raises(UnsafeName):
        view.add(HFEntry(**{**good, **bad}))
    assert not view.hub.exists()


def test_repo_folder_matches_huggingface_hub():
    hub = pytest.importorskip("huggingface_hub.file_download")
    for repo_type, repo_id in (
        ("model", "org/name"),
        ("dataset", "org/set"),
        ("space", "org/app"),
        ("model", "gpt2"),
    ):
        assert repo_folder(repo_type, repo_id) == hub.repo_folder_name(
            repo_id=repo_id, repo_type=repo_type
        )


@pytest.mark.parametrize(
    "where",
    [
        "huggingface",
        "huggingface/.nekko",
        "huggingface/hub/models--org--name/refs",
        "huggingface/hub/models--org--name/blobs",
        "huggingface/hub/models--org--name/snapshots",
    ],
)
def test_a_link_planted_in_the_view_is_never_followed(store, tmp_path, where):
    """The view is below the cache root: a link planted there (``refs -> /etc``) is refused,
    and nothing is written, linked or removed through it (issue 9, finding 2)."""
    victim = tmp_path / "victim"
    (victim / "main").mkdir(parents=True)
    (victim / "main" / "keep").write_bytes(b"keep me")
    before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
    link = Path(store.root) / where
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, link)
    view = HFCacheView(store)
    files = hf_files(store, REPO, lfs=("model.safetensors",))
    entry = HFEntry("hf://huggingface.co/org/name@v2", "model", "org/name", "v2", C1, files)
    with pytest.raises(UnsafeCachePath):
        view.add(entry)
    with contextlib.suppress(UnsafeCachePath):
        view.remove(entry.url)  # a removal must not walk through it either
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before
    assert (victim / "main" / "keep").read_bytes() == b"keep me"
    os.unlink(link)  # once the plant is gone, the same entry is laid out as usual
    assert (view.add(entry) / "config.json").read_bytes() == REPO["config.json"]
