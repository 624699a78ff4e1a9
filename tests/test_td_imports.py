"""``td/`` must load inside TouchDesigner: stdlib only, nothing touched at import, and not as ``td``.

TD's Python has none of cuepipe's dependencies, its callbacks DATs load a file as a lone module,
and inside TD the name ``td`` is already TD's own built-in module. These tests check all three in
a subprocess started with ``-I -S`` (no site-packages, no PYTHONPATH) and the repo alone on sys.path.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.env import ROOT

TD = ROOT / "td"
STANDALONE = ("callbacks.py", "boot.py")  # loaded by TD as DAT modules: no package imports at all


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) for every import in the file; level > 0 is a relative import."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_td_imports_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted(TD.glob("*.py")):
        for module, level in imports(path):
            if level:
                assert path.name not in STANDALONE, f"{path.name} is loaded alone by TD: no relative imports"
                continue
            assert module.split(".")[0] in allowed, f"{path.name} imports {module}, which is not stdlib"
            assert module.split(".")[0] != "td", f"{path.name}: import siblings relatively (TD owns the name td)"


ISOLATED = r"""
import builtins, sys
sys.path.insert(0, {root!r})
touched = []
class Tripwire:
    def __init__(self, name): self.name = name
    def __getattr__(self, attr): touched.append(self.name + "." + attr); raise AttributeError(attr)
    def __call__(self, *a, **k): touched.append(self.name + "()")
    def __bool__(self): touched.append(self.name); return True
before = set(sys.modules)
{setup}
import importlib
import pathlib
names = sorted(p.stem for p in pathlib.Path({root!r}, "td").glob("*.py") if p.stem != "__init__")
assert len(names) >= 10, names
for name in names:
    importlib.import_module("td." + name)
foreign = sorted(m for m in set(sys.modules) - before
                 if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "td")
print("FOREIGN", foreign)
print("TOUCHED", touched)
"""


def run_isolated(code: str) -> str:
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_imports_without_site_packages_and_without_op_me_mod() -> None:
    out = run_isolated(ISOLATED.format(root=str(ROOT), setup=""))
    assert "FOREIGN []" in out and "TOUCHED []" in out


def test_import_never_touches_td_globals() -> None:
    setup = "for n in ['op', 'me', 'mod', 'parent', 'ext', 'tdu', 'project', 'root']: setattr(builtins, n, Tripwire(n))"
    out = run_isolated(ISOLATED.format(root=str(ROOT), setup=setup))
    assert "FOREIGN []" in out and "TOUCHED []" in out


BOOT = r"""
import builtins, importlib.util, sys, types
from pathlib import Path
sys.modules["td"] = types.ModuleType("td")  # what TouchDesigner has: its own module named td
try:
    import cuepipe.td.start
except ImportError as exc:
    print("PLAIN IMPORT FAILS:", type(exc).__name__)
spec = importlib.util.spec_from_file_location("boot", {boot!r})  # as TD loads a Text DAT module
boot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boot)
class Dependency:
    def __init__(self, val): self.val = val
builtins.tdu = types.SimpleNamespace(Dependency=Dependency)
class Par:
    def __init__(self, val): self.val = val
    def eval(self): return self.val
class Comp:
    par = types.SimpleNamespace(Repo=Par({root!r}), Mode=Par("run"))
    def op(self, name): return None
ext = boot.extension(Comp(), auto_refresh=False)
print("CLASS", type(ext).__module__, type(ext).__name__, type(ext.Status).__name__)
again = boot.extension(Comp(), auto_refresh=False)  # re-init reloads the package (picks up edits)
print("RELOADED", type(again) is not type(ext))
print("FOREIGN", sorted(m for m in sys.modules if m.split(".")[0] not in sys.stdlib_module_names
                         and m.split(".")[0] not in ("__main__", "td", "boot", "cuepipe_td")))
"""


def test_boot_loads_the_package_where_td_is_taken() -> None:
    out = run_isolated(BOOT.format(boot=str(TD / "boot.py"), root=str(ROOT)))
    assert "PLAIN IMPORT FAILS: ModuleNotFoundError" in out
    assert "CLASS cuepipe_td.extension CuepipeExt Dependency" in out
    assert "RELOADED True" in out and "FOREIGN []" in out
