"""``nekko-sm [global options] COMMAND``: the command line (DESIGN section 6).

``main(argv) -> int`` parses the arguments (:mod:`nekko_sm.cli_parser`), builds the
configuration, sets up logging, runs the command (a function per command over the
service, or the API server for ``serve``) and maps every error once: a message on stderr
and the exit status of the table (0 ok, 1 failed, 2 bad input, 3 incomplete, 4 absent).
It defines no option (the parser does) and holds no state between commands.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from nekko_sm import logs
from nekko_sm.cli_parser import build_parser, command_of, normalise_verbose
from nekko_sm.cli_quick import quick_parse
from nekko_sm.errors import (
    EXIT_ABSENT,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    NekkoError,
)

TRACE = 5
WIRE = 3
# Commands that set up logging only when something logs: engines start them cold, often
# (``path`` in an init script), and importing logging was a tenth of their time.
_LAZY_LOGGING = ("status", "path", "ls")


def _setup_logging(verbose: int, command: str) -> None:
    import logging

    logging.addLevelName(TRACE, "TRACE")
    logging.addLevelName(WIRE, "WIRE")
    level = {0: logging.INFO, 1: logging.DEBUG, 2: TRACE, 3: WIRE}[verbose]
    if command != "serve" and verbose == 0:
        level = logging.WARNING  # one-shot commands stay quiet unless asked
    handler = logging.StreamHandler(sys.stderr)
    fmt = (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if command == "serve"
        else "nekko-sm: %(message)s"
    )
    if command != "serve" and sys.stderr.isatty():
        fmt = "\r\033[K" + fmt  # a line (a retry's) over the progress bar, which redraws below
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("nekko_sm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list | None = None) -> int:
    argv = normalise_verbose(list(sys.argv[1:] if argv is None else argv))
    args: Any = quick_parse(argv)  # a plain status/path/ls line: no argparse to import
    if args is None:
        parser = build_parser(command_of(argv))  # one command's parser: a faster start
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    command = args.command or "serve"
    from nekko_sm import config as _config

    flags = {
        k: getattr(args, k, None)
        for k in (
            "cache_dir",
            "address",
            "verbose",
            "platform",
            "insecure_registry",
            "jobs",
            "registry_mirror",
            "ca_cert",
            "api_token_file",
            "deny_network",
            "allow_network",
            "verify_cached_credentials",
            "max_cache_size",
            "min_free_space",
            "discard_unpacked_layers",
            "max_pull_size",
            "max_pull_files",
        )
    }
    try:
        config = _config.build(flags, os.environ)
    except NekkoError as e:
        print(f"nekko-sm: {e.message}", file=sys.stderr)
        return EXIT_USAGE
    if command in _LAZY_LOGGING:
        logs.configure(lambda: _setup_logging(config.verbose, command))
    else:
        _setup_logging(config.verbose, command)
    for note in config.notes:
        print(f"nekko-sm: {note}", file=sys.stderr)
    try:
        return _COMMANDS[command](config, args)
    except NekkoError as e:
        print(f"nekko-sm: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nekko-sm: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"nekko-sm: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        logs.configure(None)  # a set-up not needed: not left for whatever logs next


def _service(config):
    from nekko_sm.service import Service

    return Service(config)


def _cmd_serve(config, args) -> int:
    from nekko_sm import api

    return api.run(config)


class _ProgressBar:
    def __init__(self, flight) -> None:
        self.flight = flight
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.start_t = time.monotonic()

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            self._draw()

    def _draw(self, end: str = "") -> None:
        p = self.flight.progress
        mib = 1 << 20
        rate = p.done / max(0.001, time.monotonic() - self.start_t) / mib
        if p.total:
            pct = min(100.0, 100.0 * p.done / p.total)
            text = f"{pct:5.1f}% {p.done / mib:8.1f}/{p.total / mib:.1f} MiB {rate:7.1f} MiB/s"
        else:
            text = f"{p.done / mib:8.1f} MiB {rate:7.1f} MiB/s"
        sys.stderr.write(f"\r{text}  " + end)
        sys.stderr.flush()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._draw("\n")


def _cmd_pull(config, args) -> int:
    from nekko_sm.credentials import Credentials
    from nekko_sm.errors import BadRequest

    secret = args.credentials
    if args.credentials_file:
        if args.credentials:
            raise BadRequest("give --credentials or --credentials-file, not both")
        try:
            if args.credentials_file == "-":
                secret = sys.stdin.readline()
            else:
                with open(args.credentials_file, encoding="utf-8") as f:
                    secret = f.readline()
        except OSError as e:
            raise BadRequest(f"cannot read --credentials-file: {e.strerror}") from None
        secret = secret.strip()
    creds = Credentials.make(secret, args.credentials_type)
    from nekko_sm.refparse import with_patterns

    url = with_patterns(args.url, args.include, args.exclude, config.hf_endpoint)
    svc = _service(config)
    try:
        pin = True if args.pin else None
        flight, entry = svc.start(
            url, creds, args.digest, getattr(args, "platform", None), pin, args.hold
        )
        if entry is None:
            if sys.stderr.isatty():
                with _ProgressBar(flight):
                    _wait(flight)
            else:
                _wait(flight)
            entry, _ = svc.finish(flight, pin, args.hold)
    finally:
        svc.close()
    if args.json:
        print(json.dumps(entry, indent=2))
    else:
        print(entry["path"])
    return EXIT_OK


def _wait(flight):
    # Wait in small steps so Ctrl-C reaches the main thread.
    while True:
        try:
            return flight.future.result(timeout=0.5)
        except TimeoutError:
            continue
        except Exception as e:
            import concurrent.futures

            if isinstance(e, concurrent.futures.TimeoutError):
                continue
            raise


def _cmd_status(config, args) -> int:
    from nekko_sm.errors import EntryNotFound

    svc = _service(config)
    try:
        entry = svc.status(args.url)
    except EntryNotFound as e:
        if args.json:
            # the canonical URL: what was typed may carry a user:password
            print(json.dumps({"url": svc.canonical(args.url), "state": "absent"}))
        else:
            print(f"absent: {e.message}")
        return EXIT_ABSENT
    finally:
        svc.store.close()
    if args.json:
        print(json.dumps(entry, indent=2))
    else:
        done, size = entry.get("downloaded"), entry.get("size")
        print(f"{entry['state']} {entry['url']} {done}/{size if size is not None else '?'} bytes")
    return EXIT_OK if entry["state"] == "complete" else EXIT_INCOMPLETE


def _cmd_path(config, args) -> int:
    svc = _service(config)
    try:
        entry = svc.use(args.url)
    finally:
        svc.store.close()
    if entry["state"] != "complete":
        print(f"nekko-sm: {entry['url']} is {entry['state']}, not complete", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(entry["path"])
    return EXIT_OK


def _cmd_ls(config, args) -> int:
    svc = _service(config)
    try:
        if args.json:  # one entry a line: json's indent= would use its slow pure-Python encoder
            texts = svc.catalog.list_texts()
            sys.stdout.write("[\n" + ",\n".join(texts) + "\n]\n" if texts else "[]\n")
            return EXIT_OK
        rows = svc.catalog.summaries()
    finally:
        svc.store.close()
    now = time.time()
    lines = []
    for url, state, size, pinned, held, used in rows:
        flags = "pinned" if pinned else "-"
        if held is not None and held > now:
            flags = ("pinned," if pinned else "") + "held-until=" + _when(held)
        lines.append(
            f"{state:<11} {size if size is not None else '?':>14}"
            f"  {_when(used) if used is not None else '-':<19}  {flags:<10}  {url}\n"
        )
    sys.stdout.write("".join(lines))
    return EXIT_OK


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _cmd_rm(config, args) -> int:
    svc = _service(config)
    try:
        r = svc.remove(args.url)
    finally:
        svc.close()
    print(f"removed {r['url']} ({r['blobs_freed']} blobs, {r['bytes_freed']} bytes freed)")
    return EXIT_OK


def _cmd_gc(config, args) -> int:
    svc = _service(config)
    try:
        r = svc.gc(dry_run=args.dry_run)
        evicted = None
        if not args.dry_run and svc.budget.enabled:
            evicted = svc.budget.enforce("to bring the cache within its budget (gc)")
    finally:
        svc.close()
    verb = "would free" if args.dry_run else "freed"
    print(
        f"{verb} {len(r.blobs_freed)} blobs ({r.bytes_freed} bytes),"
        f" {len(r.partials_freed)} partial downloads"
    )
    if evicted is not None:
        print(
            f"evicted {len(evicted.evicted)} entries and partials ({evicted.bytes_freed}"
            f" bytes) to keep the budget ({svc.budget.describe()})"
            + (
                f"; still {evicted.over} bytes over: pinned, held or in flight"
                if evicted.over
                else ""
            )
        )
    return EXIT_OK


def _cmd_verify(config, args) -> int:
    svc = _service(config)
    try:
        roots = None
        if args.url:
            key = svc.canonical(args.url)
            desc = svc.store.get_entry(key)
            if desc is None:
                print(f"nekko-sm: {key} is not in the cache", file=sys.stderr)
                return EXIT_ABSENT
            roots = [desc]
        problems = svc.verify(roots, repair=args.repair)
    finally:
        svc.close()
    for digest, problem in problems:
        done = (
            ""
            if not args.repair
            else " (removed)"
            if problem == "digest mismatch"
            else " (recounted)"
            if problem.startswith(("reference count", "the database"))
            else ""
        )
        print(f"damaged: {digest}: {problem}{done}")
    if not problems:
        print("ok")
    return EXIT_FAILED if problems else EXIT_OK


def _cmd_pin(config, args) -> int:
    svc = _service(config)
    try:
        entry = svc.pin(args.url, args.command == "pin")
    finally:
        svc.store.close()
    print(f"{'pinned' if entry['pinned'] else 'unpinned'} {entry['url']}")
    return EXIT_OK


_COMMANDS = {
    "serve": _cmd_serve,
    "pull": _cmd_pull,
    "status": _cmd_status,
    "path": _cmd_path,
    "ls": _cmd_ls,
    "rm": _cmd_rm,
    "gc": _cmd_gc,
    "verify": _cmd_verify,
    "pin": _cmd_pin,
    "unpin": _cmd_pin,
}
