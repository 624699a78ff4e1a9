"""td/start.py without a TD: the interpreter default, argv, environment, errors, the pipelines query."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from cuepipe.td.start import (
    REPO_ROOT,
    DaemonClient,
    LaunchError,
    LaunchOptions,
    PipelinesQuery,
    build_command,
    child_env,
    default_python,
    new_job_id,
    start_job,
)
from tests.support.env import subprocess_env
from tests.support.pipelines import pipelines_toml, step


def test_default_interpreter_is_the_repositorys_venv_never_tds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_python(Path("C:/cp"), windows=True) == Path("C:/cp/.venv/Scripts/python.exe")
    assert default_python(Path("/cp"), windows=False) == Path("/cp/.venv/bin/python")
    expected = default_python()
    assert expected.parent.parent == REPO_ROOT / ".venv"
    # Inside TD, sys.executable is TD's own interpreter: the default must not follow it.
    monkeypatch.setattr(sys, "executable", "C:/Program Files/Derivative/TouchDesigner/bin/python.exe")
    assert default_python() == expected


def test_job_ids_are_what_cuepipe_run_accepts() -> None:
    for _ in range(20):
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", new_job_id())


def test_command_is_an_argv_list() -> None:
    options = LaunchOptions(python="/v/python", report_port=7000, pipelines="/p.toml", out="/renders",
                            reports=("10.0.0.2:7000",))
    cmd = build_command(options, "matte", "/in/take 1.mov", "J1", ["matting.ratio=0.5"])
    assert cmd == ["/v/python", "-m", "cuepipe.orchestrator.cli", "--pipelines", "/p.toml", "run", "matte",
                   "/in/take 1.mov",
                   "--report", "127.0.0.1:7000", "--job-id", "J1", "--json", "--cancel-on-eof",
                   "--report", "10.0.0.2:7000",
                   "--set", "matting.ratio=0.5", "--out", "/renders"]


def test_child_env_drops_what_points_at_tds_python() -> None:
    env = child_env({"PATH": "/bin", "PYTHONHOME": "C:/TouchDesigner/bin", "PYTHONPATH": "C:/TD/lib"})
    assert env == {"PATH": "/bin", "PYTHONUNBUFFERED": "1"}


def test_cannot_start_is_a_launch_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="cannot start"):
        start_job(LaunchOptions(python=tmp_path / "missing", report_port=9, log_dir=tmp_path), "p", "in")
    with pytest.raises(LaunchError, match="cannot start"):
        PipelinesQuery(tmp_path / "missing")
    with pytest.raises(LaunchError, match="cannot resolve"):
        DaemonClient("no such host.invalid", 9000, 7000)


def test_cancel_after_exit_is_a_no_op(tmp_path: Path) -> None:
    (tmp_path / "pipelines.toml").write_text(pipelines_toml(one=[step()]))
    options = LaunchOptions(python=sys.executable, report_port=9, pipelines=tmp_path / "pipelines.toml",
                            env=subprocess_env(), log_dir=tmp_path)
    handle = start_job(options, "nope", str(tmp_path / "missing.mov"))
    assert handle.process.wait(timeout=30) == 2  # unknown pipeline: the request was wrong
    assert handle.cancel() is False
    handle.kill_tree()  # already gone: nothing happens
    assert "unknown_pipeline" in handle.log_path.read_text()


def test_pipelines_query_reports_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / "pipelines.toml").write_text("version = [")
    query = PipelinesQuery(sys.executable, tmp_path / "pipelines.toml", env=subprocess_env())
    deadline = time.monotonic() + 30
    while not query.poll():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert query.result is None and "exit 2" in query.error and "pipelines.toml" in query.error
    assert query.names() == []
    query.close()
