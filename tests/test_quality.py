"""Project rules that code review would otherwise have to catch: layering, lint, types, README/CI."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.env import ROOT
from tests.support.typecheck import typecheck

PACKAGES = ("orchestrator", "stages", "models", "td")
#: The layers: which of the project's other packages each one may import. The orchestrator runs
#: stages as programs and resolves models; stages run models; models and td stand alone (td runs
#: inside TouchDesigner, whose Python has none of the rest: stdlib and itself only).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "orchestrator": frozenset({"stages", "models"}),
    "stages": frozenset({"models"}),
    "models": frozenset(),
    "td": frozenset(),
}
#: Modules below every layer, importable by all but td: they import nothing of the project.
SHARED = frozenset({"cuepipe.stages.errors", "cuepipe.stages.protocol"})


def module_name(path: Path) -> str:
    """The installed name of a project file: ``stages/stage.py`` -> ``cuepipe.stages.stage``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(["cuepipe", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def layer(module: str) -> str | None:
    """Which of PACKAGES a module name belongs to (``cuepipe.stages.x`` -> ``stages``), else None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "cuepipe" and len(parts) > 1 and parts[1] in PACKAGES else None


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, module: str | None = None) -> set[str]:
    """Every module ``path`` imports, as absolute names: at top level, inside functions and under
    ``if TYPE_CHECKING`` alike; relative imports are resolved (``module``: the file's own name)."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules importing it runs: the ones it names, and the
    ``__init__`` of every other package those live in."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for target in imported_modules(path, name):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and (prefix == target or not name.startswith(prefix + ".")):
                    edges.add(prefix)
        graph[name] = edges - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> a``) for each group of modules that import each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(_cycle_through(min(group), group, graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _cycle_through(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest import path from ``start`` back to itself within ``group``."""
    paths = {w: [start, w] for w in sorted(graph[start] & group)}
    queue = list(paths)
    while queue:
        v = queue.pop(0)
        if v == start:
            return paths[v]
        for w in sorted(graph[v] & group):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return sorted(group)


def test_layers_import_only_downwards() -> None:
    """orchestrator -> stages -> models, never back (a Stage never imports orchestrator); td: stdlib only."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    offenders = []
    for name, path in project_modules().items():
        package = layer(name)
        assert package is not None
        for target in sorted(imported_modules(path, name)):
            top = layer(target)
            if target.split(".")[0] in PACKAGES:  # the bare folder name: a second copy of the module
                offenders.append(f"{path.relative_to(ROOT)} imports {target}: import it as cuepipe.{target}")
            elif package == "td":
                if top != "td" and target.split(".")[0] not in stdlib:
                    offenders.append(f"{path.relative_to(ROOT)} imports {target}: td/ is stdlib only")
            elif (top is not None and top != package and top not in MAY_IMPORT[package]
                  and not any(target == m or target.startswith(m + ".") for m in SHARED)):
                offenders.append(f"{path.relative_to(ROOT)} imports {target}: {package} is below {top}")
    assert offenders == []


def test_shared_modules_import_nothing_of_the_project() -> None:
    modules = project_modules()
    for name in SHARED:
        assert not {layer(t) for t in imported_modules(modules[name], name)} - {None}, name


def test_no_import_cycles() -> None:
    """Lazy imports inside functions count too: a cycle hidden by one is still misplaced code."""
    graph = import_graph()
    assert len(graph) > 50 and "cuepipe.stages.stage" in graph["cuepipe.stages.preprocess"]  # really built
    assert [" -> ".join(cycle) for cycle in find_cycles(graph)] == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e2", "e"]]


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert len(commands) >= 2 and "cuepipe demo" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]


def _tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed (it is in the [test] extra)")
    return exe


def test_ruff_clean() -> None:
    proc = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean() -> None:
    _tool("mypy")
    try:
        proc = typecheck()
    except OSError as exc:  # Windows without symbolic-link rights (developer mode off)
        pytest.skip(f"cannot link the cuepipe view for mypy here: {exc}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout and "source files" in proc.stdout  # it really checked the package


def test_every_error_stands_under_the_one_root_with_a_kind() -> None:
    """Each exception class the project defines derives from CuepipeError (td's included, through its
    by-path copy of stages/errors.py) and so carries a failure kind; private control-flow ones aside."""
    import importlib
    import inspect

    from cuepipe.stages.errors import ErrorKind

    orphans, checked = [], 0
    for name in project_modules():
        module = importlib.import_module(name)
        for cls_name, cls in vars(module).items():
            if (inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__
                    and not cls_name.startswith("_")):
                checked += 1
                if not any(base.__name__ == "CuepipeError" for base in cls.__mro__):
                    orphans.append(f"{name}.{cls_name}")
                else:
                    assert cls.kind.value in {k.value for k in ErrorKind}, cls_name
    assert checked >= 25 and orphans == []
