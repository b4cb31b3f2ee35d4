"""nekko_sm.record against the standard library's dataclasses: the same answers, class by class.

The classes a cold command defines use :mod:`nekko_sm.record` instead of :mod:`dataclasses`
(issue 11, item 5); type checkers are told they are standard data classes, so any difference
in behaviour here would be a lie to them.  Each case defines one class body under both
decorators and compares what the two classes do.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from nekko_sm import record


def _both(body: str, frozen: bool) -> tuple[type, type]:
    out = []
    for mod in (dataclasses, record):
        scope = {"dataclass": mod.dataclass, "field": mod.field, "__name__": __name__}
        exec(  # noqa: S102 - the test's own class bodies
            f"@dataclass(frozen={frozen})\nclass Thing:\n" + body, scope
        )
        out.append(scope["Thing"])
    return out[0], out[1]


BODIES = {
    "plain": "    a: int\n    b: str\n",
    "defaults": "    a: int\n    b: str = 'x'\n    c: tuple = ()\n",
    "factory": "    a: int\n    d: dict = field(default_factory=dict)\n    e: list = field(default_factory=list)\n",
    "hidden": "    a: int\n    secret: str = field(repr=False)\n    s2: str | None = field(default=None, repr=False)\n",
    "methods": "    a: int = 0\n    def twice(self):\n        return 2 * self.a\n    def __str__(self):\n        return f'<{self.a}>'\n",
    "one": "    a: int\n",
}
CALLS = [((1, "y"), {}), ((1,), {}), ((), {"a": 2}), ((), {"a": 3, "b": "z"}), ((1, "p", ()), {})]


def _outcome(fn, *args, **kwargs):
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the outcome compared
        return type(e).__name__, str(e)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("shape", BODIES)
def test_record_classes_behave_as_data_classes(shape, frozen):
    std, rec = _both(BODIES[shape], frozen)
    for args, kw in CALLS:
        a, b = _outcome(std, *args, **kw), _outcome(rec, *args, **kw)
        assert a[0] == b[0]
        if a[0] != "ok":
            assert a[1] == b[1]  # the same TypeError, word for word
            continue
        x, y = a[1], b[1]
        assert repr(x) == repr(y) and str(x) == str(y)
        assert [getattr(x, n) for n in vars(x)] == [getattr(y, n) for n in vars(y)]
        assert vars(x) == vars(y)  # the same attributes, set in the same order
        assert (x == std(*args, **kw)) == (y == rec(*args, **kw)) is True
        assert x != y and y != x  # another class: never equal, as there
        assert getattr(y, "__match_args__", None) == getattr(x, "__match_args__", None)
        changed = {next(iter(vars(x))): 99}
        assert repr(dataclasses.replace(x, **changed)) == repr(record.replace(y, **changed))
        assert _outcome(hash, x) == _outcome(hash, y)  # the same hash, or both unhashable
        if frozen:
            for act, extra in ((setattr, (5,)), (delattr, ())):
                e1, e2 = _outcome(act, x, "a", *extra), _outcome(act, y, "a", *extra)
                assert e1[1] == e2[1] and e2[0] == "FrozenInstanceError"
                with pytest.raises(AttributeError):
                    act(y, "a", *extra)
        else:
            x.a = y.a = 7
            assert repr(x) == repr(y)
    for name in ("a", "b", "c", "d", "secret", "s2"):  # class attributes: the defaults only
        assert _outcome(getattr, std, name) == _outcome(getattr, rec, name)


def test_defaults_are_fresh_and_checked_as_there():
    std, rec = _both(BODIES["factory"], False)
    assert rec(1).d is not rec(1).d and rec(1).e == std(1).e == []
    for body in ("    a: list = []\n", "    a: int = 0\n    b: int\n"):
        e1, e2 = _outcome(_define, body, dataclasses), _outcome(_define, body, record)
        assert e1[0] == e2[0] != "ok"
    with pytest.raises(ValueError, match="both default and default_factory"):
        record.field(default=1, default_factory=list)


def _define(body: str, mod) -> type:
    scope = {"dataclass": mod.dataclass, "field": mod.field, "__name__": __name__}
    exec(f"@dataclass\nclass Thing:\n{body}", scope)  # noqa: S102 - the test's own class body
    return scope["Thing"]


def test_replace_takes_standard_data_classes_too():
    @dataclasses.dataclass(frozen=True)
    class Std:
        a: int
        b: int = 2

    assert record.replace(Std(1), b=3) == Std(1, 3)
    with pytest.raises(TypeError):
        record.replace(object(), a=1)


def test_the_cold_path_classes_are_records_that_pickle_and_compare():
    from nekko_sm.config import Config, Platform, build
    from nekko_sm.refparse import parse
    from nekko_sm.store import Descriptor

    cfg = build({"cache_dir": "/tmp/unused"}, {}, need_cache=False)
    assert isinstance(cfg, Config) and hasattr(Config, "__record_fields__")
    assert record.replace(cfg, jobs=3).jobs == 3 and record.replace(cfg, jobs=3) != cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    p = Platform("linux", "arm", "v7")
    assert {p: 1}[Platform("linux", "arm", "v7")] == 1 and str(p) == "linux/arm/v7"
    ref = parse("oci://example.org/a/b:c")
    assert hash(ref) == hash(parse("oci://example.org/a/b:c"))
    d = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 1)
    assert d.annotations == {} and d == Descriptor.from_json(d.to_json())
    with pytest.raises(TypeError):
        hash(d)  # not frozen: unhashable, as a standard data class


def test_no_code_asks_dataclasses_about_a_record_class():
    # dataclasses.fields/asdict/astuple/is_dataclass do not know record classes (mypy thinks
    # they are data classes, so only this catches it): nekko-sm's code uses none of them.
    import re
    from pathlib import Path

    package = Path(record.__file__).parent
    asks = re.compile(r"\b(fields|asdict|astuple|is_dataclass)\s*\(")
    found = [
        f"{p.relative_to(package)}:{n}: {line.strip()}"
        for p in sorted(package.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if asks.search(line) and "dataclasses" in p.read_text()
    ]
    assert not found, "\n".join(found)
