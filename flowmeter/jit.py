"""Numba set-up: where compiled kernels are cached, and the one ``njit`` we use.

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

Import kernels' modules through here (``from .jit import njit``), never
``numba.njit`` directly, so the cache location and the options (``cache``,
``nogil``: kernels release the GIL, a capture thread never blocks another)
are the same everywhere.

Loading a cached kernel makes numba first "refresh" its compiler contexts:
it imports and registers the implementations of everything it could ever
compile (about 60 modules of its own: lists, dicts, linear algebra, random
generators...), 0.15-0.2 s of every start, although a cached kernel is
machine code that needs none of them. ``lean_cache_loads()`` makes a cache
load start only numba's runtime (NRT, which the kernels' arrays need);
compiling still refreshes everything, as numba's compiler does that itself.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


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
    """``numba.njit`` with ``cache=True, nogil=True``; use as ``@njit`` or ``@njit(...)``."""
    options.setdefault("cache", True)
    options.setdefault("nogil", True)
    if func is None:
        return lambda f: numba.njit(f, **options)
    return numba.njit(func, **options)


__all__ = ["ensure_numba_cache", "lean_cache_loads", "njit"]
