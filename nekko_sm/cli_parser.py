"""The command line's grammar: ``nekko-sm [global options] COMMAND [options]``.

:func:`build_parser` makes the argparse parser of every command and option (what
``--help`` shows, and what tests/test_docs.py holds the README and the man page to), from
one table of the global options every command takes, before or after its name;
:func:`normalise_verbose` accepts the spellings of ``-v`` argparse does not.  It parses
only: it reads no configuration, and runs nothing (:mod:`nekko_sm.cli` does).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from nekko_sm import __version__

if TYPE_CHECKING:  # imported by build_parser: the plain lines of status, path and ls
    import argparse  # are read without it (nekko_sm.cli_quick)

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

# The options of every command: the flag (and its short form), its metavar (None: a switch),
# whether it may be given more than once, and its help.
GLOBAL_OPTIONS: tuple[tuple[str, str | None, bool, str], ...] = (
    (
        "--cache-dir",
        "DIR",
        False,
        (
            "cache directory (env CACHE_DIR; default /var/lib/nekko/cache, or the"
            " user cache dir, e.g. ~/.cache/nekko, when that is not writable)"
        ),
    ),
    (
        "--address",
        "ADDR",
        False,
        (
            "API address HOST:PORT, :PORT (all interfaces), [v6]:PORT, or a Unix"
            " socket unix:/path or /path (env NEKKO_ADDRESS; default localhost:8050)"
        ),
    ),
    (
        "-v --verbose",
        "N",
        False,
        "log level 0 info, 1 debug, 2 trace, 3 wire (-v, -vv, -v=2; env VERBOSE)",
    ),
    (
        "--platform",
        "OS/ARCH[/VARIANT]",
        False,
        (
            "platform to pick from multi-arch images, or 'all' (env NEKKO_PLATFORM;"
            " default the host's)"
        ),
    ),
    (
        "--insecure-registry",
        "HOST[:PORT]",
        True,
        (
            "use plain http for this registry; repeatable"
            " (env NEKKO_INSECURE_REGISTRIES, comma-separated)"
        ),
    ),
    ("--jobs", "N", False, "blobs and byte ranges downloaded at once (env NEKKO_JOBS; default 8)"),
    (
        "--registry-mirror",
        "REGISTRY=URL",
        True,
        (
            "try this mirror first for REGISTRY; repeatable"
            " (env NEKKO_REGISTRY_MIRRORS, comma-separated)"
        ),
    ),
    ("--ca-cert", "FILE", False, "CA bundle for https (env SSL_CERT_FILE; default the system's)"),
    (
        "--max-pull-size",
        "SIZE",
        False,
        (
            "refuse a pull larger than SIZE (bytes, or K/M/G/T: powers of 1024);"
            " a body of unknown length is cut off when it passes"
            " (env NEKKO_MAX_PULL_SIZE; default 2T)"
        ),
    ),
    (
        "--max-pull-files",
        "N",
        False,
        (
            "refuse a pull of more than N files: a repository's files, an image's"
            " layers (env NEKKO_MAX_PULL_FILES; default 10000)"
        ),
    ),
    (
        "--api-token-file",
        "FILE",
        False,
        (
            "serve: every request but GET /healthz needs 'Authorization: Bearer"
            " TOKEN', the first line of FILE; re-read when FILE changes and on"
            " SIGHUP (env NEKKO_API_TOKEN_FILE; default none)"
        ),
    ),
    (
        "--verify-cached-credentials",
        "always|never",
        False,
        (
            "before answering from the cache with an entry pulled with"
            " credentials, ask the upstream whether this caller's credentials may"
            " fetch it now (env NEKKO_VERIFY_CACHED_CREDENTIALS; default always)"
        ),
    ),
    (
        "--discard-unpacked-layers",
        None,
        False,
        (
            "free a model's tar layers once their files are in the cache: its"
            " disk use is its files only, but OCI tools can no longer copy that"
            " image out (env NEKKO_DISCARD_UNPACKED_LAYERS=1; default off)"
        ),
    ),
    (
        "--deny-network",
        "CIDR",
        True,
        (
            "never connect to addresses in CIDR; repeatable (env"
            " NEKKO_DENY_NETWORKS, comma-separated; link-local and cloud metadata"
            " addresses are always denied unless allowed)"
        ),
    ),
    (
        "--allow-network",
        "CIDR",
        True,
        (
            "allow CIDR even inside a denied network (the most specific wins);"
            " repeatable (env NEKKO_ALLOW_NETWORKS, comma-separated; default none)"
        ),
    ),
    (
        "--max-cache-size",
        "SIZE",
        False,
        (
            "keep blobs/ and ingest/ within SIZE (bytes, or K/M/G/T, powers of"
            " 1024), evicting least recently used entries before a pull writes"
            " (env NEKKO_MAX_CACHE_SIZE; default unlimited)"
        ),
    ),
    (
        "--min-free-space",
        "SIZE|N%",
        False,
        (
            "keep this much of the cache's file system free, evicting likewise"
            " (env NEKKO_MIN_FREE_SPACE; default none)"
        ),
    ),
)


# Every spelling of a global option: True when it takes a value, False for a switch.
_GLOBAL_FLAGS = {
    flag: metavar is not None for flags, metavar, _, _ in GLOBAL_OPTIONS for flag in flags.split()
}


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    import argparse

    d = argparse.SUPPRESS if suppress else None
    for flags, metavar, repeatable, text in GLOBAL_OPTIONS:
        if metavar is None:
            p.add_argument(*flags.split(), action="store_true", default=d, help=text)
        elif repeatable:
            p.add_argument(*flags.split(), metavar=metavar, action="append", default=d, help=text)
        else:
            p.add_argument(*flags.split(), metavar=metavar, default=d, help=text)


class _Skipped:
    """What :func:`build_parser` gives a command it was not asked for: options go nowhere."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        pass


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of the command ``only`` (:func:`command_of`'s).

    Both parse a command line naming ``only`` the same way, with the same messages; a
    one-shot command builds the one-command parser, since the ten subparsers are most of
    what argparse costs at start-up (a cold ``status``, an engine's ``path``).
    """
    import argparse

    p = argparse.ArgumentParser(
        prog="nekko-sm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"nekko-sm {__version__}")
    _global_options(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, **kw: Any) -> argparse.ArgumentParser | _Skipped:
        if only is not None and name != only:
            return _Skipped()
        return sub.add_parser(name, parents=[common], **kw)

    add("serve", help="run the HTTP API (the default command)")

    s = add("pull", help="download URL into the cache, print its path")
    s.add_argument("url", metavar="URL")
    s.add_argument(
        "--credentials",
        metavar="TOKEN",
        help="Bearer token, or base64 of user:pass with --credentials-type Basic"
        " (visible in ps: prefer --credentials-file)",
    )
    s.add_argument(
        "--credentials-file",
        metavar="FILE",
        help="read the credentials from the first line of FILE ('-' for stdin)",
    )
    s.add_argument(
        "--credentials-type",
        metavar="TYPE",
        type=str.capitalize,
        choices=["Bearer", "Basic"],
        help="Bearer (default) or Basic, any case",
    )
    s.add_argument(
        "--digest",
        metavar="sha256:HEX",
        help="expected digest of the entry: the file's sha256 for a single file",
    )
    s.add_argument(
        "--include",
        metavar="PATTERN",
        action="append",
        help="hf:// only: pull only the files matching PATTERN (fnmatch on the path"
        " in the repository, as huggingface_hub's allow_patterns; repeatable)",
    )
    s.add_argument(
        "--exclude",
        metavar="PATTERN",
        action="append",
        help="hf:// only: then skip the files matching PATTERN (repeatable)",
    )
    s.add_argument("--pin", action="store_true", help="pin the entry: never evicted")
    s.add_argument(
        "--hold",
        metavar="SECONDS",
        type=_seconds,
        help="keep the entry from eviction for SECONDS from now",
    )
    s.add_argument("--json", action="store_true", help="print the entry as JSON")

    s = add(
        "status",
        help="print the state of URL; exit 0 complete, 3 incomplete, 4 absent",
    )
    s.add_argument("url", metavar="URL")
    s.add_argument("--json", action="store_true", help="print the entry as JSON")

    s = add("path", help="print the path an engine should open")
    s.add_argument("url", metavar="URL")

    s = add("ls", help="list every entry")
    s.add_argument("--json", action="store_true", help="print the entries as JSON")

    s = add("rm", help="remove URL, free blobs no one else uses")
    s.add_argument("url", metavar="URL")

    s = add("gc", help="free unreferenced blobs and stale partials; keep the budget")
    s.add_argument("--dry-run", action="store_true", help="only say what would be freed")

    s = add("verify", help="re-hash blobs; exit 1 when any is damaged")
    s.add_argument("url", metavar="URL", nargs="?")
    s.add_argument(
        "--repair",
        action="store_true",
        help="remove damaged blobs (and the entries needing them), fix the counts",
    )

    s = add("pin", help="pin a cached URL: it is never evicted")
    s.add_argument("url", metavar="URL")
    s = add("unpin", help="unpin a cached URL")
    s.add_argument("url", metavar="URL")
    return p


def command_of(argv: list) -> str | None:
    """The command ``argv`` (:func:`normalise_verbose`'s) names, or None when unsure.

    Only global options spelled in full may come before it (a value each, or ``--opt=value``,
    or a switch), as argparse would read them; for anything else (``--help``, an
    abbreviation, an unknown option, no command) None asks for the parser of every command.
    """
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in COMMANDS:
            return a
        name, eq, _ = a.partition("=")
        spec = _GLOBAL_FLAGS.get(name)
        if spec is None or (eq and not spec):
            return None
        i += 2 if spec and not eq else 1
    return None


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"--hold must be from 0 to 315360000 seconds: {text!r}")
    return value


def normalise_verbose(argv: list) -> list:
    """Accept -v, -vv, -vvv, -v N, -v=N, -vN, --verbose N and --verbose=N."""
    out: list = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            out.extend(argv[i - 1 :])
            break
        if not a.startswith("-v"):  # the patterns below match none of these: no compiling them
            out.append(a)
            continue
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
