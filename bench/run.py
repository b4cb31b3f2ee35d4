#!/usr/bin/env python3
"""nekko-sm benchmark: starts local peers and prints ratios measured in the same run.

    python3 bench/run.py                   # full run (~6-10 min), 1 GiB sizes
    python3 bench/run.py --quick           # 128 MiB sizes, fewer repetitions (~1.5-2 min)
    python3 bench/run.py --only 1,5        # some scenarios only
    python3 bench/run.py --size-mib 512    # another size for scenarios 1-4 and 6
    python3 bench/run.py --selftest        # scenario 1 at 8 MiB in a few seconds (CI smoke)
    python3 bench/run.py --baseline OLD.pyz  # also an older build, interleaved: before/after

Scenarios (see BENCHMARKS.md for targets and findings):

1. one file from an unthrottled nginx: ``nekko-sm pull`` (defaults, and ``--jobs 1``) vs
   ``curl -o`` (also ``&& sync f``) and ``aria2c -x16 -s16``; CPU seconds per GiB too;
2. a 256 MiB file behind nginx ``limit_rate 20m`` per connection (a CDN): the same tools,
   and ``aria2c -x16 -s16 -k1M`` (without ``-k1M`` aria2c splits no finer than 20 MiB);
3. an 8-layer image on a local docker-registry: ``nekko-sm pull oci://`` vs ``skopeo copy``;
4. an LFS file on the fake Hub: ``nekko-sm pull hf:///`` vs ``huggingface_hub.hf_hub_download``;
5. cache-hit API: ``nekko-sm serve`` with 10,000 entries under ``wrk -t2 -c32 -d10s``;
6. peak RSS of a pull and cold start of ``nekko-sm status URL``;
7. a repository of 200 small files on the fake Hub: ``nekko-sm pull hf:///ORG/NAME`` vs
   ``huggingface_hub.snapshot_download`` (requests counted at the fake Hub);
8. a model in a ModelPack tar layer on the docker-registry: ``pull`` (download, then unpack
   into one blob per file) vs ``pull`` of the same bytes as a raw layer, and the unpack alone.

Every tool runs as a fresh process, repetitions are interleaved (the order rotates each
round) and the page cache is flushed (``sync``) and the previous output deleted before each
timed run.  Times are medians with min-max spread; ratios are nekko's median over the peer's.
Every output is hashed after the timed part and compared with the source's sha256: a fast
wrong answer is reported as an error, not a win.

Results: a table on stdout, and ``bench/results.json`` + ``bench/results.md`` for a full run
(``bench/results-quick.*`` for ``--quick``, ``bench/results-partial.*`` with ``--only``;
``--out PREFIX`` to choose; the selftest and an interrupted run write nothing unless ``--out``
is given).  Exit status: 0 when every scenario ran and every output
verified (a missed performance target is not a failure), 1 otherwise, 130 on Ctrl-C.
Temporary directories are removed and every peer stopped at the end, on failure and on
Ctrl-C/SIGTERM too (``--keep`` keeps the work directory for a post-mortem).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import hashlib
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the peers (tests/peers/) work outside pytest
from peers import free_ports  # found through the path just set

MIB = 1 << 20
PY = sys.executable or "python3"
T0 = time.monotonic()


# --------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A tool failed or its output did not verify."""


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def rm(path: Path | str) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def settle(*paths: Path | str) -> None:
    """Delete the previous outputs and flush dirty pages so the next run starts clean."""
    for p in paths:
        rm(p)
    os.sync()


def free_port() -> int:
    return free_ports(1)[0]


def tail(text: str | bytes, n: int = 600) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return ("…" + text[-n:]) if len(text) > n else text


