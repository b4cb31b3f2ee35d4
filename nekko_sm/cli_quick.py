"""The plain command lines of ``status``, ``path`` and ``ls``, read without argparse.

Engines run these cold and often (``path`` in an init script); importing argparse, with
the gettext and locale look-ups its parsers make, was a tenth of their time (issue 11).
:func:`quick_parse` reads the simple, common lines of those commands: global options
spelled in full (``--opt value``, ``--opt=value``, a switch), each given once, before or
after the command; the command's ``--json``; its URL.  It returns what
``build_parser().parse_args(argv)`` would, and None for every other line (help, an
abbreviation, a repeated or unknown option, a missing or extra word, any other command),
which argparse then reads with its own answers and messages.  tests/test_cold_start.py
holds the two to the same result, line by line.
"""

from __future__ import annotations

from types import SimpleNamespace

from nekko_sm.cli_parser import GLOBAL_OPTIONS

# command -> (its own switches, whether it takes a URL)
_QUICK = {"status": (("--json",), True), "path": ((), True), "ls": (("--json",), False)}

# Every spelling of a global option -> (its dest, takes a value, repeatable)
_OPTIONS = {
    flag: (flags.split()[-1][2:].replace("-", "_"), metavar is not None, repeatable)
    for flags, metavar, repeatable, _ in GLOBAL_OPTIONS
    for flag in flags.split()
}
_DESTS = tuple(dict.fromkeys(dest for dest, _, _ in _OPTIONS.values()))


def quick_parse(argv: list) -> SimpleNamespace | None:
    """``argv`` (:func:`~nekko_sm.cli_parser.normalise_verbose`'s) as argparse would read
    it, if it is a plain status, path or ls line; else None."""
    values: dict[str, object] = {}
    switches: set[str] = set()
    command: str | None = None
    url: str | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if command is None and a in _QUICK:
            command = a
            continue
        if a.startswith("-"):
            if command is not None and a in _QUICK[command][0]:
                if a in switches:
                    return None
                switches.add(a)
                continue
            name, eq, value = a.partition("=")
            spec = _OPTIONS.get(name)
            if spec is None or spec[0] in values or (eq and not spec[1]):
                return None
            dest, takes_value, repeatable = spec
            if takes_value and not eq:
                if i >= len(argv) or argv[i].startswith("-"):
                    return None
                value = argv[i]
                i += 1
            values[dest] = ([value] if repeatable else value) if takes_value else True
            continue
        if command is None or not _QUICK[command][1] or url is not None:
            return None
        url = a
    if command is None or (_QUICK[command][1] and url is None):
        return None
    ns: dict[str, object] = dict.fromkeys(_DESTS)
    ns.update(values, command=command)
    if _QUICK[command][1]:
        ns["url"] = url
    for switch in _QUICK[command][0]:
        ns[switch[2:]] = switch in switches
    return SimpleNamespace(**ns)
