#!/usr/bin/env python3
"""Where does nekko-sm's time go?  Profiles of the benchmark's scenarios (see BENCHMARKS.md).

    python3 bench/profile.py http    # pull of a 1 GiB file from unthrottled nginx (py-spy)
    python3 bench/profile.py slow    # the same behind nginx limit_rate 20m (py-spy)
    python3 bench/profile.py oci     # pull of an 8-layer ~1 GiB image (py-spy)
    python3 bench/profile.py hf      # pull of a 1 GiB LFS file from the fake Hub (py-spy)
    python3 bench/profile.py api     # serve with 10,000 entries under wrk (py-spy --gil)
    python3 bench/profile.py start   # cold start of `status URL` (python -X importtime)

Options: ``--size-mib N`` (default 1024), ``--out DIR`` (raw py-spy stacks and a flamegraph
SVG per profile; default a new directory under /tmp, printed at the end and kept).

Needs py-spy (``pip install py-spy``) for all but ``start``.  It starts the same local peers
as bench/run.py, runs the built ``dist/nekko-sm.pyz`` once unprofiled under ``/usr/bin/time``
(wall, user and system CPU, peak RSS) and once under ``py-spy record`` (all threads, 200 Hz),
then prints: the share of samples per thread, the hottest lines (self) and the hottest
functions (inclusive).  Samples in ``Condition.wait``/``select``/``readinto`` are threads
waiting (for the network, or for each other), not burning CPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as B

WAITING = (
    "Condition.wait",
    "select (selectors",
    "readinto (socket",
    "_PollLikeSelector.select",
    "Event.wait",
    "Thread.join",
    "lock.acquire",
)


def summarize(raw: Path, top: int = 25) -> str:
    """The py-spy raw (collapsed) stacks as three short tables."""
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    total = waiting = 0

    def short(frame: str, line: bool) -> str:
        m = re.match(r"(.*) \((.*):(\d+)\)$", frame)
        if not m:
            return frame
        fn, file, ln = m.groups()
        file = file.split("/")[-1]
        return f"{fn} ({file}:{ln})" if line else f"{fn} ({file})"

    for text in raw.read_text().splitlines():
        if not text.strip():
            continue
        stack, n_s = text.rsplit(" ", 1)
        n = int(n_s)
        frames = stack.split(";")
        total += n
        thread = re.sub(r"\(\d+\)", "", frames[0]).strip()
        thread = re.sub(r"(pull|hash) .*", r"\1 …", thread)
        threads[thread] += n
        leaf = short(frames[-1], True)
        self_c[leaf] += n
        if any(w in leaf for w in WAITING):
            waiting += n
        seen = set()
        for f in frames[1:]:
            s = short(f, False)
            if s not in seen:
                incl[s] += n
                seen.add(s)
    if not total:
        return "no samples\n"
    out = [f"{total} samples; {100 * waiting / total:.0f}% of them in a waiting frame"]
    out.append("threads:")
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in threads.most_common(8)]
    out.append("hottest lines (self):")
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in self_c.most_common(top)]
    out.append("hottest functions (inclusive):")
    out += [
        f"  {100 * v / total:5.1f}%  {k}"
        for k, v in incl.most_common(top + 15)
        if not k.startswith(("Thread._bootstrap", "Thread.run", "_run_module_as_main", "_run_code"))
    ]
    return "\n".join(out) + "\n"


def py_spy() -> str:
    path = shutil.which("py-spy")
    if not path:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return path


def timed(cmd: list, env: dict) -> str:
    r = subprocess.run(
        ["/usr/bin/time", "-f", "wall %e s, user %U s, sys %S s, max RSS %M KiB", *map(str, cmd)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        raise B.BenchError(f"exit {r.returncode}: {B.tail(r.stderr)}")
    return r.stderr.decode().strip().splitlines()[-1]


def record(ctx: B.Context, name: str, cmd: list, env: dict, out: Path, cache: Path) -> str:
    report = []
    B.settle(cache)
    report.append(f"unprofiled: {timed(cmd, env)}")
    for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
        B.settle(cache)
        dst = out / f"{name}.{suffix}"
        subprocess.run(
            [
                py_spy(),
                "record",
                "--threads",
                "-r",
                "200",
                "--format",
                fmt,
                "-o",
                str(dst),
                "--",
                *map(str, cmd),
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    B.settle(cache)
    report.append(summarize(out / f"{name}.txt"))
    report.append(f"raw stacks: {out / (name + '.txt')}, flamegraph: {out / (name + '.svg')}")
    return "\n".join(report)


def prof_file(ctx: B.Context, out: Path, slow: bool) -> str:
    peer = ctx.nginx("nginx-p", limit_rate="20m" if slow else None)
    url = f"{peer.url}/files/big.bin"
    cache = ctx.work / "cache"
    return record(
        ctx,
        "slow" if slow else "http",
        ctx.nekko("pull", url, cache=cache),
        ctx.nekko_env(),
        out,
        cache,
    )


def prof_oci(ctx: B.Context, out: Path) -> str:
    from peers.images import push_image
    from peers.registry import start_registry

    peer = start_registry(str(ctx.work / "registry"))
    ctx.stack.callback(peer.close)
    push_image(
        peer,
        "bench/big:v1",
        layer_sizes=[ctx.size // 8] * 8,
        seed="bench",
        workdir=str(ctx.work / "images"),
        keep_layout=False,
    )
    host = peer.registry_host
    cache = ctx.work / "cache"
    cmd = ctx.nekko("--insecure-registry", host, "pull", f"oci://{host}/bench/big:v1", cache=cache)
    return record(ctx, "oci", cmd, ctx.nekko_env(), out, cache)


def prof_hf(ctx: B.Context, out: Path) -> str:
    import hashlib

    import peers.fakehub as fakehub_module
    from peers.fakehub import start_fakehub

    # as bench/run.py does: the fake CDN's whole-file MD5 per request, computed once
    cache = B._CdnEtagCache(hashlib)
    fakehub_module.hashlib = cache  # type: ignore[assignment]
    ctx.stack.callback(setattr, fakehub_module, "hashlib", hashlib)
    src, _ = ctx.source()
    hub = start_fakehub()
    ctx.stack.callback(hub.close)
    hub.add_repo("bench/model", files={"model.gguf": src.read_bytes()})
    cache.md5(hub.blob("bench/model", "model.gguf").data)
    cache = ctx.work / "cache"
    cmd = ctx.nekko(
        "--insecure-registry",
        hub.endpoint.split("://", 1)[1],
        "pull",
        "hf:///bench/model/model.gguf",
        cache=cache,
    )
    return record(ctx, "hf", cmd, ctx.nekko_env(HF_ENDPOINT=hub.endpoint), out, cache)


def prof_api(ctx: B.Context, out: Path, duration: int = 10) -> str:
    peer = ctx.nginx("nginx-p", with_source=False)
    cache = ctx.work / "cache"
    items = B.build_entries(ctx, cache, peer, 10_000)
    port = B.free_port()
    proc = subprocess.Popen(
        ctx.nekko("--address", f"127.0.0.1:{port}", "serve", cache=cache),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ctx.nekko_env(),
    )
    ctx.stack.callback(lambda: (proc.poll() is None and proc.terminate(), proc.wait(10)))
    deadline = time.monotonic() + 20
    while True:
        try:
            if B.http_call(port, "GET", "/healthz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise B.BenchError("serve did not come up")
        time.sleep(0.05)
    for url, _ in random.sample(items, 100):  # warm, as bench/run.py does
        B.http_call(port, "GET", "/content/" + B.b64(url))
    paths = ctx.work / "paths.txt"
    paths.write_text("".join(f"/content/{B.b64(u)}\n" for u, _ in items))
    lua = ctx.work / "get.lua"
    lua.write_text(B.WRK_LUA)
    wrk = [
        "wrk",
        "-t2",
        "-c32",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(lua),
        f"http://127.0.0.1:{port}",
        "--",
        str(paths),
    ]
    plain = B.parse_wrk(subprocess.run(wrk, capture_output=True, text=True, check=True).stdout)
    raw = out / "api.txt"
    spy = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--gil",
            "--threads",
            "-r",
            "200",
            "-d",
            str(duration + 1),
            "--format",
            "raw",
            "-o",
            str(raw),
            "-p",
            str(proc.pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    profiled = B.parse_wrk(subprocess.run(wrk, capture_output=True, text=True, check=True).stdout)
    spy.wait(60)
    return "\n".join(
        [
            f"unprofiled: {plain['rps']} GET/s, p50 {plain['p50_ms']} ms, p99 {plain['p99_ms']} ms",
            f"under py-spy: {profiled['rps']} GET/s, p99 {profiled['p99_ms']} ms",
            "samples only while a thread holds the GIL (--gil): where the Python work goes",
            summarize(raw),
            f"raw stacks: {raw}",
        ]
    )


def prof_start(ctx: B.Context, out: Path, runs: int = 10) -> str:
    peer = ctx.nginx("nginx-p", with_source=False)
    url = peer.put("tiny", b"tiny\n")
    cache = ctx.work / "cache"
    B.run_timed(ctx.nekko("pull", url, cache=cache), env=ctx.nekko_env())
    # the same code unzipped, with its bytecode compiled once: what the zip costs
    tree = ctx.work / "unzipped"
    shutil.unpack_archive(str(ctx.pyz), str(tree), "zip")
    subprocess.run(
        [B.PY, "-m", "compileall", "-q", str(tree)], check=True, stdout=subprocess.DEVNULL
    )

    args = ["--cache-dir", str(cache), "status", url]
    cmds = {
        "python3 -c pass": [B.PY, "-c", "pass"],
        "python3 -S -c pass (no site)": [B.PY, "-S", "-c", "pass"],
        "nekko-sm.pyz status URL": [B.PY, str(ctx.pyz), *args],
        "same code unzipped, .pyc cached": [B.PY, str(tree / "__main__.py"), *args],
    }
    vals: dict = {k: [] for k in cmds}
    for _ in range(2 * runs):  # interleaved, so load changes hit every variant alike
        for k, cmd in cmds.items():
            t = time.perf_counter()
            subprocess.run(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=ctx.nekko_env(),
                check=False,
            )
            vals[k].append(time.perf_counter() - t)
    lines = [
        f"{k + ':':<34} median {statistics.median(v) * 1e3:4.0f} ms,"
        f" min {min(v) * 1e3:4.0f} ms (n={len(v)})"
        for k, v in vals.items()
    ]
    per: dict = collections.defaultdict(list)
    for _ in range(runs):
        r = subprocess.run(
            [B.PY, "-X", "importtime", str(ctx.pyz), *args],
            capture_output=True,
            text=True,
            env=ctx.nekko_env(),
            check=False,
        )
        acc: collections.Counter = collections.Counter()
        for ln in r.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", ln)
            if m:
                name = m.group(4)
                key = name if name.startswith("nekko_sm") else name.split(".")[0]
                acc[key] += int(m.group(1))
        for k, v in acc.items():
            per[k].append(v)
    med = {k: statistics.median(v) / 1e3 for k, v in per.items()}
    total = sum(med.values())
    lines.append(
        f"-X importtime, median self time per module over {runs} runs"
        f" (sum {total:.0f} ms; importtime itself adds overhead):"
    )
    lines.append(
        f"  {sum(v for k, v in med.items() if k.startswith('nekko_sm')):6.1f} ms"
        "  nekko_sm.* (compiled from source on every start: zipimport keeps no .pyc)"
    )
    for k, v in sorted(med.items(), key=lambda kv: -kv[1])[:18]:
        lines.append(f"  {v:6.1f} ms  {k}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["http", "slow", "oci", "hf", "api", "start"])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--out", help="where the profiles go (default: a new dir under /tmp)")
    ap.add_argument("--workdir", help="where the temporary data goes")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nekko-profile."))
    out.mkdir(parents=True, exist_ok=True)
    ctx = B.Context(
        argparse.Namespace(workdir=args.workdir, keep=False, size_mib=args.size_mib, baseline=None)
    )
    try:
        info = ctx.prepare_pyz()
        print(
            f"nekko-sm pyz {info['pyz_sha256'][:12]} ({info.get('version')}),"
            f" load average {os.getloadavg()[0]:.1f}"
        )
        fn = {
            "http": lambda: prof_file(ctx, out, False),
            "slow": lambda: prof_file(ctx, out, True),
            "oci": lambda: prof_oci(ctx, out),
            "hf": lambda: prof_hf(ctx, out),
            "api": lambda: prof_api(ctx, out),
            "start": lambda: prof_start(ctx, out),
        }[args.what]
        text = fn()
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()
    print(text)
    (out / f"{args.what}.summary.txt").write_text(text)
    print(f"profiles in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
