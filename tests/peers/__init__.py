"""Real and fake peers the tests talk to.  Everything binds to 127.0.0.1.

A peer that is not installed is a loud skip on a developer's machine and a failure in CI
(CI=true), so nothing is silently left untested where the peers are supposed to be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess

import pytest

MISSING: set[str] = set()


def require_binary(name: str, package: str | None = None) -> str:
    """Return the path of executable ``name`` or skip (fail under CI) with a loud message."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    msg = f"PEER MISSING: {name} (Debian package {package or name}); run bash tests/run.sh to install it"
    MISSING.add(name)
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def tmpfs(mnt, size: str, what: str):
    """Mount a tmpfs of ``size`` (``24m``) at ``mnt`` for the block: root only; a loud skip
    elsewhere, a failure under CI (CI runs as root).  ``what`` names the tests that need it."""
    if os.geteuid() != 0:
        msg = f"PEER MISSING: a tmpfs mount needs root; {what} did not run"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        msg = f"cannot mount a tmpfs here ({r.stderr.strip()}); {what} did not run"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def require_module(name: str) -> None:
    try:
        __import__(name)
    except ImportError:
        msg = f"PEER MISSING: python module {name}; run bash tests/run.sh to install it"
        MISSING.add(name)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


class ChildProcess:
    """Lifetime of a peer that runs as a child process in ``self._proc``."""

    _proc: subprocess.Popen

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        """Stop the process (idempotent): TERM, then KILL after 5 s."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 20,
                 timeout_ends: bool = False) -> bytes:
    """Send raw ``data`` on a fresh connection, half-close, read until the server closes.

    A reset ends the answer.  A read timeout ends it too with ``timeout_ends``; otherwise
    it raises (for tests where a server that hangs is the finding).
    """
    ends: tuple = (ConnectionResetError, socket.timeout) if timeout_ends else (ConnectionResetError,)
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        with contextlib.suppress(OSError):
            s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ends:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()
