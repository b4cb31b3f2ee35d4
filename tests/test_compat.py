"""Python 3.9 compatibility (DESIGN section 1: CPython 3.9 to 3.13, RHEL 9 and Debian 11).

* vermin finds nothing in nekko_sm/ nor in the vendored urllib3 and platformdirs that needs a
  Python newer than 3.9;
* the built .pyz runs under every CPython 3.9 .. 3.13 found on this machine (pyenv): --version,
  a pull of an nginx file, and serve (healthz, a POST, SIGTERM).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from peers import require_module

from nekko_sm import __version__

ROOT = Path(__file__).resolve().parent.parent
VERMIN_TARGET = "3.9-"  # the newest minimum version allowed


def _vermin(*args: str) -> subprocess.CompletedProcess:
    require_module("vermin")
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, vermin; sys.exit(vermin.main())",
            f"--target={VERMIN_TARGET}",
            "--no-tips",
            "--violations",
            "--no-parse-comments",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_nekko_sm_needs_nothing_newer_than_python_3_9():
    r = _vermin(str(ROOT / "nekko_sm"))
    assert r.returncode == 0, f"vermin found code needing Python > 3.9:\n{r.stdout}{r.stderr}"


def test_vendored_dependencies_need_nothing_newer_than_python_3_9(tmp_path):
    wheels = sorted((ROOT / "vendor").glob("*.whl"))
    assert {w.name.split("-")[0] for w in wheels} == {"urllib3", "platformdirs"}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(tmp_path)
    # urllib3 imports the 3.14 stdlib module compression.zstd only under
    # `if sys.version_info >= (3, 14)` inside try/except ImportError (else backports.zstd).
    r = _vermin(
        "--exclude",
        "compression",
        "--exclude",
        "compression.zstd",
        str(tmp_path / "urllib3"),
        str(tmp_path / "platformdirs"),
    )
    assert r.returncode == 0, f"vermin found code needing Python > 3.9:\n{r.stdout}{r.stderr}"


def _runtime_unions(tree: ast.AST, annotations_evaluated: bool = False) -> list[int]:
    """Lines with ``X | Y`` of types outside annotations (isinstance(x, A | B), an alias
    ``Ref = A | B``): evaluated at run time, a TypeError before 3.10.  vermin misses these
    (its union-types detection is unstable: it flags annotations under
    ``from __future__ import annotations`` too)."""
    annotations: set[int] = set()
    for node in ast.walk(tree) if not annotations_evaluated else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in [
                *node.args.args,
                *node.args.posonlyargs,
                *node.args.kwonlyargs,
                node.args.vararg,
                node.args.kwarg,
            ]:
                if a is not None and a.annotation is not None:
                    annotations.update(id(n) for n in ast.walk(a.annotation))
            if node.returns is not None:
                annotations.update(id(n) for n in ast.walk(node.returns))
        elif isinstance(node, ast.AnnAssign):
            annotations.update(id(n) for n in ast.walk(node.annotation))

    def typeish(n: ast.AST) -> bool:
        if isinstance(n, ast.Constant):
            return n.value is None
        if isinstance(n, ast.Subscript):
            return typeish(n.value)
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
        builtin = {
            "int",
            "str",
            "bytes",
            "float",
            "bool",
            "dict",
            "list",
            "tuple",
            "set",
            "frozenset",
            "type",
            "object",
        }
        # a class name (CapWords, OCIRef), not a constant (O_RDONLY, LOCK_EX)
        return name in builtin or bool(
            re.fullmatch(r"_?[A-Z]\w*", name) and re.search(r"[a-z]", name)
        )

    return sorted(
        {
            n.lineno
            for n in ast.walk(tree)
            if isinstance(n, ast.BinOp)
            and isinstance(n.op, ast.BitOr)
            and id(n) not in annotations
            and (typeish(n.left) or typeish(n.right))
        }
    )


def test_no_runtime_union_types_in_nekko_sm():
    found = {}
    for path in sorted((ROOT / "nekko_sm").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        future = any(
            isinstance(n, ast.ImportFrom)
            and n.module == "__future__"
            and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        lines = _runtime_unions(tree, annotations_evaluated=not future)
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    assert found == {}, f"X | Y of types at run time needs Python 3.10: {found}"


def test_the_union_check_finds_what_it_should():
    src = (
        "from __future__ import annotations\n"
        "def f(x: int | None) -> A | B:\n"
        "    y: str | None = None\n"
        "    return isinstance(x, int | str)\n"
        "Ref = OCIRef | HFRef\n"
        "flags = os.O_RDONLY | os.O_DIRECTORY\n"
    )
    assert _runtime_unions(ast.parse(src)) == [4, 5]
    assert _runtime_unions(ast.parse(src), annotations_evaluated=True) == [2, 3, 4, 5]


# --------------------------------------------------------------------------------------------
# the .pyz under every interpreter


def _interpreters() -> list[str]:
    found = []
    for minor in range(9, 14):
        for path in sorted(glob.glob(f"/root/.pyenv/versions/3.{minor}*/bin/python3.{minor}")):
            if os.access(path, os.X_OK):
                found.append(path)
                break
    return found


INTERPRETERS = _interpreters()


@pytest.fixture(params=INTERPRETERS or [None], ids=lambda p: Path(p).name if p else "none")
def python(request):
    if request.param is None:
        msg = "PEER MISSING: no CPython 3.9..3.13 under /root/.pyenv/versions"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return request.param


def test_every_python_from_3_9_to_3_13_is_there():
    """The matrix below is only as good as the interpreters it finds: say which are missing."""
    have = {re.search(r"python(3\.\d+)$", p).group(1) for p in INTERPRETERS}
    missing = sorted({f"3.{m}" for m in range(9, 14)} - have)
    if missing:
        msg = f"PEER MISSING: CPython {', '.join(missing)} under /root/.pyenv/versions"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYENV_VERSION"))}
    env["CACHE_DIR"] = str(tmp_path / "cache")
    return env


def test_pyz_imports_every_module(python, pyz, tmp_path):
    """Every module, not only those a pull or serve happens to load (sources/oci, hf ...),
    with warnings as errors."""
    with zipfile.ZipFile(pyz) as z:
        mods = sorted(
            n[:-3].replace("/", ".")
            for n in z.namelist()
            if n.startswith("nekko_sm/") and n.endswith(".py") and not n.endswith("__main__.py")
        )
    assert "nekko_sm.sources.oci" in mods and "nekko_sm.api" in mods
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(pyz)!r})\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m.replace('.__init__', ''))\n"
    )
    r = subprocess.run(
        [python, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path),
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_pyz_version_and_pull(python, pyz, nginx, tmp_path):
    r = subprocess.run(
        [python, str(pyz), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path),
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0 and r.stdout.strip() == f"nekko-sm {__version__}", r.stderr
    data = os.urandom(500_000)
    url = nginx.put(f"compat-{Path(python).name}-{os.getpid()}.bin", data)
    r = subprocess.run(
        [python, str(pyz), "pull", url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)
    assert entry["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert Path(entry["path"]).read_bytes() == data
    r = subprocess.run(
        [python, str(pyz), "status", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path),
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_pyz_serve(python, pyz, nginx, tmp_path):
    data = os.urandom(100_000)
    url = nginx.put(f"compat-serve-{Path(python).name}-{os.getpid()}.bin", data)
    proc = subprocess.Popen(
        [python, str(pyz), "--address", "127.0.0.1:0", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "serve did not say where it listens"
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            c.request("GET", "/healthz")
            r = c.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
            c.request(
                "POST",
                "/content/",
                body=json.dumps({"url": url}),
                headers={"Content-Type": "application/json"},
            )
            r = c.getresponse()
            entry = json.loads(r.read())
            assert r.status == 201, entry
            assert Path(entry["path"]).read_bytes() == data
            c.request("GET", "/content/" + "QUFB" * 20)  # not a URL: a JSON 400
            r = c.getresponse()
            assert r.status == 400 and "error" in json.loads(r.read())
        finally:
            c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
