"""Names that cannot be laid out are refused before a byte is fetched (issue 9, finding 8).

A view directory holds one link per file, named by the registry or the Hub.  A set of names
that cannot be laid out (two alike, also once Unicode-normalised; ``x`` beside ``x/y``; a
component over 255 bytes; a title equal to another layer's generated ``sha256-HEX`` name) used
to fail with a 500 only after every blob was downloaded, leaving a ``views/.*.tmp`` directory
gc never removed and an absolute path in the message; names with bidirectional controls were
laid out as they came.  Now the whole name set of a pull is checked first: ``502
manifest-invalid``, no blob requested, nothing left behind.  Against the real docker-registry
(manifests pushed as they are) and the fake Hub.
"""

from __future__ import annotations

import os
import time

import pytest
from peers.fakehub import start_fakehub
from peers.images import TITLE, artifact_manifest, push_blob, push_manifest

from nekko_sm import config as cfg
from nekko_sm.errors import ManifestInvalid, NekkoError
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer


def make_service(tmp_path, *hosts: str, env: dict | None = None) -> Service:
    config = cfg.build(
        {
            "cache_dir": str(tmp_path / "cache"),
            "insecure_registry": list(hosts),
            "platform": "linux/amd64",
        },
        env or {},
    )
    return Service(config, transfer=Transfer(config, read_timeout=5.0, backoff=0.01))


def leftovers(svc: Service) -> list[str]:
    return [n for n in os.listdir(svc.store.views_dir) if n.startswith(".")]


LONG = "d" * 200
CASES = {
    "file-beside-its-directory": ["x", "x/y"],
    "component-over-255-bytes": ["a" * 256],
    "component-over-255-bytes-in-utf8": ["\u00e9" * 128],  # 128 characters, 256 bytes
    "path-over-3800-bytes": ["/".join([LONG] * 20)],
    "alike-once-nfc-normalised": ["caf\u00e9.txt", "cafe\u0301.txt"],
    "bidi-override": ["weights\u202eftsnoitaler.bin"],
    "bidi-isolate": ["a\u2066b.json"],
    "c1-control": ["a\u0085b"],
    "same-after-cleaning": ["dir/a.bin", "dir//a.bin"],
}


@pytest.fixture
def reg(registry):
    registry.reset()
    yield registry
    registry.reset()


def push_titled(reg, repo: str, names: list[str | None]) -> str:
    layers = []
    for i, name in enumerate(names):
        ann = {"annotations": {TITLE: name}} if name is not None else {}
        layers.append(push_blob(reg, repo, f"layer {i} of {repo}".encode() + os.urandom(8), **ann))
    push_manifest(reg, repo, "v1", artifact_manifest(reg, repo, layers))
    return f"oci://{reg.host}/{repo}:v1"


def assert_refused_before_any_byte(svc: Service, reg, url: str, tmp_path) -> None:
    reg.clear()
    with pytest.raises(ManifestInvalid) as e:
        svc.pull(url)
    assert e.value.status == 502 and e.value.code == "manifest-invalid"
    assert str(tmp_path) not in e.value.message
    assert reg.blob_gets() == 0, "blobs were downloaded before the names were checked"
    assert svc.store.get_entry(svc.canonical(url)) is None
    assert leftovers(svc) == []
    assert svc.store.verify() == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_names_that_cannot_be_laid_out_are_refused_first(tmp_path, reg, case):
    url = push_titled(reg, f"names/{case}", CASES[case])
    svc = make_service(tmp_path, reg.host)
    try:
        assert_refused_before_any_byte(svc, reg, url, tmp_path)
    finally:
        svc.close()


def test_a_title_equal_to_another_layers_digest_name(tmp_path, reg):
    repo = "names/digest-title"
    untitled = push_blob(reg, repo, b"untitled layer" + os.urandom(8))
    titled = push_blob(
        reg,
        repo,
        b"titled layer" + os.urandom(8),
        annotations={TITLE: untitled["digest"].replace(":", "-")},
    )
    push_manifest(reg, repo, "v1", artifact_manifest(reg, repo, [untitled, titled]))
    svc = make_service(tmp_path, reg.host)
    try:
        assert_refused_before_any_byte(svc, reg, f"oci://{reg.host}/{repo}:v1", tmp_path)
    finally:
        svc.close()


