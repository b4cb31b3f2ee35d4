"""The man page and the README say what the code does: no drift from ``--help`` and config.py.

Like huggingface_hub's generated CLI reference, a new flag, command or environment variable
fails here until it is documented; a documented one that no longer exists fails too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest
from peers import require_binary

from nekko_sm import __version__
from nekko_sm.cli_parser import build_parser
from nekko_sm.refparse import parse

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man" / "nekko-sm.1"
README = ROOT / "README.md"
CONFIG = ROOT / "nekko_sm" / "config.py"
CI_RUN = ROOT / ".ci" / "run"

SETUP_RUN = "python3 build_zipapp.py --if-needed && python3 dist/nekko-sm.pyz serve"
SETUP_TEST = "bash tests/run.sh"

# Other programs' long options that the man page's examples use, and the program each
# belongs to: allowed only on a line that names that program.
FOREIGN_FLAGS = {"--unix-socket": "curl", "--layout": "umoci"}


# -- reading the sources of truth ------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


PARSER = build_parser()
COMMANDS = _subparsers(PARSER)
TOP_FLAGS = _options(PARSER)
ALL_FLAGS = TOP_FLAGS.union(*(_options(p) for p in COMMANDS.values()))


def _own_flags(command: str) -> set[str]:
    """A command's options that are not the global ones (nor -h/--help)."""
    return _options(COMMANDS[command]) - TOP_FLAGS - {"-h", "--help"}


def _config_env_names() -> set[str]:
    """Every environment variable config.py reads: _env(environ, ...) and pick(flag, ...)."""
    src = CONFIG.read_text()
    names: set[str] = set()
    for args in re.findall(r"_env\(\s*environ\s*,([^)]*)\)", src):
        names.update(re.findall(r'"([^"]+)"', args))
    for args in re.findall(r'\bpick\(\s*"[a-z_]+"\s*,([^)]*)\)', src):
        names.update(re.findall(r'"([^"]+)"', args))
    return names


MAN_TEXT = MAN.read_text()
README_TEXT = README.read_text()


def _roff(flag: str) -> str:
    return flag.replace("-", r"\-")


def _man_has_flag(text: str, flag: str) -> bool:
    # \-\-json, \fB\-\-json\fR ...; not the start of a longer flag (\-\-json\-x, \-\-jsonx).
    pattern = re.escape(_roff(flag)) + r"(?![A-Za-z0-9_]|\\-[A-Za-z0-9])"
    return re.search(pattern, text) is not None


def _section(name: str) -> str:
    """The text of one .SH section of the man page (up to the next .SH)."""
    m = re.search(
        rf"^\.SH {re.escape(name)}\s*$(.*?)(?=^\.SH |\Z)", MAN_TEXT, re.MULTILINE | re.DOTALL
    )
    assert m, f"the man page has no .SH {name} section"
    return m.group(1)


def _subsections(section: str) -> dict[str, str]:
    """``.SS NAME ...`` subsections of a section, by their first word."""
    out = {}
    for m in re.finditer(
        r"^\.SS (\S+)[^\n]*\n(.*?)(?=^\.SS |\Z)", section, re.MULTILINE | re.DOTALL
    ):
        out[m.group(1)] = m.group(2)
    return out


def _tp_headers(text: str) -> list[str]:
    """The item lines of the ``.TP`` lists in ``text`` (the line after each .TP)."""
    return re.findall(r"^\.TP[^\n]*\n([^\n]*)", text, re.MULTILINE)


def _flags_in(text: str) -> set[str]:
    text = re.sub(r"\\f(?:[BIRP]|\(..|\[[^]]*\])", " ", text)  # font changes: \fB \fR ...
    found = set(re.findall(r"\\-\\-[A-Za-z0-9]+(?:\\-[A-Za-z0-9]+)*", text))
    found |= set(re.findall(r"(?<![\\A-Za-z0-9-])\\-[A-Za-z](?![A-Za-z0-9]|\\-)", text))
    return {f.replace("\\-", "-") for f in found}


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


# -- commands and flags: --help and the man page agree ------------------------------------------


def test_parser_is_what_the_docs_describe():
    # The premise of the other tests: build_parser() is the real CLI, with commands.
    assert set(COMMANDS) >= {"serve", "pull", "status", "path", "ls", "rm", "gc", "verify"}
    assert "--cache-dir" in TOP_FLAGS and "--json" in _own_flags("pull")


def test_every_flag_is_in_the_man_page():
    missing = sorted(f for f in ALL_FLAGS if not _man_has_flag(MAN_TEXT, f))
    assert not missing, f"flags of --help missing from man/nekko-sm.1: {missing}"


def test_every_command_has_its_subsection_in_commands():
    subsections = _subsections(_section("COMMANDS"))
    assert set(subsections) == set(COMMANDS), (
        f"COMMANDS .SS subsections {sorted(subsections)} != --help commands {sorted(COMMANDS)}"
    )


def test_every_command_is_in_the_synopsis():
    synopsis = _section("SYNOPSIS")
    missing = [
        c for c in COMMANDS if not re.search(rf"^\.B {c}$|\\fB{c}\\fR", synopsis, re.MULTILINE)
    ]
    assert not missing, f"commands missing from the SYNOPSIS: {missing}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_options_are_listed_under_the_command(command):
    section = _subsections(_section("COMMANDS"))[command]
    listed = set().union(*(_flags_in(h) for h in _tp_headers(section)))
    assert listed == _own_flags(command), (
        f"{command}: the man page lists {sorted(listed)}, --help has {sorted(_own_flags(command))}"
    )


