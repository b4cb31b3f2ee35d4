"""Links planted in the cache are never followed (issue 9, finding 2).

Whoever can write the cache directory (a compromised engine with the node's uid in another
mount namespace; anyone, when an old version made directories 0777 under umask 000) plants a
symbolic link at an ingest file, a blob, ``views/`` or a view, a lock file or a partial
download's directory.  The next ``pull``, ``gc``, ``rm`` or ``verify`` -- run by root on a
node -- must not write, create, chmod or delete anything outside the cache through it.  Each
test plants links to a *victim* directory outside the cache, runs the real commands against
real peers (nginx, docker-registry), and checks the victim is exactly as it was; then it
removes what is left of the plants and checks the cache still verifies.

At start-up a cache directory someone else could change (another user's, group- or
world-writable) or whose own directories are links is refused: one line, exit status 2.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from nekko_sm import cli
from nekko_sm import config as cfg
from nekko_sm.errors import UnsafeCacheDir, UnsafeCachePath
from nekko_sm.service import Service
from nekko_sm.store import Store, key_for, write_atomic
from nekko_sm.transfer import Transfer


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_service(cache: Path, *hosts: str) -> Service:
    config = cfg.build(
        {"cache_dir": str(cache), "insecure_registry": list(hosts), "platform": "linux/amd64"}, {}
    )
    return Service(config, transfer=Transfer(config, read_timeout=5.0, backoff=0.01))


@pytest.fixture
def victim(tmp_path):
    """A directory outside the cache with files and subdirectories; ``victim.intact()``
    says whether anything in it changed (names, modes, owners, bytes)."""
    d = tmp_path / "victim"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "secret").write_bytes(b"root's secret\n")
    os.chmod(d / "secret", 0o640)
    (d / "sub" / "keep.txt").write_bytes(b"keep me\n")
    (d / "sub" / "deeper" / "x").write_bytes(b"x" * 100)

    class Victim:
        path = d

        @staticmethod
        def snapshot() -> dict:
            out = {}
            for p in [d, *sorted(d.rglob("*"))]:
                st = os.lstat(p)
                body = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
                out[str(p.relative_to(d))] = (st.st_mode, st.st_uid, body)
            return out

    Victim.before = Victim.snapshot()
    Victim.intact = staticmethod(lambda: Victim.snapshot() == Victim.before)
    return Victim


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def run_cli(cache: Path, *args: str, hosts: tuple = ()) -> int:
    argv = ["--cache-dir", str(cache)]
    for h in hosts:
        argv += ["--insecure-registry", h]
    return cli.main(argv + list(args))


# --------------------------------------------------------------------------------------------
# a partial download's directory, its data file, its lock


def test_gc_never_descends_a_partial_download_that_is_a_link(cache, victim, nginx):
    svc = make_service(cache)
    try:
        svc.pull(nginx.put("links/one.bin", os.urandom(3000)))
        # ingest/KEY -> victim: the old gc took it for a stale partial, created victim/lock,
        # and removed everything in the victim.
        os.symlink(victim.path, svc.store.ingest_dir / key_for("url:http://x/stale"))
        assert run_cli(cache, "gc") == 0
        assert victim.intact()
        assert not os.path.lexists(svc.store.ingest_dir / key_for("url:http://x/stale"))
        assert run_cli(cache, "verify") == 0
    finally:
        svc.close()


def test_a_link_at_a_partial_download_is_never_written_through(cache, victim, nginx):
    data = os.urandom(50_000)
    url = nginx.put("links/data.bin", data)
    svc = make_service(cache)
    try:
        d = svc.store.ingest_path("url:" + svc.canonical(url))
        d.mkdir(parents=True)
        os.symlink(victim.path / "secret", d / "data")  # the old writer wrote the body there
        os.symlink(victim.path / "sub" / "keep.txt", d / "state.json")
        entry, created = svc.pull(url)
        assert created and Path(entry["path"]).read_bytes() == data
        assert victim.intact()
        assert svc.store.verify() == []
    finally:
        svc.close()


def test_links_at_lock_files_create_nothing_outside(cache, victim, nginx):
    url = nginx.put("links/locked.bin", os.urandom(4000))
    svc = make_service(cache)
    try:
        key = svc.canonical(url)
        # The pull's lock, the cache's .lock and the blob ingest's lock, each a link to a
        # file that does not exist yet: the old FileLock created it (as root: /etc/nologin).
        os.symlink(victim.path / "made-by-pull-lock", svc.pulls_dir / f"{key_for(key)}.lock")
        os.unlink(cache / ".lock")
        os.symlink(victim.path / "made-by-index-lock", cache / ".lock")
        ingest = svc.store.ingest_path("url:" + key)
        ingest.mkdir(parents=True)
        os.symlink(victim.path / "made-by-ingest-lock", ingest / "lock")
        _, created = svc.pull(url)
        assert created
        assert victim.intact(), sorted(os.listdir(victim.path))
        assert svc.store.verify() == []
        svc.remove(url)
        assert victim.intact()
    finally:
        svc.close()


def test_a_planted_write_atomic_temporary_is_not_written_through(cache, victim):
    store = Store(cache).init()
    tmp = cache / f".index.json.{os.getpid()}.{threading.get_ident()}.tmp"
    os.symlink(victim.path / "secret", tmp)
    write_atomic(store.index_path, b'{"schemaVersion": 2, "manifests": []}')
    assert victim.intact()
    assert not os.path.lexists(tmp)
    assert store.entries() == []


# --------------------------------------------------------------------------------------------
# blobs


def test_a_blob_that_is_a_link_is_neither_followed_nor_trusted(cache, victim, nginx):
    svc = make_service(cache)
    try:
        # 1. An unreferenced "blob" that is a link: gc removes the link (the old unlink
        #    chmodded the victim to 0600 first, through the link).
        stray = os.urandom(32).hex()
        os.symlink(victim.path / "secret", svc.store.blobs_dir / stray)
        assert run_cli(cache, "gc") == 0
        assert victim.intact()
        assert not os.path.lexists(svc.store.blobs_dir / stray)

        # 2. A link where the blob of what we are about to pull goes, to a file of the same
        #    size: the old commit took it for the blob and the entry pointed at the victim.
        data = b"s" * len((victim.path / "secret").read_bytes())
        url = nginx.put("links/same-size.bin", data)
        target = svc.store.blob_path(sha(data))
        os.symlink(victim.path / "secret", target)
        svc.pull(url)
        assert stat.S_ISREG(os.lstat(target).st_mode) and target.read_bytes() == data
        assert victim.intact()

        # 3. A referenced blob swapped for a link: verify reports it, --repair removes the
        #    link and the entry, never touching the victim.
        os.unlink(target)
        os.symlink(victim.path / "secret", target)
        assert run_cli(cache, "verify") == 1
        assert run_cli(cache, "verify", "--repair") == 1
        assert victim.intact()
        assert not os.path.lexists(target)
        assert run_cli(cache, "verify") == 0
    finally:
        svc.close()


def test_blobs_dir_that_is_a_link_receives_nothing(cache, victim, nginx):
    svc = make_service(cache)
    try:
        svc.pull(nginx.put("links/before.bin", os.urandom(1000)))
        real = cache / "blobs" / "sha256.real"
        os.replace(svc.store.blobs_dir, real)
        os.symlink(victim.path, svc.store.blobs_dir)  # blobs/sha256 -> victim (/etc/cron.d)
        with pytest.raises(UnsafeCachePath) as e:
            svc.pull(nginx.put("links/after.bin", os.urandom(2000)))
        assert str(cache) not in e.value.message
        assert run_cli(cache, "gc") == 2  # refused at start-up: nothing swept
        assert victim.intact()
        os.unlink(svc.store.blobs_dir)
        os.replace(real, svc.store.blobs_dir)
        assert run_cli(cache, "verify") == 0
    finally:
        svc.close()


# --------------------------------------------------------------------------------------------
# views


@pytest.fixture
def image(cache, registry, seeded):
    """(service, URL, view directory) of an image pulled into the cache."""
    svc = make_service(cache, registry.host)
    url = seeded["public/single:v1"].url
    try:
        entry, _ = svc.pull(url)  # an image: a view directory of named links
        view = Path(entry["path"])
        assert view.parent == svc.store.views_dir and view.is_dir()
        yield svc, url, view
    finally:
        svc.close()


def test_views_that_is_a_link_is_never_followed(cache, victim, registry, image):
    svc, url, view = image
    # views -> victim, with a directory in the victim named as the entry's view and one
    # named as no entry: the old gc removed every subdirectory of the victim, rm the
    # entry's, and the next pull built its view in the victim.
    os.replace(svc.store.views_dir, cache / "views.real")
    (victim.path / view.name).mkdir()
    victim.before = victim.snapshot()
    os.symlink(victim.path, svc.store.views_dir)

    svc.store.gc()
    assert victim.intact()
    svc.remove(url)
    assert victim.intact()
    with pytest.raises(UnsafeCachePath):
        svc.pull(url)
    assert victim.intact()
    assert run_cli(cache, "gc", hosts=(registry.host,)) == 2  # refused at start-up
    assert victim.intact()

    os.unlink(svc.store.views_dir)
    os.replace(cache / "views.real", svc.store.views_dir)
    entry, _ = svc.pull(url)
    assert Path(entry["path"]).is_dir()
    assert svc.store.verify() == []


def test_a_view_that_is_a_link_is_removed_not_descended(victim, image):
    svc, url, view = image
    for p in sorted(view.rglob("*"), reverse=True):
        os.unlink(p) if not p.is_dir() or p.is_symlink() else os.rmdir(p)
    os.rmdir(view)
    os.symlink(victim.path, view)  # views/KEY -> victim
    os.symlink(victim.path, svc.store.views_dir / ("f" * 32))  # a view no entry names
    svc.store.gc()
    assert victim.intact()
    assert not os.path.lexists(svc.store.views_dir / ("f" * 32))
    svc.remove(url)
    assert victim.intact() and not os.path.lexists(view)
    entry, _ = svc.pull(url)  # the view is built again, as a directory
    assert Path(entry["path"]).is_dir() and not Path(entry["path"]).is_symlink()
    assert svc.store.verify() == []


# --------------------------------------------------------------------------------------------
# start-up: a cache directory others could change is refused (sshd's StrictModes)


def test_start_up_refuses_a_cache_someone_else_could_change(cache, tmp_path, capsys):
    cache.mkdir(mode=0o755)
    assert run_cli(cache, "ls") == 0

    os.chmod(cache, 0o775)  # group-writable
    assert run_cli(cache, "ls") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "writable by group or others" in err
    os.chmod(cache, 0o1777)  # sticky does not help the cache directory itself
    assert run_cli(cache, "ls") == 2
    os.chmod(cache, 0o755)

    mode = stat.S_IMODE(os.stat(tmp_path).st_mode)
    os.chmod(tmp_path, 0o777)  # a directory above it, writable by all, not sticky
    try:
        assert run_cli(cache, "ls") == 2
        assert "above the cache" in capsys.readouterr().err
        os.chmod(tmp_path, 0o1777)  # sticky, like /tmp: fine
        assert run_cli(cache, "ls") == 0
    finally:
        os.chmod(tmp_path, mode)

    if os.geteuid() == 0:
        os.chown(cache, 65534, 65534)  # another user's
        try:
            assert run_cli(cache, "ls") == 2
            assert "owned by uid 65534" in capsys.readouterr().err
        finally:
            os.chown(cache, 0, 0)
    assert run_cli(cache, "ls") == 0
    assert run_cli(cache, "verify") == 0


@pytest.mark.parametrize(
    "where", ["views", "blobs", "blobs/sha256", "ingest", "ingest/leases", "ingest/pulls"]
)
def test_start_up_refuses_a_cache_whose_directories_are_links(cache, victim, where, capsys):
    Store(cache).init()
    (cache / "ingest" / "pulls").mkdir(exist_ok=True)
    os.rename(cache / where, cache / (where + ".moved"))
    os.symlink(victim.path, cache / where)
    with pytest.raises(UnsafeCacheDir):
        Store(cache).init()
    for command in (("gc",), ("ls",), ("verify",), ("pull", "http://127.0.0.1:9/x")):
        assert run_cli(cache, *command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and where in err, err
    assert victim.intact()
    os.unlink(cache / where)
    os.rename(cache / (where + ".moved"), cache / where)
    assert run_cli(cache, "verify") == 0


def test_everything_gets_its_mode_whatever_the_umask(tmp_path, nginx, registry, seeded):
    old = os.umask(0)
    try:
        cache = tmp_path / "new" / "cache"
        svc = make_service(cache, registry.host)
        try:
            svc.pull(nginx.put("links/umask.bin", os.urandom(5000)))
            svc.pull(seeded["public/single:v1"].url)
        finally:
            svc.close()
    finally:
        os.umask(old)
    for p in [tmp_path / "new", cache, *cache.rglob("*")]:
        st = os.lstat(p)
        if not stat.S_ISLNK(st.st_mode):
            assert not st.st_mode & 0o022, (p, oct(st.st_mode))
