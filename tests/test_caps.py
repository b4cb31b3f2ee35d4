"""Sizes and counts are bounded (issue 9, finding 4).

* ``--max-pull-size`` (``NEKKO_MAX_PULL_SIZE``, default 2 TiB): a pull known to be larger is
  refused before a byte (413 ``pull-too-large``); a body without ``Content-Length`` counts
  against it as it arrives and is cut off, its partial dropped (it used to be written until
  the disk was full, and kept for a week).
* ``--max-pull-files`` (``NEKKO_MAX_PULL_FILES``, default 10,000): a Hub repository's files
  and an image's layers, refused before a byte (a 20,000-file tree was 20,000 requests).
* ``gc`` drops even the partials an interrupted pull would resume when less than 5% of the
  disk is free.
* Bad values are refused at start-up: one line, exit status 2.

Against nginx, the real docker-registry, the fake Hub, and the suite's faulty server.
"""

from __future__ import annotations

import json
import os

import pytest
from peers.fakehub import start_fakehub
from test_crash import tiny_disk  # noqa: F401 - the fixture: a 24 MiB tmpfs (root only)

from nekko_sm import cli
from nekko_sm import config as cfg
from nekko_sm.errors import ConfigError, PullTooLarge
from nekko_sm.service import Service
from nekko_sm.store import key_for, write_atomic
from nekko_sm.transfer import Transfer


def make_service(cache, *hosts: str, env: dict | None = None, **flags) -> Service:
    config = cfg.build(
        {
            "cache_dir": str(cache),
            "insecure_registry": list(hosts),
            "platform": "linux/amd64",
            **flags,
        },
        env or {},
    )
    return Service(config, transfer=Transfer(config, read_timeout=5.0, backoff=0.01))


def ingest_dirs(svc: Service) -> list[str]:
    return [n for n in os.listdir(svc.store.ingest_dir) if n not in ("leases", "pulls")]


# --------------------------------------------------------------------------------------------
# --max-pull-size


def test_a_body_known_to_be_too_large_is_refused_before_a_byte(tmp_path, nginx):
    url = nginx.put("caps/big.bin", os.urandom(3 << 20))
    svc = make_service(tmp_path / "cache", max_pull_size="1M")
    try:
        with pytest.raises(PullTooLarge) as e:
            svc.pull(url)
        assert e.value.status == 413 and e.value.code == "pull-too-large"
        assert "--max-pull-size" in e.value.message and "3 MiB" in e.value.message
        assert svc.store.partials_size() == 0 and ingest_dirs(svc) == []
        assert list(svc.store.blobs()) == [] or svc.store.verify() == []
        small = nginx.put("caps/small.bin", os.urandom(100_000))
        entry, _ = svc.pull(small)  # the server keeps serving what fits
        assert entry["size"] == 100_000
        assert svc.store.verify() == []
    finally:
        svc.close()


def test_a_body_of_unknown_length_is_cut_off_when_it_passes(tmp_path, faulty):
    # 64 MiB: what the kernel's socket buffers take in on loopback (several MiB) is sent
    # whether or not we read it; the cut-off shows in what is never sent.
    url = faulty.add("endless.bin", os.urandom(64 << 20), no_length=True)
    svc = make_service(tmp_path / "cache", max_pull_size="2MiB")
    try:
        with pytest.raises(PullTooLarge) as e:
            svc.pull(url)
        assert "no size given up front" in e.value.message
        sent = faulty.body_bytes("endless.bin")
        assert sent < 32 << 20, "the body was read far past the cap"
        assert svc.store.partials_size() == 0 and ingest_dirs(svc) == [], "partial kept"
        assert os.listdir(svc.pulls_dir) == []
        assert svc.store.verify() == []
    finally:
        svc.close()


def test_an_image_larger_than_the_limit_fetches_no_blob(tmp_path, registry, seeded):
    info = seeded["public/single:v1"]
    registry.reset()
    svc = make_service(tmp_path / "cache", registry.host, max_pull_size="100K")
    try:
        with pytest.raises(PullTooLarge):
            svc.pull(info.url)
        assert registry.blob_gets() == 0
        assert svc.store.get_entry(svc.canonical(info.url)) is None
        assert svc.store.verify() == []
    finally:
        svc.close()


# --------------------------------------------------------------------------------------------
# --max-pull-files


