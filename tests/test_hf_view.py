"""The Hugging Face cache view filled by real pulls (DESIGN section 8): pulled from the fake
Hub (the default endpoint), found by the official huggingface_hub offline with
``HF_HOME=CACHE_DIR/huggingface``: a repository, a file at another revision, a dataset; gone
after ``rm``, pruned by ``gc`` and by ``verify --repair``; the same bytes as the store's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peers import modelpacks as mp
from peers.fakehub import start_fakehub
from test_hfcache import probe

from nekko_sm import config as cfg
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer

ROOT = Path(__file__).resolve().parent.parent
CONFIG_V1 = b'{"architectures": ["NekkoForCausalLM"], "v": 1}'
CONFIG_V2 = b'{"architectures": ["NekkoForCausalLM"], "v": 2}'
WEIGHTS = mp.safetensors_bytes({"w": [0.5] * 3000})  # LFS on the Hub
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}'
TRAIN = b"text,label\nhello,1\n"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def hub():
    h = start_fakehub()
    first = h.add_repo(
        "nekko/view-model",
        files={
            "config.json": CONFIG_V1,
            "model.safetensors": WEIGHTS,
            "tokenizer/tokenizer.json": TOKENIZER,
        },
    )
    h.add_tag("nekko/view-model", "v1", first)
    h.add_commit("nekko/view-model", {"config.json": CONFIG_V2})
    h.add_repo("nekko/view-set", repo_type="dataset", files={"data/train.csv": TRAIN})
    yield h
    h.close()


@pytest.fixture
def svc(tmp_path, hub):
    config = cfg.build({"cache_dir": str(tmp_path / "cache")}, {"HF_ENDPOINT": hub.endpoint})
    s = Service(config, transfer=Transfer(config, backoff=0.01))
    yield s
    s.close()


def cli(cache: Path, hub, *args: str, env: dict | None = None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=hub.endpoint, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "nekko_sm", "--cache-dir", str(cache), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=e,
    )


def found(got: dict) -> bytes | None:
    return None if "missing" in got else bytes.fromhex(got["data"])


def test_pulled_repo_file_at_another_revision_and_dataset_are_found_offline(svc, hub):
    repo, _ = svc.pull("hf:///nekko/view-model")
    old, _ = svc.pull("hf:///nekko/view-model@v1/config.json")
    data, _ = svc.pull("hf:///datasets/nekko/view-set/data/train.csv")
    home = svc.store.root / "huggingface"
    got = probe(
        home,
        ["snapshot", {"repo_id": "nekko/view-model"}],
        ["file", {"repo_id": "nekko/view-model", "filename": "config.json"}],
        ["file", {"repo_id": "nekko/view-model", "filename": "config.json", "revision": "v1"}],
        [
            "file",
            {"repo_id": "nekko/view-set", "filename": "data/train.csv", "repo_type": "dataset"},
        ],
        ["scan", {}],
    )
    snapshot = {k: bytes.fromhex(v) for k, v in got[0]["files"].items()}
    assert snapshot == {
        "config.json": CONFIG_V2,
        "model.safetensors": WEIGHTS,
        "tokenizer/tokenizer.json": TOKENIZER,
    }
    commit = hub.commit_sha("nekko/view-model")
    assert got[0]["path"].endswith(f"models--nekko--view-model/snapshots/{commit}")
    assert found(got[1]) == CONFIG_V2 and found(got[2]) == CONFIG_V1
    assert found(got[3]) == TRAIN
    assert got[4]["warnings"] == []
    assert got[4]["repos"]["nekko/view-model"]["refs"] == ["main", "v1"]
    # what vLLM / transformers read from the snapshot, with the standard library
    snap = Path(got[0]["path"])
    json.loads((snap / "config.json").read_text())
    assert mp.parse_safetensors((snap / "model.safetensors").read_bytes())
    # blobs named by ETag (sha256 for LFS, git blob id otherwise), the store's own inodes
    blobs = snap.parent.parent / "blobs"
    lfs = blobs / hashlib.sha256(WEIGHTS).hexdigest()
    [st] = [f for f in repo["files"] if f["name"] == "model.safetensors"]
    assert os.stat(lfs).st_ino == os.stat(st["path"]).st_ino
    assert (blobs / git_sha1(TOKENIZER)).read_bytes() == TOKENIZER
    assert Path(old["path"]).read_bytes() == CONFIG_V1 and data["state"] == "complete"


def test_rm_takes_it_out_of_the_view_and_keeps_the_rest(svc, hub):
    svc.pull("hf:///nekko/view-model")
    svc.pull("hf:///nekko/view-model@v1/config.json")
    home = svc.store.root / "huggingface"
    svc.remove("hf:///nekko/view-model")
    got = probe(
        home,
        ["snapshot", {"repo_id": "nekko/view-model"}],
        ["file", {"repo_id": "nekko/view-model", "filename": "model.safetensors"}],
        ["file", {"repo_id": "nekko/view-model", "filename": "config.json", "revision": "v1"}],
    )
    assert "missing" in got[0] and "missing" in got[1]
    assert found(got[2]) == CONFIG_V1  # another entry's file stays
    svc.remove("hf:///nekko/view-model@v1/config.json")
    got = probe(
        home, ["file", {"repo_id": "nekko/view-model", "filename": "config.json", "revision": "v1"}]
    )
    assert "missing" in got[0]
    assert not (home / "hub" / "models--nekko--view-model").exists()
    assert list(svc.store.blobs()) == []  # no hard link kept a freed blob's bytes


def test_the_cli_pull_rm_gc_and_verify_repair_keep_the_view_true(tmp_path, hub):
    cache = tmp_path / "cache"
    home = cache / "huggingface"
    r = cli(cache, hub, "pull", "hf:///nekko/view-model/model.safetensors")
    assert r.returncode == 0, r.stderr
    got = probe(home, ["file", {"repo_id": "nekko/view-model", "filename": "model.safetensors"}])
    assert found(got[0]) == WEIGHTS
    assert cli(cache, hub, "rm", "hf:///nekko/view-model/model.safetensors").returncode == 0
    assert (
        "missing"
        in probe(home, ["file", {"repo_id": "nekko/view-model", "filename": "model.safetensors"}])[
            0
        ]
    )
    # gc prunes what the index no longer has (an entry dropped behind the service's back)
    assert cli(cache, hub, "pull", "hf:///nekko/view-model/config.json").returncode == 0
    svc = Service(cfg.build({"cache_dir": str(cache)}, {"HF_ENDPOINT": hub.endpoint}))
    svc.store.remove_entry(svc.canonical("hf:///nekko/view-model/config.json"))
    svc.close()
    assert cli(cache, hub, "gc").returncode == 0
    assert (
        "missing"
        in probe(home, ["file", {"repo_id": "nekko/view-model", "filename": "config.json"}])[0]
    )
    # verify --repair: a damaged blob's entry goes, and so does what the view showed of it
    r = cli(cache, hub, "pull", "hf:///datasets/nekko/view-set/data/train.csv", "--json")
    assert r.returncode == 0, r.stderr
    blob = Path(json.loads(r.stdout)["path"])
    os.chmod(blob, 0o644)
    blob.write_bytes(b"X" + blob.read_bytes()[1:])
    assert cli(cache, hub, "verify", "--repair").returncode == 1
    assert (
        "missing"
        in probe(
            home,
            [
                "file",
                {"repo_id": "nekko/view-set", "repo_type": "dataset", "filename": "data/train.csv"},
            ],
        )[0]
    )
    assert cli(cache, hub, "verify").returncode == 0


def test_another_endpoint_is_not_in_the_view(tmp_path, hub):
    host = hub.endpoint.split("://", 1)[1]
    config = cfg.build(
        {"cache_dir": str(tmp_path / "cache"), "insecure_registry": [host]},
        {"HF_ENDPOINT": "https://huggingface.co"},
    )
    svc = Service(config, transfer=Transfer(config, backoff=0.01))
    try:
        entry, _ = svc.pull(f"hf://{host}/nekko/view-model/config.json")
        assert Path(entry["path"]).read_bytes() == CONFIG_V2
        assert not (svc.store.root / "huggingface" / "hub").exists()
    finally:
        svc.close()
