"""Stages die with their launcher (issue 9, item 5), and the daemon can reap what is left anyway.

A launcher killed hard (``kill -9``) runs no cleanup: its stages must notice on their own
(``stages/parentwatch.py``), and the next daemon start kills recorded leftovers (``reap_leftovers``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cuepipe.orchestrator.worker import ProcessRegistry, Worker, reap_leftovers
from cuepipe.stages.parentwatch import PARENT_ENV, parent_token
from tests.support.daemon_peer import PIPELINES
from tests.support.env import subprocess_env

POSIX_ONLY = pytest.mark.skipif(
    sys.platform == "win32",
    reason="kills a launcher with SIGKILL and relies on process groups; on Windows the kill-on-close Job "
           "Object does this, and that cannot run here",
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def wait_pids(pidfile: Path, timeout: float = 30.0) -> list[psutil.Process]:
    """The stage and its grandchild, once the stage has written both pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_pids = pidfile.read_text().split() if pidfile.exists() else []
        if len(with_pids) == 2:
            return [psutil.Process(int(p)) for p in with_pids]
        time.sleep(0.05)
    raise AssertionError(f"the stage wrote no pids to {pidfile} within {timeout}s")


def gone(proc: psutil.Process) -> bool:
    """Whether that very process (pid and creation time) has ended."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in procs):
        if time.monotonic() > deadline:
            alive = [p.pid for p in procs if not gone(p)]
            for p in procs:  # do not leave them to the next test
                if not gone(p):
                    p.kill()
            raise AssertionError(f"processes {alive} still run {timeout}s after their launcher died")
        time.sleep(0.05)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    (tmp_path / "clip.txt").write_text("pretend video")
    return tmp_path


@POSIX_ONLY
@pytest.mark.parametrize(("pipeline", "hard"), [("slow", False), ("stubborn", True)])
def test_stage_tree_dies_with_a_killed_cuepipe_run(workspace: Path, pipeline: str, hard: bool) -> None:
    """``slow`` stops politely (its log says so, no hard kill); ``stubborn`` ignores that and its
    grandchild ignores SIGTERM, so only the hard kill after the grace period ends them."""
    pidfile = workspace / "pids.txt"
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(workspace / "pipelines.toml"), "run",
           pipeline, "clip.txt", "--job-id", "orphan", "--json", "--set", f"0.pidfile={pidfile}"]
    launcher = subprocess.Popen(cmd, cwd=workspace, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        tree = wait_pids(pidfile)
        assert tree[0].ppid() == launcher.pid
    finally:
        launcher.kill()
        launcher.wait()
    wait_gone(tree, timeout=10.0)
    log = next((workspace / "out" / ".cuepipe-work" / "orphan").glob("*.log")).read_text()
    assert "launcher that started this stage is gone" in log
    assert ("killing the stage's process tree" in log) is hard


@POSIX_ONLY
def test_resident_worker_tree_dies_with_a_killed_daemon(tmp_path: Path) -> None:
    """A busy resident worker (stdin EOF alone would not stop it mid-job) and its child die too."""
    (tmp_path / "clip.txt").write_text("pretend video")
    pidfile = tmp_path / "pids.txt"
    daemon = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cuepipe.orchestrator.resident import WorkerPool\n"
        "pool = WorkerPool(Path(sys.argv[1]))\n"
        "resident = pool.lease('misbehaving')\n"
        "assert resident.submit('j1', Path(sys.argv[2]), Path(sys.argv[3]), 9,\n"
        "                       {'mode': 'hang_silent', 'pidfile': sys.argv[4]})\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", daemon, str(tmp_path / "workers"), str(tmp_path / "clip.txt"),
                             str(tmp_path / "out"), str(pidfile)], env=subprocess_env())
    try:
        tree = wait_pids(pidfile)
        assert tree[0].ppid() == proc.pid
        assert tree[0].cmdline()[-1] == "--serve"
    finally:
        proc.kill()
        proc.wait()
    wait_gone(tree, timeout=10.0)


def test_stage_watches_a_launcher_that_is_not_its_parent(workspace: Path) -> None:
    """The creation-time check (Windows, or a wrapper between launcher and stage): the stage stops
    politely (exit 130) and takes its grandchild along once the named launcher dies."""
    launcher = subprocess.Popen(SLEEPER)
    pidfile = workspace / "pids.txt"
    env = dict(subprocess_env(), **{PARENT_ENV: parent_token(launcher.pid)})
    with (workspace / "stage.log").open("wb") as log:
        stage = subprocess.Popen([sys.executable, "-m", "tests.support.misbehaving", "--input", "clip.txt",
                                  "--output-dir", "out", "--mode", "hang_silent", f"--pidfile={pidfile}"],
                                 cwd=workspace, env=env, stderr=log)
    tree: list[psutil.Process] = []
    try:
        tree = wait_pids(pidfile)
        time.sleep(1.0)
        assert stage.poll() is None, "the stage stopped while its launcher still ran"
        launcher.kill()
        launcher.wait()
        code = stage.wait(timeout=10)
        assert code == 130, (workspace / "stage.log").read_text()
        wait_gone(tree, timeout=5.0)
    finally:
        for proc in (launcher, stage):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for ps in tree:
            if not gone(ps):
                ps.kill()


def test_stage_does_not_start_when_its_launcher_is_already_gone(workspace: Path) -> None:
    dead = subprocess.Popen(SLEEPER)
    token = parent_token(dead.pid)
    dead.kill()
    dead.wait()
    me = psutil.Process()
    reused = f"{me.pid}:{me.create_time() + 100.0!r}"  # a live pid, but not the process that was named
    for value in (token, reused):
        pidfile = workspace / "pids.txt"
        env = dict(subprocess_env(), **{PARENT_ENV: value})
        proc = subprocess.run([sys.executable, "-m", "tests.support.misbehaving", "--input", "clip.txt",
                               "--output-dir", "out", "--mode", "hang_silent", f"--pidfile={pidfile}"],
                              cwd=workspace, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 130, proc.stderr
        assert "already gone; not starting" in proc.stderr
        assert not pidfile.exists()


def test_stage_with_a_live_launcher_or_none_runs_normally(workspace: Path) -> None:
    env = subprocess_env()
    env.pop(PARENT_ENV, None)
    for extra in ({PARENT_ENV: parent_token()}, {}):
        (workspace / "out" / "copy.txt").unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-m", "tests.support.misbehaving", "--input", "clip.txt",
                               "--output-dir", "out", "--mode", "ok"], cwd=workspace, env=dict(env, **extra),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert (workspace / "out" / "copy.txt").read_text() == "pretend video"


def test_worker_records_its_process_until_it_is_reaped(tmp_path: Path) -> None:
    registry = ProcessRegistry(tmp_path / "processes")
    worker = Worker(SLEEPER, tmp_path, tmp_path / "sleeper.log", registry=registry)
    worker.start()
    try:
        [record] = [json.loads(p.read_text()) for p in registry.folder.glob("*.json")]
        proc = psutil.Process(worker.pid)
        assert (record["pid"], record["created"]) == (proc.pid, proc.create_time())
    finally:
        worker.stop(grace=1.0)
    assert list(registry.folder.iterdir()) == []


def _record(registry: ProcessRegistry, proc: subprocess.Popen[bytes], shift: float = 0.0) -> None:
    ps = psutil.Process(proc.pid)
    registry.record(proc.pid, ps.create_time() + shift, SLEEPER)


def test_reap_leftovers_kills_recorded_trees_only(tmp_path: Path) -> None:
    registry = ProcessRegistry(tmp_path / "processes")
    # A leftover stage with a child of its own, as a dead daemon would have left it.
    tree_code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                 "'import time; time.sleep(600)']); time.sleep(600)")
    kwargs: dict[str, object] = {"start_new_session": True} if sys.platform != "win32" else {}
    leftover = subprocess.Popen([sys.executable, "-c", tree_code], **kwargs)  # type: ignore[call-overload]
    innocent = subprocess.Popen(SLEEPER)  # its pid was recorded once, by a process long gone (pid reuse)
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(leftover.pid).children():
            assert time.monotonic() < deadline, "the leftover never started its child"
            time.sleep(0.05)
        [grandchild] = psutil.Process(leftover.pid).children()
        tree = [psutil.Process(leftover.pid), grandchild]
        _record(registry, leftover)
        _record(registry, innocent, shift=-100.0)
        (registry.folder / "99999999.json").write_text("{not json")  # a torn record: ignored, cleared
        assert reap_leftovers(registry.folder) == [leftover.pid]
        wait_gone(tree, timeout=5.0)
        assert innocent.poll() is None, "a process whose creation time does not match was killed"
        assert list(registry.folder.iterdir()) == []
        assert reap_leftovers(registry.folder) == []
        assert reap_leftovers(tmp_path / "no-such-folder") == []
    finally:
        for proc in (leftover, innocent):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
