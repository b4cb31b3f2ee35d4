"""Real and fake peers the tests talk to.  Everything binds to 127.0.0.1.

A peer that is not installed is a loud skip on a developer's machine and a failure in CI
(CI=true), so nothing is silently left untested where the peers are supposed to be.

This package imports pytest only where it skips or fails, so the benchmark (bench/) can use
the peers and the helpers here without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

P = TypeVar("P", bound="ChildProcess")
T = TypeVar("T")

MISSING: set[str] = set()


def _skip_or_fail(msg: str) -> NoReturn:
    """A loud skip, or a failure under CI (CI=true)."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def require_binary(name: str, package: str | None = None) -> str:
    """Return the path of executable ``name`` or skip (fail under CI) with a loud message."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path:
        return path
    msg = f"PEER MISSING: {name} (Debian package {package or name}); run bash tests/run.sh to install it"
    MISSING.add(name)
    _skip_or_fail(msg)


@contextlib.contextmanager
def tmpfs(mnt, size: str, what: str):
    """Mount a tmpfs of ``size`` (``24m``) at ``mnt`` for the block: root only; a loud skip
    elsewhere, a failure under CI (CI runs as root).  ``what`` names the tests that need it."""
    if os.geteuid() != 0:
        _skip_or_fail(f"PEER MISSING: a tmpfs mount needs root; {what} did not run")
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        _skip_or_fail(f"cannot mount a tmpfs here ({r.stderr.strip()}); {what} did not run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def require_module(name: str) -> None:
    try:
        __import__(name)
    except ImportError:
        MISSING.add(name)
        _skip_or_fail(f"PEER MISSING: python module {name}; run bash tests/run.sh to install it")


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


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports of 127.0.0.1 that were free a moment ago (now closed again)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pdeathsig() -> Any:
    """A preexec_fn that kills the child with its parent (Linux), so a crashed run leaves no
    orphan; None where that cannot work."""
    if threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG fires when the forking *thread* exits
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def spawn_logged(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with no stdin, its stdout and stderr to ``log``, dying with us."""
    with open(log, "wb") as out:
        # preexec_fn only calls prctl(PDEATHSIG), which Popen has no option for
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=pdeathsig(),  # noqa: PLW1509
        )


def start_on_free_ports(
    n: int,
    spawn: Callable[[list[int]], P],
    ready: Callable[[P], bool],
    errors: Callable[[P], str],
    *,
    failure: str,
    in_use: str = "in use",
    error: type[Exception] = RuntimeError,
    timeout: float = 10.0,
    poll: float = 0.02,
) -> P:
    """Start a child-process peer on ``n`` free ports, retrying with new ones (5 tries) while
    its error output says another process took one between the choice and the bind.

    ``spawn(ports)`` starts it; ``ready(peer)`` is polled until it answers (or the process
    exits, or ``timeout``); ``errors(peer)`` reads its error output once it did not start.
    Raises ``error`` with ``failure`` and that output.
    """
    last_error = ""
    for _attempt in range(5):
        peer = spawn(free_ports(n))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and peer.alive():
            if ready(peer):
                return peer
            time.sleep(poll)
        peer.stop()
        last_error = errors(peer)
        if in_use not in last_error:
            break
    raise error(f"{failure}:\n{last_error}")


def closing_all(start: Callable[..., T]) -> Iterator[Callable[..., T]]:
    """The body of a factory fixture: ``yield from closing_all(start)`` yields ``start``,
    remembering what it made, and closes every one of them after the test."""
    made: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> T:
        thing = start(*args, **kwargs)
        made.append(thing)
        return thing

    yield make
    for thing in made:
        thing.close()


def raw_exchange(
    host: str, port: int, data: bytes, timeout: float = 20, timeout_ends: bool = False
) -> bytes:
    """Send raw ``data`` on a fresh connection, half-close, read until the server closes.

    A reset ends the answer.  A read timeout ends it too with ``timeout_ends``; otherwise
    it raises (for tests where a server that hangs is the finding).
    """
    ends: tuple = (
        (ConnectionResetError, socket.timeout) if timeout_ends else (ConnectionResetError,)
    )
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
