"""The TouchDesigner side end to end: real ``cuepipe run`` processes, real UDP, TD-shaped fakes.

Each test wires a fake ``cuepipe`` COMP the way docs/touchdesigner.md does, drives it only through
the callback adapters in ``td/callbacks.py`` (pulses, CHOP channels, DAT Execute, frame start,
OSC In / UDP In), and reads the result from the fake Table DAT.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cuepipe.td import callbacks
from cuepipe.td.extension import CuepipeExt
from cuepipe.td.start import LaunchError, LaunchOptions, start_job
from tests.support.env import subprocess_env
from tests.support.pipelines import pipelines_toml, step
from tests.support.td_fakes import FakeChannel, FakeComp, FakeOP, FakeTableDAT, FakeTOP, TDPort, running_in

PIPELINES = pipelines_toml(
    {"stall_timeout": 0},
    one=[step()],
    two={"description": "two well-behaved stages", "stages": [step(), step(frames=3)]},
    fail=[step("fail")],
    exit3=[step("exit3")],
    slow=[step("hang_silent")],
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    (tmp_path / "clip.txt").write_text("pretend video")
    return tmp_path


@pytest.fixture
def port() -> Iterator[TDPort]:
    td_port = TDPort()
    yield td_port
    td_port.close()


class Comps:
    """Makes fake COMPs with a CuepipeExt each, and makes sure none leaves a process behind."""

    def __init__(self, workspace: Path, port: TDPort) -> None:
        self.workspace, self.port = workspace, port
        self.made: list[CuepipeExt] = []

    def __call__(self, now: Any = time.monotonic, **pars: Any) -> FakeComp:
        values = {"Mode": "run", "Python": sys.executable, "Pipelinesfile": str(self.workspace / "pipelines.toml"),
                  "Oscinport": self.port.port, "Pipeline": "one", "Input": str(self.workspace / "clip.txt"),
                  "Sets": "", "Nextpipeline": "", "Movieout": None, "Heartbeats": 3}
        values.update(pars)
        comp = FakeComp(**values)
        comp.ext.Cuepipe = CuepipeExt(comp, env=subprocess_env(), auto_refresh=False, now=now)
        self.made.append(comp.ext.Cuepipe)
        return comp

    def close(self) -> None:
        for ext in self.made:
            for handle in ext.procs.values():
                if handle.poll() is None:
                    handle.cancel()
                try:
                    handle.process.wait(timeout=20)
                except Exception:
                    handle.process.kill()
                    handle.process.wait()
            ext.Close()


@pytest.fixture
def comps(workspace: Path, port: TDPort) -> Iterator[Comps]:
    made = Comps(workspace, port)
    yield made
    made.close()


def ext_of(comp: FakeComp) -> CuepipeExt:
    ext: CuepipeExt = comp.ext.Cuepipe
    return ext


def settled(comp: FakeComp, job: str, state: str) -> bool:
    """The row shows ``state`` and the launcher process has been reaped."""
    ext = ext_of(comp)
    return ext.Jobs.rows[job].state == state and job not in ext.procs


def states_seen(comp: FakeComp, port: TDPort, job: str, final: str, **pump: Any) -> list[str]:
    """Pump until the job's row is final; return the distinct states the Table DAT showed, in order."""
    seen: list[str] = []

    def watch() -> bool:
        rows = [r for r in comp.jobs.rows() if r["job"] == job]
        if rows and (not seen or seen[-1] != rows[0]["state"]):
            seen.append(rows[0]["state"])
        return settled(comp, job, final)

    port.pump([comp], until=watch, **pump)
    return seen


