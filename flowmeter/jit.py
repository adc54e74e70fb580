"""Numba set-up: where compiled kernels are cached, when a cached one is stale, and the one ``njit`` we use.

Every per-packet loop in flowmeter is a numba kernel compiled with
``cache=True``, so a process pays the compile cost once per machine, not
once per start (DESIGN.md "Data plane"). Numba's default cache lives next to
the source file (``__pycache__``), which is read-only when the package is
installed system-wide or in a container image; numba then silently compiles
on every start (seconds per kernel). ``ensure_numba_cache()`` points numba at
a writable per-user directory *before* numba is imported:

1. ``NUMBA_CACHE_DIR`` if the operator set it (respected as is);
2. else ``$XDG_CACHE_HOME/flowmeter/numba``;
3. else ``~/.cache/flowmeter/numba``;
4. else (no writable home, e.g. a system user) a per-uid directory under the
   temporary directory.

Make every kernel with this module's ``njit`` (``from flowmeter.jit import
njit``), never ``numba.njit`` directly (tests/flowmeter/test_jit.py checks
it), so the cache location, the staleness check below and the options
(``cache``, ``nogil``: kernels release the GIL, a capture thread never
blocks another) are the same everywhere.

When a cached kernel is stale
-----------------------------
Numba compiles the values of the globals a kernel reads into its machine
code: a dtype, a constant imported from another module (``packets.ST_OK``),
a kernel of another module it calls (compiled into the caller). Numba's own
cache index is stamped with a hash of the kernel's own file only, so after
an edit to ``flowmeter/ipc/packets.py`` the kernels of ``decode.py`` would
keep loading from the cache with the old values frozen in. Kernels made by
this ``njit`` are stamped instead with ``source_stamp()``: the SHA-256 of
the contents of their own file and of every module of the project it
imports, transitively (``dependencies()``). A change to any of those files,
a constant or a dtype included, recompiles the kernel at its next load.

How: ``DependencyStampLocator``, numba's ``UserProvidedCacheLocator`` with
another ``get_source_stamp``, goes first in numba's list of cache locators
(``numba.core.caching.CacheImpl._locator_classes``). It answers only for
functions made by this ``njit`` (any other numba function is cached as numba
does it), keeps numba's file layout under ``NUMBA_CACHE_DIR``, and numba
compares its stamp as it compares its own (``IndexDataCacheFile._load_index``):
an index with another stamp counts as empty, so the kernel is compiled and
its index rewritten. Numba computes the stamp when a kernel is decorated,
that is when its module is imported, just after the modules it depends on.

Which files: the import statements of each file are found by a regular
expression over its text (``import a.b`` and ``from .x import y`` at the
start of a line, inside functions too; relative imports resolved; a name
imported ``from`` a package that is a module of its own counts too; every
package ``__init__.py`` on the way, as Python runs it), nothing is imported
to find them. Only imports of the project's packages are followed
(``PROJECT_PACKAGES`` and the kernel's own top-level package), looked up in
the directory that holds the kernel's outermost package: numba's index
already keys on numba's version, and numpy's values are not ours to watch.
Finding too much is harmless (a comment that reads like an import, an
import no kernel uses: a file more in the stamp, at worst a recompile more).
Not covered: what a module computes at import from outside its text (the
environment, a data file). The stamp hashes contents, not modification
times, so a checkout or a copy that keeps the text keeps the cache. Cost:
each file is read and hashed once per process and each kernel file's stamp
computed once; a process that imports every kernel of flowmeter spends
about 1.5 ms in it (20 files, 0.2 MB), where numba's own stamp hashed the
7 kernel files.

Another numba: the locator list is private API, which is why pyproject.toml
admits only the numba minor release this was tested with. Where it is
missing (or ``NUMBA_CACHE_LOCATOR_CLASSES`` replaces numba's list), a kernel
is cached under a directory named after its stamp instead
(``NUMBA_CACHE_DIR/deps-<stamp>/``, read when numba decorates it: an edit
makes a new directory, the old ones stay until the cache is deleted, which
is always safe); a kernel that numba would not cache there is not cached at
all, never cached under a stamp that misses its dependencies.

Loading a cached kernel makes numba first "refresh" its compiler contexts:
it imports and registers the implementations of everything it could ever
compile (about 60 modules of its own: lists, dicts, linear algebra, random
generators...), 0.15-0.2 s of every start, although a cached kernel is
machine code that needs none of them. ``lean_cache_loads()`` makes a cache
load start only numba's runtime (NRT, which the kernels' arrays need);
compiling still refreshes everything, as numba's compiler does that itself.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import sys
import tempfile
import weakref
from pathlib import Path

# The project's top-level packages (pyproject.toml installs these three): imports of them are followed.
PROJECT_PACKAGES = ("flowmeter", "workers", "exporter")


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def ensure_numba_cache() -> str:
    """Set ``NUMBA_CACHE_DIR`` to a writable directory (unless already set); return it.

    Safe to call more than once and after numba was imported (the setting is
    then also written into ``numba.config``, which numba reads when a kernel
    is decorated).
    """
    chosen = os.environ.get("NUMBA_CACHE_DIR", "")
    if not chosen:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        candidates = [Path(xdg) / "flowmeter" / "numba"] if xdg else []
        try:
            candidates.append(Path.home() / ".cache" / "flowmeter" / "numba")
        except RuntimeError:  # no home directory for this uid
            pass
        uid = os.getuid() if hasattr(os, "getuid") else 0
        candidates.append(Path(tempfile.gettempdir()) / f"flowmeter-numba-{uid}")
        chosen = next((str(c) for c in candidates if _writable_dir(c)), str(candidates[-1]))
        os.environ["NUMBA_CACHE_DIR"] = chosen
    if "numba" in sys.modules:  # imported earlier: numba.config has read the old value
        sys.modules["numba"].config.CACHE_DIR = chosen
    return chosen


ensure_numba_cache()

import numba  # noqa: E402  (must follow ensure_numba_cache)

# --------------------------------------------------------------------------- what a kernel depends on

# "import a.b as c, d" or "from ..a.b import (c, d)" at the start of a line: groups dots, module, names
# (from), names (import). Prose that happens to match costs at most one more file in a stamp.
# (Anchored on a newline: ^ with re.MULTILINE takes 2.5 times as long.)
_IMPORT = re.compile(
    rb"\n[ \t]*(?:from[ \t]+(\.*)[ \t]*([\w.]*)[ \t]+import[ \t]*(\([^)]*\)|[^\n;#]*)|import[ \t]+([^\n;#]*))")
_COMMENT = re.compile(rb"#[^\n]*")


def _names(text: bytes) -> list[str]:
    """The imported names of ``a as b, c`` or ``(a,\\n b)``: ``["a", "c"]``."""
    words = (item.split() for item in _COMMENT.sub(b"", text).strip(b"() \t\r\n\\").split(b","))
    return [w[0].decode("ascii", "replace") for w in words if w]


@functools.lru_cache(maxsize=None)
def _read(path: str) -> tuple[bytes, tuple[tuple[int, tuple[str, ...], tuple[str, ...]], ...]]:
    """``(SHA-256 of the file, its imports)``; an import is ``(dots, module parts, names)``."""
    with open(path, "rb") as f:
        data = f.read()
    imports = []
    for m in _IMPORT.finditer(b"\n" + data):
        dots, module, from_names, names = m.groups()
        if names is not None:
            imports.extend((0, tuple(n.split(".")), ()) for n in _names(names))
        else:
            parts = tuple(module.decode("ascii", "replace").split(".")) if module else ()
            imports.append((len(dots), parts, tuple(_names(from_names))))
    return hashlib.sha256(data).digest(), tuple(imports)


@functools.lru_cache(maxsize=None)
def _module_of(path: str) -> tuple[str, tuple[str, ...]]:
    """``(root, dotted name as parts)`` of a source file: root is the directory above its outermost package."""
    directory, name = os.path.split(path)
    parts = [] if name == "__init__.py" else [name[:-3] if name.endswith(".py") else name]
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        directory, package = os.path.split(directory)
        parts.insert(0, package)
    return directory, tuple(parts)


@functools.lru_cache(maxsize=None)
def _module_files(root: str, parts: tuple[str, ...]) -> tuple[str, ...]:
    """The files Python runs to import ``parts`` from ``root``: each package's ``__init__.py``, then
    the module's file; fewer when a part is neither (an attribute of a module, or nothing of ours)."""
    if not parts:
        return ()
    above = _module_files(root, parts[:-1])
    if len(above) < len(parts) - 1 or (above and not above[-1].endswith("__init__.py")):
        return above  # what lies above is not a package: the last part is no file
    here = os.path.join(root, *parts)
    for path in (os.path.join(here, "__init__.py"), here + ".py"):
        if os.path.isfile(path):
            return above + (path,)
    return above