def run_timed(
    cmd: list, env: dict | None = None, timeout: float = 1800, cwd: Path | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``cmd`` to completion; (wall seconds, result).  Raises BenchError on failure.

    ``result.cpu_s`` is the user + system CPU seconds of the child and everything it waited
    for (getrusage of the children before and after; nothing else is reaped meanwhile)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # type: ignore[attr-defined]
    if r.returncode != 0:
        raise BenchError(
            f"{Path(str(cmd[0])).name} … exited {r.returncode}: {tail(r.stderr) or tail(r.stdout)}"
        )
    return dt, r


def write_random_file(path: Path, size: int, seed: int = 1) -> str:
    """``size`` pseudo-random bytes (incompressible) streamed to ``path``; returns sha256 hex."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    block = 16 * MIB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            data = rng.randbytes(n) if hasattr(rng, "randbytes") else os.urandom(n)
            f.write(data)
            h.update(data)
            left -= n
    return h.hexdigest()


@dataclass
class Stats:
    values: list

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def as_json(self) -> dict:
        return {
            "median": round(self.median, 4),
            "min": round(self.lo, 4),
            "max": round(self.hi, 4),
            "n": len(self.values),
            "runs": [round(v, 4) for v in self.values],
        }

    def fmt(self, unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
        m, lo, hi = self.median * scale, self.lo * scale, self.hi * scale
        if len(self.values) == 1:
            return f"{m:.{digits}f} {unit}"
        return f"{m:.{digits}f} {unit} ({lo:.{digits}f}–{hi:.{digits}f}, n={len(self.values)})"


@dataclass
class Row:
    id: str
    scenario: str
    nekko: str = "—"
    peers: list = field(default_factory=list)  # [(name, text)]
    ratios: list = field(default_factory=list)  # [(label, value)]
    target: str = ""
    checks: list = field(default_factory=list)  # [(label, ok)] decide the verdict
    info_checks: list = field(default_factory=list)  # [(label, ok)] reported only
    notes: list = field(default_factory=list)
    error: str | None = None
    data: dict = field(default_factory=dict)  # raw numbers for the JSON

    @property
    def verdict(self) -> str:
        if self.error and not self.checks:
            return "ERROR"
        if not self.checks:
            return "INFO"
        return "PASS" if all(ok for _, ok in self.checks) else "MISS"

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "scenario": self.scenario,
            "nekko": self.nekko,
            "peers": [{"tool": n, "time": t} for n, t in self.peers],
            "ratios": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.ratios},
            "target": self.target,
            "verdict": self.verdict,
            "checks": [{"check": c, "ok": ok} for c, ok in self.checks],
            "info_checks": [{"check": c, "ok": ok} for c, ok in self.info_checks],
            "notes": self.notes,
            "error": self.error,
            "data": self.data,
        }


def ratio_text(label: str, value: float) -> str:
    return f"{label} {value:.2f}×"


# --------------------------------------------------------------------------------------------
# the run context: work directory, the .pyz, peers to stop


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        base = args.workdir or None
        self.work = Path(tempfile.mkdtemp(prefix="nekko-bench.", dir=base))
        self.stack = contextlib.ExitStack()
        self.size = args.size_mib * MIB
        self.pyz = self.work / "nekko-sm.pyz"
        self.baseline = (
            self.work / "nekko-sm-before.pyz" if getattr(args, "baseline", None) else None
        )
        self._sources: dict[int, tuple[Path, str]] = {}
        self.keep: dict[str, Any] = {}  # state shared between scenarios (5 -> 6)

    # -- nekko ---------------------------------------------------------------------------
    def prepare_pyz(self) -> dict:
        subprocess.run(
            [PY, str(ROOT / "build_zipapp.py"), "--if-needed"],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        # A snapshot, so a rebuild by someone else during the run changes nothing here.
        shutil.copy2(ROOT / "dist" / "nekko-sm.pyz", self.pyz)
        info = {"pyz_sha256": sha256_file(self.pyz), "pyz_bytes": self.pyz.stat().st_size}
        with contextlib.suppress(Exception):
            info["git_head"] = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "nekko_sm"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split("\n")
            info["uncommitted_nekko_sm"] = [d.strip() for d in dirty if d.strip()]
        with contextlib.suppress(Exception):
            info["version"] = subprocess.run(
                [PY, str(self.pyz), "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
        if self.baseline is not None:
            shutil.copy2(self.args.baseline, self.baseline)
            info["baseline_pyz_sha256"] = sha256_file(self.baseline)
        return info

    def nekko(self, *args: str, cache: Path, pyz: Path | None = None) -> list:
        return [PY, str(pyz or self.pyz), "--cache-dir", str(cache), *args]

    def nekko_timed(
        self, args: list, cache: Path, env: dict, pyz: Path | None = None
    ) -> tuple[float, Any, float | None]:
        """Run nekko-sm once; (wall seconds, result, peak RSS in MiB or None)."""
        rss_file = self.work / "rss.txt"
        wrap = (
            ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)]
            if os.path.exists("/usr/bin/time")
            else []
        )
        dt, r = run_timed(wrap + self.nekko(*args, cache=cache, pyz=pyz), env=env)
        rss = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            rss = int(rss_file.read_text().split()[-1]) / 1024
        return dt, r, rss

    def nekko_env(self, **extra: str) -> dict:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NEKKO_", "STORAGE_MANAGER_", "HF_"))
            and k
            not in (
                "CACHE_DIR",
                "VERBOSE",
                "HTTP_PROXY",
                "HTTPS_PROXY",
                "http_proxy",
                "https_proxy",
            )
        }
        env.update(extra)
        return env

    # -- data ----------------------------------------------------------------------------
    def source(self, size: int | None = None) -> tuple[Path, str]:
        """A random file of ``size`` bytes (default ``--size-mib``; made once): (path, sha256)."""
        size = size or self.size
        if size not in self._sources:
            d = self.work / "data"
            d.mkdir(exist_ok=True)
            path = d / f"big-{size}.bin"
            log(f"writing a {size // MIB} MiB random source file")
            digest = write_random_file(path, size, seed=1 if size == self.size else size)
            self._sources[size] = (path, digest)
        return self._sources[size]

    def nginx(
        self,
        name: str,
        limit_rate: str | None = None,
        with_source: bool = True,
        size: int | None = None,
    ):
        from peers.nginx import start_nginx

        peer = start_nginx(self.work / name, limit_rate=limit_rate)
        self.stack.callback(peer.stop)
        if with_source:
            src, _ = self.source(size)
            dst = peer.root / "big.bin"
            os.link(src, dst)  # same bytes, no copy
        return peer

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            if self.args.keep:
                log(f"kept work directory {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# interleaved repetitions


@dataclass
class Tool:
    name: str
    fn: Callable[[int], dict]  # rep -> {metric: seconds}


def measure(tools: list[Tool], reps: int) -> tuple[dict[str, Stats], dict[str, str]]:
    """Run every tool ``reps`` times, interleaved, the order rotating each round.

    A tool that fails is not run again; its error is returned instead of its times.
    """
    values: dict[str, list] = {}
    errors: dict[str, str] = {}
    for rep in range(reps):
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
        for tool in order:
            if tool.name in errors:
                continue
            try:
                got = tool.fn(rep)
            except (BenchError, subprocess.TimeoutExpired, OSError) as e:
                errors[tool.name] = str(e)
                log(f"  {tool.name}: ERROR {tail(str(e), 300)}")
                continue
            for k, v in got.items():
                values.setdefault(k, []).append(v)
            log(
                f"  rep {rep + 1}/{reps} {tool.name}: "
                + ", ".join(
                    f"{k} {v:.1f}" if k.endswith("_mib") else f"{k} {v:.3f}s"
                    for k, v in got.items()
                )
            )
    return {k: Stats(v) for k, v in values.items()}, errors


def check_nekko_blob(stdout: str, cache: Path, want_hex: str) -> Path:
    """``nekko-sm pull`` printed the blob path; it must be the expected blob, bytes and all."""
    path = Path(stdout.strip().splitlines()[-1]) if stdout.strip() else None
    blob = cache / "blobs" / "sha256" / want_hex
    if path is None or path.resolve() != blob.resolve():
        raise BenchError(f"nekko-sm printed {stdout.strip()[:200]!r}, expected {blob}")
    got = sha256_file(blob)
    if got != want_hex:
        raise BenchError(f"nekko-sm's blob has sha256 {got}, expected {want_hex}")
    return blob


def check_file(path: Path, want_hex: str, who: str) -> None:
    got = sha256_file(path)
    if got != want_hex:
        raise BenchError(f"{who}'s download has sha256 {got}, expected {want_hex}")


# --------------------------------------------------------------------------------------------
# scenarios 1 and 2: one file over http


ARIA = ["-x16", "-s16"]  # aria2c's strongest documented split (16 connections per server)


def nekko_tools(
    ctx: Context,
    tag: str,
    args: list,
    check: Callable[[Any, Path], None],
    env: dict | None = None,
    jobs1: bool = False,
) -> list[Tool]:
    """nekko-sm with defaults, and (``jobs1``) with ``--jobs 1``, and the baseline build."""
    out = ctx.work / f"out-{tag}"
    out.mkdir(exist_ok=True)
    cache = out / "nekko-cache"
    env = env or ctx.nekko_env()

    def one(name: str, extra: list, pyz: Path | None) -> Tool:
        def fn(rep: int) -> dict:
            settle(cache)
            dt, r, rss = ctx.nekko_timed([*extra, *args], cache, env, pyz=pyz)
            check(r, cache)
            settle(cache)
            got = {name: dt, f"{name}_cpu": r.cpu_s}
            if rss and name == "nekko":
                got["nekko_rss_mib"] = rss
            return got

        return Tool(name, fn)

    tools = [one("nekko", [], None)]
    if jobs1:
        tools.append(one("nekko --jobs 1", ["--jobs", "1"], None))
    if ctx.baseline is not None:
        tools.append(one("nekko (before)", [], ctx.baseline))
    return tools


def file_tools(
    ctx: Context, url: str, want: str, tag: str, arias: dict, jobs1: bool = False
) -> list[Tool]:
    out = ctx.work / f"out-{tag}"
    out.mkdir(exist_ok=True)
    curl_f = out / "curl.bin"
    aria_f = out / "aria.bin"

    def curl(rep: int) -> dict:
        settle(curl_f)
        dt, r = run_timed(["curl", "-sS", "--fail", "-o", curl_f, url])
        t = time.perf_counter()
        subprocess.run(["sync", str(curl_f)], check=True)
        dts = dt + time.perf_counter() - t
        # What nekko-sm does and curl does not: check the bytes' sha256 (sha256sum, after).
        dh, rh = run_timed(["sha256sum", curl_f])
        check_file(curl_f, want, "curl")
        settle(curl_f)
        return {
            "curl": dt,
            "curl+sync": dts,
            "curl_cpu": r.cpu_s,
            "curl+sync+sha256sum": dts + dh,
            "curl+sha256sum_cpu": r.cpu_s + rh.cpu_s,
        }

    def aria(name: str, opts: list) -> Tool:
        def fn(rep: int) -> dict:
            settle(aria_f, str(aria_f) + ".aria2")
            dt, r = run_timed(
                [
                    "aria2c",
                    *opts,
                    "-q",
                    "--allow-overwrite=true",
                    "--auto-file-renaming=false",
                    "--file-allocation=none",
                    "--console-log-level=error",
                    "-d",
                    out,
                    "-o",
                    aria_f.name,
                    url,
                ]
            )
            t = time.perf_counter()
            subprocess.run(["sync", str(aria_f)], check=True)
            dts = dt + time.perf_counter() - t
            check_file(aria_f, want, "aria2c")
            settle(aria_f)
            return {name: dt, f"{name}+sync": dts, f"{name}_cpu": r.cpu_s}

        return Tool(name, fn)

    nekkos = nekko_tools(
        ctx,
        tag,
        ["pull", url],
        lambda r, cache: check_nekko_blob(r.stdout.decode(), cache, want),
        jobs1=jobs1,
    )
    return nekkos + [Tool("curl", curl)] + [aria(n, o) for n, o in arias.items()]


def cpu_per_gib(stats: dict, name: str, size: int) -> float | None:
    s = stats.get(f"{name}_cpu")
    return s.median / (size / (1 << 30)) if s else None


def cpu_note(row: Row, stats: dict, peer: str, size: int) -> None:
    """nekko's and ``peer``'s CPU seconds per GiB, side by side."""
    cpu, theirs = cpu_per_gib(stats, "nekko", size), cpu_per_gib(stats, peer, size)
    if cpu is not None and theirs is not None:
        row.nekko += f"; CPU {cpu:.2f} s/GiB"
        row.peers.append((f"{peer} CPU", f"{theirs:.2f} s/GiB"))


def before_after(row: Row, stats: dict) -> None:
    """The baseline build's time and the ratio, when --baseline was given."""
    if "nekko (before)" in stats and "nekko" in stats:
        row.peers.append(("nekko (before)", stats["nekko (before)"].fmt()))
        row.ratios.append(
            ("nekko/nekko (before)", stats["nekko"].median / stats["nekko (before)"].median)
        )


def rss_note(row: Row, stats: dict) -> None:
    if "nekko_rss_mib" in stats:
        r = stats["nekko_rss_mib"]
        row.notes.append(f"nekko-sm peak RSS {r.hi:.0f} MiB (min {r.lo:.0f}, /usr/bin/time)")


def peer_texts(stats: dict, names: list) -> list:
    return [(n, stats[n].fmt()) for n in names if n in stats]


def outcome(row: Row, stats: dict, errors: dict, size: int, peers: list) -> Stats | None:
    """What every row comparing nekko with peers says first: the ``peers``' times, the data,
    the failures (nekko's as the row's error, the others' as notes), nekko's time and speed
    over ``size`` bytes.  nekko's Stats, None when it has none."""
    row.peers = peer_texts(stats, peers)
    row.data = {k: v.as_json() for k, v in stats.items()}
    row.data["bytes"] = size
    if "nekko" in errors:
        row.error = errors["nekko"]
    for name, err in errors.items():
        if name != "nekko":
            row.notes.append(f"{name} failed: {tail(err, 300)}")
    if "nekko" not in stats:
        return None
    n = stats["nekko"]
    row.nekko = n.fmt() + f", {size / MIB / n.median:.0f} MiB/s"
    return n


def versus(
    row: Row, stats: dict, n: Stats, peer: str, size: int, factor: float, verified: str
) -> None:
    """nekko's time ``n`` judged against ``peer``'s (at most ``factor`` times it) and shown
    against ``peer``'s followed by a sync; CPU, the baseline build, the check that was made
    (``verified``) and the peak RSS in the notes."""
    for name, checks in ((peer, row.checks), (f"{peer}+sync", row.info_checks)):
        if name in stats:
            r = n.median / stats[name].median
            row.ratios.append((f"nekko/{name}", r))
            checks.append((f"nekko ≤ {factor}× {name}", r <= factor))
    cpu_note(row, stats, peer, size)
    before_after(row, stats)
    row.notes.append(verified)
    rss_note(row, stats)


def scenario1(ctx: Context, reps: int, label_size: str) -> list[Row]:
    peer = ctx.nginx("nginx1")
    _, want = ctx.source()
    url = f"{peer.url}/files/big.bin"
    log(f"scenario 1: {label_size} from unthrottled nginx, {reps} reps")
    stats, errors = measure(file_tools(ctx, url, want, "s1", {"aria2c": ARIA}, jobs1=True), reps)
    peer.stop()
    row = Row(
        "1",
        f"{label_size} file, unthrottled nginx: pull (defaults) vs curl,"
        " aria2c -x16 -s16, pull --jobs 1",
        target="≤ 1.1× curl time (judged vs `curl -o f && sync f`; nekko fsyncs);"
        " defaults ≤ --jobs 1; CPU s/GiB ≤ 1.3× curl's",
    )
    n = outcome(
        row,
        stats,
        errors,
        ctx.size,
        ["curl", "curl+sync", "curl+sync+sha256sum", "aria2c", "aria2c+sync", "nekko --jobs 1"],
    )
    if n is not None:
        for peer_name in (
            "curl",
            "curl+sync",
            "curl+sync+sha256sum",
            "aria2c",
            "aria2c+sync",
            "nekko --jobs 1",
        ):
            if peer_name in stats:
                row.ratios.append((f"nekko/{peer_name}", n.median / stats[peer_name].median))
        if "curl+sync+sha256sum" in stats:  # the peer that ends with verified bytes, as we do
            row.info_checks.append(
                (
                    "nekko ≤ 1.1× curl+sync+sha256sum",
                    n.median <= 1.1 * stats["curl+sync+sha256sum"].median,
                )
            )
        if "curl+sync" in stats:
            row.checks.append(
                ("nekko ≤ 1.1× curl+sync", n.median <= 1.1 * stats["curl+sync"].median)
            )
        if "nekko --jobs 1" in stats:
            row.checks.append(("defaults ≤ --jobs 1", n.median <= stats["nekko --jobs 1"].median))
        cpu, cpu_curl = cpu_per_gib(stats, "nekko", ctx.size), cpu_per_gib(stats, "curl", ctx.size)
        if cpu is not None and cpu_curl:
            row.nekko += f"; CPU {cpu:.2f} s/GiB"
            row.peers.append(("curl CPU", f"{cpu_curl:.2f} s/GiB"))
            row.ratios.append(("CPU nekko/curl", cpu / cpu_curl))
            row.checks.append(("CPU s/GiB ≤ 1.3× curl", cpu <= 1.3 * cpu_curl))
            cpu_verified = cpu_per_gib(stats, "curl+sha256sum", ctx.size)
            if cpu_verified:
                row.peers.append(("curl+sha256sum CPU", f"{cpu_verified:.2f} s/GiB"))
                row.ratios.append(("CPU nekko/(curl+sha256sum)", cpu / cpu_verified))
                row.info_checks.append(
                    ("CPU s/GiB ≤ 1.3× curl+sha256sum", cpu <= 1.3 * cpu_verified)
                )
            row.data["cpu_s_per_gib"] = {
                k: round(cpu_per_gib(stats, k, ctx.size) or 0, 3)
                for k in (
                    "nekko",
                    "nekko --jobs 1",
                    "nekko (before)",
                    "curl",
                    "curl+sha256sum",
                    "aria2c",
                )
                if f"{k}_cpu" in stats
            }
        if "curl" in stats:
            row.info_checks.append(
                ("nekko ≤ 1.1× bare curl (no sync)", n.median <= 1.1 * stats["curl"].median)
            )
        before_after(row, stats)
        row.notes.append("every output's sha256 matched the source")
        rss_note(row, stats)
    return [row]


def scenario2(ctx: Context, reps: int, label_size: str) -> list[Row]:
    size = ctx.args.throttled_mib * MIB
    label = f"{ctx.args.throttled_mib} MiB" if size != 1 << 30 else "1 GiB"
    peer = ctx.nginx("nginx2", limit_rate="20m", size=size)
    _, want = ctx.source(size)
    url = f"{peer.url}/files/big.bin"
    log(f"scenario 2: {label} behind limit_rate 20m, {reps} reps")
    arias = {"aria2c": ARIA, "aria2c -k1M": [*ARIA, "-k1M"]}
    stats, errors = measure(file_tools(ctx, url, want, "s2", arias), reps)
    peer.stop()
    row = Row(
        "2",
        f"{label} file, nginx limit_rate 20m/connection: pull (defaults) vs curl, aria2c -x16 -s16",
        target="≤ 1.0× aria2c -x16 -s16 time and speed ≥ 6× curl",
    )
    n = outcome(row, stats, errors, size, ["curl", "aria2c", "aria2c -k1M"])
    if n is not None:
        if "curl" in stats:
            speedup = stats["curl"].median / n.median
            row.ratios.append(("speed nekko/curl", speedup))
            row.checks.append(("speed ≥ 6× curl", speedup >= 6))
        for name, label, judged in (
            ("aria2c", "aria2c -x16 -s16", True),
            ("aria2c -k1M", "aria2c -x16 -s16 -k1M", False),
        ):
            if name in stats:
                r = n.median / stats[name].median
                row.ratios.append((f"nekko/{label}", r))
                (row.checks if judged else row.info_checks).append((f"≤ 1.0× {label}", r <= 1))
        cpu = cpu_per_gib(stats, "nekko", size)
        if cpu is not None:
            row.nekko += f"; CPU {cpu:.2f} s/GiB"
        before_after(row, stats)
        row.notes.append("every output's sha256 matched the source")
        row.notes.append(
            "aria2c -x16 -s16 splits no finer than its -k (20 MiB): 8 connections"
            " for 256 MiB; -k1M lets it open all 16"
        )
        rss_note(row, stats)
    return [row]


# --------------------------------------------------------------------------------------------
# scenario 3: an image from a docker-registry


def scenario3(ctx: Context, reps: int, label_size: str) -> list[Row]:
    from peers.images import push_image
    from peers.registry import start_registry

    row = Row(
        "3",
        f"{label_size} 8-layer image, local docker-registry: pull oci:// vs skopeo copy",
        target="≤ 0.8× skopeo time",
    )
    log("scenario 3: starting docker-registry and pushing the image")
    peer = start_registry(str(ctx.work / "registry"))
    ctx.stack.callback(peer.close)
    layer = ctx.size // 8
    t = time.perf_counter()
    info = push_image(
        peer,
        "bench/big:v1",
        layer_sizes=[layer] * 8,
        seed="bench",
        workdir=str(ctx.work / "images"),
        keep_layout=False,
    )
    log(
        f"  pushed in {time.perf_counter() - t:.1f}s: {len(info.layers)} layers,"
        f" {info.total_size / MIB:.0f} MiB"
    )
    # Both clients talk to the registry itself, not the counting proxy (a Python relay
    # that would measure itself, not the clients).
    host = peer.registry_host
    ref = f"{host}/bench/big:v1"
    want = {d["digest"]: d["size"] for d in info.layers}
    want[info.config_digest] = info.config_size
    out = ctx.work / "out-s3"
    out.mkdir(exist_ok=True)
    sko_dir = out / "skopeo-layout"
    no_auth = out / "no-auth.json"

    def verify_layout(root: Path, who: str) -> None:
        for digest, size in want.items():
            p = root / "blobs" / "sha256" / digest.split(":", 1)[1]
            if not p.exists() or p.stat().st_size != size:
                raise BenchError(f"{who}: blob {digest} missing or of the wrong size in {root}")
            if sha256_file(p) != digest.split(":", 1)[1]:
                raise BenchError(f"{who}: blob {digest} does not hash to its digest")

    nekkos = nekko_tools(
        ctx,
        "s3",
        ["--insecure-registry", host, "pull", f"oci://{ref}"],
        lambda r, c: verify_layout(c, "nekko-sm"),
    )

    def skopeo(rep: int) -> dict:
        settle(sko_dir)
        env = dict(os.environ, REGISTRY_AUTH_FILE=str(no_auth))
        dt, r = run_timed(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--src-no-creds",
                f"docker://{ref}",
                f"oci:{sko_dir}:v1",
            ],
            env=env,
        )
        t = time.perf_counter()
        os.sync()
        dts = dt + time.perf_counter() - t
        verify_layout(sko_dir, "skopeo")
        settle(sko_dir)
        return {"skopeo": dt, "skopeo+sync": dts, "skopeo_cpu": r.cpu_s}

    log(f"scenario 3: {reps} reps")
    stats, errors = measure([*nekkos, Tool("skopeo", skopeo)], reps)
    peer.close()
    n = outcome(row, stats, errors, info.total_size, ["skopeo", "skopeo+sync"])
    row.data["layers"] = [d["size"] for d in info.layers]
    if n is not None:
        versus(
            row,
            stats,
            n,
            "skopeo",
            info.total_size,
            0.8,
            "every layer and the config verified by sha256 in both layouts",
        )
    return [row]


