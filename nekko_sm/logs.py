"""Loggers that import :mod:`logging` when they are first used, and a set-up run then.

A cold ``status``, ``path`` or ``ls`` usually logs nothing, yet importing :mod:`logging`
(with :mod:`traceback`, :mod:`string` and the patterns they compile at import) was a tenth
of its time (issue 11).  The modules such a command loads take their logger from
:func:`get`: a stand-in that imports :mod:`logging` and becomes the real
``logging.getLogger(name)`` at its first use.  :func:`configure` is how the CLI sets up its
handlers for such a command: now when :mod:`logging` is loaded already, else just before
the first stand-in is used, so every record still meets the CLI's handler and format.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable, cast

if TYPE_CHECKING:
    import logging

_pending: Callable[[], None] | None = None


class _Lazy:
    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:  # every Logger attribute: warning, isEnabledFor...
        if self._logger is None:
            self._logger = _real(self._name)
        return getattr(self._logger, attr)

    def __repr__(self) -> str:
        return f"<lazy logger {self._name}>"


def _real(name: str) -> logging.Logger:
    global _pending
    import logging

    setup, _pending = _pending, None
    if setup is not None:
        setup()
    return logging.getLogger(name)


def get(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, importing :mod:`logging` only when first used."""
    return cast("logging.Logger", _Lazy(name))


def configure(setup: Callable[[], None] | None) -> None:
    """Run ``setup`` now if :mod:`logging` is loaded, else before a stand-in's first use.

    ``None`` drops a set-up not run yet (the CLI's, when its command logged nothing).
    """
    global _pending
    if setup is not None and "logging" in sys.modules:
        _pending = None
        setup()
    else:
        _pending = setup