@functools.lru_cache(maxsize=None)
def dependencies(py_file: str) -> tuple[str, ...]:
    """The source files a kernel defined in ``py_file`` depends on: itself and every project
    module it imports, transitively (see the module's notes); sorted absolute paths."""
    start = os.path.abspath(py_file)
    root, own = _module_of(start)
    follow = set(PROJECT_PACKAGES) | set(own[:1])
    seen = {start}
    todo = [start]
    while todo:
        path = todo.pop()
        _, name = _module_of(path)
        package = name if path.endswith("__init__.py") else name[:-1]
        for dots, module, names in _read(path)[1]:
            if dots:  # relative: from the file's package, one level up per dot after the first
                if dots - 1 > len(package):
                    continue
                module = package[:len(package) - dots + 1] + module
            if not module or module[0] not in follow:
                continue
            found = _module_files(root, module)
            for name_ in names:  # "from package import module" runs that module too
                if name_ != "*":
                    found += _module_files(root, module + (name_,))
            for f in found:
                if f not in seen:
                    seen.add(f)
                    todo.append(f)
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def source_stamp(py_file: str) -> bytes:
    """SHA-256 over the contents (and paths below the package root) of ``dependencies(py_file)``."""
    root = _module_of(os.path.abspath(py_file))[0]
    h = hashlib.sha256()
    for path in dependencies(py_file):  # all below root
        h.update(path[len(root):].encode())
        h.update(_read(path)[0])
    return h.digest()