# --------------------------------------------------------------------------------------------
# scenario 4: an LFS file from the fake Hub


def hub_script(name: str, args: str) -> str:
    """A script that imports ``name`` from huggingface_hub, calls it with ``args`` and prints
    the path it returns, and on stderr the seconds the import and the call took."""
    return (
        f"\nimport sys, time\nt0 = time.perf_counter()\nfrom huggingface_hub import {name}\n"
        f"t1 = time.perf_counter()\np = {name}({args})\nt2 = time.perf_counter()\nprint(p)\n"
        'print(f"import {t1 - t0:.3f} download {t2 - t1:.3f}", file=sys.stderr)\n'
    )


HF_SCRIPT = hub_script("hf_hub_download", "repo_id=sys.argv[1], filename=sys.argv[2]")


class _CdnEtagCache:
    """Stands in for ``hashlib`` inside tests/peers/fakehub.py: the same module, except that
    ``md5`` of a large object is computed once and remembered.

    The fake CDN answers every request with an S3-style ETag that it computes as the MD5 of
    the WHOLE file, per request (1.5-2 s of CPU for 1 GiB on this machine).  A client that
    fetches a file in 32 ranged parts then makes the peer hash 32 GiB, and the benchmark
    measures the peer's CPU instead of the client.  A real CDN stores its ETag; so does this
    cache (bench-only, applied to both clients alike; see BENCHMARKS.md)."""

    def __init__(self, real) -> None:
        self._real = real
        self._memo: dict = {}
        self._lock = threading.Lock()
        self.hits = 0

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def md5(self, data=b"", **kw):
        if len(data) < (1 << 20):
            return self._real.md5(data, **kw)
        key = (id(data), len(data))
        with self._lock:  # held while hashing: concurrent first requests hash once
            got = self._memo.get(key)
            if got is not None and got[0] is data:
                self.hits += 1
                return got[1].copy()
            h = self._real.md5(data, **kw)
            self._memo[key] = (data, h.copy())  # keeps ``data`` alive: its id stays unique
        return h