def test_global_options_section_lists_exactly_the_global_flags():
    section = _section("GLOBAL OPTIONS")
    listed = set().union(*(_flags_in(h) for h in _tp_headers(section)))
    assert listed == TOP_FLAGS, (
        f"GLOBAL OPTIONS lists {sorted(listed)}, --help has {sorted(TOP_FLAGS)}"
    )


def test_every_flag_in_the_man_page_is_real():
    unknown = set()
    for line in MAN_TEXT.splitlines():
        if line.startswith('.\\"'):
            continue  # a comment
        for flag in _flags_in(line):
            if flag in ALL_FLAGS:
                continue
            program = FOREIGN_FLAGS.get(flag)
            if program and _has_word(line, program):
                continue
            if not flag.startswith("--"):
                continue  # short options of other programs in examples (curl -s, base64 -w0)
            unknown.add(flag)
    assert not unknown, f"man/nekko-sm.1 names flags --help does not have: {sorted(unknown)}"


def test_every_global_flag_and_command_is_in_the_readme():
    missing = sorted(
        f for f in TOP_FLAGS - {"-h", "--help", "--version", "-v"} if f"`{f}" not in README_TEXT
    )
    assert not missing, f"README's configuration table lacks {missing}"
    missing = sorted(
        c for c in COMMANDS if not re.search(rf"nekko-sm\.pyz(?: \S+)* {c}\b", README_TEXT)
    )
    assert not missing, f"README's quick tour never runs {missing}"


def test_man_page_version_is_the_package_version():
    th = re.search(r'^\.TH \S+ 1 "[^"]*" "nekko-sm ([^"]+)"', MAN_TEXT, re.MULTILINE)
    assert th and th.group(1) == __version__


# -- environment variables: config.py, the man page and the README agree ------------------------


def test_config_env_names_are_found():
    names = _config_env_names()
    assert {"CACHE_DIR", "NEKKO_ADDRESS", "VERBOSE", "HF_ENDPOINT", "HF_TOKEN"} <= names


@pytest.mark.parametrize("name", sorted(_config_env_names()))
def test_env_var_is_documented(name):
    assert _has_word(_section("ENVIRONMENT"), name), f"{name} missing from the man's ENVIRONMENT"
    assert _has_word(README_TEXT, f"`{name}`") or _has_word(README_TEXT, name), (
        f"{name} missing from README.md"
    )


def test_man_environment_names_only_real_variables():
    names = _config_env_names()
    named = set()
    for header in _tp_headers(_section("ENVIRONMENT")):
        named |= set(
            re.findall(
                r"(?<![\\A-Za-z0-9_])([A-Z][A-Z0-9]*_[A-Z0-9_]+|[A-Z]{4,}"
                r"|[a-z]+_proxy)(?![A-Za-z0-9_])",
                header,
            )
        )
    unknown = sorted(named - names)
    assert not unknown, f"the man's ENVIRONMENT names variables config.py never reads: {unknown}"


# -- example URLs are real references ----------------------------------------------------------

_PLACEHOLDER = re.compile(r"[A-Z]{2,}|\$|\.\.\.|…|//$")


def _example_urls(text: str) -> list[str]:
    urls = re.findall(r"\b(?:oci|hf|huggingface)://[A-Za-z0-9./@:_~…-]*", text)
    return sorted({u.rstrip(".:") for u in urls if not _PLACEHOLDER.search(u)})


@pytest.mark.parametrize("doc", ["README.md", "man/nekko-sm.1"])
def test_example_urls_parse(doc):
    text = (ROOT / doc).read_text().replace("\\-", "-").replace("\\&", "")
    urls = _example_urls(text)
    assert len(urls) >= 3
    for url in urls:
        parse(url)  # raises InvalidReference for a URL the docs should not show


# -- the README's set-up commands and CI --------------------------------------------------------


def _fenced_blocks(text: str) -> list[str]:
    return [
        m.group(1).strip()
        for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    ]


def test_readme_has_the_exact_setup_commands():
    blocks = _fenced_blocks(README_TEXT)
    assert blocks.count(SETUP_RUN) == 1 and blocks.count(SETUP_TEST) == 1
    head = README_TEXT.split("\n## ", 3)
    setup = next(part for part in head if part.startswith("Set-up on a fresh machine"))
    assert f"```sh\n{SETUP_RUN}\n```" in setup and f"```sh\n{SETUP_TEST}\n```" in setup


def test_nothing_else_in_the_readme_looks_like_a_setup_command():
    others = [b for b in _fenced_blocks(README_TEXT) if b not in (SETUP_RUN, SETUP_TEST)]
    for block in others:
        for word in ("build_zipapp", "tests/run.sh", "pip install", "apt-get", "apt install"):
            assert word not in block, f"README block looks like a set-up command: {block!r}"


def test_ci_runs_the_readme_test_command():
    lines = [ln.strip() for ln in CI_RUN.read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    assert commands and commands[-1] == SETUP_TEST


# -- the man page renders ---------------------------------------------------------------------


@pytest.mark.parametrize("device", [[], ["-Tutf8", "-rLL=78n"]], ids=["default", "80-columns"])
def test_man_page_renders_without_warnings(device):
    groff = require_binary("groff", "groff-base")
    r = subprocess.run(
        [groff, "-man", "-ww", "-z", *device, str(MAN)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
