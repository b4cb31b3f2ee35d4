"""``@dataclass``, ``field`` and ``replace`` without the start-up cost of :mod:`dataclasses`.

The classes a cold ``status``, ``path`` or ``ls`` defines (the Config, the references, the
descriptor...) were a third of its time as standard data classes: importing
:mod:`dataclasses` imports :mod:`inspect`, and each class compiles six methods from source
(issue 11).  The decorator here gives a class the methods the standard library's would for
the options nekko-sm uses (``frozen``; fields with a default, a ``default_factory`` or
``repr=False``), as shared functions over the class's field table, so defining a class costs
about what a plain one does.  Type checkers see the standard library's functions, whose
behaviour this is; tests/test_record.py holds the two to the same answers.
"""

from __future__ import annotations

import sys
from operator import attrgetter
from typing import TYPE_CHECKING, Any

__all__ = ["FrozenInstanceError", "dataclass", "field", "replace"]

_MISSING: Any = object()


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen instance (as the standard library's)."""


class _Field:
    __slots__ = ("default", "factory", "repr")

    def __init__(self, default: Any, factory: Any, repr: bool) -> None:
        self.default, self.factory, self.repr = default, factory, repr


def _field(*, default: Any = _MISSING, default_factory: Any = _MISSING, repr: bool = True) -> Any:
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory, repr)


def _dataclass(cls: Any = None, /, *, frozen: bool = False) -> Any:
    def wrap(cls: type) -> type:
        _process(cls, frozen)
        return cls

    return wrap if cls is None else wrap(cls)


def _process(cls: Any, frozen: bool) -> None:
    fields: dict[str, _Field] = {}
    own = cls.__dict__
    kinds = own.get("__annotations__")
    for name, kind in (getattr(cls, "__annotations__", {}) if kinds is None else kinds).items():
        if str(kind).startswith(("ClassVar", "typing.ClassVar", "InitVar", "KW_ONLY")):
            raise TypeError(f"{cls.__name__}.{name}: {kind} is not supported here")
        value = own.get(name, _MISSING)
        f = value if isinstance(value, _Field) else _Field(value, _MISSING, True)
        if isinstance(f.default, (list, dict, set)):
            raise ValueError(f"mutable default {type(f.default)} for field {name} is not allowed")  # noqa: TRY004
        if f.default is not _MISSING:
            setattr(cls, name, f.default)  # the class attribute is the default, as there
        elif name in own:
            delattr(cls, name)
        if (
            f.default is _MISSING
            and f.factory is _MISSING
            and any(g.default is not _MISSING or g.factory is not _MISSING for g in fields.values())
        ):
            raise TypeError(f"non-default argument {name!r} follows default argument")
        fields[name] = f
    names = tuple(fields)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # The first instance compiles the class's own __init__ (classes a command never
        # makes an instance of compile nothing) and puts it in place of this one.
        init = _init(cls, fields, frozen)
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = init
        init(self, *args, **kwargs)

    methods: dict[str, Any] = {"__init__": __init__}
    values = attrgetter(*names) if len(names) > 1 else lambda o: tuple(getattr(o, n) for n in names)
    shown = tuple(n for n, f in fields.items() if f.repr)

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in shown)
        return f"{self.__class__.__qualname__}({inner})"

    def __eq__(self: Any, other: object) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    methods.update(__repr__=__repr__, __eq__=__eq__)
    if frozen:

        def __setattr__(self: Any, name: str, value: Any) -> None:
            if type(self) is cls or name in fields:
                raise FrozenInstanceError(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)

        def __delattr__(self: Any, name: str) -> None:
            if type(self) is cls or name in fields:
                raise FrozenInstanceError(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)

        def __hash__(self: Any) -> int:
            return hash(values(self))

        methods.update(__setattr__=__setattr__, __delattr__=__delattr__, __hash__=__hash__)
    else:
        methods["__hash__"] = None  # eq without frozen: unhashable, as there
    if "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own):
        del methods["__hash__"]  # the class's own hash stays, as there
    for name, fn in methods.items():
        if name not in own or name == "__hash__":
            if fn is not None:
                fn.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, fn)
    setattr(cls, "__record_fields__", fields)  # noqa: B010 - the table replace() reads
    if sys.version_info >= (3, 10):  # as there: 3.9's data classes have no __match_args__
        setattr(cls, "__match_args__", names)  # noqa: B010


def _init(cls: type, fields: dict[str, _Field], frozen: bool) -> Any:
    """The ``__init__`` the standard library would write: one small compile, no more."""
    params, body = [], []
    for n, f in fields.items():
        if f.factory is not _MISSING:
            params.append(f"{n}=_FACTORY")
            value = f"_fields[{n!r}].factory() if {n} is _FACTORY else {n}"
        else:
            params.append(n if f.default is _MISSING else f"{n}=_fields[{n!r}].default")
            value = n
        body.append(f"_set(self, {n!r}, {value})" if frozen else f"self.{n} = {value}")
    src = f"def __init__(self, {', '.join(params)}):\n    " + ("\n    ".join(body) or "pass") + "\n"
    scope = {"_fields": fields, "_FACTORY": _MISSING, "_set": object.__setattr__}
    exec(compile(src, f"<record {cls.__qualname__}>", "exec"), scope)  # noqa: S102 - our names
    return scope["__init__"]


def _replace(obj: Any, /, **changes: Any) -> Any:
    fields = getattr(type(obj), "__record_fields__", None)
    if fields is None:  # a standard data class (those no cold start defines)
        import dataclasses

        return dataclasses.replace(obj, **changes)
    for n in fields:
        changes.setdefault(n, getattr(obj, n))
    return obj.__class__(**changes)


if TYPE_CHECKING:  # the standard library's: the behaviour these copy
    from dataclasses import dataclass, field, replace  # re-exported: __all__ names them
else:
    dataclass, field, replace = _dataclass, _field, _replace
