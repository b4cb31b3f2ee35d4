#!/usr/bin/env python3
"""Build dist/nekko-sm.pyz: the package plus vendored urllib3 and platformdirs, one file.

Reproducible: entries sorted, timestamps fixed (SOURCE_DATE_EPOCH, default 1980-01-01),
permissions normalised, so two builds of one tree with one Python give the same bytes.

Every module is also shipped as unchecked-hash bytecode for the interpreter that builds:
zipimport cannot cache what it compiles, so without it every start compiles everything
(twice, on 3.11). Another Python version sees a foreign magic number and falls back to
the source beside it, so the .pyz still runs on 3.9 to 3.13.  nekko-sm's own bytecode is
stored, not deflated: inflating it was a tenth of a cold ``status`` (zipimport inflates every
module it loads, each start), for some 500 KB more file.  The vendored
wheels live in vendor/ and are checked against the pinned sha256 below before use.

    python3 build_zipapp.py              # build
    python3 build_zipapp.py --if-needed  # build only when a source is newer than the .pyz
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import marshal
import os
import stat
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "dist" / "nekko-sm.pyz"
VENDOR = {
    # Last releases that still run on Python 3.9 (RHEL 9, Debian 11).
    "urllib3-2.6.3-py3-none-any.whl":
        "bf272323e553dfb2e87d9bfd225ca7b0f467b919d7bbd355436d3fd37cb0acd4",
    "platformdirs-4.4.0-py3-none-any.whl":
        "abd01743f24e5287cd7a5db3752faf1a2d65353f38ec26d98e25a6db65958c85",
}
MAIN = b"""\
# nekko-sm zipapp entry point: keeps the exit status (zipapp's own __main__ drops it).
import sys

from nekko_sm.cli import main

sys.exit(main())
"""


def _epoch() -> tuple:
    t = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))
    t = max(t, 315532800)  # zip cannot store dates before 1980
    return time.gmtime(t)[:6]


def _sources() -> list:
    files = [p for p in sorted((ROOT / "nekko_sm").rglob("*.py")) if "__pycache__" not in p.parts]
    return files + [ROOT / "vendor" / w for w in VENDOR] + [ROOT / "LICENSE", Path(__file__)]


def _vendored() -> dict:
    out: dict = {}
    for wheel, want in VENDOR.items():
        path = ROOT / "vendor" / wheel
        data = path.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise SystemExit(f"build_zipapp: {wheel} has sha256 {got}, expected {want}")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                if name.endswith("/"):
                    continue
                top = name.split("/", 1)[0]
                if top.endswith(".dist-info"):
                    base = name.rsplit("/", 1)[-1]
                    if base.startswith(("LICENSE", "COPYING", "NOTICE")) or "/licenses/" in name:
                        out[f"licenses/{top.split('-')[0]}/{base}"] = z.read(name)
                    continue
                if name.endswith((".py", ".typed")):
                    out[name] = z.read(name)
    return out


def _pyc(name: str, source: bytes) -> bytes:
    """Unchecked-hash .pyc of ``source``: valid whatever the zip entry's timestamp says."""
    code = compile(source, name, "exec", dont_inherit=True, optimize=0)
    flags = 0b01  # hash-based, not checked against the source
    return (importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little")
            + importlib.util.source_hash(source) + marshal.dumps(code))


def build() -> Path:
    entries = dict(_vendored())
    for p in sorted((ROOT / "nekko_sm").rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        entries[p.relative_to(ROOT).as_posix()] = p.read_bytes()
    entries["licenses/nekko-sm/LICENSE"] = (ROOT / "LICENSE").read_bytes()
    entries["__main__.py"] = MAIN
    for name in [n for n in entries if n.endswith(".py") and n != "__main__.py"]:
        entries[name + "c"] = _pyc(name, entries[name])
    when = _epoch()
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=when)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            stored = name.startswith("nekko_sm/") and name.endswith(".pyc")
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            info.create_system = 3
            z.writestr(info, entries[name], compresslevel=None if stored else 9)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: two builds at once (two test workers) must not write one
    # temporary file, or one renames the other's half-written bytes into place.
    tmp = OUT.with_name(f"{OUT.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.chmod(tmp, 0o755)
    os.replace(tmp, OUT)
    return OUT


def main() -> int:
    ap = argparse.ArgumentParser(description="build dist/nekko-sm.pyz")
    ap.add_argument("--if-needed", action="store_true",
                    help="do nothing when the .pyz is newer than every source")
    args = ap.parse_args()
    if args.if_needed and OUT.exists():
        newest = max(p.stat().st_mtime for p in _sources() if p.exists())
        if OUT.stat().st_mtime >= newest:
            return 0
    out = build()
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"built {out.relative_to(ROOT)} ({out.stat().st_size} bytes, sha256 {digest[:16]}…)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
