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

COMMANDS = ("serve", "pull", "status", "path", "ls", "rm", "gc", "verify", "pin", "unpin")

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
  NEKKO_API_TOKEN_FILE, NEKKO_DENY_NETWORKS, NEKKO_ALLOW_NETWORKS,
  NEKKO_MAX_CACHE_SIZE, NEKKO_MIN_FREE_SPACE, NEKKO_DISCARD_UNPACKED_LAYERS

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
    p.add_argument("--api-token-file", metavar="FILE", default=d,
                   help="serve: every request but GET /healthz needs 'Authorization: Bearer"
                        " TOKEN', the first line of FILE; re-read when FILE changes and on"
                        " SIGHUP (env NEKKO_API_TOKEN_FILE; default none)")
    p.add_argument("--verify-cached-credentials", metavar="always|never", default=d,
                   help="before answering from the cache with an entry pulled with"
                        " credentials, ask the upstream whether this caller's credentials may"
                        " fetch it now (env NEKKO_VERIFY_CACHED_CREDENTIALS; default always)")
    p.add_argument("--discard-unpacked-layers", action="store_true", default=d,
                   help="free a model's tar layers once their files are in the cache: its"
                        " disk use is its files only, but OCI tools can no longer copy that"
                        " image out (env NEKKO_DISCARD_UNPACKED_LAYERS=1; default off)")
    p.add_argument("--deny-network", metavar="CIDR", action="append", default=d,
                   help="never connect to addresses in CIDR; repeatable (env"
                        " NEKKO_DENY_NETWORKS, comma-separated; link-local and cloud metadata"
                        " addresses are always denied unless allowed)")
    p.add_argument("--allow-network", metavar="CIDR", action="append", default=d,
                   help="allow CIDR even inside a denied network (the most specific wins);"
                        " repeatable (env NEKKO_ALLOW_NETWORKS, comma-separated; default none)")
    p.add_argument("--max-cache-size", metavar="SIZE", default=d,
                   help="keep blobs/ and ingest/ within SIZE (bytes, or K/M/G/T, powers of"
                        " 1024), evicting least recently used entries before a pull writes"
                        " (env NEKKO_MAX_CACHE_SIZE; default unlimited)")
    p.add_argument("--min-free-space", metavar="SIZE|N%", default=d,
                   help="keep this much of the cache's file system free, evicting likewise"
                        " (env NEKKO_MIN_FREE_SPACE; default none)")


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
    s.add_argument("--include", metavar="PATTERN", action="append",
                   help="hf:// only: pull only the files matching PATTERN (fnmatch on the path"
                        " in the repository, as huggingface_hub's allow_patterns; repeatable)")
    s.add_argument("--exclude", metavar="PATTERN", action="append",
                   help="hf:// only: then skip the files matching PATTERN (repeatable)")
    s.add_argument("--pin", action="store_true", help="pin the entry: never evicted")
    s.add_argument("--hold", metavar="SECONDS", type=_seconds,
                   help="keep the entry from eviction for SECONDS from now")
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

    s = sub.add_parser("gc", parents=[common],
                       help="free unreferenced blobs and stale partials; keep the budget")
    s.add_argument("--dry-run", action="store_true", help="only say what would be freed")

    s = sub.add_parser("verify", parents=[common],
                       help="re-hash blobs; exit 1 when any is damaged")
    s.add_argument("url", metavar="URL", nargs="?")
    s.add_argument("--repair", action="store_true",
                   help="remove damaged blobs (and the entries needing them), fix the counts")

    s = sub.add_parser("pin", parents=[common], help="pin a cached URL: it is never evicted")
    s.add_argument("url", metavar="URL")
    s = sub.add_parser("unpin", parents=[common], help="unpin a cached URL")
    s.add_argument("url", metavar="URL")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"--hold must be from 0 to 315360000 seconds: {text!r}")
    return value


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
    if command != "serve" and sys.stderr.isatty():
        fmt = "\r\033[K" + fmt  # a line (a retry's) over the progress bar, which redraws below
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
              "registry_mirror", "ca_cert", "api_token_file", "deny_network", "allow_network",
              "verify_cached_credentials", "max_cache_size", "min_free_space",
              "discard_unpacked_layers", "max_pull_size", "max_pull_files")}
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
    from nekko_sm.refs import with_patterns

    url = with_patterns(args.url, args.include, args.exclude, config.hf_endpoint)
    svc = _service(config)
    try:
        pin = True if args.pin else None
        flight, entry = svc.start(url, creds, args.digest, getattr(args, "platform", None),
                                  pin, args.hold)
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
        lines.append(f"{state:<11} {size if size is not None else '?':>14}"
                     f"  {_when(used) if used is not None else '-':<19}  {flags:<10}  {url}\n")
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
    print(f"{verb} {len(r.blobs_freed)} blobs ({r.bytes_freed} bytes),"
          f" {len(r.partials_freed)} partial downloads")
    if evicted is not None:
        print(f"evicted {len(evicted.evicted)} entries and partials ({evicted.bytes_freed}"
              f" bytes) to keep the budget ({svc.budget.describe()})"
              + (f"; still {evicted.over} bytes over: pinned, held or in flight"
                 if evicted.over else ""))
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
        done = "" if not args.repair else " (removed)" if problem == "digest mismatch" \
            else " (recounted)" if problem.startswith(("reference count", "the database")) else ""
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
    "serve": _cmd_serve, "pull": _cmd_pull, "status": _cmd_status, "path": _cmd_path,
    "ls": _cmd_ls, "rm": _cmd_rm, "gc": _cmd_gc, "verify": _cmd_verify,
    "pin": _cmd_pin, "unpin": _cmd_pin,
}
