"""docs/touchdesigner.md's code is what the tests run: its shims, its extension expression, its parameters."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest

from cuepipe.td import callbacks
from cuepipe.td.parameters import PARAMETERS, setup_parameters
from tests.support.env import ROOT
from tests.support.td_fakes import FakeChannel, FakeComp, FakeOP, FakePar, FakeTableDAT

DOC = (ROOT / "docs" / "touchdesigner.md").read_text(encoding="utf-8")


def shims() -> dict[str, str]:
    """Every ```python block of the guide that defines TD callbacks, by the first function's name."""
    blocks = re.findall(r"```python\n(.*?)```", DOC, re.DOTALL)
    found = {}
    for block in blocks:
        text = "\n".join(line[3:] if line.startswith("   ") else line for line in block.splitlines())
        name = re.search(r"^def (on\w+)\(", text, re.MULTILINE)
        if name:
            found[name.group(1)] = text
    return found


class Recorder:
    """Stands in for the extension and records what the callbacks asked of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


@pytest.fixture
def comp() -> FakeComp:
    made = FakeComp()
    made.ext.Cuepipe = Recorder()
    return made


class OpGlobal:
    """TD's ``op``: ``op(path)``, and ``op.Cuepipe``, the COMP's Global OP Shortcut."""

    def __init__(self, comp: FakeComp) -> None:
        self.Cuepipe = comp

    def __call__(self, path: str) -> Any:
        return None  # the guide's shims never use a path: a relative one breaks outside the COMP


def td_namespace(comp: FakeComp, me: Any) -> dict[str, Any]:
    """What TD gives a DAT's code: ``op`` and ``me``; the COMP holds the ``callbacks`` DAT."""
    comp.children["callbacks"] = SimpleNamespace(module=callbacks)  # type: ignore[assignment]
    return {"op": OpGlobal(comp), "me": me}


def run_shim(name: str, comp: FakeComp, *args: Any) -> Recorder:
    """Exec the guide's shim as TD would, from a DAT that sits outside the COMP (beside a button)."""
    namespace = td_namespace(comp, FakeOP(name.lower() + "_dat", FakeOP("elsewhere")))
    exec(compile(shims()[name], f"docs/touchdesigner.md:{name}", "exec"), namespace)
    namespace[name](*args)
    recorder: Recorder = comp.ext.Cuepipe
    return recorder


def test_the_guide_has_a_shim_for_every_execute_dat() -> None:
    assert set(shims()) == {"onFrameStart", "onPulse", "onOffToOn", "onTableChange", "onJobDone"}
    for name in ("onFrameStart", "onPulse", "onOffToOn", "onTableChange"):  # reach the COMP wherever they sit
        text = shims()[name]
        assert "op.Cuepipe.op('callbacks').module." in text and not re.search(r"(?<![.\w])op\('callbacks'\)", text)


def test_frame_and_pulse_shims(comp: FakeComp) -> None:
    assert run_shim("onFrameStart", comp, 12).calls == [("Update",)]
    par = FakePar("Start", owner=comp)
    assert run_shim("onPulse", comp, par).calls[-1] == ("OnPulse", par)


def test_chop_shims(comp: FakeComp) -> None:
    channel = FakeChannel("matte", owner=FakeOP("button1", FakeOP("elsewhere")))  # the CHOP may live anywhere
    assert run_shim("onOffToOn", comp, channel, 0, 1.0, 0.0).calls == [("Trigger", "matte")]
    namespace = td_namespace(comp, FakeOP("x", FakeOP("elsewhere")))
    exec(shims()["onOffToOn"], namespace)
    namespace["onValueChange"](channel, 0, 0.2, 0.0)  # below 0.5: nothing
    namespace["onValueChange"](channel, 0, 0.7, 0.2)
    assert comp.ext.Cuepipe.calls == [("Trigger", "matte"), ("Trigger", "matte")]


def test_table_shim(comp: FakeComp) -> None:
    table = FakeTableDAT("drop", FakeOP("elsewhere"), [["path"], ["/in/a.mov"]])
    assert run_shim("onTableChange", comp, table).calls == [("SubmitTable", table)]


def test_the_files_named_in_the_guide_define_the_exact_td_signatures() -> None:
    import inspect

    expected = {
        "onReceiveOSC": ["dat", "rowIndex", "message", "bytes", "timeStamp", "address", "args", "peer"],
        "onReceive": ["dat", "rowIndex", "message", "bytes", "peer"],
        "onOffToOn": ["channel", "sampleIndex", "val", "prev"],
        "onValueChange": ["channel", "sampleIndex", "val", "prev"],
        "onTableChange": ["dat"], "onPulse": ["par"], "onFrameStart": ["frame"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(callbacks, name)).parameters) == params
        assert name in DOC or name in ("onValueChange",)
    assert "op('./boot').module.extension(me)" in DOC


def test_extension_expression_calls_boot_with_the_comp() -> None:
    seen: list[Any] = []
    boot = SimpleNamespace(module=SimpleNamespace(extension=lambda comp: seen.append(comp) or "ext"))
    me = FakeComp()
    assert eval("op('./boot').module.extension(me)", {"op": lambda path: boot, "me": me}) == "ext"
    assert seen == [me]


class FakePage:
    def __init__(self, comp: FakeComp, name: str) -> None:
        self.comp, self.name = comp, name

    def __getattr__(self, method: str) -> Any:
        style = method.removeprefix("append")

        def append(name: str, label: str = "") -> list[FakePar]:
            par = FakePar(name, owner=self.comp)
            par.style, par.label = style, label  # type: ignore[attr-defined]
            self.comp.par.__dict__[name] = par
            return [par]

        return append


def test_setup_parameters_creates_the_documented_page() -> None:
    comp = FakeComp(Oscinport=7001)
    comp.customPages = []  # type: ignore[attr-defined]
    comp.appendCustomPage = lambda name: FakePage(comp, name)  # type: ignore[attr-defined]
    created = setup_parameters(comp)
    assert created == [p[0] for p in PARAMETERS if p[0] != "Oscinport"]  # existing ones are left alone
    assert comp.par.Oscinport.val == 7001 and comp.par.Daemonport.val == 9000
    assert comp.par.Mode.menuNames == ["run", "daemon"] and comp.par.Start.style == "Pulse"
    for name, *_ in PARAMETERS:
        assert f"| {name} |" in DOC or f"{name}," in DOC or f", {name}" in DOC, f"{name} undocumented"


def test_the_guides_user_callbacks_get_what_the_extension_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """The "Your own callbacks" example, called by the extension the way it calls a Callbacks DAT."""
    from cuepipe.td.extension import CuepipeExt
    from cuepipe.td.rows import JobRow

    log = FakeTableDAT("done_log", FakeOP("project1"), [])
    namespace: dict[str, Any] = {"op": lambda path: log if path == "done_log" else None}
    exec(compile(shims()["onJobDone"], "docs/touchdesigner.md:onJobDone", "exec"), namespace)
    comp = FakeComp(Callbacks=SimpleNamespace(module=SimpleNamespace(**namespace)))
    ext = CuepipeExt(comp, auto_refresh=False)
    ext._job_end(JobRow("j1", pipeline="matte", input="/in/a.mov", state="done", outputs=("/out/a_matte.mov",)))
    assert [[cell.val for cell in row] for row in log.cells] == [["j1", "matte", "/in/a.mov", "/out/a_matte.mov"]]
    ext._job_end(JobRow("j2", pipeline="matte", input="/in/b.mov", state="failed", error="bad_input: no video"))
    assert "matte on /in/b.mov failed: bad_input: no video" in capsys.readouterr().out
