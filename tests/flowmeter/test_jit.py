"""The one ``njit`` and its cache: every kernel is made by it, and a cached kernel is stale when any
file it depends on changed (flowmeter/jit.py)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flowmeter import jit

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("flowmeter", "workers", "exporter", "tests/support")
JIT_DECORATORS = {"njit", "jit"}


def direct_numba_jit(source: str, filename: str = "<source>") -> list[str]:
    """Every use of numba's own ``njit``/``jit`` in a module's source, as ``"line N: ..."``."""
    tree = ast.parse(source, filename)
    numba_names = set()  # names bound to numba or one of its modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "numba" or alias.name.startswith("numba."):
                    numba_names.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == "numba" or node.module.startswith("numba."):
                for alias in node.names:
                    if alias.name in JIT_DECORATORS or alias.name == "*":
                        found.append((node.lineno, f"from {node.module} import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in JIT_DECORATORS:
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in numba_names:
                found.append((node.lineno, ast.unparse(node)))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_every_kernel_is_made_by_flowmeter_jit():
    offenders = {}
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "flowmeter" / "jit.py":
                continue
            found = direct_numba_jit(path.read_text(), str(path))
            if found:
                offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}, "make kernels with flowmeter.jit.njit"


def test_the_checker_finds_every_spelling():
    source = """
import numba
import numba as nb
from numba import njit as fast, prange
from numba.core.decorators import jit

@numba.njit(cache=True)
def a(): pass

@nb.jit
def b(): pass

c = numba.core.decorators.njit(lambda: 0)
numba.prange  # fine
"""
    assert direct_numba_jit(source) == [
        "line 4: from numba import njit", "line 5: from numba.core.decorators import jit", "line 7: numba.njit",
        "line 10: nb.jit", "line 13: numba.core.decorators.njit"]
    assert direct_numba_jit("from flowmeter.jit import njit\nfrom numba.extending import intrinsic\n") == []


# --- what a kernel depends on ---------------------------------------------------------------


def _deps(relative: str) -> set[str]:
    return {str(Path(p).relative_to(ROOT)) for p in jit.dependencies(str(ROOT / relative))}


def test_a_kernel_depends_on_the_project_modules_it_imports_transitively():
    records = _deps("workers/records.py")
    assert {"workers/records.py", "exporter/template.py", "flowmeter/ipc/packets.py"} <= records
    assert "exporter/ie.py" in records  # through exporter/template.py
    assert "flowmeter/jit.py" in records  # its options are compiled in
    assert {"workers/records.py", "flowmeter/ipc/packets.py"} <= _deps("workers/flowtable.py")
    # Not followed: modules no import leads to, and packages that are not the project's.
    assert "workers/process.py" not in records and "flowmeter/config.py" not in records
    assert all(p.split("/")[0] in jit.PROJECT_PACKAGES for p in records)


def test_imports_of_every_form_are_followed(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "a.py", "b.py", "c.py", "d.py", "e.py", "sub/f.py", "sub/g.py",
                 "unused.py"):
        (pkg / name).write_text("X = 1\n")
    (pkg / "kern.py").write_text(
        '"""Imports in\nprose: from nothing import here."""\n'
        "import pkg.a\n"
        "import os, pkg.b as bee\n"
        "from pkg import c, sub  # comment\n"
        "from .d import X\n"
        "from . import (\n    e,  # e\n)\n"
        "def f():\n    from .sub import f as f_\n"
        "from numpy import zeros\n")
    (pkg / "sub" / "f.py").write_text("from ..sub.g import X\n")
    found = {str(Path(p).relative_to(tmp_path)) for p in jit.dependencies(str(pkg / "kern.py"))}
    assert found == {f"pkg/{n}" for n in ("__init__.py", "kern.py", "a.py", "b.py", "c.py", "d.py", "e.py",
                                          "sub/__init__.py", "sub/f.py", "sub/g.py")}


def test_project_packages_are_what_pyproject_installs():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.partition(".")[0] for p in setup["include"]} == set(jit.PROJECT_PACKAGES)


def test_the_project_kernels_are_stamped_with_their_dependencies():
    from workers import flowtable, records

    from numba.core import caching

    assert jit.DependencyStampLocator is not None  # numba as pinned in pyproject.toml has what jit.py uses
    assert getattr(caching.Cache.load_overload, "lean", False)  # and lean loads go with the stamps
    for kernel in (flowtable.update_flow_table, records._split):
        locator = kernel._cache._impl.locator
        assert isinstance(locator, jit.DependencyStampLocator)
        assert locator.get_source_stamp()[1] == jit.source_stamp(kernel.py_func.__code__.co_filename)


# --- a real cache, edited between runs ------------------------------------------------------

KERNEL = """from flowmeter.jit import njit
from pkg import consts


@njit
def k():
    return consts.K
"""

RUN = """import sys
if sys.argv[1] == "directory":  # as on a numba without the locator list
    from numba.core import caching
    import flowmeter.jit as jit
    caching.CacheImpl._locator_classes.remove(jit.DependencyStampLocator)
    jit.DependencyStampLocator = None
from pkg.kern import k
print(k(), sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))
"""


@pytest.mark.parametrize("mode", ["locator", "directory"])
def test_editing_a_module_a_kernel_imports_recompiles_it(tmp_path, mode):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    consts = pkg / "consts.py"
    consts.write_text("K = 1\n")
    (pkg / "kern.py").write_text(KERNEL)
    (tmp_path / "run.py").write_text(RUN)
    cache = tmp_path / "cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "PYTHONDONTWRITEBYTECODE": "1"}

    def run() -> str:
        done = subprocess.run([sys.executable, str(tmp_path / "run.py"), mode], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()  # value, cache hits, cache misses

    assert run() == "1 0 1"  # compiled
    assert run() == "1 1 0"  # from the cache
    st = consts.stat()
    consts.write_text("K = 2\n")  # same size, same times: only the content tells
    os.utime(consts, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run() == "2 0 1"
    os.utime(consts, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))  # touched, same content
    assert run() == "2 1 0"
    if mode == "directory":
        assert sorted(p.name.startswith("deps-") for p in cache.iterdir()) == [True, True]