def scenario4(ctx: Context, reps: int, label_size: str) -> list[Row]:
    import peers.fakehub as fakehub_module
    from peers.fakehub import start_fakehub

    etag_cache = None
    if not ctx.args.raw_fakehub:
        etag_cache = _CdnEtagCache(hashlib)
        fakehub_module.hashlib = etag_cache  # type: ignore[assignment]
        ctx.stack.callback(setattr, fakehub_module, "hashlib", hashlib)

    row = Row(
        "4",
        f"{label_size} LFS file, fake Hub + CDN: pull hf:/// vs hf_hub_download",
        target="≤ 0.8× hf_hub_download time",
    )
    src, want = ctx.source()
    log("scenario 4: starting the fake Hub")
    hub = start_fakehub()
    ctx.stack.callback(hub.close)
    hub.add_repo("bench/model", files={"model.gguf": src.read_bytes()})
    if etag_cache is not None:
        etag_cache.md5(hub.blob("bench/model", "model.gguf").data)  # before any timing
    hub_host = hub.endpoint.split("://", 1)[1]
    out = ctx.work / "out-s4"
    out.mkdir(exist_ok=True)
    hf_home = out / "hf-home"
    script = out / "hf_download.py"
    script.write_text(HF_SCRIPT)
    inner: list = []

    nekkos = nekko_tools(
        ctx,
        "s4",
        ["--insecure-registry", hub_host, "pull", "hf:///bench/model/model.gguf"],
        lambda r, c: check_nekko_blob(r.stdout.decode(), c, want),
        env=ctx.nekko_env(HF_ENDPOINT=hub.endpoint),
    )

    def hf(rep: int) -> dict:
        settle(hf_home)
        env = ctx.nekko_env(
            HF_HOME=str(hf_home),
            HF_ENDPOINT=hub.endpoint,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_XET="1",
        )  # the fake Hub serves no Xet CAS
        dt, r = run_timed([PY, script, "bench/model", "model.gguf"], env=env)
        m = re.search(r"import ([\d.]+) download ([\d.]+)", r.stderr.decode())
        if m:
            inner.append((float(m.group(1)), float(m.group(2))))
        t = time.perf_counter()
        os.sync()
        dts = dt + time.perf_counter() - t
        check_file(Path(r.stdout.decode().strip().splitlines()[-1]), want, "hf_hub_download")
        settle(hf_home)
        return {"hf_hub_download": dt, "hf_hub_download+sync": dts, "hf_hub_download_cpu": r.cpu_s}

    log(f"scenario 4: {reps} reps")
    stats, errors = measure([*nekkos, Tool("hf_hub_download", hf)], reps)
    hub.close()
    cdn_gets = sum(1 for r in hub.log("cdn") if r.method == "GET")
    if etag_cache is not None:
        row.notes.append(
            "the fake CDN's per-request MD5 of the whole file (its ETag) is"
            " computed once per file for this run (bench-side cache, both"
            f" clients alike; {cdn_gets} CDN GETs in all);"
            " --raw-fakehub measures without it"
        )
    else:
        row.notes.append(
            f"raw fake Hub: every one of the {cdn_gets} CDN GETs made the peer MD5 the whole file"
        )
    n = outcome(row, stats, errors, ctx.size, ["hf_hub_download", "hf_hub_download+sync"])
    row.data["cdn_gets"] = cdn_gets
    if inner:
        row.data["hf_import_s"] = Stats([a for a, _ in inner]).as_json()
        row.notes.append(
            f"hf_hub_download's process includes ~{Stats([a for a, _ in inner]).median:.2f} s"
            " of `import huggingface_hub`"
        )
    if n is not None:
        versus(
            row,
            stats,
            n,
            "hf_hub_download",
            ctx.size,
            0.8,
            "both outputs' sha256 matched the source",
        )
    return [row]


SNAPSHOT_SCRIPT = hub_script("snapshot_download", "repo_id=sys.argv[1], cache_dir=sys.argv[2]")


