"""Shared fixtures: a clean environment for every test, the built .pyz, running servers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import peers
import pytest

# Peer fixtures (nginx, faulty, registry, auth_registry, fakehub …) live beside their peers.
pytest_plugins = ["peers.nginx", "peers.faulty", "peers.fakehub", "peers.registry"]

ROOT = Path(__file__).resolve().parent.parent
_ENV_PREFIXES = ("NEKKO_", "HF_", "STORAGE_MANAGER_", "HUGGING_FACE")
_ENV_NAMES = ("CACHE_DIR", "VERBOSE", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy",
              "http_proxy", "no_proxy", "ALL_PROXY", "all_proxy", "SSL_CERT_FILE")


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


@pytest.fixture(scope="session")
def pyz() -> Path:
    """dist/nekko-sm.pyz, built once per test session from this tree."""
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py")], check=True,
                   capture_output=True)
    return ROOT / "dist" / "nekko-sm.pyz"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if peers.MISSING:
        tr = terminalreporter
        tr.section("PEERS MISSING", sep="!", red=True, bold=True)
        tr.write_line("These peers are not installed, so the tests that need them did NOT run:",
                      red=True, bold=True)
        for name in sorted(peers.MISSING):
            tr.write_line(f"  - {name}", red=True)
        tr.write_line("Install them with: bash tests/run.sh", red=True, bold=True)
