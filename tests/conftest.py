"""Shared fixtures: a clean environment for every test, the built .pyz, running servers, and
Services on a test's own cache (``new_service``, and ``make`` for registry tests)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import peers
import pytest

from nekko_sm import config as cfg
from nekko_sm.service import Service
from nekko_sm.transfer import Transfer

# Peer fixtures (nginx, faulty, registry, auth_registry, fakehub …) live beside their peers.
pytest_plugins = ["peers.nginx", "peers.faulty", "peers.fakehub", "peers.registry"]

ROOT = Path(__file__).resolve().parent.parent
_ENV_PREFIXES = ("NEKKO_", "HF_", "STORAGE_MANAGER_", "HUGGING_FACE")
_ENV_NAMES = (
    "CACHE_DIR",
    "VERBOSE",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "SSL_CERT_FILE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No test sees the developer's configuration; the cache defaults to tmp_path.

    cli.main() configures the nekko_sm logger for its stderr; put it back afterwards so
    one in-process CLI call does not change what later tests' caplog sees.
    """
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    logger = logging.getLogger("nekko_sm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def new_service(tmp_path):
    """new_service(flags=None, env=None, transfer=None) -> a Service of ``cfg.build(flags,
    env)``, on tmp_path/cache unless ``flags`` name a ``cache_dir``, with
    ``Transfer(config, **transfer)`` when ``transfer`` is given (else the Service makes its
    own).  Every one made is closed after the test."""

    def new(
        flags: dict | None = None, env: dict | None = None, transfer: dict | None = None
    ) -> Service:
        config = cfg.build({"cache_dir": str(tmp_path / "cache"), **(flags or {})}, env or {})
        return Service(config, transfer=None if transfer is None else Transfer(config, **transfer))

    yield from peers.closing_all(new)


@pytest.fixture
def make(new_service, tmp_path):
    """make(*insecure_hosts, cache=None, env=None, transfer=None, **flags) -> a Service for
    registry tests: on ``cache`` (default tmp_path/cache), platform linux/amd64 unless
    ``flags`` say otherwise, retries 0.05 s apart unless ``transfer`` says otherwise; closed
    after the test."""

    def make(
        *hosts: str,
        cache: Path | None = None,
        env: dict | None = None,
        transfer: dict | None = None,
        **flags,
    ) -> Service:
        flags.setdefault("platform", "linux/amd64")
        return new_service(
            {
                "cache_dir": str(cache or tmp_path / "cache"),
                "insecure_registry": list(hosts),
                **flags,
            },
            env,
            transfer or {"backoff": 0.05},
        )

    return make


def _on_tmpfs(path: str) -> bool:
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1:3] == [path, "tmpfs"] for line in f)
    except OSError:
        return False


@pytest.fixture
def ram_dir(tmp_path):
    """A fresh directory in memory (under /dev/shm, a tmpfs), removed after the test; tmp_path
    where the machine has none.  For tests whose loops are about this process (its memory),
    not the disk: there every fsync of the cache's durable writes is free."""
    if not _on_tmpfs("/dev/shm"):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="nekko-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pyz() -> Path:
    """dist/nekko-sm.pyz, built once per test session from this tree."""
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py")], check=True, capture_output=True)
    return ROOT / "dist" / "nekko-sm.pyz"


# The test files that take longest (about 20-90 s each, most of it waiting on peers or on
# killed children), longest first. Under pytest-xdist (tests/run.sh: two workers, a file
# never split) a worker takes the next file when it is nearly done with its own, so starting
# with these and ending with the short files lets both workers finish together.
_LONGEST_FILES = (
    "test_crash.py",
    "test_compat.py",
    "test_engine_ready.py",
    "test_fuzz.py",
    "test_security.py",
    "test_budget.py",
    "test_cli.py",
    "test_leaks.py",
    "test_oci.py",
    "test_hf_real.py",
    "test_hf_view.py",
    "test_ranged.py",
    "test_hfcache.py",
    "test_model_formats.py",
    "test_access.py",
)


def pytest_collection_modifyitems(config, items):
    """On a pytest-xdist worker, the longest files first (see _LONGEST_FILES); the order of
    the tests inside a file, and of everything in a run without workers, is left alone."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if peers.MISSING:
        tr = terminalreporter
        tr.section("PEERS MISSING", sep="!", red=True, bold=True)
        tr.write_line(
            "These peers are not installed, so the tests that need them did NOT run:",
            red=True,
            bold=True,
        )
        for name in sorted(peers.MISSING):
            tr.write_line(f"  - {name}", red=True)
        tr.write_line("Install them with: bash tests/run.sh", red=True, bold=True)
