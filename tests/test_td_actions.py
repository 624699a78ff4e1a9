"""Issue 14, points 2-3: the COMP's Setup venv / Start daemon / Stop daemon pulses, Status, and the fixes
found against TD's documentation (TD's own Python from ``app.pythonExecutable``, project paths through
``tdu.expandPath`` and ``project.folder``, the Movie out TOP reloaded after a re-run and released before it).

The extension runs on the fake COMP of ``tests/support/td_fakes.py``; the processes it starts are real:
a real venv made by a system-Python stand-in (this test run's interpreter) with a real ``pip install -e``
(offline: ``--no-deps --no-build-isolation`` on a one-file project), and a real ``cuepipe serve``.
"""

from __future__ import annotations

import builtins
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cuepipe.td.extension import CuepipeExt, td_python
from cuepipe.td.rows import JobRow
from tests.support.env import subprocess_env
from tests.support.td_fakes import FakeComp, FakePar, FakeTOP


@pytest.fixture
def td_globals(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Put fake TD globals where TD puts them (builtins), for one test."""
    def put(**values: Any) -> None:
        for name, value in values.items():
            monkeypatch.setattr(builtins, name, value, raising=False)
    return put


@pytest.fixture
def ext(tmp_path: Path) -> Iterator[CuepipeExt]:
    comp = FakeComp(Mode="run", Python=sys.executable, Oscinport=free_port(), Daemonport=free_port(),
                    Repo=str(tmp_path), Pipeline="prep", Input="", Movieout=None, Status="")
    extension = comp.ext.Cuepipe = CuepipeExt(comp, env=subprocess_env(), auto_refresh=False)
    yield extension
    for handle in list(extension.helpers.values()) + list(extension.procs.values()):
        if handle.poll() is None:
            handle.kill_tree()
        handle.process.wait(timeout=20)
    extension.Close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(ext: CuepipeExt, done: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out; status: {ext.Status.val}"
        ext.Update()
        time.sleep(0.05)


def test_setup_venv_makes_a_venv_in_the_background_and_says_how_it_went(ext: CuepipeExt, tmp_path: Path) -> None:
    """The pulse uses a system Python (py -3.11 / python3.11 / python3) and installs cuepipe; here this
    run's interpreter stands in for the system one and the "repository" is a one-module project, so the
    venv, the editable install and the import are real and quick (pip fetches setuptools to build it,
    from the index this machine's pip is configured with, as any package install does)."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "fakepkg"\nversion = "0"\n'
                                             '[build-system]\nrequires = ["setuptools>=61"]\n'
                                             'build-backend = "setuptools.build_meta"\n')
    (tmp_path / "fakepkg.py").write_text("X = 1\n")
    ext.SetupVenv(base=[sys.executable])
    assert "setting up the venv" in ext.Status.val and ext.owner.par.Status.val == ext.Status.val
    seen: set[str] = set()

    def finished() -> bool:
        seen.add(ext.Status.val)
        return "venv" not in ext.helpers

    until(ext, finished)
    assert ext.Status.val.startswith("venv ready: "), (ext.Status.val, (tmp_path / ".venv-setup.log").read_text())
    log = (tmp_path / ".venv-setup.log").read_text()
    assert "installing cuepipe into" in log and "Successfully installed fakepkg" in log
    python = tmp_path / ".venv" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    assert python.is_file() and str(python) in ext.Status.val
    import subprocess

    probe = subprocess.run([str(python), "-c", "import fakepkg; print(fakepkg.X)"], capture_output=True, text=True,
                           cwd=tmp_path.parent, timeout=60)
    assert probe.stdout.strip() == "1", probe.stderr
    assert any(s.startswith("setting up the venv") for s in seen)  # progress while it ran


def test_the_pulses_reach_their_actions(ext: CuepipeExt, monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    for name in ("StartDaemon", "StopDaemon", "SetupVenv"):
        monkeypatch.setattr(ext, name, lambda name=name: called.append(name))
    for pulse in ("Startdaemon", "Stopdaemon", "Setupvenv"):
        ext.owner.pulse(pulse)
    assert called == ["StartDaemon", "StopDaemon", "SetupVenv"]


def test_a_failed_setup_says_where_its_log_is(ext: CuepipeExt, tmp_path: Path) -> None:
    ext.SetupVenv(base=[sys.executable], pip_args=["--no-deps", "--no-index"])  # no project here: pip fails
    until(ext, lambda: "venv" not in ext.helpers)
    assert ext.Status.val.startswith("venv setup failed (exit code ") and ".venv-setup.log" in ext.Status.val


@pytest.mark.skipif(sys.platform == "win32", reason="the daemon is stopped with SIGTERM here")
def test_start_and_stop_daemon_pulses_run_a_real_cuepipe_serve(ext: CuepipeExt) -> None:
    ext.owner.pulse("Startdaemon")
    daemon = ext.helpers["daemon"]
    assert "starting cuepipe serve on port" in ext.Status.val
    deadline = time.monotonic() + 30
    while "listening" not in daemon.log_path.read_text(errors="replace"):
        assert daemon.poll() is None and time.monotonic() < deadline, daemon.log_path.read_text()
        time.sleep(0.1)
    assert f"--port {ext.owner.par.Daemonport.val}" in " ".join(daemon.command)
    ext.owner.pulse("Startdaemon")
    assert "already running" in ext.Status.val
    ext.owner.pulse("Stopdaemon")
    until(ext, lambda: "daemon" not in ext.helpers, timeout=30)
    assert ext.Status.val == f"cuepipe serve exited (code 0); its log: {daemon.log_path}"


def test_td_own_python_is_refused_as_app_python_executable_names_it(ext: CuepipeExt, td_globals: Any) -> None:
    assert td_python() == ""  # outside TD
    td_globals(app=SimpleNamespace(pythonExecutable=sys.executable))
    assert td_python() == sys.executable
    assert ext.Start(pipeline="prep", input=__file__) is not None
    assert "TouchDesigner's own interpreter" in ext.Status.val


def test_inputs_are_project_paths(ext: CuepipeExt, td_globals: Any, tmp_path: Path) -> None:
    td_globals(tdu=SimpleNamespace(expandPath=lambda p: p.replace("movies://", "Movies/")),
               project=SimpleNamespace(folder=str(tmp_path / "show")))
    assert ext._input("movies://take.mp4") == str(tmp_path / "show" / "Movies" / "take.mp4")
    assert ext._input("/abs/take.mp4") == "/abs/take.mp4" or sys.platform == "win32"


def test_the_movie_out_top_is_released_before_a_rerun_and_reloaded_after(ext: CuepipeExt, tmp_path: Path) -> None:
    movie = FakeTOP("moviefilein1")
    movie.par.__dict__["reloadpulse"] = FakePar("reloadpulse", owner=movie)
    ext.owner.par.Movieout.val = movie
    output = str(tmp_path / "out" / "take_composite.mp4")
    movie.par.file = output  # showing the last run's output of take.mp4
    ext._release_movie(str(tmp_path / "take.mp4"))
    assert movie.par.file.val == ""  # unloaded: Windows could not replace a file TD holds open
    movie.par.file = str(tmp_path / "out" / "other_composite.mp4")
    ext._release_movie(str(tmp_path / "take.mp4"))
    assert movie.par.file.val.endswith("other_composite.mp4")  # another clip's output stays
    row = JobRow("j1", "matte", str(tmp_path / "take.mp4"), "run")
    row.state, row.outputs = "done", (output,)
    ext._job_end(row)
    assert movie.par.file.val == output and movie.par.reloadpulse.pulses == 1  # the same path again: reloaded


def test_an_older_td_python_is_refused_with_the_build_to_install() -> None:
    """TD 2022 builds embed Python 3.9: boot.py says so before td/ fails deeper down."""
    from cuepipe.td import boot

    with pytest.raises(ImportError, match=r"runs Python 3\.9\.18 \(a TD 2022 build\).*2023 or 2025"):
        boot.check_python((3, 9, 18))
    boot.check_python((3, 11, 7))  # TD 2023 / 2025
    boot.check_python()  # this interpreter (>= 3.11: the project's requirement)


def test_the_venv_is_made_with_a_system_python_3_11_never_an_older_one() -> None:
    from cuepipe.td import start

    assert start._is_311_or_newer([sys.executable])
    # a stand-in for an older python3: it answers False to the version probe (the probe's own -c comes after)
    assert not start._is_311_or_newer([sys.executable, "-c", "print(False)"])
    assert not start._is_311_or_newer([str(Path("/nonexistent/python3"))])  # missing: not taken


def test_a_parameter_value_change_reaching_the_chop_callback_is_ignored_not_an_error(ext: CuepipeExt) -> None:
    """A Parameter Execute DAT with Value Change on calls onValueChange(par, prev): nothing starts, no error."""
    from cuepipe.td import callbacks

    assert callbacks.onValueChange(FakePar("Input", "clip.mp4", owner=ext.owner), "old.mp4") is None
    assert ext.Jobs.rows == {}


def test_a_local_daemon_gets_the_same_resolved_paths(ext: CuepipeExt, td_globals: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Mode daemon on this machine: the input is resolved as in run mode; on another machine it goes as typed."""
    td_globals(tdu=SimpleNamespace(expandPath=lambda p: p.replace("movies://", "Movies/")),
               project=SimpleNamespace(folder=str(tmp_path / "show")))
    sent: list[str] = []
    monkeypatch.setattr(ext, "_start_daemon", lambda pipeline, input, sets, chained: sent.append(input) or "k")
    ext.owner.par.Mode.val = "daemon"
    ext.owner.__dict__["par"].__dict__["Daemonhost"] = FakePar("Daemonhost", "127.0.0.1", ext.owner)
    ext.Start(pipeline="prep", input="movies://take.mp4")
    ext.owner.par.Daemonhost.val = "10.0.0.7"
    ext.Start(pipeline="prep", input="movies://take.mp4")
    assert sent == [str(tmp_path / "show" / "Movies" / "take.mp4"), "movies://take.mp4"]
