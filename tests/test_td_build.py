"""td/build_comp.py against TD-shaped fakes: the COMP, its children, their parameters, idempotence, save."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from cuepipe.td import build_comp
from cuepipe.td.parameters import PARAMETERS
from tests.support.env import ROOT
from tests.support.td_fakes import (
    OLD_EXTENSION_PARS,
    FakeCOMP,
    FakeParMode,
    FakeTableDAT,
    td_globals,
)

LISTED = {"pipelines": [{"name": "matte", "stages": [{"stage": "preprocess"}, {"stage": "matting"}]},
                        {"name": "prep", "stages": [{"stage": "preprocess"}]}]}


def lister(python: str, pipelines: str | None) -> Mapping[str, Any]:
    return LISTED


class Network:
    """A fake TD network: ``/`` holding ``/project1``, and the TD globals the build looks up."""

    def __init__(self, builtins: dict[str, Any] | None = None) -> None:
        self.root = FakeCOMP("", None)
        self.project = FakeCOMP("project1", self.root, builtins=builtins)
        self.td = td_globals(self.root)
        self.printed: list[str] = []

    @property
    def path_root(self) -> str:
        return self.project.path

    def build(self, tmp: Path, **kwargs: Any) -> Any:
        kwargs.setdefault("lister", lister)
        return build_comp.build(repo=ROOT, tox=tmp / "cuepipe.tox", td=self.td, out=self.printed.append, **kwargs)


@pytest.fixture
def net() -> Network:
    return Network()


def test_builds_the_comp_and_its_children(net: Network, tmp_path: Path) -> None:
    comp = net.build(tmp_path)
    assert net.project.op("cuepipe") is comp and comp.path == "/project1/cuepipe" and comp.OPType == "baseCOMP"
    types = {name: child.OPType for name, child in comp.children.items()}
    assert types == {"boot": "textDAT", "callbacks": "textDAT", "oscin1": "oscinDAT", "jobs": "tableDAT",
                     "frame": "executeDAT", "pulses": "parameterexecuteDAT"}
    assert isinstance(comp.op("jobs"), FakeTableDAT) and comp.op("jobs").viewer
    boot, callbacks = comp.op("boot"), comp.op("callbacks")
    assert boot.par.file.val == f"{ROOT.as_posix()}/td/boot.py" and boot.par.syncfile.val is True
    assert callbacks.par.file.val == f"{ROOT.as_posix()}/td/callbacks.py" and callbacks.par.syncfile.val is True
    frame = comp.op("frame")
    assert frame.par.framestart.val is True and "op('callbacks').module.frame_start(me)" in frame.text
    positions = {(child.nodeX, child.nodeY) for child in comp.children.values()}
    assert len(positions) == len(comp.children)  # every node has its own place
    assert comp.par.opshortcut.val == "Cuepipe"  # op.Cuepipe
    assert comp.par.Repo.val == ROOT.as_posix()
    # the COMP's own tile shows the job table: Node View = Operator Viewer, pointing at it, viewer flag on
    assert (comp.par.nodeview.val, comp.par.opviewer.val, comp.viewer) == ("opviewer", "./jobs", True)


def test_osc_in_port_follows_the_comp_parameter_by_expression(net: Network, tmp_path: Path) -> None:
    oscin = net.build(tmp_path).op("oscin1")
    assert oscin.par.port.expr == "parent().par.Oscinport"
    assert oscin.par.port.mode == FakeParMode.EXPRESSION
    assert oscin.par.callbacks.val == "callbacks" and oscin.par.active.val is True


def test_parameter_execute_dat_fires_on_custom_pulses_only(net: Network, tmp_path: Path) -> None:
    comp = net.build(tmp_path)
    pulses = comp.op("pulses")
    assert pulses.par.custom.val is True and pulses.par.valuechange.val is False
    assert pulses.par.onpulse.val is True and pulses.par.builtin.val is False
    assert pulses.par.op.val == ".." and comp.op("pulses").op("..") is comp
    watched = pulses.par.pars.val.split()
    assert {"Start", "Cancel", "Refresh", "Clear", "Startdaemon", "Stopdaemon", "Setupvenv"} <= set(watched)
    assert all(getattr(comp.par, name).style == "Pulse" for name in watched)
    assert "def onPulse(par):" in pulses.text and "op('callbacks').module.onPulse(par)" in pulses.text


def test_docked_callbacks_dats_that_td_made_are_destroyed(net: Network, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # TD docks a callbacks DAT onto a new OSC In DAT; say it did so for a Parameter Execute DAT as well
    monkeypatch.setitem(FakeCOMP.auto_docked, "parameterexecuteDAT", "_callbacks")
    comp = net.build(tmp_path)
    assert {"oscin1_callbacks", "pulses_callbacks"} <= set(comp.destroyed)
    assert comp.op("oscin1_callbacks") is None and comp.op("pulses_callbacks") is None
    assert comp.op("oscin1").docked == [] and comp.op("pulses").docked == []
    assert comp.op("oscin1").par.callbacks.val == "callbacks"  # not the destroyed one
    assert any("removed /project1/cuepipe/oscin1_callbacks" in line for line in net.printed[0].splitlines())


def test_custom_page_reuses_parameters_py_and_adds_the_build_extras(net: Network, tmp_path: Path) -> None:
    comp = net.build(tmp_path)
    (page,) = comp.customPages
    assert page.name == "Cuepipe"
    names = [p.name for p in page.pars]
    assert names == [p[0] for p in PARAMETERS] + [p[0] for p in build_comp.EXTRA_PARAMETERS]
    assert comp.par.Start.label == "Run" and comp.par.Start.style == "Pulse"
    assert comp.par.Input.style == "File" and comp.par.Daemonport.style == "Int" and comp.par.Daemonport.val == 9000
    for name, label in (("Startdaemon", "Start daemon"), ("Stopdaemon", "Stop daemon"), ("Setupvenv", "Setup venv")):
        assert getattr(comp.par, name).style == "Pulse" and getattr(comp.par, name).label == label
    status = comp.par.Status
    assert status.style == "Str" and status.readOnly is True
    assert status.mode == FakeParMode.EXPRESSION and "me.ext.Cuepipe.Status.val" in status.expr


def test_pipeline_menu_is_filled_from_the_listing(net: Network, tmp_path: Path) -> None:
    comp = net.build(tmp_path)
    assert comp.par.Pipeline.menuNames == ["matte", "prep"] == comp.par.Nextpipeline.menuNames
    assert comp.par.Pipeline.menuLabels == ["matte (preprocess > matting)", "prep (preprocess)"]
    assert comp.par.Pipeline.val == "matte"


def test_pipeline_menu_from_the_real_cli(net: Network, tmp_path: Path) -> None:
    """No lister: the launcher's PipelinesQuery runs ``cuepipe pipelines --json`` with the COMP's Python."""
    net.project.create("baseCOMP", "cuepipe")
    first = net.build(tmp_path, pipelines=False)
    first.par.Python = sys.executable  # this venv has cuepipe installed
    comp = net.build(tmp_path, lister=None)
    assert comp is first and "prep" in comp.par.Pipeline.menuNames


def test_missing_venv_is_reported_not_fatal(net: Network, tmp_path: Path) -> None:
    net.project.create("baseCOMP", "cuepipe")
    comp = net.build(tmp_path, lister=None, pipelines=False)
    comp.par.Python = str(tmp_path / "nowhere" / "python")
    net.build(tmp_path, lister=None)
    assert "no interpreter at" in net.printed[-1] and comp.par.Pipeline.menuNames == []


def test_extension_current_spelling(net: Network, tmp_path: Path) -> None:
    comp = net.build(tmp_path)
    assert comp.par.ext0object.val == "op('./boot').module.extension(me)"
    assert comp.par.ext0name.val == "Cuepipe" and comp.par.ext0promote.val is True
    assert comp.par.ext0object.mode == FakeParMode.CONSTANT
    assert comp.initialized == 1


def test_extension_older_spelling(tmp_path: Path) -> None:
    net = Network()
    old = FakeCOMP("cuepipe", net.project, builtins=OLD_EXTENSION_PARS)  # an older TD build's Base COMP
    comp = net.build(tmp_path)
    assert comp is old
    assert comp.par.extension1.val == "op('./boot').module.extension(me)"
    assert comp.par.extname1.val == "Cuepipe" and comp.par.promoteextension1.val is True
    assert getattr(comp.par, "ext0object", None) is None and comp.initialized == 1


def test_neither_extension_spelling_is_a_clear_error(net: Network, tmp_path: Path) -> None:
    FakeCOMP("cuepipe", net.project, builtins={"opshortcut": ""})
    with pytest.raises(RuntimeError, match="neither ext0object nor extension1"):
        net.build(tmp_path)


def test_second_build_updates_in_place(net: Network, tmp_path: Path) -> None:
    comp = net.build(tmp_path)
    tree, made = comp.tree(), list(comp.created)
    comp.par.Input = "D:/takes/a.mov"  # the user's choices survive a rebuild
    comp.op("boot").par.file = "elsewhere"
    again = net.build(tmp_path)
    assert again is comp and list(net.project.children) == ["cuepipe"]  # no cuepipe1
    assert net.project.created == [("baseCOMP", "cuepipe")]
    assert comp.tree() == tree and comp.created == made  # nothing created the second time
    assert comp.replaced == []  # no parameter re-appended (TD would reset its value)
    assert comp.par.Input.val == "D:/takes/a.mov" and comp.op("boot").par.file.val.endswith("/td/boot.py")
    assert len(comp.customPages) == 1 and comp.initialized == 2
    assert "created" not in net.printed[1]


def test_a_same_named_child_of_another_type_is_replaced(net: Network, tmp_path: Path) -> None:
    comp = net.project.create("baseCOMP", "cuepipe")
    comp.create("textDAT", "jobs")
    net.build(tmp_path)
    assert comp.op("jobs").OPType == "tableDAT" and "jobs" in comp.destroyed


def test_saves_the_tox_next_to_the_repo_by_default(net: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    saved: list[str] = []
    monkeypatch.setattr(FakeCOMP, "save", lambda self, path, **kw: saved.append(path))
    build_comp.build(repo=ROOT, td=net.td, lister=lister, out=None)
    assert saved == [f"{ROOT.as_posix()}/cuepipe.tox"]


def test_save_path_is_configurable_and_written(net: Network, tmp_path: Path) -> None:
    comp = net.build(tmp_path)
    assert comp.saved == [(tmp_path / "cuepipe.tox").as_posix()]
    assert (tmp_path / "cuepipe.tox").read_text(encoding="utf-8").startswith("fake tox of /project1/cuepipe")
    net.build(tmp_path, save=False)
    assert len(comp.saved) == 1


def test_given_parent_and_summary(net: Network, tmp_path: Path) -> None:
    show = net.project.create("baseCOMP", "show")
    comp = build_comp.build(show, ROOT, tox=tmp_path / "x.tox", td={"ParMode": FakeParMode}, lister=lister,
                            out=net.printed.append)
    assert comp.path == "/project1/show/cuepipe" and net.project.op("cuepipe") is None
    summary = net.printed[0]
    assert summary.startswith("cuepipe build:")
    for expected in ("created /project1/show/cuepipe (baseCOMP)", "op.Cuepipe", "extension: ext0object",
                     "2 in the menu", f"saved {(tmp_path / 'x.tox').as_posix()}"):
        assert expected in summary, expected


def test_no_parent_and_no_td_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="/project1"):
        build_comp.build(repo=ROOT, td={}, out=None)


def test_repo_is_found_from_the_exec_namespace_the_file_or_the_running_dat() -> None:
    assert build_comp.find_repo({"CUEPIPE_REPO": "/x/cuepipe"}) == Path("/x/cuepipe")
    assert build_comp.find_repo({}) == ROOT.resolve()  # from this file's location


IMPORT_AND_EXEC = r"""
import builtins, sys
sys.path.insert(0, {root!r})
class Tripwire:
    def __getattr__(self, attr): raise SystemExit("touched a TD global at import: ." + attr)
    def __call__(self, *a, **k): raise SystemExit("called a TD global at import")
for name in ("op", "me", "mod", "app", "tdu", "project", "root", "ParMode"):
    setattr(builtins, name, Tripwire())
import td.build_comp as b
print("IMPORTED", callable(b.build), callable(b.main))
ran = []
namespace = {{"op": lambda path: ran.append(path), "CUEPIPE_REPO": "/nowhere"}}
try:  # what TD's Textport does: exec in a namespace that has op; main() runs and says why it stops
    exec(open({file!r}).read(), namespace)
except RuntimeError as exc:
    print("EXEC RAN", ran, exc)
"""


def test_imports_without_td_and_runs_main_when_exec_d_by_td() -> None:
    code = IMPORT_AND_EXEC.format(root=str(ROOT), file=str(ROOT / "td" / "build_comp.py"))
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT.parent)
    assert "IMPORTED True True" in proc.stdout, proc.stderr
    assert "EXEC RAN ['/project1']" in proc.stdout and "/project1" in proc.stdout, proc.stdout + proc.stderr