def small_repo_files(n: int = 200) -> dict[str, bytes]:
    """``n`` small regular (git, non-LFS) files in a few directories: configs, tokenizers,
    code, as a repository of many small files holds them (200 B to ~8 KB, deterministic)."""
    out = {}
    for i in range(n):
        size = 200 + (i * 397) % 8000
        body = hashlib.sha256(b"small%d" % i).hexdigest().encode() * (size // 64 + 1)
        out[f"part{i % 8}/file{i:03}.{('json', 'txt', 'py', 'md')[i % 4]}"] = body[:size]
    return out


def scenario7(ctx: Context, reps: int) -> list[Row]:
    from peers.fakehub import start_fakehub

    files = small_repo_files()
    total = sum(len(v) for v in files.values())
    row = Row(
        "7",
        f"{len(files)} small files ({total // 1024} KiB), fake Hub: pull hf:///ORG/NAME"
        " vs snapshot_download",
        target="≤ 0.5× snapshot_download time",
    )
    log("scenario 7: starting the fake Hub")
    hub = start_fakehub()
    ctx.stack.callback(hub.close)
    hub.add_repo("bench/small-files", files=files)
    want = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    hub_host = hub.endpoint.split("://", 1)[1]
    out = ctx.work / "out-s7"
    out.mkdir(exist_ok=True)
    cache, hf_home = out / "nekko-cache", out / "hf-home"
    script = out / "snapshot.py"
    script.write_text(SNAPSHOT_SCRIPT)
    requests: dict[str, list] = {"nekko": [], "snapshot_download": []}

    def check_tree(root: Path, who: str) -> None:
        got = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        if got != set(want):
            raise BenchError(f"{who}: {len(got)} files, expected {len(want)}")
        for name, digest in want.items():
            check_file(root / name, digest, who)

    def nekko(rep: int) -> dict:
        settle(cache)
        hub.clear_log()
        env = ctx.nekko_env(HF_ENDPOINT=hub.endpoint)
        dt, r, rss = ctx.nekko_timed(
            ["--insecure-registry", hub_host, "pull", "hf:///bench/small-files"], cache, env
        )
        if r.returncode != 0:
            raise BenchError(f"nekko-sm failed: {tail(r.stderr)}")
        requests["nekko"].append(len(hub.log()))
        check_tree(Path(r.stdout.decode().strip().splitlines()[-1]), "nekko-sm")
        settle(cache)
        return {"nekko": dt, **({"nekko_rss_mib": rss} if rss else {})}

    def snapshot(rep: int) -> dict:
        settle(hf_home)
        hub.clear_log()
        env = ctx.nekko_env(
            HF_HOME=str(hf_home),
            HF_ENDPOINT=hub.endpoint,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_XET="1",
        )  # the fake Hub serves no Xet CAS
        dt, r = run_timed([PY, script, "bench/small-files", str(hf_home / "hub")], env=env)
        if r.returncode != 0:
            raise BenchError(f"snapshot_download failed: {tail(r.stderr)}")
        requests["snapshot_download"].append(len(hub.log()))
        check_tree(Path(r.stdout.decode().strip().splitlines()[-1]), "snapshot_download")
        settle(hf_home)
        return {"snapshot_download": dt}

    log(f"scenario 7: {reps} reps")
    stats, errors = measure([Tool("nekko", nekko), Tool("snapshot_download", snapshot)], reps)
    row.peers = peer_texts(stats, ["snapshot_download"])
    row.data = {k: v.as_json() for k, v in stats.items()}
    row.data.update(
        files=len(files),
        bytes=total,
        requests_per_pull={k: v[0] if v else None for k, v in requests.items()},
    )
    if "nekko" in errors:
        row.error = errors["nekko"]
    if "snapshot_download" in errors:
        row.notes.append(f"snapshot_download failed: {tail(errors['snapshot_download'], 300)}")
    if "nekko" in stats:
        row.nekko = stats["nekko"].fmt()
        if "snapshot_download" in stats:
            r = stats["nekko"].median / stats["snapshot_download"].median
            row.ratios.append(("nekko/snapshot_download", r))
            row.checks.append(("nekko ≤ 0.5× snapshot_download", r <= 0.5))
        n, h = requests["nekko"], requests["snapshot_download"]
        if n and h:
            row.notes.append(
                f"requests at the fake Hub per pull: nekko {n[0]}, snapshot_download"
                f" {h[0]} (it HEADs each file, then GETs it)"
            )
        row.notes.append("every file of both trees matched its sha256")
        rss_note(row, stats)
    return [row]


# --------------------------------------------------------------------------------------------
# scenario 5: the cache-hit API under wrk

WRK_LUA = r"""
-- GET /content/B64 of a random entry; the paths file is the script's argument.
local paths = {}
local counter = 0
setup = function(thread)
  counter = counter + 1
  thread:set("id", counter)
end
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  math.randomseed(os.time() * 100 + (id or 0))
end
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""

A_SOURCE_URL = "io.nekko.source.url"
A_ETAG = "io.nekko.source.etag"
A_DIGEST = "io.nekko.digest"
REF_NAME = "org.opencontainers.image.ref.name"
TITLE = "org.opencontainers.image.title"


def b64(url: str) -> str:
    return base64.b64encode(url.encode()).decode()


def http_call(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 30
) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def build_entries(ctx: Context, cache: Path, peer, n: int) -> list[tuple[str, str]]:
    """Make ``n`` complete entries: one real pull, then n-1 more shaped exactly like it.

    The first file is pulled by ``nekko-sm pull`` (so the format is nekko's own); the others
    are written straight into the layout from that template (blob files + one index.json
    write, under the cache's .lock) -- adding 10,000 entries one by one through the API
    rewrites index.json 10,000 times, which is measured separately.  Every synthetic entry
    is a real, content-addressed file that nginx also serves.  Returns [(url, file digest)].
    """

    def data_of(i: int) -> bytes:
        return f"nekko bench tiny file {i}\n".encode()

    urls = []
    for i in range(n):
        (peer.root / f"tiny-{i:05d}").write_bytes(data_of(i))
        urls.append(f"{peer.url}/files/tiny-{i:05d}")
    run_timed(ctx.nekko("pull", urls[0], cache=cache), env=ctx.nekko_env())
    index_path = cache / "index.json"
    index = json.loads(index_path.read_text())
    (template,) = index["manifests"]
    blobs = cache / "blobs" / "sha256"
    tman = json.loads((blobs / template["digest"].split(":", 1)[1]).read_bytes())
    if len(tman.get("layers", [])) != 1:
        raise BenchError(f"unexpected template manifest: {tman}")
    out = [(urls[0], template["annotations"].get(A_DIGEST, ""))]
    manifests = [template]
    for i in range(1, n):
        data = data_of(i)
        fhex = hashlib.sha256(data).hexdigest()
        (blobs / fhex).write_bytes(data)
        man = json.loads(json.dumps(tman))
        layer = man["layers"][0]
        layer["digest"], layer["size"] = "sha256:" + fhex, len(data)
        layer.setdefault("annotations", {})[TITLE] = f"tiny-{i:05d}"
        ann = man.setdefault("annotations", {})
        ann[A_SOURCE_URL] = urls[i]
        ann.pop(A_ETAG, None)
        mdata = json.dumps(man, sort_keys=True, separators=(",", ":")).encode()
        mhex = hashlib.sha256(mdata).hexdigest()
        (blobs / mhex).write_bytes(mdata)
        desc = json.loads(json.dumps(template))
        desc["digest"], desc["size"] = "sha256:" + mhex, len(mdata)
        desc["annotations"][REF_NAME] = urls[i]
        desc["annotations"][A_DIGEST] = "sha256:" + fhex
        manifests.append(desc)
        out.append((urls[i], "sha256:" + fhex))
    for p in blobs.iterdir():
        with contextlib.suppress(OSError):
            os.chmod(p, 0o444)
    manifests.sort(key=lambda d: d["annotations"].get(REF_NAME, ""))
    index["manifests"] = manifests
    import fcntl

    with open(cache / ".lock", "a+") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        tmp = index_path.with_name(".index.json.bench.tmp")
        tmp.write_bytes(json.dumps(index, indent=1, sort_keys=True).encode())
        os.replace(tmp, index_path)
    os.sync()
    return out


def parse_wrk(text: str) -> dict:
    def ms(v: str, unit: str) -> float:
        return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    out: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
        out[f"p{pct}_ms"] = ms(m.group(1), m.group(2)) if m else None
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:\s+(.*)", text)
    out["socket_errors"] = m.group(1).strip() if m else ""
    return out


def start_serve(
    ctx: Context,
    cache: Path,
    name: str,
    timeout: float = 20,
) -> tuple[subprocess.Popen, int, Callable[[], None]]:
    """``nekko-sm serve`` on a free port, answering /healthz: (process, port, stop)."""
    port = free_port()
    log_path = ctx.work / f"{name}.log"
    logf = open(log_path, "wb")  # noqa: SIM115 - closed by stop
    proc = subprocess.Popen(
        ctx.nekko("--address", f"127.0.0.1:{port}", "serve", cache=cache),
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=logf,
        env=ctx.nekko_env(),
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        logf.close()

    ctx.stack.callback(stop)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_call(port, "GET", "/healthz", timeout=2)[0] == 200:
                return proc, port, stop
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"nekko-sm serve did not come up: {tail(log_path.read_bytes())}")
        time.sleep(0.05)


def scenario5(ctx: Context, runs: int, duration: int, entries: int = 10_000) -> list[Row]:
    row = Row(
        "5",
        f"cache-hit API: serve with {entries:,} entries, wrk -t2 -c32 GET /content/B64",
        target="≥ 3,000 GET/s and p99 < 10 ms",
    )
    peer = ctx.nginx("nginx5", with_source=False)
    cache = ctx.work / "cache-s5"
    log(f"scenario 5: building {entries:,} entries")
    t = time.perf_counter()
    items = build_entries(ctx, cache, peer, entries)
    row.data["build_s"] = round(time.perf_counter() - t, 2)
    row.data["index_json_bytes"] = (cache / "index.json").stat().st_size
    ctx.keep["s5"] = (cache, items)
    # the CLI sees them
    for url, _ in random.sample(items, 3):
        run_timed(ctx.nekko("status", url, cache=cache), env=ctx.nekko_env())

    _, port, stop_server = start_serve(ctx, cache, "serve5")

    # correctness first: random entries answer 200 with the right digest
    t = time.perf_counter()
    sample = random.sample(items, 100)
    for url, digest in sample:
        status, body = http_call(port, "GET", "/content/" + b64(url))
        doc = json.loads(body)
        if status != 200 or doc.get("digest") != digest or doc.get("state") != "complete":
            raise BenchError(f"GET {url}: {status} {body[:200]!r}")
    seq_ms = (time.perf_counter() - t) / len(sample) * 1e3
    row.data["sequential_get_ms_incl_connect"] = round(seq_ms, 3)

    paths = ctx.work / "paths.txt"
    paths.write_text("".join(f"/content/{b64(u)}\n" for u, _ in items))
    lua = ctx.work / "get.lua"
    lua.write_text(WRK_LUA)
    results = []
    for i in range(runs):
        log(f"  wrk run {i + 1}/{runs} ({duration}s)")
        _, r = run_timed(
            [
                "wrk",
                "-t2",
                "-c32",
                f"-d{duration}s",
                "--latency",
                "-s",
                lua,
                f"http://127.0.0.1:{port}",
                "--",
                paths,
            ],
            timeout=duration + 60,
        )
        w = parse_wrk(r.stdout.decode())
        log(
            f"    {w['rps']} req/s, p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms,"
            f" non-2xx {w['non2xx']}"
        )
        results.append(w)
    bad = sum(w["non2xx"] for w in results)
    if bad or any(w["rps"] is None for w in results):
        row.error = f"{bad} non-2xx answers under load"
    during = hits_during_a_pull(ctx, peer, port, lua, paths, duration)
    row.data["during_1gib_pull"] = during
    row.checks.append(("p99 < 25 ms during a 1 GiB pull", during["wrk"]["p99_ms"] < 25))

    # what adding one more entry costs at this index size (index.json is rewritten whole)
    add_ms = []
    for j in range(10):
        body = json.dumps({"url": peer.put(f"tiny-new-{j}", f"new {j}\n".encode())}).encode()
        t = time.perf_counter()
        status, resp = http_call(port, "POST", "/content/", body)
        add_ms.append((time.perf_counter() - t) * 1e3)
        if status not in (200, 201):
            row.notes.append(f"POST of a new entry answered {status}: {resp[:200]!r}")
            break
    stop_server()
    peer.stop()

    rps = Stats([w["rps"] for w in results if w["rps"] is not None])
    p99 = Stats([w["p99_ms"] for w in results if w["p99_ms"] is not None])
    p50 = Stats([w["p50_ms"] for w in results if w["p50_ms"] is not None])
    row.nekko = (
        f"{rps.median:,.0f} GET/s ({rps.lo:,.0f}–{rps.hi:,.0f}); "
        f"p50 {p50.median:.2f} ms, p99 {p99.median:.2f} ms ({p99.lo:.2f}–{p99.hi:.2f})"
    )
    row.checks.append(("≥ 3,000 GET/s", rps.median >= 3000))
    row.checks.append(("p99 < 10 ms", p99.median < 10))
    row.data.update(
        {
            "wrk": results,
            "rps": rps.as_json(),
            "p99_ms": p99.as_json(),
            "p50_ms": p50.as_json(),
            "add_entry_ms": Stats(add_ms).as_json(),
        }
    )
    row.notes.append(
        f"entries: 1 real `nekko-sm pull` + {entries - 1:,} written from its"
        f" template in {row.data['build_s']} s (index.json"
        f" {row.data['index_json_bytes'] / MIB:.1f} MiB); 100 random GETs"
        " checked for 200 + digest before the load; 0 non-2xx under load"
        if not bad
        else ""
    )
    row.notes.append(
        f"POST of one new entry at {entries:,} entries: median {Stats(add_ms).median:.0f} ms"
    )
    w = during["wrk"]
    row.notes.append(
        f"while the same server pulls 1 GiB from nginx: {w['rps']:,.0f} GET/s, p50"
        f" {w['p50_ms']} ms, p99 {w['p99_ms']} ms (the pull took {during['pull_s']} s,"
        f" {'the whole' if during['overlapped'] else 'NOT the whole'} wrk run)"
    )
    return [row]


def hits_during_a_pull(
    ctx: Context, peer, port: int, lua: Path, paths: Path, duration: int
) -> dict:
    """wrk on the cached entries while the same server pulls 1 GiB (issue 11: p99 < 25 ms)."""
    src, _ = ctx.source(1 << 30)
    os.link(src, peer.root / "big-during.bin")
    body = json.dumps({"url": f"{peer.url}/files/big-during.bin"}).encode()
    done: dict = {}

    def pull() -> None:
        t = time.perf_counter()
        done["status"] = http_call(port, "POST", "/content/", body, timeout=600)[0]
        done["end"], done["pull_s"] = time.perf_counter(), round(time.perf_counter() - t, 2)

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    time.sleep(0.5)  # the pull is under way
    duration = min(duration, 5)  # within the pull: 1 GiB takes 7-15 s here
    log(f"  wrk during a 1 GiB pull ({duration}s)")
    cmd = ["wrk", "-t2", "-c32", f"-d{duration}s", "--latency", "-s", lua]
    _, r = run_timed([*cmd, f"http://127.0.0.1:{port}", "--", paths], timeout=duration + 60)
    wrk_end = time.perf_counter()
    thread.join(600)
    if done.get("status") not in (200, 201):
        raise BenchError(f"the 1 GiB pull during wrk answered {done.get('status')}")
    w = parse_wrk(r.stdout.decode())
    log(
        f"    {w['rps']} req/s, p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, pull {done['pull_s']} s"
    )
    return {"wrk": w, "pull_s": done["pull_s"], "overlapped": done["end"] >= wrk_end}


# --------------------------------------------------------------------------------------------
# scenario 6: memory and cold start


def scenario6(ctx: Context, rss_runs: int, starts: int, label_size: str) -> list[Row]:
    peer = ctx.nginx("nginx6")
    _, want = ctx.source()
    url = f"{peer.url}/files/big.bin"
    cache = ctx.work / "cache-s6"
    rows = []
    log(f"scenario 6: peak RSS of a {label_size} pull, {rss_runs} runs")
    rss = []
    for i in range(rss_runs):
        settle(cache)
        _, r = run_timed(
            ["/usr/bin/time", "-v", *ctx.nekko("pull", url, cache=cache)], env=ctx.nekko_env()
        )
        check_nekko_blob(r.stdout.decode(), cache, want)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr.decode())
        if not m:
            raise BenchError("/usr/bin/time -v printed no maximum RSS")
        rss.append(int(m.group(1)) / 1024)
        log(f"  max RSS {rss[-1]:.1f} MiB")
    s = Stats(rss)
    row = Row(
        "6a",
        f"peak RSS of `pull` of the {label_size} file (/usr/bin/time -v)",
        nekko=f"{s.hi:.1f} MiB max ({s.lo:.1f}–{s.hi:.1f}, n={len(rss)})",
        target="< 100 MiB",
    )
    row.checks.append(("max RSS < 100 MiB", s.hi < 100))
    row.data = {"rss_mib": s.as_json()}
    rows.append(row)

    def cold(cmd: list, n: int) -> Stats:
        vals = []
        run_timed(cmd, env=ctx.nekko_env())  # warm the page cache once, not counted
        for _ in range(n):
            t = time.perf_counter()
            r = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=ctx.nekko_env(),
                check=False,
            )
            vals.append(time.perf_counter() - t)
            if r.returncode != 0:
                raise BenchError(
                    f"{' '.join(map(str, cmd[-2:]))} exited {r.returncode}: {tail(r.stderr)}"
                )
        return Stats(vals)

    log(f"scenario 6: cold start of `status URL`, {starts} fresh processes")
    base = cold([PY, "-c", "pass"], starts)
    st = cold(ctx.nekko("status", url, cache=cache), starts)
    row = Row(
        "6b",
        "cold start: `python3 nekko-sm.pyz status URL` (1-entry cache)",
        nekko=st.fmt("ms", 1e3, 0),
        target="< 150 ms (median of fresh processes)",
    )
    row.peers = [("python3 -c pass", base.fmt("ms", 1e3, 0))]
    row.checks.append(("median < 150 ms", st.median < 0.150))
    row.data = {"status_s": st.as_json(), "python_baseline_s": base.as_json()}
    rows.append(row)
    settle(cache)

    if "s5" in ctx.keep:
        c5, items = ctx.keep["s5"]
        url5 = items[len(items) // 2][0]
        st5 = cold(ctx.nekko("status", url5, cache=c5), starts)
        row = Row(
            "6c",
            f"cold start: `status URL` on the {len(items):,}-entry cache of scenario 5",
            nekko=st5.fmt("ms", 1e3, 0),
            target="< 150 ms (same target, bigger index)",
        )
        row.peers = [("python3 -c pass", base.fmt("ms", 1e3, 0))]
        row.checks.append(("median < 150 ms", st5.median < 0.150))
        row.data = {"status_s": st5.as_json()}
        rows.append(row)
    peer.stop()
    return rows


# --------------------------------------------------------------------------------------------
# scenario 8: unpacking a tar layer vs the same bytes as a raw layer


def _push_blob(peer, repo: str, path: Path, digest: str) -> dict:
    """A blob from a file, by monolithic upload (streamed, never whole in memory)."""
    from urllib.parse import urlsplit

    size = path.stat().st_size
    if peer.request("HEAD", f"/v2/{repo}/blobs/{digest}", direct=True).status != 200:
        start = peer.request(
            "POST", f"/v2/{repo}/blobs/uploads/", {"Content-Length": "0"}, b"", direct=True
        )
        loc = urlsplit(start.headers["location"])
        target = (
            f"{loc.path}?{loc.query}&digest={digest}"
            if loc.query
            else f"{loc.path}?digest={digest}"
        )
        with open(path, "rb") as f:
            put = peer.request(
                "PUT",
                target,
                {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                f,
                direct=True,
            )
        if put.status != 201:
            raise BenchError(f"PUT blob {digest}: {put.status} {put.body[:200]!r}")
    return {"digest": digest, "size": size}


def _tar_of(src: Path, name: str, out: Path) -> str:
    """``out``: an uncompressed tar with one member ``name`` holding ``src``, as modctl writes
    it (USTAR/PAX header, data, padding, two zero blocks); returns its sha256 hex."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = src.stat().st_size
    info.mode, info.uid, info.gid, info.mtime = 0o644, 1000, 1000, 1748779200
    h = hashlib.sha256()
    with open(out, "wb") as f, open(src, "rb") as s:

        def put(b: bytes) -> None:
            f.write(b)
            h.update(b)

        put(info.tobuf(tarfile.PAX_FORMAT))
        while True:
            b = s.read(4 * MIB)
            if not b:
                break
            put(b)
        put(b"\0" * (-info.size % 512) + b"\0" * 1024)
    return h.hexdigest()


_UNPACK_ONLY = """
import json
import sys
from nekko_sm.models import formats, unpack
from nekko_sm.store import Lease, Store
store = Store(sys.argv[1]).init()
doc = json.loads(open(sys.argv[2], "rb").read())
plan = formats.plan(doc)
with Lease(store) as lease:
    r = unpack.materialize(store, plan, lambda lp: open(store.blob_path(lp.digest), "rb"), lease)
print(json.dumps({f.name: f.digest for f in r.files}))
"""


def scenario8(ctx: Context, reps: int, label_size: str) -> list[Row]:
    from peers.modelpacks import go_json
    from peers.registry import start_registry

    row = Row(
        "8",
        f"{label_size} model in a ModelPack tar layer, local docker-registry:"
        " pull (download + unpack) vs pull of the same bytes as a raw layer",
        target="≤ 1.2× the raw pull's time; peak RSS < 100 MiB",
    )
    src, want = ctx.source()
    log("scenario 8: starting docker-registry, pushing the tar and the raw model")
    peer = start_registry(str(ctx.work / "registry8"))
    ctx.stack.callback(peer.close)
    tar = ctx.work / "data" / "model.tar"
    tar_hex = _tar_of(src, "model.safetensors", tar)
    config_json = ctx.work / "data" / "config.json"
    config_json.write_bytes(b'{"architectures": ["NekkoBench"]}')
    cfg_hex = sha256_file(config_json)
    model_cfg = ctx.work / "data" / "modelcfg.json"
    model_cfg.write_bytes(
        go_json(
            {
                "descriptor": {"name": "bench"},
                "modelfs": {"type": "layers", "diffIds": []},
                "config": {"format": "safetensors"},
            }
        )
    )
    manifests = {}
    for repo, kind, blob, blob_hex in (
        ("bench/tar", "tar", tar, tar_hex),
        ("bench/raw", "raw", src, want),
    ):
        cdesc = _push_blob(peer, repo, model_cfg, "sha256:" + sha256_file(model_cfg))
        ldesc = _push_blob(peer, repo, blob, "sha256:" + blob_hex)
        jdesc = _push_blob(peer, repo, config_json, "sha256:" + cfg_hex)
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.cncf.model.manifest.v1+json",
            "config": {"mediaType": "application/vnd.cncf.model.config.v1+json", **cdesc},
            "layers": [
                {
                    "mediaType": "application/vnd.cncf.model.weight.config.v1.raw",
                    **jdesc,
                    "annotations": {"org.cncf.model.filepath": "config.json"},
                },
                {
                    "mediaType": f"application/vnd.cncf.model.weight.v1.{kind}",
                    **ldesc,
                    "annotations": {"org.cncf.model.filepath": "model.safetensors"},
                },
            ],
        }
        body = go_json(doc)
        put = peer.request(
            "PUT",
            f"/v2/{repo}/manifests/v1",
            {"Content-Type": doc["mediaType"], "Content-Length": str(len(body))},
            body,
            direct=True,
        )
        if put.status != 201:
            raise BenchError(f"PUT manifest {repo}: {put.status} {put.body[:200]!r}")
        manifests[kind] = body
    host = peer.registry_host
    out = ctx.work / "out-s8"
    out.mkdir(exist_ok=True)
    cache = out / "nekko-cache"

    def check(entry_json: str, c: Path) -> None:
        entry = json.loads(entry_json)
        got = {f["name"]: f["digest"] for f in entry["files"]}
        if got != {"model.safetensors": "sha256:" + want, "config.json": "sha256:" + cfg_hex}:
            raise BenchError(f"nekko-sm's view is {got}")
        model = c / "blobs" / "sha256" / want
        if sha256_file(model) != want:
            raise BenchError("the unpacked model.safetensors does not hash to the source's")

    def blobs_bytes(c: Path) -> int:
        return sum(p.stat().st_size for p in (c / "blobs" / "sha256").iterdir())

    def pull(kind: str, discard: bool = False) -> Callable[[int], dict]:
        name = kind + ("+discard" if discard else "")

        def run(rep: int) -> dict:
            settle(cache)
            env = ctx.nekko_env(**({"NEKKO_DISCARD_UNPACKED_LAYERS": "1"} if discard else {}))
            dt, r, rss = ctx.nekko_timed(
                ["--insecure-registry", host, "pull", "--json", f"oci://{host}/bench/{kind}:v1"],
                cache,
                env,
            )
            check(r.stdout.decode(), cache)
            got = {name: dt, **({f"{name}_rss_mib": rss} if rss else {})}
            if discard:
                got[f"{name}_disk_ratio"] = blobs_bytes(cache) / src.stat().st_size
            settle(cache)
            return got

        return run

    layer_doc = out / "tar-manifest.json"
    layer_doc.write_bytes(manifests["tar"])
    ucache = out / "unpack-cache"

    def unpack_only(rep: int) -> dict:
        settle(ucache)
        (ucache / "blobs" / "sha256").mkdir(parents=True)
        os.link(tar, ucache / "blobs" / "sha256" / tar_hex)
        os.link(config_json, ucache / "blobs" / "sha256" / cfg_hex)
        os.sync()
        rss_file = ctx.work / "rss8.txt"
        env = dict(ctx.nekko_env(), PYTHONPATH=str(ctx.pyz))
        dt, r = run_timed(
            [
                "/usr/bin/time",
                "-f",
                "%M",
                "-o",
                str(rss_file),
                PY,
                "-c",
                _UNPACK_ONLY,
                str(ucache),
                str(layer_doc),
            ],
            env=env,
        )
        files = json.loads(r.stdout.decode().strip().splitlines()[-1])
        if files.get("model.safetensors") != "sha256:" + want:
            raise BenchError(f"the unpack alone gave {files}")
        rss = int(rss_file.read_text().split()[-1]) / 1024
        settle(ucache)
        return {"unpack": dt, "unpack_rss_mib": rss}

    log(f"scenario 8: {reps} reps")
    stats, errors = measure(
        [
            Tool("raw", pull("raw")),
            Tool("tar", pull("tar")),
            Tool("unpack", unpack_only),
            Tool("tar+discard", pull("tar", discard=True)),
        ],
        reps,
    )
    peer.close()
    row.data = {k: v.as_json() for k, v in stats.items()}
    row.data["bytes"] = src.stat().st_size
    for name, err in errors.items():
        row.notes.append(f"{name} failed: {tail(err, 300)}")
    if errors:
        row.error = "; ".join(f"{k}: {tail(v, 200)}" for k, v in errors.items())
    size_mib = src.stat().st_size / MIB
    if "tar" in stats and "raw" in stats:
        t, r = stats["tar"], stats["raw"]
        row.nekko = f"tar pull {t.fmt()}, {size_mib / t.median:.0f} MiB/s; unpack alone " + (
            f"{stats['unpack'].fmt()}, {size_mib / stats['unpack'].median:.0f} MiB/s"
            if "unpack" in stats
            else "—"
        )
        row.peers = [("raw-layer pull", r.fmt() + f", {size_mib / r.median:.0f} MiB/s")]
        if "tar+discard" in stats:
            row.peers.append(("tar pull, --discard-unpacked-layers", stats["tar+discard"].fmt()))
        ratio = t.median / r.median
        row.ratios.append(("tar pull/raw pull", ratio))
        row.checks.append(("tar pull ≤ 1.2× raw pull", ratio <= 1.2))
        if "unpack" in stats:
            u = stats["unpack"].median / r.median
            row.ratios.append(("unpack alone/raw pull", u))
            row.info_checks.append(("unpack alone ≤ 1.2× raw pull", u <= 1.2))
        rss = [x for k, st in stats.items() if k.endswith("_rss_mib") for x in st.values]
        if rss:
            row.checks.append(("peak RSS < 100 MiB", max(rss) < 100))
            row.notes.append(
                "peak RSS: "
                + ", ".join(
                    f"{k[:-8]} {stats[k].hi:.0f} MiB"
                    for k in sorted(stats)
                    if k.endswith("_rss_mib")
                )
            )
        if "tar+discard_disk_ratio" in stats:
            row.notes.append(
                "with --discard-unpacked-layers the cache holds"
                f" {stats['tar+discard_disk_ratio'].hi:.3f}× the file's size"
            )
        row.notes.append("every view verified: model.safetensors hashes to the source")
    return [row]


# --------------------------------------------------------------------------------------------
# report


def machine_info(work: Path) -> dict:
    def out(cmd: list) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    st = os.statvfs(work)
    fs = out(["stat", "-f", "-c", "%T", str(work)])
    dev = ""
    with contextlib.suppress(Exception):
        dev = (
            subprocess.run(
                ["df", "-h", "--output=source,fstype,size", str(work)],
                capture_output=True,
                text=True,
                check=False,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
    flags: set = set()
    with contextlib.suppress(OSError):
        m = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        flags = set(m.group(1).split()) if m else set()
    block = os.urandom(4 << 20)  # the one cost no client that verifies can avoid
    t = time.perf_counter()
    h = hashlib.sha256()
    for _ in range(32):
        h.update(block)
    sha_rate = 128 / (time.perf_counter() - t)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu + (" (SHA-NI)" if "sha_ni" in flags else " (no SHA-NI)"),
        "sha256_mib_s": round(sha_rate),
        "memory": mem,
        "disk": f"{dev or fs}; {st.f_bavail * st.f_frsize / (1 << 30):.0f} GiB free",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "tools": {
            "curl": out(["curl", "--version"]),
            "aria2c": out(["aria2c", "--version"]),
            "skopeo": out(["skopeo", "--version"]),
            "wrk": out(["wrk", "--version"]),
            "nginx": out(["nginx", "-v"]),
            "docker-registry": out(["docker-registry", "--version"]),
            "huggingface_hub": out([PY, "-c", "import huggingface_hub as h; print(h.__version__)"]),
        },
    }


def markdown(rows: list[Row]) -> str:
    lines = [
        "| # | scenario | nekko-sm | peer(s) | ratio(s) | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peers = "<br>".join(f"{n}: {t}" for n, t in r.peers) or "—"
        ratios = "<br>".join(ratio_text(k, v) for k, v in r.ratios) or "—"
        nekko = r.nekko if not (r.error and r.nekko == "—") else f"ERROR: {tail(r.error, 300)}"
        verdict = r.verdict
        detail = [f"{'✓' if ok else '✗'} {c}" for c, ok in r.checks]
        detail += [f"({'✓' if ok else '✗'} {c})" for c, ok in r.info_checks]
        if detail:
            verdict += "<br>" + "<br>".join(detail)
        cells = [r.id, r.scenario, nekko, peers, ratios, r.target, verdict]
        lines.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    notes = [(r.id, n) for r in rows for n in r.notes if n]
    errs = [(r.id, r.error) for r in rows if r.error and r.nekko != "—"]
    if notes or errs:
        lines.append("")
        for rid, n in notes:
            lines.append(f"- {rid}: {n}")
        for rid, e in errs:
            lines.append(f"- {rid}: error: {tail(e, 400)}")
    return "\n".join(lines) + "\n"


def text_table(rows: list[Row]) -> str:
    out = []
    for r in rows:
        out.append(f"[{r.verdict}] {r.id}. {r.scenario}")
        out.append(f"    nekko-sm : {r.nekko if r.nekko != '—' or not r.error else 'ERROR'}")
        for n, t in r.peers:
            out.append(f"    {n:<9}: {t}")
        if r.ratios:
            out.append("    ratios   : " + ", ".join(ratio_text(k, v) for k, v in r.ratios))
        out.append(f"    target   : {r.target}")
        for c, ok in r.checks:
            out.append(f"      {'PASS' if ok else 'MISS'} {c}")
        for c, ok in r.info_checks:
            out.append(f"      ({'pass' if ok else 'miss'} {c}, not judged)")
        if r.error:
            out.append(f"    error    : {tail(r.error, 500)}")
        for n in r.notes:
            if n:
                out.append(f"    note     : {n}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# main


def _raise_interrupt(signum, frame):  # SIGTERM/SIGHUP: clean up as on Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="128 MiB sizes and fewer repetitions (~2-3 min smoke run)",
    )
    ap.add_argument(
        "--selftest",
        action="store_true",
        help="scenario 1 only, at 8 MiB, in a few seconds; fails only on errors",
    )
    ap.add_argument("--only", metavar="N,...", help="scenarios to run (1-8)")
    ap.add_argument("--size-mib", type=int, help="size for scenarios 1-4 and 6 (default 1024)")
    ap.add_argument("--reps", type=int, help="repetitions per tool (default: per scenario)")
    ap.add_argument(
        "--out",
        metavar="PREFIX",
        help="write PREFIX.json and PREFIX.md (default bench/results for a full"
        " run, bench/results-quick for --quick, bench/results-partial with"
        " --only, nothing for --selftest or an interrupted run)",
    )
    ap.add_argument("--workdir", metavar="DIR", help="where the temporary directory goes")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--throttled-mib", type=int, help="size of scenario 2's file (default 256; 64 with --quick)"
    )
    ap.add_argument(
        "--baseline",
        metavar="PYZ",
        help="also run this (older) nekko-sm.pyz in scenarios 1-4, interleaved"
        " with the current build: a before/after in the same run",
    )
    ap.add_argument(
        "--raw-fakehub",
        action="store_true",
        help="scenario 4 without the bench-side cache of the fake CDN's per-request"
        " whole-file MD5 (see BENCHMARKS.md)",
    )
    args = ap.parse_args(argv)

    if args.selftest:
        args.size_mib = args.size_mib or 8
        only = {"1"}
    else:
        args.size_mib = args.size_mib or (128 if args.quick else 1024)
        only = set((args.only or "1,2,3,4,5,6,7,8").replace(" ", "").split(","))
    args.throttled_mib = args.throttled_mib or (64 if args.quick else 256)
    bad = only - {"1", "2", "3", "4", "5", "6", "7", "8"}
    if bad:
        ap.error(f"unknown scenario(s) {','.join(sorted(bad))}")
    mode = "selftest" if args.selftest else "quick" if args.quick else "full"
    quick = args.quick or args.selftest
    reps = {
        "1": args.reps or (3 if quick else 5),
        "2": args.reps or (2 if quick else 3),
        "3": args.reps or (2 if quick else 3),
        "4": args.reps or (2 if quick else 3),
        "7": args.reps or (3 if quick else 5),
        "8": args.reps or (2 if quick else 3),
    }
    if args.out:
        out_prefix: Path | None = Path(args.out)
    elif args.selftest:
        out_prefix = None
    elif args.quick:
        out_prefix = ROOT / "bench" / "results-quick"
    elif only != {"1", "2", "3", "4", "5", "6", "7", "8"}:
        out_prefix = ROOT / "bench" / "results-partial"
    else:
        out_prefix = ROOT / "bench" / "results"

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGHUP, _raise_interrupt)

    size_label = f"{args.size_mib} MiB" if args.size_mib != 1024 else "1 GiB"
    ctx = Context(args)
    rows: list[Row] = []
    status = 0
    meta: dict = {
        "mode": mode,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "size_mib": args.size_mib,
    }
    interrupted = False
    try:
        meta["machine"] = machine_info(ctx.work)
        meta["nekko"] = ctx.prepare_pyz()
        log(
            f"mode {mode}, size {size_label}, scenarios {','.join(sorted(only))},"
            f" work dir {ctx.work}, nekko {meta['nekko'].get('version')}"
            f" (pyz {meta['nekko']['pyz_sha256'][:12]})"
        )
        plan: list = [
            ("1", lambda: scenario1(ctx, reps["1"], size_label)),
            ("2", lambda: scenario2(ctx, reps["2"], size_label)),
            ("3", lambda: scenario3(ctx, reps["3"], size_label)),
            ("4", lambda: scenario4(ctx, reps["4"], size_label)),
            ("5", lambda: scenario5(ctx, 1 if quick else 3, 5 if quick else 10)),
            ("6", lambda: scenario6(ctx, 1 if quick else 3, 10, size_label)),
            ("7", lambda: scenario7(ctx, reps["7"])),
            ("8", lambda: scenario8(ctx, reps["8"], size_label)),
        ]
        for sid, fn in plan:
            if sid not in only:
                continue
            t = time.perf_counter()
            load0 = os.getloadavg()[0]
            try:
                got = fn()
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a scenario that cannot run is a row, not the end
                log(f"scenario {sid} failed: {e}")
                traceback.print_exc(file=sys.stderr)
                got = [Row(sid, f"scenario {sid}", error=f"{type(e).__name__}: {e}")]
            for r in got:
                r.data["scenario_wall_s"] = round(time.perf_counter() - t, 1)
                r.data["loadavg_1min_start_end"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            rows.extend(got)
            log(f"scenario {sid} done in {time.perf_counter() - t:.1f}s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping peers and removing temporary files")
    finally:
        ctx.close()
        meta["duration_s"] = round(time.monotonic() - T0, 1)
        meta["loadavg_end"] = os.getloadavg()
        meta["interrupted"] = interrupted

    print()
    print(text_table(rows), end="")
    md = markdown(rows)
    if interrupted:
        out_prefix = None  # a partial run must not replace a complete one
    if out_prefix is not None and rows:
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        doc = {**meta, "rows": [r.as_json() for r in rows]}
        Path(str(out_prefix) + ".json").write_text(
            json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        )
        Path(str(out_prefix) + ".md").write_text(
            f"nekko-sm benchmark, {mode} run of {meta['started']}"
            f" ({meta['duration_s']} s; size {size_label}; nekko {meta.get('nekko', {}).get('version')},"
            f" pyz sha256 {meta.get('nekko', {}).get('pyz_sha256', '?')[:12]})\n\n" + md
        )
        log(f"wrote {out_prefix}.json and {out_prefix}.md")
    if interrupted:
        return 130
    if any(r.error for r in rows) or not rows:
        status = 1
    if args.selftest:
        print("selftest:", "ok" if status == 0 else "FAILED")
    return status


if __name__ == "__main__":
    sys.exit(main())