def test_start_pulse_runs_pipeline_to_done(comps: Comps, port: TDPort, workspace: Path) -> None:
    comp = comps(Pipeline="two")
    observer = comps()  # a second TD COMP, fed the same datagrams decoded (OSC In DAT path)
    started = time.perf_counter()
    comp.pulse("Start")
    elapsed = time.perf_counter() - started
    assert elapsed < 0.05, f"Start blocked TD for {elapsed * 1000:.1f} ms"
    (job,) = ext_of(comp).Jobs.rows
    assert comp.jobs.row(job)["state"] == "starting"  # the row exists before the first Event
    assert ext_of(comp).procs[job].poll() is None  # ... and the job is running meanwhile
    seen: list[str] = []

    def watch() -> bool:
        state = comp.jobs.row(job)["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        return settled(comp, job, "done") and observer.jobs.numRows > 1 and observer.jobs.row(job)["state"] == "done"

    port.pump([comp], [observer], until=watch)
    assert seen == ["starting", "running", "done"]
    row = comp.jobs.row(job)
    final = workspace / "out" / "clip_copy.txt"
    assert (row["pipeline"], row["stage"], row["progress"], row["error"]) == ("two", "2/2 misbehaving", "1.000", "")
    assert row["output"] == str(final) and final.read_text() == "pretend video"
    assert row["heartbeat"]
    assert observer.jobs.row(job)["output"] == str(final)
    assert ext_of(comp).Jobs.malformed == ext_of(observer).Jobs.malformed == 0
    assert ext_of(comp).LastOutput.val == str(final)
    log = Path(ext_of(comp).Jobs.rows[job].log)
    assert '"event": "job/done"' in log.read_text()  # the launcher's --json output went to the log file


@pytest.mark.parametrize(("pipeline", "expected"), [
    ("fail", ["input_invalid", "clip.txt is not what this stage wants"]),
    ("exit3", ["crashed", "exit 3"]),
])
def test_failure_shows_error(comps: Comps, port: TDPort, pipeline: str, expected: list[str]) -> None:
    comp = comps(Pipeline=pipeline)
    job = ext_of(comp).Start()
    assert job is not None
    assert states_seen(comp, port, job, "failed")[-1] == "failed"
    error = comp.jobs.row(job)["error"]
    assert all(text in error for text in expected), error


def _dead(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


def test_cancel_kills_the_process_tree(comps: Comps, port: TDPort, workspace: Path) -> None:
    pidfile = workspace / "pids.txt"
    comp = comps(Pipeline="slow", Sets=f"misbehaving.pidfile={pidfile}")
    job = ext_of(comp).Start()
    assert job is not None
    handle = ext_of(comp).procs[job]
    port.pump([comp], until=lambda: comp.jobs.row(job)["state"] == "running" and pidfile.exists())
    time.sleep(0.1)  # the pid file is written in two steps on some file systems
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2 and not _dead(pids)
    started = time.perf_counter()
    comp.pulse("Cancel")
    assert time.perf_counter() - started < 0.05
    assert comp.jobs.row(job)["state"] == "cancelling"
    port.pump([comp], until=lambda: settled(comp, job, "cancelled"))
    assert handle.poll() == 130  # cuepipe run reported job/cancelled itself and exited "cancelled"
    assert any(b"/cuepipe/v1/job/cancelled" in d for d in port.received)
    deadline = time.monotonic() + 5
    while not _dead(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(pids), "the stage or its grandchild survived the cancel"


def test_chop_trigger_fills_menu_chains_and_loads_movie(comps: Comps, port: TDPort, workspace: Path) -> None:
    movie = FakeTOP("moviefilein1")
    comp = comps(Pipeline="fail", Nextpipeline="two", Movieout=movie)
    ext = ext_of(comp)
    comp.pulse("Refresh")  # cuepipe pipelines --json, collected by the frame callback
    port.pump([comp], until=lambda: bool(comp.par.Pipeline.menuNames))
    assert comp.par.Pipeline.menuNames == ["one", "two", "fail", "exit3", "slow"] == ext.Pipelines.val
    assert comp.par.Pipeline.menuLabels[1] == "two (misbehaving > misbehaving)"
    button = FakeOP("button1", comp)
    channel = FakeChannel("one", owner=button)  # a channel named after a pipeline runs that pipeline
    with running_in(FakeOP("chopexec1", comp)):
        assert callbacks.onValueChange(channel, 0, 0.0, 1.0) is None  # falling edge: nothing
        first = callbacks.onOffToOn(channel, 0, 1.0, 0.0)
    assert first in ext.Jobs.rows and ext.Jobs.rows[first].pipeline == "one"
    port.pump([comp], until=lambda: len(ext.Jobs.rows) == 2 and not ext.Jobs.active() and not ext.procs)
    second = next(job for job in ext.Jobs.rows if job != first)
    one_out, two_out = workspace / "out" / "clip_copy.txt", workspace / "out" / "clip_copy_copy.txt"
    assert comp.jobs.row(first)["output"] == str(one_out)
    chained = ext.Jobs.rows[second]
    assert (chained.pipeline, chained.input, chained.state) == ("two", str(one_out), "done")
    assert movie.par.file.val == str(two_out) == chained.output  # the last done output is loaded


def test_table_change_submits_each_row_once(comps: Comps, port: TDPort, workspace: Path) -> None:
    comp = comps()
    ext = ext_of(comp)
    (workspace / "b.txt").write_text("b")
    rows = [["pipeline", "input"], ["one", str(workspace / "clip.txt")]]
    requests = FakeTableDAT("requests", FakeOP("elsewhere"), rows)
    with running_in(FakeOP("datexec1", comp)):
        callbacks.onTableChange(requests)
        callbacks.onTableChange(requests)  # unchanged: nothing new
        assert len(ext.Jobs.rows) == 1
        requests.appendRow(["", str(workspace / "b.txt")])  # no pipeline: the Pipeline parameter's
        callbacks.onTableChange(requests)
    assert [(r.pipeline, Path(r.input).name) for r in ext.Jobs.rows.values()] == [("one", "clip.txt"), ("one", "b.txt")]
    port.pump([comp], until=lambda: not ext.Jobs.active() and not ext.procs)
    assert [r["state"] for r in comp.jobs.rows()] == ["done", "done"]


def test_launcher_returns_at_once_and_never_uses_a_shell(port: TDPort, workspace: Path, tmp_path: Path) -> None:
    options = LaunchOptions(python=sys.executable, report_port=port.port, pipelines=workspace / "pipelines.toml",
                            env=subprocess_env(), log_dir=tmp_path / "logs")
    started = time.perf_counter()
    handle = start_job(options, "slow", str(workspace / "clip.txt"), sets=["0.frames=2"])
    elapsed = time.perf_counter() - started
    try:
        assert elapsed < 0.05, f"start_job took {elapsed * 1000:.1f} ms"
        assert handle.poll() is None
        args = handle.process.args
        assert isinstance(args, list) and args[0] == sys.executable
        assert args[args.index("--report") + 1] == f"127.0.0.1:{port.port}"
        assert args[args.index("--job-id") + 1] == handle.job_id
        assert args[-2:] == ["--set", "0.frames=2"]
        # stdin is the cancel pipe (--cancel-on-eof), never written; output goes to a log file, not a pipe
        assert handle.process.stdin is not None and handle.process.stdout is None and handle.process.stderr is None
        assert handle.log_path.parent == tmp_path / "logs"
        port.pump([], until=lambda: any(b"job/stage_started" in d for d in port.received))
    finally:
        handle.cancel()
        code = handle.process.wait(timeout=20)
    assert code == 130  # cuepipe run's own "cancelled" exit: it handled the signal, nothing was killed


def test_missing_interpreter_fails_the_row_not_td(comps: Comps, workspace: Path) -> None:
    comp = comps(Python=str(workspace / "no-venv" / "bin" / "python"))
    job = ext_of(comp).Start()
    assert job is not None
    row = comp.jobs.row(job)
    assert row["state"] == "failed" and "cannot start" in row["error"]
    with pytest.raises(LaunchError):
        start_job(LaunchOptions(python=workspace / "nope", report_port=9), "one", "x")


def test_exit_without_events_is_reported_after_grace(comps: Comps, port: TDPort) -> None:
    clock = [1000.0]
    comp = comps(now=lambda: clock[0])
    ext = ext_of(comp)
    job = ext.Start()
    assert job is not None
    deadline = time.monotonic() + 30
    while job in ext.procs:  # frames run, but no datagram is ever fed in: "no events arriving"
        assert time.monotonic() < deadline
        with running_in(comp.execute):
            callbacks.onFrameStart(0)
        time.sleep(0.01)
    assert comp.jobs.row(job)["state"] == "starting"  # within the grace, Events may still come
    clock[0] += 2.5
    with running_in(comp.execute):
        callbacks.onFrameStart(1)
    row = comp.jobs.row(job)
    assert row["state"] == "failed" and "job/done never arrived" in row["error"] and ".log" in row["error"]
