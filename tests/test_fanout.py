"""An index cannot run the daemon out of memory (issue 9, finding 3).

An index naming one big manifest 20,000 times, pulled with ``platform: all``, took RSS past
1 GiB: every descriptor fetched the manifest again and every copy (bytes and parsed JSON) was
held until the end.  Now a pull fetches each manifest once (by digest), stores it at once and
lets it go, and caps what one pull may name: 256 distinct manifests (502 manifest-invalid),
``--max-pull-files`` blobs and files (413 pull-too-large), both before any blob is fetched.

The manifests are pushed to the real docker-registry (which checks every reference exists);
the pull runs in a child process whose peak RSS is measured (and whose address space is
capped, so the unfixed code fails fast instead of taking the machine with it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from peers.images import (
    OCI_INDEX,
    TITLE,
    artifact_manifest,
    push_blob,
    push_manifest,
)

from nekko_sm.entries import Catalog
from nekko_sm.sources import oci
from nekko_sm.store import MT_OCI_INDEX, MT_OCI_MANIFEST, Descriptor, Store

ROOT = Path(__file__).resolve().parent.parent

# A child that pulls a small image (warming up imports, pools and threads), then the URL
# under test, and says how far its peak RSS (VmHWM, reset just before) rose above its RSS
# before that pull, and how the pull ended.
CHILD = r"""
import gc, json, resource, sys
from nekko_sm import config as cfg
from nekko_sm.errors import NekkoError
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer

cache, host, warm, url, files = sys.argv[1:6]
config = cfg.build({"cache_dir": cache, "insecure_registry": [host], "platform": "all",
                    "max_pull_files": files}, {})
svc = Service(config, transfer=Transfer(config, read_timeout=10, backoff=0.01))
svc.pull(warm)
gc.collect()
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from what is resident now
before = status("VmRSS")
try:
    entry, _ = svc.pull(url)
    result = {"ok": True, "files": len(entry["files"])}
except NekkoError as e:
    result = {"ok": False, "code": e.code, "status": e.status, "message": e.message}
except MemoryError:
    result = {"ok": False, "code": "MemoryError"}
