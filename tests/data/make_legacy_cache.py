"""Make tests/data/legacy-cache.tar.gz: a cache written by nekko-sm before it had nekko.db.

Run with the *old* tree first on the path (commit c96135b, the last without the database):

    git archive c96135b | tar -x -C /tmp/oldcode
    PYTHONPATH=/tmp/oldcode:/tmp/oldcode/tests python3 tests/data/make_legacy_cache.py OUT.tar.gz

It pulls two files from a local nginx through the old Service (one of them twice under two
URLs, so a blob is shared), commits a multi-file artifact and a multi-platform image index
through the old Service._commit, and packs the cache.  tests/test_db.py opens it with the
new code and checks that no entry was lost.
"""

from __future__ import annotations

import json
import sys
import tarfile
import tempfile
from pathlib import Path

from peers.nginx import start_nginx

from nekko_sm import config as cfg
from nekko_sm.service import Service
from nekko_sm.sources.base import PullResult
from nekko_sm.store import MT_OCI_INDEX, MT_OCI_MANIFEST, TITLE, Descriptor


def manifest(store, layers: list[tuple[str, bytes]], platform=None) -> Descriptor:
    descs = [
        {
            "mediaType": "application/octet-stream",
            "digest": store.put_bytes(data),
            "size": len(data),
            "annotations": {TITLE: name},
        }
        for name, data in layers
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": "application/vnd.nekko.test",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": store.put_bytes(b"{}"),
            "size": 2,
        },
        "layers": descs,
    }
    raw = json.dumps(doc).encode()
    return Descriptor(
        MT_OCI_MANIFEST,
        store.put_bytes(raw),
        len(raw),
        artifact_type="application/vnd.nekko.test",
        platform=platform,
    )


def main(out: str) -> None:
    work = Path(tempfile.mkdtemp())
    peer = start_nginx(work / "nginx")
    try:
        cache = work / "cache"
        config = cfg.build({"cache_dir": str(cache)}, {})
        svc = Service(config)
        a = peer.put("a.bin", b"legacy file a\n" * 100)
        b = peer.put("b.bin", b"legacy file b\n" * 100)
        svc.pull(a)
        svc.pull(b)
        svc.pull(a + "?again")  # the same bytes under a second URL: one shared blob
        store = svc.store
        multi = manifest(store, [("model.bin", b"weights"), ("tok/t.json", b'{"t":1}')])
        svc._commit("hf://huggingface.co/org/legacy@main", PullResult(multi, multi.digest, []))
        amd = manifest(
            store,
            [("layer", b"amd64 layer"), ("shared", b"shared layer")],
            {"os": "linux", "architecture": "amd64"},
        )
        arm = manifest(
            store,
            [("layer", b"arm64 layer"), ("shared", b"shared layer")],
            {"os": "linux", "architecture": "arm64"},
        )
        idx = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_INDEX,
            "manifests": [
                {
                    "mediaType": MT_OCI_MANIFEST,
                    "digest": m.digest,
                    "size": m.size,
                    "platform": m.platform,
                }
                for m in (amd, arm)
            ],
        }
        raw = json.dumps(idx).encode()
        top = Descriptor(MT_OCI_INDEX, store.put_bytes(raw), len(raw))
        svc._commit(
            "oci://registry.test/legacy/multi:v1?platform=all", PullResult(top, top.digest, [])
        )
        svc.close()
        assert not (cache / "nekko.db").exists(), "run this with the old tree on the path"
        with tarfile.open(out, "w:gz") as tar:
            tar.add(cache, arcname="cache")
    finally:
        peer.stop()


if __name__ == "__main__":
    main(sys.argv[1])