def test_a_hub_repository_with_too_many_files_is_refused_before_any(tmp_path):
    with start_fakehub(tree_page_size=5) as hub:
        hub.add_repo("acme/many", files={f"shard-{i:03d}.json": b"{}" for i in range(40)})
        svc = make_service(
            tmp_path / "cache", env={"HF_ENDPOINT": hub.endpoint}, max_pull_files="12"
        )
        try:
            hub.clear_log()
            with pytest.raises(PullTooLarge) as e:
                svc.pull("hf:///acme/many")
            assert "--max-pull-files" in e.value.message
            assert not [r for r in hub.log() if "/resolve/" in r.path]
            pages = [r for r in hub.log() if "/tree/" in r.path]
            assert len(pages) <= 3, "the listing was read to its end before refusing"
            hub.add_repo("acme/few", files={f"f{i}.json": b"{}" for i in range(12)})
            entry, _ = svc.pull("hf:///acme/few")
            assert len(entry["files"]) == 12
            assert svc.store.verify() == []
        finally:
            svc.close()


def test_an_image_with_too_many_layers_is_refused_before_any(tmp_path, registry, seeded):
    info = seeded["public/single:v1"]  # 3 layers
    registry.reset()
    svc = make_service(tmp_path / "cache", registry.host, max_pull_files="2")
    try:
        with pytest.raises(PullTooLarge) as e:
            svc.pull(info.url)
        assert "3 layers" in e.value.message
        assert registry.blob_gets() == 0
        assert svc.store.verify() == []
    finally:
        svc.close()


# --------------------------------------------------------------------------------------------
# start-up


@pytest.mark.parametrize(
    ("flags", "env", "want"),
    [
        ({}, {}, (2 << 40, 10_000)),
        ({"max_pull_size": "1.5GiB"}, {}, (3 << 29, 10_000)),
        ({}, {"NEKKO_MAX_PULL_SIZE": "500k", "NEKKO_MAX_PULL_FILES": "7"}, (500 << 10, 7)),
        ({"max_pull_size": "3T"}, {"NEKKO_MAX_PULL_SIZE": "1K"}, (3 << 40, 10_000)),
        ({"max_pull_size": "123"}, {}, (123, 10_000)),
        ({"max_pull_size": "2Ti"}, {}, (2 << 40, 10_000)),
    ],
)
def test_sizes_and_counts_from_flags_and_environment(tmp_path, flags, env, want):
    c = cfg.build({"cache_dir": str(tmp_path / "c"), **flags}, env)
    assert (c.max_pull_size, c.max_pull_files) == want


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-pull-size", "12X"],
        ["--max-pull-size", "0"],
        ["--max-pull-size", "1.5.2G"],
        ["--max-pull-size", "G"],
        ["--max-pull-files", "0"],
        ["--max-pull-files", "many"],
    ],
)
def test_bad_sizes_and_counts_are_refused_at_start_up(tmp_path, argv, capsys):
    assert cli.main(["--cache-dir", str(tmp_path / "c"), *argv, "ls"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[0] in err
    with pytest.raises(ConfigError):
        cfg.build(
            {},
            {
                "NEKKO_MAX_PULL_SIZE" if "size" in argv[0] else "NEKKO_MAX_PULL_FILES": argv[1],
                "CACHE_DIR": str(tmp_path / "c"),
            },
        )


# --------------------------------------------------------------------------------------------
# gc when space is short


def test_gc_drops_wanted_partials_when_space_is_short(tiny_disk):  # noqa: F811
    svc = make_service(tiny_disk / "cache")
    try:
        ref = "url:http://127.0.0.1:9/interrupted.bin"
        with svc.store.writer(ref) as w:  # an interrupted download: kept for its resume
            w.write(os.urandom(2 << 20))
        record = svc.pulls_dir / f"{key_for('http://127.0.0.1:9/interrupted.bin')}.json"
        write_atomic(
            record,
            json.dumps({"url": "http://127.0.0.1:9/interrupted.bin", "ingest": [ref]}).encode(),
        )
        svc.store.gc()
        assert svc.store.partial_size(ref) == 2 << 20, "plenty of space: the resume is kept"

        filler = tiny_disk / "filler"
        st = os.statvfs(tiny_disk)
        with open(filler, "wb") as f:  # leave less than 5% of the disk free
            f.write(b"\0" * (st.f_bavail * st.f_frsize - int(0.03 * st.f_blocks * st.f_frsize)))
        assert svc.store.space_short()
        report = svc.store.gc()
        assert key_for(ref) in report.partials_freed
        assert svc.store.partial_size(ref) == 0
        os.unlink(filler)
        assert svc.store.verify() == []
    finally:
        svc.close()