after = status("VmHWM")
problems = svc.store.verify()
print(json.dumps({**result, "grown": after - before, "verify": problems}))
svc.close()
"""


def pull_in_child(tmp_path, reg, warm: str, url: str, max_files: int = 10_000) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cache"), reg.host, warm, url, str(max_files)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def big_manifest(reg, repo: str, files: int) -> dict:
    """An artifact manifest of ``files`` layers (one blob, titled f00000 ...): ~180 bytes a
    layer as JSON, several times that once parsed."""
    layer = push_blob(reg, repo, b"one small layer")
    layers = [{**layer, "annotations": {TITLE: f"f{i:05d}"}} for i in range(files)]
    return push_manifest(reg, repo, "big", artifact_manifest(reg, repo, layers))


def fan_out(reg, repo: str, child: dict, n: int, platforms) -> str:
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**child, "platform": platforms(i)} for i in range(n)],
    }
    push_manifest(reg, repo, "fan", index)
    return f"oci://{reg.host}/{repo}:fan"


def test_memory_is_flat_over_a_2000_descriptor_index(tmp_path, reg, seeded):
    repo = "fanout/same"
    child = big_manifest(reg, repo, 400)  # ~75 KB of JSON
    url = fan_out(reg, repo, child, 2000, lambda i: {"os": "linux", "architecture": "amd64"})
    reg.clear()
    out = pull_in_child(tmp_path, reg, seeded["public/single:v1"].url, url)
    assert out["ok"], out
    assert out["files"] == 400  # one image of the platform: the first descriptor's
    assert out["grown"] < 25 << 20, f"peak RSS grew {out['grown'] >> 20} MiB"
    assert reg.manifest_gets(child["digest"]) == 1, "the manifest was fetched more than once"
    assert out["verify"] == []


def test_too_many_files_across_platforms_is_refused_before_any_blob(tmp_path, reg, seeded):
    repo = "fanout/platforms"
    child = big_manifest(reg, repo, 400)
    # 2,000 platforms of one manifest: 800,000 files in the view, over --max-pull-files.
    url = fan_out(
        reg, repo, child, 2000, lambda i: {"os": "linux", "architecture": "arm", "variant": f"v{i}"}
    )
    reg.clear()
    out = pull_in_child(tmp_path, reg, seeded["public/single:v1"].url, url)
    assert not out["ok"] and out["code"] == "pull-too-large" and out["status"] == 413, out
    assert "--max-pull-files" in out["message"]
    assert out["grown"] < 25 << 20, f"peak RSS grew {out['grown'] >> 20} MiB"
    assert reg.blob_gets(push_blob(reg, repo, b"one small layer")["digest"]) == 0
    assert out["verify"] == []


def test_too_many_distinct_manifests_are_refused_before_any_is_fetched(tmp_path, reg, seeded):
    repo = "fanout/distinct"
    layer = push_blob(reg, repo, b"a layer")
    base = artifact_manifest(reg, repo, [])  # its empty config pushed once, not 300 times
    children = [
        push_manifest(
            reg, repo, f"c{i}", {**base, "layers": [{**layer, "annotations": {TITLE: f"file-{i}"}}]}
        )
        for i in range(300)
    ]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**c, "platform": {"os": "linux", "architecture": "amd64"}} for c in children
        ],
    }
    push_manifest(reg, repo, "fan", index)
    reg.clear()
    out = pull_in_child(
        tmp_path, reg, seeded["public/single:v1"].url, f"oci://{reg.host}/{repo}:fan"
    )
    assert not out["ok"] and out["code"] == "manifest-invalid", out
    assert not any(reg.manifest_gets(c["digest"]) for c in children)
    assert out["verify"] == []


def test_an_image_with_more_layers_than_files_allowed_is_refused(tmp_path, reg, seeded):
    repo = "fanout/layers"
    big_manifest(reg, repo, 600)
    reg.clear()
    out = pull_in_child(
        tmp_path, reg, seeded["public/single:v1"].url, f"oci://{reg.host}/{repo}:big", max_files=500
    )
    assert not out["ok"] and out["code"] == "pull-too-large", out
    assert "600 layers" in out["message"]
    assert reg.blob_gets(push_blob(reg, repo, b"one small layer")["digest"]) == 0
    assert out["verify"] == []


def test_the_files_of_an_index_read_each_named_manifest_once(tmp_path):
    """An index naming one manifest 2,000 times (the test above) made the entry's file list
    read, parse and list that manifest 2,000 times at commit: 2,000 x 400 files for 400."""
    store = Store(tmp_path / "cache").init()
    try:
        blob = store.put_bytes(b"one small layer")
        layers = [
            {
                "mediaType": "application/octet-stream",
                "digest": blob,
                "size": 15,
                "annotations": {TITLE: f"f{i}"},
            }
            for i in range(3)
        ]
        raw = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "layers": layers})
        child = Descriptor(MT_OCI_MANIFEST, store.put_bytes(raw.encode()), len(raw))
        amd64 = {"os": "linux", "architecture": "amd64"}
        arm = {"os": "linux", "architecture": "arm", "variant": "v7"}
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MT_OCI_INDEX,
                "manifests": [{**child.to_json(), "platform": p} for p in [amd64] * 50 + [arm]],
            }
        ).encode()
        desc = Descriptor(MT_OCI_INDEX, store.put_bytes(index), len(index))
        reads: list = []
        real = store.read_blob
        store.read_blob = lambda d: reads.append(d) or real(d)  # type: ignore[method-assign]
        files = Catalog(store, tmp_path / "pulls", lambda key: (None, None)).files_of(desc)
        names = [f["name"] for f in files]
        assert names == [f"linux-amd64/f{i}" for i in range(3)] + [
            f"linux-arm-v7/f{i}" for i in range(3)
        ]
        assert reads.count(child.digest) == 2, "one read per platform directory, not per name"
    finally:
        store.close()


def test_a_manifest_an_index_repeats_is_checked_once_per_directory(reg, make, monkeypatch):
    """The same fan-out made the pull check all 400 layers of the one manifest again for
    each of its 2,000 descriptors before fetching a blob."""
    repo = "fanout/checked"
    layer = push_blob(reg, repo, b"a checked layer")
    layers = [{**layer, "annotations": {TITLE: f"f{i}"}} for i in range(3)]
    child = push_manifest(reg, repo, "one", artifact_manifest(reg, repo, layers))
    amd64 = {"os": "linux", "architecture": "amd64"}
    arm = {"os": "linux", "architecture": "arm", "variant": "v7"}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{**child, "platform": p} for p in [amd64] * 50 + [arm]],
    }
    push_manifest(reg, repo, "fan", index)
    checked: list = []
    real = oci.descriptor
    monkeypatch.setattr(oci, "descriptor", lambda d, what: checked.append(d) or real(d, what))
    entry, _ = make(reg.host, platform="all").pull(f"oci://{reg.host}/{repo}:fan")
    assert sorted(f["name"] for f in entry["files"]) == [
        f"linux-{p}/f{i}" for p in ("amd64", "arm-v7") for i in range(3)
    ]
    assert sum(d is not None and d.get("digest") == layer["digest"] for d in checked) == 2 * 3
