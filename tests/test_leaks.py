"""Failed pulls leave nothing behind: not their exceptions in memory, not files (issue 9, finding 5)."""

from __future__ import annotations

import gc
import os

import pytest

from nekko_sm.errors import EntryNotFound, UpstreamNotFound
from nekko_sm.service import Service

TRANSFER = {"read_timeout": 5.0, "backoff": 0.01}


@pytest.fixture
def svc(new_service):
    return new_service(transfer=TRANSFER)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fail(svc: Service, url: str) -> None:
    with pytest.raises(UpstreamNotFound):
        svc.pull(url)


@pytest.mark.slow
def test_memory_is_flat_over_2000_failing_pulls(new_service, ram_dir, nginx):
    # The cache in memory: each failed pull makes its record durable first (two
    # write_atomic, four fsyncs), which on this disk was two thirds of the test's time;
    # what is measured here is this process's memory, the same on any file system.
    svc = new_service({"cache_dir": str(ram_dir / "cache")}, transfer=TRANSFER)
    base = nginx.url + "/files/leak/missing-"
    for i in range(200):  # warm up: pools, caches, the logger
        _fail(svc, f"{base}warm-{i}")
    gc.collect()
    before = _rss()
    for i in range(2000):
        _fail(svc, f"{base}{i}")
    gc.collect()
    grown = _rss() - before
    # Each failure used to keep its exception and traceback (~31 kB): 2,000 -> ~60 MB.
    assert grown < 25 << 20, f"RSS grew {grown >> 20} MiB over 2,000 failed pulls"
    # The newest failure is still told, the oldest are forgotten (bounded).
    with pytest.raises(EntryNotFound, match="the last pull failed"):
        svc.status(f"{base}1999")
    with pytest.raises(EntryNotFound) as e:
        svc.status(f"{base}0")
    assert "the last pull failed" not in e.value.message


def test_pulls_leave_no_lock_file_per_url(svc, nginx):
    for i in range(20):
        _fail(svc, nginx.url + f"/files/leak/gone-{i}")
    for i in range(5):
        svc.pull(nginx.put(f"leak/here-{i}.bin", os.urandom(100 + i)))
    left = sorted(os.listdir(svc.pulls_dir))
    assert left == [], left
