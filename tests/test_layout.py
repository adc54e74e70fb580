"""The tree is the process diagram: import rules between the packages, read from every module's imports.

=================  ================================================================
layer              may import (besides itself and third-party packages)
=================  ================================================================
``flowmeter.ipc``  nothing of flowmeter's: the contracts every process shares
``flowmeter.jit``  nothing of flowmeter's: the one ``njit`` and its cache
capture stage      ``flowmeter.ipc``, ``flowmeter.jit``
(``flowmeter.capture``)
workers            ``flowmeter.ipc``, ``flowmeter.jit``, and of the exporter only its
                   record layout (``exporter.template``)
exporter           ``flowmeter.ipc``, ``flowmeter.jit``
control plane      anything of the runtime; but only ``flowmeter.cli`` imports
(``flowmeter.*``)  ``flowmeter.supervisor``
=================  ================================================================

No runtime module imports ``tests`` (test generators and helpers live in
``tests/support``), and there is no import cycle anywhere, counting imports
made inside functions too: a cycle held together by a function-level import
is still a cycle.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("flowmeter", "workers", "exporter")
FOUNDATION = ("flowmeter.ipc", "flowmeter.jit")
STAGES = {"flowmeter.capture": "capture", "workers": "workers", "exporter": "exporter"}
STAGE_MAY_IMPORT = {"workers": ("exporter.template",)}  # the record layout the workers fill
SUPERVISOR, CLI = "flowmeter.supervisor", "flowmeter.cli"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from package import module" imports the module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    known = set(modules) | {"tests", "tests.support"}
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> str:
    if any(_within(name, f) for f in FOUNDATION):
        return "foundation"
    for prefix, stage in STAGES.items():
        if _within(name, prefix):
            return stage
    if _within(name, "tests"):
        return "tests"
    return "control" if name != "flowmeter" else "package"


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule of the module notes, as ``a -> b: why``."""
    bad = []
    for a, targets in sorted(graph.items()):
        la = layer(a)
        for b in sorted(targets):
            lb = layer(b)
            if lb == "package":
                continue
            if lb == "tests":
                bad.append(f"{a} -> {b}: the runtime never imports tests")
            elif la == "foundation" and not (_within(b, "flowmeter.ipc") and _within(a, "flowmeter.ipc")):
                bad.append(f"{a} -> {b}: {a} imports nothing of flowmeter's but the contracts beside it")
            elif la in STAGES.values() and lb not in ("foundation", la) and b not in STAGE_MAY_IMPORT.get(la, ()):
                bad.append(f"{a} -> {b}: a stage imports only the contracts (flowmeter.ipc, flowmeter.jit)")
            elif b == SUPERVISOR and a != CLI:
                bad.append(f"{a} -> {b}: only {CLI} imports the supervisor")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, RUNTIME)


def test_every_package_and_stage_is_where_the_diagram_says(graph):
    for package in ("flowmeter.ipc", "flowmeter.capture", "flowmeter.capture.sources", "workers", "exporter"):
        assert package in graph, package
    assert {"flowmeter.capture.process", "workers.process", "exporter.process"} <= graph.keys()


def test_no_import_breaks_a_layer_rule(graph):
    assert forbidden_arrows(graph) == []


def test_there_is_no_import_cycle(graph):
    assert cycles(graph) == []


def test_the_tests_support_package_is_not_shipped():
    assert not (ROOT / "flowmeter" / "traffic.py").exists()
    assert all(layer(m) != "tests" for m in project_modules(ROOT, RUNTIME))


# --- the checker itself: it finds what it is meant to find ---------------------------------


def test_checker_finds_a_cycle_held_by_a_function_level_import(tmp_path):
    pkg = tmp_path / "flowmeter"
    (pkg / "ipc").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ipc" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from .status import X\nY = 1\n")
    (pkg / "status.py").write_text("X = 1\ndef f():\n    from flowmeter.config import Y\n    return Y\n")
    g = import_graph(tmp_path, ("flowmeter",))
    assert cycles(g) == [["flowmeter.config", "flowmeter.status"]]


def test_checker_finds_forbidden_arrows():
    g = {"flowmeter.ipc.schema": {"flowmeter.config"},          # a contract importing the control plane
         "workers.process": {"flowmeter.capture.decode",       # a stage importing another stage
                             "exporter.template"},              # (the record layout is allowed)
         "exporter.process": {"flowmeter.supervisor"},          # a stage importing the supervisor
         "flowmeter.demo": {"flowmeter.supervisor"},            # only the CLI may
         "flowmeter.cli": {"flowmeter.supervisor"},
         "flowmeter.capture.decode": {"tests.support"}}         # the runtime importing tests
    assert forbidden_arrows(g) == [
        "exporter.process -> flowmeter.supervisor: a stage imports only the contracts (flowmeter.ipc, flowmeter.jit)",
        "flowmeter.capture.decode -> tests.support: the runtime never imports tests",
        "flowmeter.demo -> flowmeter.supervisor: only flowmeter.cli imports the supervisor",
        "flowmeter.ipc.schema -> flowmeter.config: flowmeter.ipc.schema imports nothing of flowmeter's but the "
        "contracts beside it",
        "workers.process -> flowmeter.capture.decode: a stage imports only the contracts (flowmeter.ipc, "
        "flowmeter.jit)",
    ]


def test_the_readme_package_map_names_every_module_of_the_control_plane_contracts_and_capture():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Package map", 1)[1].split("```", 2)[1]
    words = set(re.findall(r"[\w.]+", block))
    for directory in ("flowmeter", "flowmeter/ipc", "flowmeter/capture"):
        for path in sorted((ROOT / directory).glob("*.py")):
            if path.name != "__init__.py":
                assert path.name in words, f"{directory}/{path.name} is not in the README's package map"
    for path in sorted((ROOT / "flowmeter" / "capture" / "sources").glob("*.py")):
        if path.name != "__init__.py":
            assert path.stem in words, f"sources/{path.name} is not in the README's package map"
    for directory in ("ipc/", "capture/", "sources/", "workers/", "exporter/", "support/", "bench/"):
        assert directory in block, directory
