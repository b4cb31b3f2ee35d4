"""The syntax of one option's value, whichever flag or variable it came from: an address
(``HOST:PORT``, ``[v6]:PORT``, ``unix:/path``), a size (``20G``, ``2TiB``: powers of 1024), a
free-space floor (a size or ``N%``), a whole number in a range, an on/off setting, a
comma-separated list, the API token file (a platform's, ``os/arch[/variant]``, is parsed
beside the Config that carries it).  Each parser raises a ConfigError naming the
option.  It never reads the environment or the flags and never decides which one wins:
that is :func:`nekko_sm.config.build`'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

from nekko_sm.errors import ConfigError
from nekko_sm.record import dataclass


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> Address:
    text = text.strip()
    if text.startswith("unix:"):
        path = text.removeprefix("unix:").removeprefix("//")
        if not path:
            raise ConfigError("--address unix: needs a socket path")
        return Address("unix", path=path)
    if text.startswith("/"):
        return Address("unix", path=text)
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]*):(\d+)$", text)
    if not m:
        raise ConfigError(f"bad address {text!r}: want HOST:PORT, [v6]:PORT or unix:/path")
    port = int(m.group(2))
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in address {text!r}")
    return Address("tcp", host=m.group(1) or "0.0.0.0", port=port)


def parse_int(value: object, name: str, lo: int, hi: int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, not {n}")
    return n


def parse_bool(value: object, name: str) -> bool:
    """An on/off setting: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false), not {value!r}")


def split_list(values: object) -> list:
    out: list = []
    for v in cast("Iterable[object]", values or []):  # flags come from argparse: a list or None
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return out


def read_api_token(path: str) -> str:
    """The API token: the first line of ``path``, which must be a printable ASCII word."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"cannot read the API token file {path}: {why}") from None
    if not token:
        raise ConfigError(f"the API token file {path} is empty")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ConfigError(f"the API token in {path} must be printable ASCII without spaces")
    return token


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B?)$", re.IGNORECASE)
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(text: object, name: str = "size") -> int:
    """Bytes from ``123``, ``512K``, ``1.5G``, ``10GiB``, ``2Ti``, ``3 MB`` (powers of 1024).

    A bare number is bytes (``B`` may follow); ``K``/``M``/``G``/``T``/``P`` are powers of
    1024 whatever the spelling (``K``, ``Ki``, ``KiB``, ``KB``), as kubelet and ``ls -h``
    read them.  Anything else is a ConfigError naming ``name``.
    """
    raw = str(text).strip()
    m = _SIZE.match(raw)
    unit, tail = (m.group(2).upper(), m.group(3).upper()) if m else ("", "")
    if not m or (not unit and tail not in ("", "B")):
        raise ConfigError(f"{name} must be a size such as 500M, 20G or 2TiB, not {raw!r}")
    if not unit and "." in m.group(1):
        raise ConfigError(f"{name} in bytes must be a whole number, not {raw!r}")
    number = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return int(number * 1024 ** _UNITS[unit])


def parse_free_space(
    text: object, name: str = "--min-free-space"
) -> tuple[int | None, float | None]:
    """``SIZE`` (bytes, see :func:`parse_size`) or ``N%`` of the file system: (bytes, percent)."""
    raw = str(text).strip()
    if raw.endswith("%"):
        try:
            pct = float(raw[:-1].strip())
        except ValueError:
            pct = -1.0
        if not 0 <= pct < 100:
            raise ConfigError(f"{name} must be a size or a percentage from 0% to 99%, not {raw!r}")
        return None, pct
    return parse_size(raw, name), None
