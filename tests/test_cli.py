"""The CLI as users run it: the built .pyz in a subprocess (DESIGN section 6)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import require_binary

from nekko_sm import __version__, api
from nekko_sm.store import Store


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def run(pyz, tmp_path):
    cache = tmp_path / "cache"

    def run(*args, env=None, timeout=120, **kw):
        e = {k: v for k, v in os.environ.items()}
        e.update(env or {})
        return subprocess.run(
            [sys.executable, str(pyz), "--cache-dir", str(cache), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=e,
            cwd=tmp_path,
            check=False,
            **kw,
        )

    run.cache = cache
    return run


def test_version_from_another_directory(pyz, tmp_path):
    r = subprocess.run(
        [str(pyz), "--version"], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert r.returncode == 0 and r.stdout.strip() == f"nekko-sm {__version__}"


def test_pyz_is_reproducible(pyz):
    first = pyz.read_bytes()
    subprocess.run(
        [sys.executable, str(pyz.parent.parent / "build_zipapp.py")],
        check=True,
        capture_output=True,
    )
    assert pyz.read_bytes() == first


def test_pyz_vendors_pinned_dependencies(pyz):
    import zipfile

    with zipfile.ZipFile(pyz) as z:
        names = set(z.namelist())
    assert "urllib3/__init__.py" in names and "platformdirs/__init__.py" in names
    assert "licenses/urllib3/LICENSE.txt" in names
    assert any(n.startswith("licenses/platformdirs/") for n in names)
    assert "__main__.py" in names


def test_pull_status_path_ls_rm(run, nginx):
    data = os.urandom(2 << 20)
    url = nginx.put("cli.bin", data)
    r = run("pull", url)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.read_bytes() == data and path.name == sha(data)[7:]
    assert r.stderr == ""  # not a terminal: no progress bar, no noise
    nginx.clear_log()
    r = run("pull", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["digest"] == sha(data)
    assert nginx.requests_for("cli.bin") == []  # second pull transferred nothing
    assert run("status", url).returncode == 0
    assert run("path", url).stdout.strip() == str(path)
    ls = json.loads(run("ls", "--json").stdout)
    assert [e["url"] for e in ls] == [url]
    assert url in run("ls").stdout
    assert run("rm", url).returncode == 0
    assert not path.exists()
    assert run("status", url).returncode == 4
    assert run("path", url).returncode == 4
    assert run("rm", url).returncode == 4


def test_exit_codes_for_failures(run, nginx):
    r = run("pull", f"{nginx.url}/status/404")
    assert r.returncode == 1 and "not found" in r.stderr
    r = run("pull", "ftp://example.com/x")
    assert r.returncode == 2 and "unsupported" in r.stderr
    r = run("pull", nginx.put("d.bin", b"d"), "--digest", "sha256:bad")
    assert r.returncode == 2
    r = run("pull", nginx.put("d2.bin", b"d"), "--digest", sha(b"other"))
    assert r.returncode == 1 and "digest" in r.stderr
    r = run("--jobs", "0", "ls")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_verify_finds_damage(run, nginx):
    url = nginx.put("v.bin", b"verify me" * 1000)
    path = Path(run("pull", url).stdout.strip())
    assert run("verify").returncode == 0
    assert run("verify", url).returncode == 0
    os.chmod(path, 0o644)
    path.write_bytes(b"X" * path.stat().st_size)
    r = run("verify")
    assert r.returncode == 1 and "damaged" in r.stdout
    r = run("verify", "--repair")
    assert r.returncode == 1 and not path.exists()
    assert run("status", url).returncode == 4  # the damaged entry is gone ...
    assert run("pull", url).returncode == 0  # ... and pulling again heals it
    assert path.read_bytes() == b"verify me" * 1000
    assert run("verify").returncode == 0


def test_gc(run, nginx):
    url = nginx.put("gc.bin", b"gc")
    run("pull", url)
    orphan = run.cache / "blobs" / "sha256" / ("0" * 64)
    orphan.write_bytes(b"nothing points here")
    r = run("gc", "--dry-run")
    assert r.returncode == 0 and "would free 1 blobs" in r.stdout and orphan.exists()
    r = run("gc")
    assert "freed 1 blobs" in r.stdout and not orphan.exists()
    assert run("status", url).returncode == 0


def test_cache_is_valid_oci_layout_for_umoci(run, nginx):
    umoci = require_binary("umoci")
    url = nginx.put("umoci.bin", b"u" * 100)
    run("pull", url)
    r = subprocess.run(
        [umoci, "ls", "--layout", str(run.cache)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [url]


def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("jobs", ["1", "8"], ids=["one-stream", "ranged"])
def test_sigkill_midway_then_resume_fetches_only_the_rest(pyz, run, faulty, jobs):
    size = 64 << 20
    data = os.urandom(size)
    # Every answer stalls after 4 MiB: one stream stops at 4 MiB, eight ranged parts of
    # 8 MiB stop half-way each.
    url = faulty.add("big.bin", data, stall_after=4 << 20, stall_seconds=60, stall_times=None)
    proc = subprocess.Popen(
        [sys.executable, str(pyz), "--cache-dir", str(run.cache), "--jobs", jobs, "pull", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    want = (4 << 20) if jobs == "1" else size // 2
    try:
        assert _wait_for(lambda: Store(run.cache).partials_size() >= want, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.communicate()
    kept = Store(run.cache).partials_size()
    # Never a partial blob or index entry.
    assert list((run.cache / "blobs" / "sha256").iterdir()) == []
    assert json.loads((run.cache / "index.json").read_text())["manifests"] == []
    assert run("status", url).returncode == 3  # incomplete, resumable
    faulty.add("big.bin", data)  # healthy now
    faulty.clear_requests()
    r = run("--jobs", jobs, "pull", url)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == data
    refetched = faulty.body_bytes("big.bin", all_statuses=True)
    assert kept >= want and refetched == size - kept, (kept, refetched)
    assert run("verify").returncode == 0


# A service manager's soft limit, lower than serve needs: set, then the .pyz run in its place.
_LOW_FD_LIMIT = (
    "import os, resource, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1];"
    " resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard));"
    " os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)


def test_serve_raises_its_fd_limit_and_stops_cleanly_on_sigterm(pyz, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = api.FD_WANTED if hard == resource.RLIM_INFINITY else min(api.FD_WANTED, hard)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _LOW_FD_LIMIT,
            str(pyz),
            "--cache-dir",
            str(tmp_path / "c"),
            "--address",
            f"127.0.0.1:{port}",
            "serve",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        assert _wait_for(up, 15)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft.split()[3] == str(want), soft
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "serving on 127.0.0.1" in err and "stopped" in err


def test_serve_bad_address_exits_2(pyz, tmp_path):
    r = subprocess.run(
        [sys.executable, str(pyz), "--cache-dir", str(tmp_path), "--address", "127.0.0.1:99999"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2 and "port" in r.stderr


def test_runs_on_the_oldest_python_available(pyz, nginx, tmp_path):
    """The .pyz must run on 3.9; use the oldest interpreter on this machine."""
    candidates = [f"/root/.pyenv/versions/{v}/bin/python3" for v in ("3.9.18",)] + ["python3.9"]
    py = next((c for c in candidates if Path(c).exists()), None)
    if py is None:
        pytest.skip("no Python 3.9 on this machine; CI's vermin check covers syntax")
    url = nginx.put("py39.bin", b"3.9")
    r = subprocess.run(
        [py, str(pyz), "--cache-dir", str(tmp_path / "c"), "pull", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_progress_bar_only_on_a_terminal(pyz, faulty, tmp_path):
    import pty

    data = os.urandom(4 << 20)
    url = faulty.add("tty.bin", data, stall_after=1 << 20, stall_seconds=0.6)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, str(pyz), "--cache-dir", str(tmp_path / "c"), "pull", url],
            stdout=subprocess.PIPE,
            stderr=follower,
        )
        os.close(follower)
        out, _ = proc.communicate(timeout=60)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    assert proc.returncode == 0
    bar = b"".join(chunks).decode()
    assert "\r" in bar and "MiB" in bar and "100.0%" in bar
    assert Path(out.decode().strip()).read_bytes() == data
