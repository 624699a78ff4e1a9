"""``cuepipe run`` end to end: real subprocesses, real UDP Events at a fake TouchDesigner."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cuepipe.orchestrator.job import Job
from cuepipe.orchestrator.publish import publish
from tests.support.env import subprocess_env
from tests.support.fake_td import FakeTD
from tests.support.pipelines import pipelines_toml, step

PIPELINES = pipelines_toml(
    {"stall_timeout": 0},
    two={"description": "two well-behaved stages", "stages": [step(), step(frames=3)]},
    sigkill=[step("sigkill")],
    exit3=[step("exit3")],
    retry=[step("exit3", retries=1)],
    no_done=[step("no_done")],
    fail=[step("fail")],
    hang=[step("hang", timeout=1.0)],
    stall=[step("hang_silent", stall_timeout=0.7)],
    slow=[step("hang_silent")],
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    (tmp_path / "clip.txt").write_text("pretend video")
    return tmp_path


def cuepipe(workspace: Path, td: FakeTD, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(workspace / "pipelines.toml"), "run",
           *args, "--report", td.address, "--json"]
    return subprocess.run(cmd, cwd=workspace, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def settle(td: FakeTD, last: str) -> None:
    td.wait_for(last, timeout=5)


def test_two_stages_end_to_end(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "two", "clip.txt")
    assert proc.returncode == 0, proc.stderr
    settle(fake_td, "job/done")
    names = [n for n in fake_td.names() if n != "job/progress"]
    assert names == ["job/started", "job/stage_started", "job/stage_done",
                     "job/stage_started", "job/stage_done", "job/done"]
    job = fake_td.events[0]["job"]
    assert all(e["job"] == job for e in fake_td.events)
    assert [e["index"] for e in fake_td.events if e.spec.name == "job/stage_started"] == [0, 1]
    progress = [e for e in fake_td.events if e.spec.name == "job/progress"]
    assert progress and progress[-1]["fraction"] == 1.0 and progress[-1]["overall"] == 1.0
    assert [e["index"] for e in progress] == sorted(e["index"] for e in progress)
    final = Path(fake_td.events[-1]["outputs"][0])
    assert final == workspace / "out" / "clip_copy.txt"
    assert final.read_text() == "pretend video"
    assert not (workspace / "out" / ".cuepipe-work" / job).exists(), "work folder kept after success"
    # --json prints exactly the Events that were sent, one per line
    assert len(proc.stdout.strip().splitlines()) == len(fake_td.events)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_stage_killed_by_sigkill(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "sigkill", "clip.txt")
    assert proc.returncode == 1
    failed = fake_td.wait_for("job/stage_failed")
    assert failed["exit_code"] == -signal.SIGKILL
    assert failed["kind"] == "crashed" and "SIGKILL" in failed["message"]
    assert fake_td.wait_for("job/failed")["exit_code"] == -signal.SIGKILL
    assert not (workspace / "out" / "clip_copy.txt").exists()


def test_non_zero_exit_carries_stderr_tail(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "exit3", "clip.txt")
    assert proc.returncode == 1
    failed = fake_td.wait_for("job/stage_failed")
    assert (failed["exit_code"], failed["kind"], failed["retrying"]) == (3, "crashed", 0)
    assert "last words of the stage" in failed["stderr"]
    job_failed = fake_td.wait_for("job/failed")
    assert (job_failed["index"], job_failed["stage"]) == (0, "misbehaving")
    # the work folder (with the stage's log) is kept after a failure, for diagnosis
    logs = list((workspace / "out" / ".cuepipe-work" / job_failed["job"]).glob("*.log"))
    assert logs and "last words" in logs[0].read_text()


def test_retry_then_fail(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "retry", "clip.txt")
    assert proc.returncode == 1
    settle(fake_td, "job/failed")
    fails = [e for e in fake_td.events if e.spec.name == "job/stage_failed"]
    assert [(e["attempt"], e["retrying"]) for e in fails] == [(1, 1), (2, 0)]
    starts = [e["attempt"] for e in fake_td.events if e.spec.name == "job/stage_started"]
    assert starts == [1, 2]


def test_exit_zero_without_done(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "no_done", "clip.txt")
    assert proc.returncode == 1
    failed = fake_td.wait_for("job/stage_failed")
    assert (failed["exit_code"], failed["kind"]) == (0, "no_done")


def test_stage_reported_failure(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "fail", "clip.txt")
    assert proc.returncode == 1
    failed = fake_td.wait_for("job/failed")
    assert (failed["exit_code"], failed["kind"]) == (1, "input_invalid")
    assert "clip.txt is not what this stage wants" in failed["message"]


def _tree_pids(workspace: Path) -> list[int]:
    text = (workspace / "pids.txt").read_text()
    return [int(p) for p in text.split()]


def _assert_dead(pids: list[int]) -> None:
    for pid in pids:
        if psutil.pid_exists(pid):
            proc = psutil.Process(pid)
            assert proc.status() == psutil.STATUS_ZOMBIE, f"process {pid} of the stage tree is still alive"


@pytest.mark.parametrize(("pipeline", "kind"), [("hang", "timeout"), ("stall", "stalled")])
def test_hung_stage_tree_is_killed(workspace: Path, fake_td: FakeTD, pipeline: str, kind: str) -> None:
    started = time.monotonic()
    proc = cuepipe(workspace, fake_td, pipeline, "clip.txt", "--set",
                   f"misbehaving.pidfile={workspace / 'pids.txt'}")
    assert proc.returncode == 1
    assert time.monotonic() - started < 30
    failed = fake_td.wait_for("job/stage_failed")
    assert failed["kind"] == kind
    pids = _tree_pids(workspace)
    assert len(pids) == 2  # the stage and its grandchild
    _assert_dead(pids)


def test_cancel_with_signal(workspace: Path, fake_td: FakeTD) -> None:
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(workspace / "pipelines.toml"), "run",
           "slow", "clip.txt", "--report", fake_td.address, "--set", f"0.pidfile={workspace / 'pids.txt'}"]
    kwargs: dict[str, object] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    launcher = subprocess.Popen(cmd, cwd=workspace, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    try:
        fake_td.wait_for("job/stage_started")
        deadline = time.monotonic() + 10
        while not (workspace / "pids.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = _tree_pids(workspace)
        launcher.send_signal(signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGINT)  # type: ignore[attr-defined]
        assert launcher.wait(timeout=20) == 130
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    cancelled = fake_td.wait_for("job/cancelled")
    assert (cancelled["index"], cancelled["stage"]) == (0, "misbehaving")
    _assert_dead(pids)
    assert not (workspace / "out" / ".cuepipe-work" / cancelled["job"]).exists()
    assert "job/done" not in fake_td.names()


def test_caller_chosen_job_id(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "two", "clip.txt", "--job-id", "td-take_7")
    assert proc.returncode == 0, proc.stderr
    settle(fake_td, "job/done")
    assert {e["job"] for e in fake_td.events} == {"td-take_7"}
    bad = cuepipe(workspace, fake_td, "two", "clip.txt", "--job-id", "../escape")
    assert bad.returncode == 2 and "job ids are" in bad.stderr


def test_cancel_by_closing_stdin(workspace: Path, fake_td: FakeTD) -> None:
    """The Windows-safe cancel TouchDesigner uses: close the pipe (a dying parent does the same)."""
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(workspace / "pipelines.toml"), "run",
           "slow", "clip.txt", "--report", fake_td.address, "--cancel-on-eof", "--set",
           f"0.pidfile={workspace / 'pids.txt'}"]
    launcher = subprocess.Popen(cmd, cwd=workspace, env=subprocess_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fake_td.wait_for("job/stage_started")
        deadline = time.monotonic() + 10
        while not (workspace / "pids.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = _tree_pids(workspace)
        assert launcher.stdin is not None
        launcher.stdin.close()
        assert launcher.wait(timeout=20) == 130
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert fake_td.wait_for("job/cancelled")["stage"] == "misbehaving"
    _assert_dead(pids)


def test_missing_input(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "two", "nope.mp4")
    assert proc.returncode == 2
    failed = fake_td.wait_for("job/failed")
    assert (failed["kind"], failed["index"]) == ("input_missing", -1)
    assert "nope.mp4" in failed["message"]
    assert "job/stage_started" not in fake_td.names()


def test_unknown_pipeline(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "nope", "clip.txt")
    assert proc.returncode == 2
    failed = fake_td.wait_for("job/failed")
    assert failed["kind"] == "unknown_pipeline"
    assert "'nope'" in failed["message"] and "two" in failed["message"]


def test_invalid_toml(workspace: Path, fake_td: FakeTD) -> None:
    (workspace / "pipelines.toml").write_text("version = 1\n[pipelines.x\n")
    proc = cuepipe(workspace, fake_td, "x", "clip.txt")
    assert proc.returncode == 2
    failed = fake_td.wait_for("job/failed")
    assert failed["kind"] == "config_invalid"
    assert "pipelines.toml" in failed["message"] and "invalid TOML" in failed["message"]


def test_bad_override(workspace: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(workspace, fake_td, "two", "clip.txt", "--set", "misbehaving.frames=many")
    assert proc.returncode == 2
    failed = fake_td.wait_for("job/failed")
    assert failed["kind"] == "config_invalid"
    assert "frames" in failed["message"] and "integer" in failed["message"]


def test_publish_never_leaves_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "work" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(b"x" * 1000)
    dst = tmp_path / "out" / "final.bin"

    def cross_device(a: str, b: str) -> None:  # the work folder is on another file system: copy
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def broken_copy(a: str, b: str) -> None:
        Path(b).write_bytes(b"x" * 10)  # half copied, then the disk fills up
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr("cuepipe.orchestrator.publish.os.rename", cross_device)
    monkeypatch.setattr("cuepipe.orchestrator.publish.shutil.copy2", broken_copy)
    with pytest.raises(OSError):
        publish(src, dst)
    assert not dst.exists()
    assert list(dst.parent.iterdir()) == [], "the temporary file was left behind"
    assert src.read_bytes() == b"x" * 1000, "the source was lost"
    monkeypatch.undo()
    assert publish(src, dst) == dst and dst.read_bytes() == b"x" * 1000


def test_values_that_look_like_options_reach_the_stage(workspace: Path) -> None:
    """Ranges such as "[-1,1]" (generator contracts) start with a dash once the bracket is dropped."""
    from cuepipe.orchestrator.pipeline import load_file
    from cuepipe.stages.stage import build_parser
    from tests.support import misbehaving

    pipeline = load_file(workspace / "pipelines.toml").pipelines["two"]
    stage = pipeline.stages[0].__class__(**{**pipeline.stages[0].__dict__, "params": {"pidfile": "-1,1]"}})
    argv = Job(pipeline, workspace / "clip.txt", lambda e: None).argv(stage, workspace / "clip.txt", workspace, 9)
    assert "--pidfile=-1,1]" in argv
    parsed = build_parser("misbehaving", misbehaving.PARAMS, None).parse_args(argv[3:])
    assert parsed.pidfile == "-1,1]"


def test_publish_a_folder_over_an_older_one(tmp_path: Path) -> None:
    """PNG sequences are folders; re-running a job replaces the published folder as a whole."""
    dst = tmp_path / "out" / "clip_rgba"
    for run, frames in enumerate((3, 2)):
        src = tmp_path / f"work{run}" / "rgba"
        src.mkdir(parents=True)
        for i in range(frames):
            (src / f"frame_{i:06d}.png").write_bytes(bytes([run]))
        assert publish(src, dst) == dst
    assert sorted(p.name for p in dst.iterdir()) == ["frame_000000.png", "frame_000001.png"]
    assert (dst / "frame_000000.png").read_bytes() == bytes([1])
    assert sorted(p.name for p in dst.parent.iterdir()) == ["clip_rgba"]  # no .part / .old left
