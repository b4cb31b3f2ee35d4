#!/usr/bin/env python3
"""How nekko-sm's costs grow with the entries already cached (issue 11).

    python3 bench/growth.py                          # points 0, 1k, 10k, 100k
    python3 bench/growth.py --points 0,1000 --posts 10
    python3 bench/growth.py --pyz OLD.pyz --label before --points 0,1000,10000

At each point a fresh cache gets N entries (1 real ``nekko-sm pull`` of a tiny nginx file
plus N-1 written from it as a template, the way ``bench/run.py`` scenario 5 builds its
cache; the first open takes them over), then, all against that cache:

- ``ls`` and cold ``status URL`` (fresh processes, medians), and the first open (take-over);
- ``serve``: RSS after start; the cost of creating an entry (``POST`` of a new nginx file,
  sequential, median and p90) and of removing one (``DELETE``); cache-hit ``GET/s`` and
  latency under ``wrk -t2 -c16`` over random entries; RSS after the load.

Creation and removal at N are the ratios that matter: cost(N) / cost(0) in the same run.
Results: a table on stdout and ``bench/growth-LABEL.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the helpers and peers of bench/run.py

PY = bench.PY


def _rss_mib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def _cpu_reference() -> float:
    """Seconds of a fixed pure-Python loop now: how busy the shared machine is (0.15 idle)."""
    t = time.perf_counter()
    sum(range(10**7))
    return round(time.perf_counter() - t, 3)


def _median_ms(values: list) -> float:
    return round(statistics.median(values) * 1e3, 2)


def _p90_ms(values: list) -> float:
    return round(sorted(values)[int(0.9 * (len(values) - 1))] * 1e3, 2)


def _timed(cmd: list, env: dict, cpu: list | None = None) -> float:
    """Wall seconds of one run of ``cmd``; its CPU seconds (user + sys) go to ``cpu``."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise bench.BenchError(f"{cmd[-2:]} exited {proc.returncode}: {bench.tail(err)}")
    if cpu is not None:
        cpu.append(usage.ru_utime + usage.ru_stime)
    return dt


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + sys) process ``pid`` has used, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def point(ctx: bench.Context, peer, n: int, args: argparse.Namespace) -> dict:
    cache = ctx.work / f"cache-{n}"
    env = ctx.nekko_env()
    res: dict = {"entries": n, "load": os.getloadavg()[0], "cpu_ref_s": _cpu_reference()}
    items: list = []
    if n:
        bench.log(f"{n:,} entries: building")
        t = time.perf_counter()
        items = bench.build_entries(ctx, cache, peer, n)
        res["build_s"] = round(time.perf_counter() - t, 1)
        res["first_open_s"] = round(_timed(ctx.nekko("ls", cache=cache), env), 2)
        cpu: list = []
        res["ls_s"] = round(
            statistics.median(_timed(ctx.nekko("ls", cache=cache), env, cpu) for _ in range(3)), 3
        )
        res["ls_cpu_s"] = round(statistics.median(cpu), 3)
        url = items[n // 2][0]
        _timed(ctx.nekko("status", url, cache=cache), env)
        cpu = []
        res["status_cold_ms"] = _median_ms(
            [_timed(ctx.nekko("status", url, cache=cache), env, cpu) for _ in range(args.starts)]
        )
        res["status_cpu_ms"] = _median_ms(cpu)
        cpu = []
        _timed([PY, "-c", "pass"], env)
        res["python_pass_ms"] = _median_ms(
            [_timed([PY, "-c", "pass"], env, cpu) for _ in range(args.starts)]
        )
        res["python_pass_cpu_ms"] = _median_ms(cpu)
    cache.mkdir(exist_ok=True)
    proc, port, stop = bench.start_serve(ctx, cache, f"serve-{n}", timeout=120)
    try:
        res["rss_start"] = _rss_mib(proc.pid)
        posts, deletes, new = [], [], []
        cpu0 = _cpu_s(proc.pid)
        for j in range(args.posts):
            url = peer.put(f"growth-{n}-{j}", f"new entry {n} {j}\n".encode())
            body = json.dumps({"url": url}).encode()
            t = time.perf_counter()
            status, resp = bench.http_call(port, "POST", "/content/", body)
            posts.append(time.perf_counter() - t)
            if status != 201:
                raise bench.BenchError(f"POST {url}: {status} {resp[:200]!r}")
            new.append(url)
        time.sleep(2.5)  # the index.json rewrites these commits asked for belong to them
        cpu1 = _cpu_s(proc.pid)
        for url in new:
            t = time.perf_counter()
            status, resp = bench.http_call(port, "DELETE", "/content/" + bench.b64(url))
            deletes.append(time.perf_counter() - t)
            if status != 204:
                raise bench.BenchError(f"DELETE {url}: {status} {resp[:200]!r}")
        time.sleep(2.5)
        cpu2 = _cpu_s(proc.pid)
        res["post_ms"] = {
            "median": _median_ms(posts),
            "p90": _p90_ms(posts),
            "server_cpu": round((cpu1 - cpu0) / len(posts) * 1e3, 2),
        }
        res["delete_ms"] = {
            "median": _median_ms(deletes),
            "p90": _p90_ms(deletes),
            "server_cpu": round((cpu2 - cpu1) / len(deletes) * 1e3, 2),
        }
        if items and shutil.which("wrk"):
            for url, digest in random.sample(items, min(20, len(items))):
                status, body = bench.http_call(port, "GET", "/content/" + bench.b64(url))
                if status != 200 or json.loads(body).get("digest") != digest:
                    raise bench.BenchError(f"GET {url}: {status} {body[:200]!r}")
            paths = ctx.work / "paths.txt"
            paths.write_text("".join(f"/content/{bench.b64(u)}\n" for u, _ in items))
            lua = ctx.work / "get.lua"
            lua.write_text(bench.WRK_LUA)
            runs = []
            for _ in range(args.wrk_runs):
                r = subprocess.run(
                    [
                        "wrk",
                        "-t2",
                        f"-c{args.connections}",
                        f"-d{args.wrk_seconds}s",
                        "--latency",
                        "-s",
                        str(lua),
                        f"http://127.0.0.1:{port}",
                        "--",
                        str(paths),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=args.wrk_seconds + 60,
                    check=False,
                )
                w = bench.parse_wrk(r.stdout)
                if w["non2xx"] or w["rps"] is None:
                    raise bench.BenchError(f"wrk: {w} {r.stdout[-400:]}")
                runs.append(w)
            res["wrk"] = {
                "runs": runs,
                "rps": statistics.median(w["rps"] for w in runs),
                "p50_ms": statistics.median(w["p50_ms"] for w in runs),
                "p99_ms": statistics.median(w["p99_ms"] for w in runs),
            }
        res["rss_end"] = _rss_mib(proc.pid)
    finally:
        stop()
    for name in ("index.json", "nekko.db"):
        if (cache / name).exists():
            res[f"{name}_mib"] = round((cache / name).stat().st_size / (1 << 20), 1)
    shutil.rmtree(cache, ignore_errors=True)
    bench.log(f"{n:,} entries: {res}")
    return res


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--points",
        default="0,1000,10000,100000",
        help="entries already cached at each point (comma-separated)",
    )
    ap.add_argument("--posts", type=int, default=20, help="POSTs (and DELETEs) per point")
    ap.add_argument("--starts", type=int, default=10, help="cold `status` processes per point")
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument("--wrk-runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--pyz", help="measure this .pyz instead of building the tree's")
    ap.add_argument("--label", default="after", help="names the result file")
    ap.add_argument("--workdir", help="where the temporary directory goes")
    args = ap.parse_args(argv)
    ns = argparse.Namespace(workdir=args.workdir, size_mib=1, keep=False)
    ctx = bench.Context(ns)
    results: dict = {"label": args.label, "machine": {"load": os.getloadavg()}}
    try:
        if args.pyz:
            shutil.copy2(args.pyz, ctx.pyz)
            results["pyz"] = {"path": args.pyz, "sha256": bench.sha256_file(ctx.pyz)}
        else:
            results["pyz"] = ctx.prepare_pyz()
        peer = ctx.nginx("nginx", with_source=False)
        results["points"] = [point(ctx, peer, int(p), args) for p in args.points.split(",")]
    finally:
        ctx.close()
    out = Path(__file__).resolve().parent / f"growth-{args.label}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    base = results["points"][0]
    print(
        f"\n{'entries':>8} {'POST ms':>8} {'×0':>5} {'cpu ms':>7} {'×0':>5} {'DEL ms':>7}"
        f" {'×0':>5} {'cpu ms':>7} {'×0':>5} {'ls s':>6} {'status':>7} {'GET/s':>6}"
        f" {'p99':>6} {'RSS':>6}"
    )
    for p in results["points"]:
        w = p.get("wrk") or {}
        row = [f"{p['entries']:>8,}"]
        for k in ("post_ms", "delete_ms"):
            for m in ("median", "server_cpu"):
                v, b = p[k][m], base[k][m]
                row.append(f"{v:>7.1f} {v / b if b else 0:>5.2f}")
        row.append(
            f"{p.get('ls_s', 0):>6.2f} {p.get('status_cold_ms', 0):>7.0f}"
            f" {w.get('rps', 0):>6.0f} {w.get('p99_ms', 0):>6.1f}"
            f" {p['rss_end'].get('VmRSS', 0):>6.1f}"
        )
        print(" ".join(row))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