def test_names_that_can_be_laid_out_still_are(tmp_path, reg):
    names = [
        "config.json",
        "tokenizer/tokenizer.json",
        "caf\u00e9/\u65e5\u672c.txt",
        "x.y",
        "x.y.z/w",
        "a" * 255,
    ]
    url = push_titled(reg, "names/fine", [*names, None])
    svc = make_service(tmp_path, reg.host)
    try:
        entry, _ = svc.pull(url)
        got = [f["name"] for f in entry["files"]]
        assert got[:-1] == names and got[-1].startswith("sha256-")
        for name in names:
            assert os.path.islink(os.path.join(entry["path"], name))
        assert svc.store.verify() == []
    finally:
        svc.close()


def test_hub_tree_names_are_checked_before_any_file(tmp_path):
    with start_fakehub() as hub:
        hub.add_repo("acme/alike", files={"caf\u00e9.txt": b"one", "cafe\u0301.txt": b"two"})
        hub.add_repo("acme/bidi", files={"ok.json": b"{}", "x\u202egpj.exe": b"MZ"})
        svc = make_service(tmp_path, env={"HF_ENDPOINT": hub.endpoint})
        try:
            for repo in ("acme/alike", "acme/bidi"):
                hub.clear_log()
                with pytest.raises(ManifestInvalid):
                    svc.pull(f"hf:///{repo}")
                assert not [r for r in hub.log() if "/resolve/" in r.path], repo
            assert leftovers(svc) == [] and svc.store.verify() == []
        finally:
            svc.close()


# --------------------------------------------------------------------------------------------
# a view that fails mid-way leaves nothing; gc sweeps what a kill left; no absolute path


def test_a_failed_view_leaves_no_temporary_directory(tmp_path, reg, monkeypatch):
    url = push_titled(reg, "names/view-fails", ["a.bin", "b.bin", "c.bin"])
    svc = make_service(tmp_path, reg.host)
    real = os.symlink
    calls = []

    def failing(*args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(svc.store.views_dir / "x"))
        return real(*args, **kw)

    try:
        monkeypatch.setattr(os, "symlink", failing)
        with pytest.raises(NekkoError) as e:
            svc.pull(url)
        monkeypatch.setattr(os, "symlink", real)
        assert str(tmp_path) not in e.value.message
        assert leftovers(svc) == []
        entry, _ = svc.pull(url)  # and the next pull makes the view
        assert sorted(os.listdir(entry["path"])) == ["a.bin", "b.bin", "c.bin"]
        assert svc.store.verify() == []
    finally:
        svc.close()


def test_an_os_error_names_no_absolute_path(tmp_path, reg, monkeypatch):
    url = push_titled(reg, "names/os-error", ["a.bin", "b.bin"])
    svc = make_service(tmp_path, reg.host)

    def broken(url, files):
        raise OSError(36, "File name too long", str(svc.store.views_dir / ("n" * 300)))

    try:
        monkeypatch.setattr(svc.store, "make_view", broken)
        with pytest.raises(NekkoError) as e:
            svc.pull(url)
        assert str(tmp_path) not in e.value.message
        assert "File name too long" in e.value.message
    finally:
        svc.close()


def test_gc_sweeps_temporary_views_left_by_a_kill(tmp_path, reg):
    svc = make_service(tmp_path, reg.host)
    try:
        views = svc.store.views_dir
        old = views / f".{'a' * 32}.4242.99.tmp"
        old_replaced = views / f".{'b' * 32}.4242.old"
        fresh = views / f".{'c' * 32}.{os.getpid()}.7.tmp"
        for d in (old, old_replaced, fresh):
            (d / "sub").mkdir(parents=True)
            os.symlink("../../blobs/sha256/" + "0" * 64, d / "sub" / "link")
        stale = time.time() - 2 * 3600
        for d in (old, old_replaced):
            os.utime(d, (stale, stale))
        report = svc.store.gc()
        assert not old.exists() and not old_replaced.exists()
        assert fresh.exists(), "a build under way (a fresh temporary) is left alone"
        assert sorted(report.views_freed) == sorted([old.name, old_replaced.name])
        (views / ".unrelated").mkdir()
        svc.store.gc()
        assert (views / ".unrelated").exists()  # not a name of ours: never touched
    finally:
        svc.close()
