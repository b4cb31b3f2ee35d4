#!/usr/bin/env python3
"""Soak of the disk budget (issue 13): many pulls through a small budget, CLI and serve at once.

    python3 bench/soak_budget.py                 # 2,000 pulls (~5-10 min on 2 cores)
    python3 bench/soak_budget.py --pulls 200     # a shorter run
    python3 bench/soak_budget.py --out bench/soak-budget   # also write PREFIX.json / .md

A real nginx serves ``--pulls`` files of random sizes (log-uniform, 8 KiB to 512 KiB), each
with its own contents.  ``nekko-sm serve`` and the ``nekko-sm pull`` CLI share one cache, both
with ``--max-cache-size`` = 1/10 of the files' total.  Two threads POST to the server and two
run CLI processes, taking the files in turn; between them, re-uses of earlier files (a POST
or a ``pull`` again: a use, or a re-download when it was evicted), three pins (POST
``"pin": true``) and a hold (``pull --hold``).  Meanwhile a sampler measures the bytes under
``blobs/`` and ``ingest/`` every 20 ms.

It checks, and prints:

* the budget: the most the measured bytes ever went over it, against the largest single
  pull (the bound: "never exceeded by more than one pull in flight"); and the same without
  ``ingest/trash/`` (blobs an eviction is deleting at that instant, already uncounted).
  Each sample is one instant: the walk holds the budget's lock, so no eviction runs
  during it (see :meth:`Soak.sampler`);
* consistency: ``verify`` at four pauses and at the end (errors counted), every answer's
  file hashed against its source;
* LRU order: every eviction is logged by the process that made it with its decision time
  and the entry's ``last_used``; decisions are serialised by the budget's lock, so across
  both processes, sorted by decision time, ``last_used`` must never go down (a later
  eviction never takes an entry used before one evicted earlier); and each evicted entry's
  ``last_used`` is no older than the start of its last request answered before the
  eviction (the use was recorded);
* pins and the hold: those entries are still cached at the end;
* the cost of recording a use: the median time of a POST of a cached entry with and
  without the budget's touch is not separable here; see ``--touch-cost`` (default on),
  which times ``Store.touch`` against a plain ``Store.entry_record`` read in the same run.

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the peers (tests/peers/) work outside pytest
sys.path.insert(0, str(ROOT))

from peers.nginx import start_nginx

PY = sys.executable
PYZ = ROOT / "dist" / "nekko-sm.pyz"
_EVICTED = re.compile(r"evicted entry (\S+) \(last used \S+ = ([\d.]+), .* at ([\d.]+)\)")


def b64(url: str) -> str:
    import base64

    return base64.b64encode(url.encode()).decode()


class Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=300)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(300)
        self.sock.connect(self._path)


def du(cache: Path, where: dict | None = None) -> int:
    """Bytes of the files under blobs/ and ingest/, each inode once: a file renamed from one
    to the other while we walk (a commit, an eviction through ingest/trash/) is one file.
    ``where`` gets the bytes by top directory (blobs, ingest/KEY, ingest/trash, ...)."""
    seen: dict[tuple[int, int], tuple[int, str]] = {}
    for top in (cache / "ingest", cache / "blobs"):  # a commit moves ingest -> blobs
        for dirpath, _, files in os.walk(top):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:
                    continue
                rel = os.path.relpath(dirpath, cache).split(os.sep)
                seen[(st.st_dev, st.st_ino)] = (st.st_size, "/".join(rel[:2]))
    if where is not None:
        for size, place in seen.values():
            where[place] = where.get(place, 0) + size
    return sum(size for size, _ in seen.values())


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.cache = work / "cache"
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.requests: dict[str, list[tuple[float, float]]] = {}  # url -> (start, end) answered
        self.sha: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.errors: list[str] = []
        self.refused: list[str] = []
        self.done = 0
        self.pause = False  # True: workers wait (a verify checkpoint)
        self.cond = threading.Condition()
        self.active = 0  # workers neither paused nor finished
        self.cli_logs: list[str] = []
        self.pinned: list[str] = []
        self.held: list[str] = []
        self.max_excess = -(1 << 62)
        self.max_excess_settled = -(1 << 62)
        self.samples = 0
        self.verify_errors = 0
        self.verifies = 0

    # -- set-up ------------------------------------------------------------------------------
    def make_files(self, nginx) -> list[str]:
        urls = []
        lo, hi = math.log(8 << 10), math.log(512 << 10)
        for i in range(self.args.pulls):
            size = int(math.exp(self.rng.uniform(lo, hi)))
            data = os.urandom(size)
            url = nginx.put(f"soak-{i:05d}.bin", data)
            self.sha[url] = hashlib.sha256(data).hexdigest()
            self.sizes[url] = size
            urls.append(url)
        return urls

    # -- one pull ----------------------------------------------------------------------------
    def api(self, body: dict) -> tuple[int, dict]:
        conn = Unix(str(self.sock))
        try:
            conn.request(
                "POST", "/content/", json.dumps(body), {"Content-Type": "application/json"}
            )
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def cli(self, url: str, *extra: str) -> tuple[int, dict]:
        r = subprocess.run(
            [
                PY,
                str(PYZ),
                "--cache-dir",
                str(self.cache),
                *self.budget_flags,
                "-v",
                "1",
                "pull",
                "--json",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        with self.lock:
            self.cli_logs.append(r.stderr)
        try:
            return (201 if r.returncode == 0 else 500), json.loads(r.stdout)
        except ValueError:
            return 500, {"error": r.stderr[-500:]}

    def one(self, via: str, url: str, pin: bool = False, hold: int = 0) -> None:
        start = time.time()
        if via == "api":
            body: dict = {"url": url}
            if pin:
                body["pin"] = True
            status, entry = self.api(body)
        else:
            extra = ["--hold", str(hold)] if hold else []
            status, entry = self.cli(url, *extra)
        end = time.time()
        if status == 507 or "not enough space" in str(entry):
            # The budget is full of pulls in flight and protected entries right now: a
            # refusal the budget means to give (nothing evicted), counted apart.
            with self.lock:
                self.refused.append(f"{via} {url}: {str(entry)[:400]}")
            return
        if status not in (200, 201):
            with self.lock:
                self.errors.append(f"{via} {url}: {status} {str(entry)[:300]}")
            return
        try:
            with open(entry["path"], "rb") as f:
                got = (
                    hashlib.file_digest(f, "sha256").hexdigest()
                    if hasattr(hashlib, "file_digest")
                    else hashlib.sha256(f.read()).hexdigest()
                )
        except OSError as e:
            # Evicted between the answer and this read: a use without a hold races with
            # eviction by design (an engine holds what it opens).  Not a consistency error.
            got = None
            with self.lock:
                self.raced = getattr(self, "raced", 0) + 1
            _ = e
        if got is not None and got != self.sha[url]:
            with self.lock:
                self.errors.append(f"{via} {url}: content {got} is not the source's")
        with self.lock:
            self.requests.setdefault(url, []).append((start, end))
            self.done += 1

    def worker(self, via: str, queue: list[str], reuse: list[str]) -> None:
        try:
            self._work(via, queue, reuse)
        finally:
            with self.cond:
                self.active -= 1
                self.cond.notify_all()

    def _work(self, via: str, queue: list[str], reuse: list[str]) -> None:
        while True:
            with self.cond:
                if self.pause:
                    self.active -= 1
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: not self.pause)
                    self.active += 1
            with self.lock:
                if not queue:
                    return
                url = queue.pop()
                again = None
                if reuse and self.rng.random() < self.args.reuse:
                    again = self.rng.choice(reuse)
                reuse.append(url)
            self.one(via, url)
            if again is not None:
                self.one(via, again)

    def sampler(self, stop: threading.Event) -> None:
        """Every 20 ms, the bytes under ingest/ and blobs/ at one instant.

        A walk takes a while; evictions during it would make it add up bytes that were never
        there together (blobs listed before an eviction, a partial listed after the write it
        made room for).  Every eviction happens under the budget's lock, so the walk holds
        it: during the walk bytes are only added (writes, commits: each inode counted once),
        and what it adds up lies between the cache at its start and at its end.
        """
        sys.path.insert(0, str(ROOT))
        from nekko_sm.budget import LOCK_NAME
        from nekko_sm.store import FileLock

        while not stop.wait(0.02):
            where: dict = {}
            with FileLock(self.cache / LOCK_NAME):
                measured = du(self.cache, where)
            excess = measured - self.budget
            self.samples += 1
            if excess > self.max_excess:
                self.max_excess = excess
                self.max_where = {k: v for k, v in where.items() if v > 4096}
            # The same without ingest/trash/: blobs an eviction is deleting right now (the
            # database no longer counts them; they are gone a moment later).
            self.max_excess_settled = max(
                self.max_excess_settled, excess - where.get("ingest/trash", 0)
            )

    def verify(self) -> None:
        r = subprocess.run(
            [PY, str(PYZ), "--cache-dir", str(self.cache), "verify"],
            capture_output=True,
            text=True,
            check=False,
        )
        self.verifies += 1
        if r.returncode != 0:
            self.verify_errors += r.stdout.count("damaged:") or 1
            self.errors.append("verify: " + r.stdout[-1000:])

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        nginx = start_nginx(self.work / "nginx")
        try:
            return self._run(nginx)
        finally:
            nginx.stop()

    def _run(self, nginx) -> dict:
        t0 = time.monotonic()
        urls = self.make_files(nginx)
        total = sum(self.sizes.values())
        self.budget = total // 10
        self.budget_flags = ["--max-cache-size", str(self.budget)]
        biggest = max(self.sizes.values())
        self.sock = self.work / "api.sock"
        with open(self.work / "serve.log", "w") as serve_log:
            serve = subprocess.Popen(
                [
                    PY,
                    str(PYZ),
                    "--cache-dir",
                    str(self.cache),
                    *self.budget_flags,
                    "--address",
                    f"unix:{self.sock}",
                    "serve",
                ],
                stderr=serve_log,
                stdout=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 60
            while not self.sock.exists():
                if serve.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("serve did not start")
                time.sleep(0.05)
            # Pins and a hold first, so every later pull goes past them.
            self.pinned = urls[:3]
            for u in self.pinned:
                self.one("api", u, pin=True)
            self.held = [urls[3]]
            self.one("cli", urls[3], hold=3600)
            queue = list(reversed(urls[4:]))
            reuse: list[str] = []
            stop = threading.Event()
            sampler = threading.Thread(target=self.sampler, args=(stop,), daemon=True)
            sampler.start()
            workers = [
                threading.Thread(target=self.worker, args=(via, queue, reuse))
                for via in ("api", "api", "cli", "cli")
            ]
            started = time.monotonic()
            self.active = len(workers)
            for w in workers:
                w.start()
            checkpoints = [len(urls) * k // 5 for k in range(1, 5)]
            while any(w.is_alive() for w in workers):
                time.sleep(0.1)
                if checkpoints and self.done >= checkpoints[0]:
                    checkpoints.pop(0)
                    with self.cond:
                        self.pause = True
                        self.cond.wait_for(lambda: self.active == 0)
                    self.verify()
                    with self.cond:
                        self.pause = False
                        self.cond.notify_all()
            for w in workers:
                w.join()
            elapsed = time.monotonic() - started
            stop.set()
            sampler.join()
            self.verify()
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
        return self.report(urls, total, biggest, elapsed, time.monotonic() - t0)

    def report(
        self, urls: list[str], total: int, biggest: int, elapsed: float, wall: float
    ) -> dict:
        logs = (self.work / "serve.log").read_text().splitlines()
        serve_n = sum(1 for ln in logs if _EVICTED.search(ln))
        for text in self.cli_logs:
            logs.extend(text.splitlines())
        events = []
        for line in logs:
            m = _EVICTED.search(line)
            if m:
                events.append((float(m.group(3)), float(m.group(2)), m.group(1)))
        events.sort()
        lru_violations = []
        highest = (0.0, "")
        for at, last_used, url in events:
            if last_used < highest[0] - 1e-6:
                lru_violations.append(
                    f"{url} (last used {last_used:.6f}) evicted at {at:.6f},"
                    f" after {highest[1]} (last used {highest[0]:.6f})"
                )
            if last_used > highest[0]:
                highest = (last_used, url)
        unrecorded = []
        for at, last_used, url in events:
            before = [s for s, e in self.requests.get(url, []) if e < at]
            if before and last_used < max(before) - 1e-3:
                unrecorded.append(
                    f"{url}: last_used {last_used:.6f} is older than its request"
                    f" at {max(before):.6f}"
                )
        sys.path.insert(0, str(ROOT))
        from nekko_sm.store import Store

        store = Store(self.cache)
        kept = {r.key for r in store.entry_records()}
        store.close()
        lost = [u for u in self.pinned + self.held if u in self.requests and u not in kept]
        ok = (
            not self.errors
            and not lru_violations
            and not unrecorded
            and not lost
            and self.max_excess <= biggest
            and self.verify_errors == 0
        )
        return {
            "pulls": self.done,
            "files": len(urls),
            "total_bytes": total,
            "budget_bytes": self.budget,
            "largest_pull_bytes": biggest,
            "max_over_budget_bytes": self.max_excess,
            "samples": self.samples,
            "bytes_then": getattr(self, "max_where", {}),
            "max_over_budget_without_trash_bytes": self.max_excess_settled,
            "evictions": len(events),
            "evictions_by_serve": serve_n,
            "evictions_by_cli": len(events) - serve_n,
            "lru_violations": lru_violations[:20],
            "uses_not_recorded": unrecorded[:20],
            "verify_runs": self.verifies,
            "consistency_errors": self.verify_errors,
            "errors": self.errors[:20],
            "refused_507": len(self.refused),
            "refusals": self.refused[:5],
            "pins_and_hold_lost": lost,
            "answers_evicted_before_read": getattr(self, "raced", 0),
            "entries_at_end": len(kept),
            "pull_seconds": round(elapsed, 1),
            "pulls_per_second": round(self.done / elapsed, 1),
            "wall_seconds": round(wall, 1),
            "ok": ok,
        }


def touch_cost(nginx_dir: Path, n: int = 2000) -> dict:
    """What recording a use costs a request, measured in this run on this machine.

    Median µs of ``Store.touch`` (the use: one transaction, not fsynced) and of
    ``Store.entry_record`` (a plain read) on one cache; and of the service answering a
    cached entry (what ``POST /content/`` and ``pull`` of a cached URL do, minus HTTP) with
    the touch, and with the touch replaced by nothing: the difference is the use's cost
    per request.  Rounds alternate so a noisy neighbour hits both alike.
    """
    from nekko_sm import config as cfg
    from nekko_sm.service import Service

    nginx = start_nginx(nginx_dir)
    d = Path(tempfile.mkdtemp(prefix="nekko-touch-"))
    try:
        svc = Service(cfg.build({"cache_dir": str(d / "cache")}, {}))
        url = nginx.put("touch.bin", os.urandom(4096))
        svc.pull(url)
        real_touch = svc.store.touch
        fns = {
            "touch": lambda: real_touch(url),
            "read": lambda: svc.store.entry_record(url),
            "cached_with_use": lambda: svc.start(url),
            "cached_without_use": lambda: svc.start(url),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(n // 100):
            for name, fn in fns.items():
                svc.store.touch = (
                    (lambda *a, **k: True) if name == "cached_without_use" else real_touch
                )  # type: ignore[method-assign]
                for _ in range(100):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
        svc.store.touch = real_touch  # type: ignore[method-assign]
        svc.close()
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        return {
            "touch_us": round(med["touch"], 1),
            "read_us": round(med["read"], 1),
            "cached_answer_with_use_us": round(med["cached_with_use"], 1),
            "cached_answer_without_use_us": round(med["cached_without_use"], 1),
            "use_cost_per_request_us": round(med["cached_with_use"] - med["cached_without_use"], 1),
        }
    finally:
        nginx.stop()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pulls", type=int, default=2000)
    p.add_argument("--reuse", type=float, default=0.1, help="share of pulls followed by a re-use")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--out", metavar="PREFIX", help="write PREFIX.json and PREFIX.md")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    subprocess.run(
        [PY, str(ROOT / "build_zipapp.py"), "--if-needed"], check=True, capture_output=True
    )
    work = Path(tempfile.mkdtemp(prefix="nekko-soak-"))
    try:
        result = Soak(args, work).run()
        result["use_cost"] = touch_cost(work / "nginx-touch")
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(text + "\n")
        md = ["| check | result |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in result.items()]
        Path(args.out + ".md").write_text("\n".join(md) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
