"""``nekko-sm [global options] COMMAND``: the command line (DESIGN section 6).

``main(argv) -> int`` maps every error once: a message on stderr and the exit status of
the table (0 ok, 1 failed, 2 bad input, 3 incomplete, 4 absent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time

from nekko_sm import __version__
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

COMMANDS = ("serve", "pull", "status", "path", "ls", "rm", "gc", "verify")

DESCRIPTION = """\
nekko-sm downloads OCI images and artifacts (oci://), Hugging Face files and repositories
(hf://, huggingface://) and any http(s) URL into one verified, deduplicated cache in OCI
image-layout format, and tells inference engines where the bytes are.
"""

EPILOG = """\
environment:
  CACHE_DIR, NEKKO_ADDRESS, VERBOSE   (also STORAGE_MANAGER_CACHE_DIR/_ADDRESS/_VERBOSE)
  NEKKO_PLATFORM, NEKKO_JOBS, NEKKO_INSECURE_REGISTRIES, NEKKO_REGISTRY_MIRRORS
  HF_ENDPOINT, HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), SSL_CERT_FILE
  HTTPS_PROXY, HTTP_PROXY, NO_PROXY (lower-case spellings too)
  NEKKO_MAX_PULL_SIZE, NEKKO_MAX_PULL_FILES

with no COMMAND, nekko-sm runs serve

exit status: 0 ok, 1 failed, 2 bad input or configuration, 3 incomplete, 4 absent
"""


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("--cache-dir", metavar="DIR", default=d,
                   help="cache directory (env CACHE_DIR; default /var/lib/nekko/cache, or the"
                        " user cache dir, e.g. ~/.cache/nekko, when that is not writable)")
    p.add_argument("--address", metavar="ADDR", default=d,
                   help="API address HOST:PORT, :PORT (all interfaces), [v6]:PORT, or a Unix"
                        " socket unix:/path or /path (env NEKKO_ADDRESS; default localhost:8050)")
    p.add_argument("-v", "--verbose", metavar="N", default=d,
                   help="log level 0 info, 1 debug, 2 trace, 3 wire (-v, -vv, -v=2; env VERBOSE)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", default=d,
                   help="platform to pick from multi-arch images, or 'all' (env NEKKO_PLATFORM;"
                        " default the host's)")
    p.add_argument("--insecure-registry", metavar="HOST[:PORT]", action="append", default=d,
                   help="use plain http for this registry; repeatable"
                        " (env NEKKO_INSECURE_REGISTRIES, comma-separated)")
    p.add_argument("--jobs", metavar="N", default=d,
                   help="blobs and byte ranges downloaded at once (env NEKKO_JOBS; default 8)")
    p.add_argument("--registry-mirror", metavar="REGISTRY=URL", action="append", default=d,
                   help="try this mirror first for REGISTRY; repeatable"
                        " (env NEKKO_REGISTRY_MIRRORS, comma-separated)")
    p.add_argument("--ca-cert", metavar="FILE", default=d,
                   help="CA bundle for https (env SSL_CERT_FILE; default the system's)")
    p.add_argument("--max-pull-size", metavar="SIZE", default=d,
                   help="refuse a pull larger than SIZE (bytes, or K/M/G/T: powers of 1024);"
                        " a body of unknown length is cut off when it passes"
                        " (env NEKKO_MAX_PULL_SIZE; default 2T)")
    p.add_argument("--max-pull-files", metavar="N", default=d,
                   help="refuse a pull of more than N files: a repository's files, an image's"
                        " layers (env NEKKO_MAX_PULL_FILES; default 10000)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nekko-sm", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"nekko-sm {__version__}")
    _global_options(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("serve", parents=[common], help="run the HTTP API (the default command)")

    s = sub.add_parser("pull", parents=[common], help="download URL into the cache, print its path")
    s.add_argument("url", metavar="URL")
    s.add_argument("--credentials", metavar="TOKEN",
                   help="Bearer token, or base64 of user:pass with --credentials-type Basic"
                        " (visible in ps: prefer --credentials-file)")
    s.add_argument("--credentials-file", metavar="FILE",
                   help="read the credentials from the first line of FILE ('-' for stdin)")
    s.add_argument("--credentials-type", metavar="TYPE", type=str.capitalize,
                   choices=["Bearer", "Basic"], help="Bearer (default) or Basic, any case")
    s.add_argument("--digest", metavar="sha256:HEX",
                   help="expected digest of the entry: the file's sha256 for a single file")
    s.add_argument("--json", action="store_true", help="print the entry as JSON")

    s = sub.add_parser("status", parents=[common],
                       help="print the state of URL; exit 0 complete, 3 incomplete, 4 absent")
    s.add_argument("url", metavar="URL")
    s.add_argument("--json", action="store_true", help="print the entry as JSON")

    s = sub.add_parser("path", parents=[common], help="print the path an engine should open")
    s.add_argument("url", metavar="URL")

    s = sub.add_parser("ls", parents=[common], help="list every entry")
    s.add_argument("--json", action="store_true", help="print the entries as JSON")

    s = sub.add_parser("rm", parents=[common], help="remove URL, free blobs no one else uses")
    s.add_argument("url", metavar="URL")

    s = sub.add_parser("gc", parents=[common], help="free unreferenced blobs and stale partials")
    s.add_argument("--dry-run", action="store_true", help="only say what would be freed")

    s = sub.add_parser("verify", parents=[common],
                       help="re-hash blobs; exit 1 when any is damaged")
    s.add_argument("url", metavar="URL", nargs="?")
    s.add_argument("--repair", action="store_true", help="remove damaged blobs")
    return p


def _normalise_verbose(argv: list) -> list:
    """Accept -v, -vv, -vvv, -v N, -v=N, -vN, --verbose N and --verbose=N."""
    out: list = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            out.extend(argv[i - 1:])
            break
        if a == "-v" and i < len(argv) and re.fullmatch(r"\d+", argv[i]):
            out.append(f"--verbose={argv[i]}")  # -v 2
            i += 1
            continue
        m = re.fullmatch(r"-(v+)", a)
        if m:
            out.append(f"--verbose={len(m.group(1))}")
            continue
        m = re.fullmatch(r"-v=?(\d+)", a)
        if m:
            out.append(f"--verbose={m.group(1)}")
            continue
        out.append(a)
    return out


def _setup_logging(verbose: int, command: str) -> None:
    logging.addLevelName(TRACE, "TRACE")
    logging.addLevelName(WIRE, "WIRE")
    level = {0: logging.INFO, 1: logging.DEBUG, 2: TRACE, 3: WIRE}[verbose]
    if command != "serve" and verbose == 0:
        level = logging.WARNING  # one-shot commands stay quiet unless asked
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if command == "serve" \
        else "nekko-sm: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("nekko_sm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list | None = None) -> int:
    argv = _normalise_verbose(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    command = args.command or "serve"
    from nekko_sm import config as _config

    flags = {k: getattr(args, k, None) for k in
             ("cache_dir", "address", "verbose", "platform", "insecure_registry", "jobs",
              "registry_mirror", "ca_cert", "max_pull_size", "max_pull_files")}
    try:
        config = _config.build(flags, os.environ)
    except NekkoError as e:
        print(f"nekko-sm: {e.message}", file=sys.stderr)
        return EXIT_USAGE
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
    svc = _service(config)
    try:
        flight, entry = svc.start(args.url, creds, args.digest, getattr(args, "platform", None))
        if entry is None:
            if sys.stderr.isatty():
                with _ProgressBar(flight):
                    entry, _ = _wait(flight)
            else:
                entry, _ = _wait(flight)
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
    if args.json:
        print(json.dumps(entry, indent=2))
    else:
        done, size = entry.get("downloaded"), entry.get("size")
        print(f"{entry['state']} {entry['url']} {done}/{size if size is not None else '?'} bytes")
    return EXIT_OK if entry["state"] == "complete" else EXIT_INCOMPLETE


def _cmd_path(config, args) -> int:
    entry = _service(config).status(args.url)
    if entry["state"] != "complete":
        print(f"nekko-sm: {entry['url']} is {entry['state']}, not complete", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(entry["path"])
    return EXIT_OK


def _cmd_ls(config, args) -> int:
    entries = _service(config).list()
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    for e in entries:
        size = e.get("size")
        print(f"{e['state']:<11} {size if size is not None else '?':>14}  {e['url']}")
    return EXIT_OK


def _cmd_rm(config, args) -> int:
    r = _service(config).remove(args.url)
    print(f"removed {r['url']} ({r['blobs_freed']} blobs, {r['bytes_freed']} bytes freed)")
    return EXIT_OK


def _cmd_gc(config, args) -> int:
    svc = _service(config)
    r = svc.store.gc(dry_run=args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {len(r.blobs_freed)} blobs ({r.bytes_freed} bytes),"
          f" {len(r.partials_freed)} partial downloads")
    return EXIT_OK


def _cmd_verify(config, args) -> int:
    svc = _service(config)
    roots = None
    if args.url:
        key = svc.canonical(args.url)
        desc = svc.store.get_entry(key)
        if desc is None:
            print(f"nekko-sm: {key} is not in the cache", file=sys.stderr)
            return EXIT_ABSENT
        roots = [desc]
    problems = svc.store.verify(roots, repair=args.repair)
    for digest, problem in problems:
        print(f"damaged: {digest}: {problem}" + (" (removed)" if args.repair and
                                                 problem == "digest mismatch" else ""))
    if not problems:
        print("ok")
    return EXIT_FAILED if problems else EXIT_OK


_COMMANDS = {
    "serve": _cmd_serve, "pull": _cmd_pull, "status": _cmd_status, "path": _cmd_path,
    "ls": _cmd_ls, "rm": _cmd_rm, "gc": _cmd_gc, "verify": _cmd_verify,
}
