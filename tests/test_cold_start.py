"""A cold ``status``, ``path`` and ``ls`` (issue 11, item 5): what they import, and the parser.

Engines call ``path`` in init scripts, so a one-shot command's start-up is mostly imports. No
test here times anything: they hold the commands, run from the built .pyz with
``python -X importtime``, to loading none of the modules that only a download, the server,
or the standard library's data classes need, and the one-command parser to reading every
command line as the parser of every command does.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest

from nekko_sm.cli_parser import build_parser, command_of, normalise_verbose
from nekko_sm.cli_quick import quick_parse

# Modules a cold status/path/ls must not import: the network stack, what only a pull or the
# server uses, the standard library's data classes (with `inspect`) and logging (with
# traceback and string) until something logs, and argparse (with gettext and locale) for a
# plain command line.  socket, selectors, concurrent.futures,
# hashlib, platform, dataclasses, inspect, logging, traceback, string, argparse, gettext and
# locale were imported until issue 11; the others never were, and must not start to be.
NOT_IMPORTED = (
    "socket",
    "ssl",
    "selectors",
    "http.client",
    "http.server",
    "email",
    "urllib3",
    "concurrent.futures",
    "hashlib",
    "_hashlib",
    "platform",
    "dataclasses",
    "inspect",
    "platformdirs",
    "nekko_sm.transfer",
    "nekko_sm.pools",
    "nekko_sm.download",
    "nekko_sm.api",
    "logging",
    "traceback",
    "string",
    "argparse",
    "gettext",
    "locale",
)


def _imported(pyz, cache, *args: str) -> tuple[subprocess.CompletedProcess, set]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", str(pyz), "--cache-dir", str(cache), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return r, names


@pytest.fixture(scope="module")
def cached(pyz, nginx, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cold") / "cache"
    url = nginx.put("cold-start.bin", b"cold start\n")
    r = subprocess.run(
        [sys.executable, str(pyz), "--cache-dir", str(cache), "pull", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return cache, url, r.stdout.strip()


@pytest.mark.parametrize("command", ["status", "status --json", "path", "ls", "ls --json"])
def test_a_cold_command_imports_no_network_stack(pyz, cached, command):
    cache, url, path = cached
    words = command.split()
    args = [*words[:1], *([url] if words[0] != "ls" else []), *words[1:]]
    r, names = _imported(pyz, cache, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (path if words[0] == "path" else url) in r.stdout  # the command did its work
    assert {"nekko_sm.cli", "nekko_sm.store", "sqlite3"} <= names  # the list is the real one
    assert sorted(set(NOT_IMPORTED) & names) == []


def test_an_absent_entry_imports_no_network_stack(pyz, tmp_path):
    r, names = _imported(pyz, tmp_path / "cache", "status", "http://127.0.0.1:9/no/such")
    assert r.returncode == 4, r.stderr[-2000:]
    assert "absent" in r.stdout and "nekko_sm.store" in names
    # hashlib, though: an entry not in the cache is looked for as a pull's record, whose
    # file name is a sha256 (an OCI reference also needs the platform, for its key)
    assert sorted(set(NOT_IMPORTED) - {"hashlib", "_hashlib"} & names) == []


def test_a_cold_command_logs_through_the_cli_handler(pyz, nginx, tmp_path):
    """logging is imported at the first record: that record still gets the CLI's format."""
    cache = tmp_path / "cache"
    url = nginx.put("cold-start-log.bin", b"logged\n")
    run = [sys.executable, str(pyz), "--cache-dir", str(cache)]
    assert subprocess.run([*run, "pull", url], capture_output=True, check=False).returncode == 0
    for name in ("nekko.db", "nekko.db-wal", "nekko.db-shm"):  # index.json only: taken over
        (cache / name).unlink(missing_ok=True)
    r = subprocess.run([*run, "-v", "status", url], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith(f"complete {url} "), r.stderr
    assert "nekko-sm: " in r.stderr and "taking 1 entries into nekko.db" in r.stderr
    r = subprocess.run([*run, "status", url], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stderr == ""  # quiet at -v 0, as before


def test_refs_spells_string_punctuation_out():
    import string

    from nekko_sm import refs

    assert refs._PUNCTUATION == string.punctuation


U = "http://h/x"
COMMAND_LINES = [
    ["status", U],
    ["--cache-dir", "/c", "status", U],
    ["--cache-dir=/c", "status", "--json", U],
    ["path", U],
    ["ls"],
    ["ls", "--json"],
    ["-v", "status", U],
    ["-vv", "path", U, "--jobs", "3"],
    ["-v", "2", "ls"],
    ["--verbose", "2", "ls"],
    ["status"],
    ["status", "--help"],
    ["path", "-h"],
    ["status", U, "extra"],
    ["status", "--json"],
    ["ls", U],
    ["--bogus", "status", U],
    ["--cache-dir", "status", "status", U],
    ["--jobs", "status", U],
    ["--cache-dir", "-x", "status", U],
    ["--cache-dir"],
    ["--discard-unpacked-layers", "ls"],
    ["--discard-unpacked-layers=1", "ls"],
    ["--cache", "/c", "status", U],
    ["status", "--cache", "/c", U],
    ["--insecure-registry", "a", "--insecure-registry=b", "ls"],
    ["--", "status", U],
    ["status", "--", U],
    ["pull", U, "--hold", "x"],
    ["pull", U, "--hold", "5", "--pin", "--include", "*.json"],
    ["pull", U, "--credentials-type", "basic"],
    ["pull", U, "--credentials-type", "x"],
    ["gc", "--dry-run"],
    ["verify"],
    ["verify", U, "--repair"],
    ["pin", U],
    ["unpin", U],
    ["rm", U],
    ["serve"],
    [],
    ["--version"],
    ["--help"],
    ["bogus"],
    # the quick reading's edges: repeats, options after the command, odd values
    ["--insecure-registry", "a", "status", U, "--insecure-registry", "b"],
    ["status", U, "--insecure-registry", "a"],
    ["status", U, "--cache-dir", "/c"],
    ["--cache-dir", "/a", "status", U, "--cache-dir", "/b"],
    ["status", "--json", "--json", U],
    ["ls", "--json=1"],
    ["--json", "status", U],
    ["ls", "--js"],
    ["path", U, "--json"],
    ["--registry-mirror=a=b", "ls"],
    ["--cache-dir=", "ls"],
    ["--cache-dir", "", "ls"],
    ["status", "path"],
    ["path", "status"],
    ["status", U, U],
    ["status", "-", U],
    ["--jobs", "-1", "status", U],
    ["status", U, "-v"],
    ["ls", "--verbose", "3"],
    ["--discard-unpacked-layers", "status", U, "--discard-unpacked-layers"],
    ["--max-pull-size", "1G", "--deny-network", "10.0.0.0/8", "path", U],
    ["--allow-network=10.1.0.0/16", "--deny-network", "10.0.0.0/8", "ls", "--json"],
]
# Lines an engine or a user types: the quick reading takes each of them.
PLAIN = [
    ["status", U],
    ["status", "--json", U],
    ["--cache-dir", "/c", "status", U, "--json"],
    ["-v", "path", U],
    ["--cache-dir=/c", "--platform", "linux/arm64", "path", U],
    ["ls"],
    ["ls", "--json", "--cache-dir", "/c"],
    ["--discard-unpacked-layers", "--insecure-registry", "r:5000", "ls"],
]


def _parse(parser, argv: list) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns, code = vars(parser.parse_args(argv)), None
        except SystemExit as e:
            ns, code = None, e.code
    return ns, code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=" ".join)
def test_the_one_command_parser_reads_a_line_as_the_full_one_does(argv):
    argv = normalise_verbose(argv)
    assert _parse(build_parser(command_of(argv)), argv) == _parse(build_parser(), argv)


@pytest.mark.parametrize("argv", COMMAND_LINES + PLAIN, ids=" ".join)
def test_the_quick_reading_is_argparse_s_or_none(argv):
    argv = normalise_verbose(argv)
    quick = quick_parse(argv)
    ns, code, out, err = _parse(build_parser(), argv)
    if quick is not None:
        assert (code, out, err) == (None, "", "") and vars(quick) == ns


def test_plain_lines_are_read_quickly():
    assert all(quick_parse(normalise_verbose(argv)) is not None for argv in PLAIN)
    for other in (["pull", U], ["rm", U], ["status", "--help"], []):
        assert quick_parse(other) is None


def test_command_of_finds_the_command_only_when_sure():
    assert command_of(["--cache-dir", "status", "path", U]) == "path"
    assert command_of(["--cache-dir=/c", "--discard-unpacked-layers", "ls"]) == "ls"
    for unsure in (["--cache", "/c", "ls"], ["--help", "ls"], ["--", "ls"], [], ["--jobs"]):
        assert command_of(unsure) is None
    # one-command parsers know only their command: the full parser is the one with all
    only = build_parser("status")._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert list(only) == ["status"]
