"""Builds (or updates) the ``cuepipe`` COMP inside TouchDesigner, and saves it as ``cuepipe.tox``.

Run it once from TD, in either of two ways (``C:/cuepipe`` is the repository):

- Textport: ``CUEPIPE_REPO = r'C:/cuepipe'; exec(open(CUEPIPE_REPO + '/td/build_comp.py').read())``
- a Text DAT whose **File** is ``C:/cuepipe/td/build_comp.py``: right-click it, **Run Script**.

Either way ``main()`` runs: ``build()`` under ``/project1``, then a printed summary. Run it again
after updating cuepipe: it updates the COMP and its children in place (children are looked up by
name before anything is created), never makes a ``cuepipe1``. ``build(parent=op('/project1/show'))``
builds elsewhere.

It uses only TD's documented Python API (docs.derivative.ca: COMP Class ``create``, ``save``,
``appendCustomPage``, ``initializeExtensions``; OP Class ``op``, ``nodeX``/``nodeY``, ``dock``/``docked``,
``destroy``, ``viewer``, ``OPType``; Par Class ``val``, ``expr``, ``mode``, ``readOnly``, ``label``,
``menuNames``/``menuLabels``; ``ParMode``). Everything TD-global (``op``, ``ParMode``, ``me``) is looked up
when a function runs, never at import, so the module imports (and is tested) outside TD: tests pass
fakes through ``build(td={...})``. Standalone like ``boot.py``: no relative imports, because TD execs it.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

COMP_NAME = "cuepipe"
SHORTCUT = "Cuepipe"  # Global OP Shortcut: op.Cuepipe anywhere in the project
EXTENSION_NAME = "Cuepipe"  # must match td/callbacks.py EXTENSION
EXTENSION_OBJECT = "op('./boot').module.extension(me)"
PAGE = "Cuepipe"  # td/parameters.py setup_parameters' page
PORT_EXPRESSION = "parent().par.Oscinport"  # the OSC In DAT listens where --report / replies point
STATUS_EXPRESSION = "me.ext.Cuepipe.Status.val if hasattr(me.ext, 'Cuepipe') else 'extension not loaded'"
TOX = "cuepipe.tox"

#: What the build adds to td/parameters.py's PARAMETERS (same shape: name, style, label, default, menu).
#: Names already on the COMP (from setup_parameters, or a later PARAMETERS) are left alone.
EXTRA_PARAMETERS: tuple[tuple[str, str, str, Any, tuple[tuple[str, str], ...]], ...] = (
    ("Startdaemon", "Pulse", "Start daemon", None, ()),
    ("Stopdaemon", "Pulse", "Stop daemon", None, ()),
    ("Setupvenv", "Pulse", "Setup venv", None, ()),
    ("Status", "Str", "Status", "", ()),
)
#: Labels the page shows instead of PARAMETERS' ones (the parameter names stay: the extension reads them).
LABELS = {"Start": "Run"}

# Execute-type DATs hold one-line shims into the callbacks DAT (the guide's shims; siblings in the COMP).
FRAME_SHIM = '''# Execute DAT (Frame Start on): exit codes, heartbeat timeout, table redraw. Made by td/build_comp.py.
def onFrameStart(frame):
    return op('callbacks').module.frame_start(me)
'''
PULSE_SHIM = '''# Parameter Execute DAT (OPs .., Custom on, Value Change off, On Pulse on). Made by td/build_comp.py.
def onPulse(par):
    return op('callbacks').module.onPulse(par)
'''


class Child:
    """One operator the COMP holds: its type, where it sits, and its parameters."""

    def __init__(self, name: str, op_type: str, x: int, y: int, pars: Mapping[str, Any] | None = None,
                 text: str | None = None, viewer: bool = False) -> None:
        self.name, self.op_type, self.x, self.y = name, op_type, x, y
        self.pars, self.text, self.viewer = dict(pars or {}), text, viewer


def children(repo: Path, pulses: list[str]) -> list[Child]:
    """The network inside the COMP (docs/touchdesigner.md's steps, wired by script)."""
    td = (repo / "td").as_posix()
    return [
        Child("boot", "textDAT", -600, 200, {"file": f"{td}/boot.py", "syncfile": True}),
        Child("callbacks", "textDAT", -400, 200, {"file": f"{td}/callbacks.py", "syncfile": True}),
        Child("oscin1", "oscinDAT", -600, 0, {"active": True, "callbacks": "callbacks"}),
        Child("jobs", "tableDAT", -200, 0, viewer=True),
        Child("frame", "executeDAT", -600, -200, {"active": True, "framestart": True}, text=FRAME_SHIM),
        Child("pulses", "parameterexecuteDAT", -400, -200,
              {"active": True, "op": "..", "pars": " ".join(pulses), "custom": True, "builtin": False,
               "valuechange": False, "onpulse": True}, text=PULSE_SHIM),
    ]


# ----------------------------------------------------------------------------------------- TD lookups

def td_global(name: str, td: Mapping[str, Any] | None = None) -> Any:
    """A TD global (``op``, ``ParMode``, ``me``...) at call time: ``td`` (tests), this module's globals
    (TD's exec namespace), builtins, then TD's own ``td`` module. None when there is none."""
    if td is not None and name in td:
        return td[name]
    for space in (globals(), vars(builtins)):
        if name in space:
            return space[name]
    module = sys.modules.get("td")
    if module is not None and not hasattr(module, "__path__"):  # TD's own module, not this package
        return getattr(module, name, None)
    return None


def find_repo(td: Mapping[str, Any] | None = None) -> Path:
    """The repository: ``CUEPIPE_REPO`` (exec namespace or environment), this file, or the Text DAT
    running it (``me.par.file``)."""
    hint = td_global("CUEPIPE_REPO", td) or os.environ.get("CUEPIPE_REPO")
    if hint:
        return Path(str(hint))
    for candidate in (globals().get("__file__"), find_repo.__code__.co_filename):
        if candidate and Path(candidate).name == "build_comp.py":
            return Path(candidate).resolve().parent.parent
    me = td_global("me", td)
    file = getattr(getattr(getattr(me, "par", None), "file", None), "eval", lambda: "")()
    if file and Path(str(file)).name == "build_comp.py":
        return Path(str(file)).resolve().parent.parent
    raise RuntimeError("cannot tell where the cuepipe folder is: set CUEPIPE_REPO = r'<cuepipe folder>' first")


def load_package(repo: Path) -> ModuleType:
    """``<repo>/td`` as package ``cuepipe_td`` through ``td/boot.py`` (how the extension loads it too)."""
    path = repo / "td" / "boot.py"
    spec = importlib.util.spec_from_file_location("cuepipe_build_boot", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise RuntimeError(f"{path} is missing: is {repo} the cuepipe folder?")
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    package: ModuleType = boot.load(repo)
    for module in ("parameters", "start"):  # package.parameters / package.start below
        importlib.import_module(f"{package.__name__}.{module}")
    return package


# ---------------------------------------------------------------------------------------- the build

class Report:
    """What the build made, changed and removed: the printed summary."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(["cuepipe build:", *(f"  {line}" for line in self.lines)])


def ensure(owner: Any, name: str, op_type: str, report: Report) -> tuple[Any, bool]:
    """``owner``'s child ``name`` of type ``op_type``: the existing one, else a new one (a same-named
    child of another type is replaced). Returns (operator, created)."""
    found = owner.op(name)
    if found is not None and getattr(found, "OPType", op_type) == op_type:
        return found, False
    if found is not None:
        report.add(f"replaced {found.path} ({found.OPType}, expected {op_type})")
        found.destroy()
    made = owner.create(op_type, name)
    if made.name != name:  # TD numbers a taken name: never leave a duplicate behind
        made.destroy()
        raise RuntimeError(f"{owner.path}/{name} exists and could not be replaced")
    report.add(f"created {made.path} ({op_type})")
    return made, True


def set_pars(target: Any, values: Mapping[str, Any]) -> list[str]:
    """Set built-in parameters; returns the names this TD build does not have (reported, not fatal)."""
    missing = []
    for name, value in values.items():
        if getattr(target.par, name, None) is None:
            missing.append(name)
        else:
            setattr(target.par, name, value)
    return missing


def remove_docked(target: Any, keep: set[str], report: Report) -> None:
    """Destroy the DATs TD docked onto ``target`` by itself (e.g. ``oscin1_callbacks``): the COMP's
    one ``callbacks`` DAT serves every operator."""
    for docked in list(getattr(target, "docked", [])):
        if docked.name not in keep:
            report.add(f"removed {docked.path} (docked to {target.name}; cuepipe's callbacks DAT is used)")
            docked.destroy()


def setup_extension(comp: Any, report: Report) -> str:
    """Extension 1: Object, Name, Promote — ``ext0*`` in current builds, ``extension1`` in older ones."""
    spellings = (("ext0object", "ext0name", "ext0promote"), ("extension1", "extname1", "promoteextension1"))
    for obj, name, promote in spellings:
        if getattr(comp.par, obj, None) is not None:
            setattr(comp.par, obj, EXTENSION_OBJECT)
            for par, value in ((name, EXTENSION_NAME), (promote, True)):
                if getattr(comp.par, par, None) is not None:
                    setattr(comp.par, par, value)
            report.add(f"extension: {obj} = {EXTENSION_OBJECT}, name {EXTENSION_NAME}, promoted")
            return obj
    raise RuntimeError(f"{comp.path} has neither ext0object nor extension1: which TouchDesigner build is this?")


def setup_page(comp: Any, package: ModuleType, report: Report) -> list[str]:
    """td/parameters.py's page (``setup_parameters``), then ``EXTRA_PARAMETERS`` on the same page."""
    created: list[str] = package.parameters.setup_parameters(comp, PAGE)
    created += package.parameters.setup_parameters(comp, PAGE, EXTRA_PARAMETERS)
    for name, label in LABELS.items():
        par = getattr(comp.par, name, None)
        if par is not None:
            par.label = label
    report.add(f"parameters created: {', '.join(created)}" if created else "parameters: all present")
    return created


def pulse_names(package: ModuleType) -> list[str]:
    specs = [*package.parameters.PARAMETERS, *EXTRA_PARAMETERS]
    return [name for name, style, *_ in specs if style == "Pulse"]


def menu_items(result: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(names, labels) of ``cuepipe pipelines --json``, labelled as the extension labels them."""
    items = [p for p in result.get("pipelines", []) if isinstance(p, dict) and p.get("name")]
    labels = [f"{p['name']} ({' > '.join(str(s.get('stage')) for s in p.get('stages', []))})" for p in items]
    return [str(p["name"]) for p in items], labels


def query_pipelines(package: ModuleType, python: str, pipelines: str | None, timeout: float) -> dict[str, Any]:
    """``cuepipe pipelines --json`` through the launcher's ``PipelinesQuery``, waited for (the build is a
    one-off run from the Textport, so it may hold TD for these seconds; the extension never does)."""
    query = package.start.PipelinesQuery(python, pipelines or None)
    deadline = time.monotonic() + timeout
    while not query.poll():
        if time.monotonic() > deadline:
            query.close()
            raise RuntimeError(f"cuepipe pipelines --json did not answer within {timeout:.0f} s")
        time.sleep(0.05)
    if query.result is None:
        raise RuntimeError(query.error)
    result: dict[str, Any] = query.result
    return result


def fill_pipelines(comp: Any, package: ModuleType, repo: Path, report: Report, timeout: float,
                   lister: Callable[[str, str | None], Mapping[str, Any]] | None) -> list[str]:
    """The Pipeline (and Then run) menu from ``cuepipe pipelines --json``; a missing venv is reported."""
    python = str(comp.par.Python.eval() or "") or str(package.start.default_python(repo))
    pipelines = str(comp.par.Pipelinesfile.eval() or "") or None
    if lister is None and not Path(python).is_file():
        report.add(f"pipelines: no interpreter at {python} yet (pulse Setup venv, then Refresh pipelines)")
        return []
    try:
        result = (lister or (lambda py, pf: query_pipelines(package, py, pf, timeout)))(python, pipelines)
    except Exception as exc:  # the build goes on: Refresh pipelines can fill the menu later
        report.add(f"pipelines: not listed ({exc})")
        return []
    names, labels = menu_items(result)
    for menu in ("Pipeline", "Nextpipeline"):
        par = getattr(comp.par, menu, None)
        if par is not None:
            par.menuNames, par.menuLabels = names, labels
    if names and str(comp.par.Pipeline.eval() or "") not in names:
        comp.par.Pipeline = names[0]
    report.add(f"pipelines: {len(names)} in the menu ({', '.join(names)})")
    return names


def build(parent: Any = None, repo: str | os.PathLike[str] | None = None, save: bool = True, *,
          name: str = COMP_NAME, tox: str | os.PathLike[str] | None = None, pipelines: bool = True,
          timeout: float = 20.0, lister: Callable[[str, str | None], Mapping[str, Any]] | None = None,
          td: Mapping[str, Any] | None = None, out: Callable[[str], Any] | None = print) -> Any:
    """Build or update ``<parent>/<name>`` (default ``/project1/cuepipe``) and return the COMP.

    ``save``: write the COMP to ``tox`` (default ``<repo>/cuepipe.tox``). ``pipelines``: fill the
    Pipeline menu from ``cuepipe pipelines --json`` (``lister(python, pipelines_file)`` replaces the
    CLI; ``timeout`` bounds the wait). ``td``: TD globals to use instead of TD's (tests). ``out``:
    where the summary goes (None: nowhere)."""
    repo_path = Path(repo) if repo is not None else find_repo(td)
    report = Report()
    if parent is None:
        lookup = td_global("op", td)
        parent = lookup("/project1") if lookup is not None else None
        if parent is None:
            raise RuntimeError("no /project1 here: pass build(parent=op('/your/comp'))")
    package = load_package(repo_path)

    comp, new = ensure(parent, name, "baseCOMP", report)
    if new:
        comp.nodeX, comp.nodeY = 0, 0
    comp.par.opshortcut = SHORTCUT
    report.add(f"Global OP Shortcut: op.{SHORTCUT}")

    setup_page(comp, package, report)
    comp.par.Repo = repo_path.as_posix()
    par_mode = td_global("ParMode", td)
    status = comp.par.Status
    status.expr = STATUS_EXPRESSION
    if par_mode is not None:
        status.mode = par_mode.EXPRESSION
    status.readOnly = True

    specs = children(repo_path, pulse_names(package))
    made: dict[str, Any] = {}
    for spec in specs:
        child, _ = ensure(comp, spec.name, spec.op_type, report)
        made[spec.name] = child
        missing = set_pars(child, spec.pars)
        if missing:
            report.add(f"{child.path}: this TD build has no parameter(s) {', '.join(missing)}")
        if spec.text is not None:
            child.text = spec.text
        child.viewer = spec.viewer
        child.nodeX, child.nodeY = spec.x, spec.y
    ours = {spec.name for spec in specs}
    for child in made.values():
        remove_docked(child, ours, report)

    # the COMP's own tile shows the job table (Common page: Node View = Operator Viewer, docs.derivative.ca
    # "COMP Geometry Common Page": nodeview / opviewer), with the COMP's viewer flag on
    missing = set_pars(comp, {"nodeview": "opviewer", "opviewer": "./jobs"})
    comp.viewer = True
    report.add("node viewer: the job table" if not missing else
               f"{comp.path}: this TD build has no parameter(s) {', '.join(missing)}: its viewer stays the default")

    oscin = made["oscin1"]
    oscin.par.port.expr = PORT_EXPRESSION
    if par_mode is not None:
        oscin.par.port.mode = par_mode.EXPRESSION
    report.add(f"{oscin.path} port = {PORT_EXPRESSION}")

    if pipelines:
        fill_pipelines(comp, package, repo_path, report, timeout, lister)
    setup_extension(comp, report)
    comp.initializeExtensions()
    report.add("extensions initialized")

    if save:
        target = Path(tox) if tox is not None else repo_path / TOX
        comp.save(target.as_posix())
        report.add(f"saved {target.as_posix()}")
    if out is not None:
        out(report.text())
    return comp


def main() -> Any:
    """What TD runs (Textport exec or a Text DAT's Run Script): build under /project1 and save."""
    try:
        return build()
    except Exception as exc:
        print(f"cuepipe build failed: {exc}")
        raise


if __name__ == "__main__" or "op" in globals():  # run by TD (exec / Run Script), never on import
    main()