# --------------------------------------------------------------------------- numba's cache

_KERNELS: weakref.WeakSet = weakref.WeakSet()  # functions made by njit: the locator answers for these
_WRITABLE: set[str] = set()  # cache directories found writable in this process


def install_dependency_stamps() -> type | None:
    """Put ``DependencyStampLocator`` first among numba's cache locators; return it (None: numba lacks them)."""
    try:
        from numba.core import caching

        base = caching.UserProvidedCacheLocator
        classes = caching.CacheImpl._locator_classes
    except (ImportError, AttributeError):
        return None
    if not isinstance(classes, list):
        return None
    for cls in classes:
        if getattr(cls, "flowmeter_stamps", False):
            return cls

    class DependencyStampLocator(base):
        """Numba's locator under ``NUMBA_CACHE_DIR``, stamped with the kernel's dependencies."""

        flowmeter_stamps = True

        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._stamped_file = py_file

        def get_source_stamp(self):
            return "flowmeter dependencies", source_stamp(self._stamped_file)

        def ensure_cache_path(self):
            # numba proves the directory writable with a temporary file for every kernel; the
            # kernels of one file share a directory, which is proven once per process
            path = self.get_cache_path()
            if path not in _WRITABLE:
                super().ensure_cache_path()
                _WRITABLE.add(path)

        @classmethod
        def from_function(cls, py_func, py_file):
            if py_func not in _KERNELS:
                return None
            return super().from_function(py_func, py_file)

    classes.insert(0, DependencyStampLocator)
    return DependencyStampLocator


DependencyStampLocator = install_dependency_stamps()


def _locator_in_use() -> bool:
    return DependencyStampLocator is not None and not getattr(numba.config, "CACHE_LOCATOR_CLASSES", "")


def _njit_in_stamped_dir(func, options):
    """The fallback without the locator: cache under ``NUMBA_CACHE_DIR/deps-<stamp>``, or not at all."""
    base = numba.config.CACHE_DIR
    stamped = os.path.join(base, "deps-" + source_stamp(inspect.getfile(func)).hex()[:20])
    numba.config.CACHE_DIR = stamped  # numba finds the kernel's cache directory while decorating
    try:
        kernel = numba.njit(func, **options)
    finally:
        numba.config.CACHE_DIR = base
    where = getattr(getattr(kernel, "stats", None), "cache_path", None) or ""
    if not where.startswith(stamped + os.sep):
        return numba.njit(func, **{**options, "cache": False})
    return kernel


def lean_cache_loads() -> bool:
    """Load cached kernels without numba's full context refresh (see the module's notes).

    Returns False, changing nothing, on a numba whose cache lacks the
    methods this relies on; that numba then loads as it always does.
    """
    from numba.core import caching

    cache = caching.Cache
    if getattr(cache.load_overload, "lean", False):
        return True
    if not (hasattr(cache, "_load_overload") and hasattr(cache, "_guard_against_spurious_io_errors")):
        return False
    try:
        from numba.core.runtime import rtsys
    except ImportError:
        return False

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)  # what the refresh did that a loaded kernel needs
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        return None  # the guard swallowed an I/O error: numba compiles instead

    load_overload.lean = True
    cache.load_overload = load_overload
    return True


lean_cache_loads()


def njit(func=None, **options):
    """``numba.njit`` with ``cache=True, nogil=True``; use as ``@njit`` or ``@njit(...)``.

    A cached kernel is stamped with the files it depends on (see the module's notes).
    """
    options.setdefault("cache", True)
    options.setdefault("nogil", True)
    if func is None:
        return lambda f: njit(f, **options)
    if not options["cache"]:
        return numba.njit(func, **options)
    if not _locator_in_use():
        return _njit_in_stamped_dir(func, options)
    _KERNELS.add(func)
    return numba.njit(func, **options)


__all__ = ["PROJECT_PACKAGES", "DependencyStampLocator", "dependencies", "ensure_numba_cache",
           "install_dependency_stamps", "lean_cache_loads", "njit", "source_stamp"]
