"""Loads cuepipe's TouchDesigner package inside TD, where the name ``td`` is TD's own module.

Inside TouchDesigner ``import td.start`` cannot work: ``td`` is TD's built-in module. So this
standalone file (stdlib only, no package imports) is the content of the COMP's extension Text DAT
(its ``File`` parameter points here); it loads this repository's ``td/`` folder under another
name, ``cuepipe_td``, and builds the extension. The COMP's Extension Object is then
``op('./boot').module.extension(me)`` with Extension Name ``Cuepipe``.

Modules inside the package import each other relatively, so they work under any package name.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE = "cuepipe_td"
NEEDS = (3, 11)  # TD 2023 and 2025 builds embed Python 3.11; TD 2022 builds 3.9


def check_python(version: tuple[int, ...] | None = None) -> None:
    """Refuse a TD whose Python is older than 3.11, with the TD build to install, before anything fails
    deeper down (td/ uses 3.10+ syntax and ``zip(strict=...)``). An ImportError, as boot.py's others: it
    stands alone, before the package (and its error root) can load."""
    have = tuple(version if version is not None else sys.version_info[:3])
    if have[:2] < NEEDS:
        raise ImportError(
            f"cuepipe needs TouchDesigner's Python {NEEDS[0]}.{NEEDS[1]} (a TD 2023 or 2025 build); this TD "
            f"runs Python {'.'.join(map(str, have))} (a TD 2022 build): install a TouchDesigner 2023 or 2025 build")


def load(repo: str | Path, name: str = PACKAGE, fresh: bool = True) -> ModuleType:
    """Import ``<repo>/td`` as package ``name``; ``fresh`` drops earlier copies (picks up edits)."""
    check_python()
    folder = Path(repo) / "td"
    if fresh:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    elif name in sys.modules:
        return sys.modules[name]
    return load_file(name, folder / "__init__.py", package=True)


#: Where the stdlib-only modules td/ shares with the rest of cuepipe live: beside td/ in the repository
#: (and in an installed cuepipe alike): the address space and the failure vocabulary.
SHARED = Path(__file__).resolve().parent.parent / "stages"


def shared(package: str, name: str) -> ModuleType:
    """``stages/<name>.py`` (``protocol``, ``errors``: standard library only) as module ``<package>._<name>``.

    TD's Python cannot import ``cuepipe.stages`` (python-osc and the rest are not installed there), so
    these two files are loaded by path; one copy per package, dropped with it by a fresh ``load``.
    """
    key, path = f"{package}._{name}", SHARED / f"{name}.py"
    if key in sys.modules:
        return sys.modules[key]
    if not path.is_file():
        raise ImportError(f"cuepipe's shared {name} module is missing: {path} (td/ must stay beside stages/)")
    return load_file(key, path)


def load_file(name: str, path: Path, package: bool = False) -> ModuleType:
    """Execute the Python file ``path`` as module ``name`` (a package when ``package``), registered in
    ``sys.modules`` while it runs (dataclasses and relative imports need that), removed on failure.
    The one by-path loader of td/: this package inside TD, and the shared address space."""
    search = [str(path.parent)] if package else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"cannot load {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def repo_of(ownerComp: Any) -> Path:
    """The repository: the COMP's ``Repo`` parameter, else two folders above the boot DAT's file."""
    repo = ownerComp.par.Repo.eval() if getattr(ownerComp.par, "Repo", None) is not None else ""
    if not repo:
        boot = ownerComp.op("boot")
        file = boot.par.file.eval() if boot is not None else ""
        if not file:
            raise ImportError("set the COMP's Repo parameter to the cuepipe folder")
        return Path(file).resolve().parent.parent
    return Path(repo)


def extension(ownerComp: Any, repo: str | Path | None = None, **options: Any) -> Any:
    """The ``CuepipeExt`` for ``ownerComp``, with TD's ``tdu.Dependency`` for its state if present."""
    package = load(repo if repo is not None else repo_of(ownerComp))
    module = importlib.import_module(f"{package.__name__}.extension")
    tdu = globals().get("tdu", getattr(builtins, "tdu", None))
    if tdu is not None and "dependency" not in options:
        options["dependency"] = tdu.Dependency
    return module.CuepipeExt(ownerComp, **options)
