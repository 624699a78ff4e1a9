"""Resident (warm) Workers: reuse, recycling, crash replacement with backoff, cancel."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cuepipe.orchestrator.job import Job, JobState
from cuepipe.orchestrator.pipeline import parse
from cuepipe.orchestrator.resident import WorkerPool
from cuepipe.stages.codec import Message
from tests.support.pipelines import pipelines_toml, step

TOML = pipelines_toml(
    {"stall_timeout": 0},
    warm=[step(warm=True)],
    hang=[step("hang_silent", warm=True)],
    fail=[step("fail", warm=True)],
)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    pipelines = parse(TOML, tmp_path / "pipelines.toml")
    (tmp_path / "clip.txt").write_text("pretend video")
    pool = WorkerPool(tmp_path / "workers", max_jobs=3)
    yield tmp_path, pipelines, pool
    pool.stop()


def run_job(tmp_path: Path, pipeline, pool: WorkerPool, cancel: threading.Event | None = None):  # type: ignore[no-untyped-def]
    events: list[Message] = []
    result = Job(pipeline, tmp_path / "clip.txt", events.append, pool=pool, cancel=cancel).run()
    started = [e for e in events if e.spec.name == "job/stage_started"]
    return result, started, events


def test_reuse_then_recycle_after_max_jobs(setup) -> None:  # type: ignore[no-untyped-def]
    tmp_path, pipelines, pool = setup
    seen = []
    for _ in range(4):
        result, started, _ = run_job(tmp_path, pipelines.pipelines["warm"], pool)
        assert result.state is JobState.DONE and Path(result.outputs[0]).read_text() == "pretend video"
        seen.append((started[0]["pid"], json.loads(started[0]["info"])["runs_in_process"]))
    first_pid = seen[0][0]
    assert seen[:3] == [(first_pid, 1), (first_pid, 2), (first_pid, 3)]  # one process, model kept
    assert seen[3][0] != first_pid and seen[3][1] == 1  # recycled after max_jobs=3
    assert pool.started == 2
    assert [w["state"] for w in pool.states()] == ["idle"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_crashed_worker_is_replaced_with_backoff(setup) -> None:  # type: ignore[no-untyped-def]
    tmp_path, pipelines, pool = setup
    _, started, _ = run_job(tmp_path, pipelines.pipelines["warm"], pool)
    victim = started[0]["pid"]
    os.kill(victim, signal.SIGKILL)  # dies while idle: the next lease notices and starts another
    deadline = time.monotonic() + 10
    while psutil.pid_exists(victim) and psutil.Process(victim).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    result, started, _ = run_job(tmp_path, pipelines.pipelines["warm"], pool)
    assert result.state is JobState.DONE and started[0]["pid"] != victim
    # dying mid-job: the job fails as crashed, the crash is counted, the next worker waits a backoff
    cancel = threading.Event()
    job_thread_events: list[Message] = []
    job = Job(pipelines.pipelines["hang"], tmp_path / "clip.txt", job_thread_events.append, pool=pool, cancel=cancel)
    holder: list = []
    t = threading.Thread(target=lambda: holder.append(job.run()))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not any(e.spec.name == "job/stage_started" for e in job_thread_events):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pid = next(e["pid"] for e in job_thread_events if e.spec.name == "job/stage_started")
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=20)
    finally:
        cancel.set()
        t.join(timeout=20)
    [result] = holder
    assert result.state is JobState.FAILED and result.kind.value == "crashed"
    assert pool.backoff("misbehaving") == 1.0


def test_cancel_kills_the_resident_worker(setup) -> None:  # type: ignore[no-untyped-def]
    tmp_path, pipelines, pool = setup
    cancel = threading.Event()
    events: list[Message] = []
    job = Job(pipelines.pipelines["hang"], tmp_path / "clip.txt", events.append, pool=pool, cancel=cancel)
    threading.Timer(1.0, cancel.set).start()
    result = job.run()
    assert result.state is JobState.CANCELLED
    assert pool.states() == []  # killed on purpose, not kept
    assert pool.backoff("misbehaving") == 0.0  # and not counted as a crash


def test_each_job_on_a_resident_worker_gets_its_own_log_tail(setup) -> None:  # type: ignore[no-untyped-def]
    """Issue 9: every job of a resident worker writes to one log; a failed job's stderr tail carried
    the previous job's error. Two failing jobs on one worker: each tail names only its own input."""
    tmp_path, pipelines, pool = setup
    tails, pids = [], []
    for name in ("first-take.txt", "second-take.txt"):
        (tmp_path / name).write_text("pretend video")
        events: list[Message] = []
        result = Job(pipelines.pipelines["fail"], tmp_path / name, events.append, pool=pool).run()
        assert result.state is JobState.FAILED and result.kind is not None and result.kind.value == "input_invalid"
        pids.append(next(e["pid"] for e in events if e.spec.name == "job/stage_started"))
        tails.append(next(e["stderr"] for e in events if e.spec.name == "job/stage_failed"))
    assert pids[0] == pids[1], "both jobs must run on the same resident worker"
    assert "first-take.txt is not what this stage wants" in tails[0]
    assert "second-take.txt is not what this stage wants" in tails[1]
    assert "first-take" not in tails[1] and "second-take" not in tails[0]


def test_a_resident_generate_worker_changes_style_between_jobs_without_reloading(tmp_path: Path) -> None:
    """Issue 11: the real ``generate`` stage on a resident worker, two jobs with different styles of the
    real multistyle26: one process, the model validated (loaded) once, each job in its own style."""
    import numpy as np

    from tests.support.rgba import person_frames, read_all, write_rgba

    frames = person_frames(3, width=96, height=64)
    clip = write_rgba(tmp_path / "take.mkv", frames)
    pipelines = parse(pipelines_toml(
        {"stall_timeout": 0},
        **{name: [step(stage="generate", warm=True, model="multistyle26", style=style, provider="cpu")]
           for name, style in (("nineteen", "19"), ("seven", "7"))}), tmp_path / "pipelines.toml")
    pool = WorkerPool(tmp_path / "workers", max_jobs=3)
    try:
        results, infos, pids = [], [], []
        for name in ("nineteen", "seven"):
            events: list[Message] = []
            result = Job(pipelines.pipelines[name], clip, events.append, out_dir=tmp_path / name, pool=pool).run()
            assert result.state is JobState.DONE, [e.fields for e in events]
            started = next(e for e in events if e.spec.name == "job/stage_started")
            pids.append(started["pid"])
            infos.append(json.loads(started["info"]))
            results.append(read_all(Path(result.outputs[0])))
    finally:
        pool.stop()
    assert pids[0] == pids[1] and pool.started == 1  # one resident process served both jobs
    assert [i["style"] for i in infos] == ["19", "7"]
    [worker_log] = (tmp_path / "workers").glob("generate-*.log")
    assert worker_log.read_text().count("contract ok") == 1  # the model was loaded and checked once
    person = [f[:, :, 3] == 255 for f in frames]
    diff = np.mean([np.abs(a[m][:, :3].astype(int) - b[m][:, :3]).mean()
                    for a, b, m in zip(*results, person, strict=True)])
    assert diff > 40  # each job in its own style (measured ~80 between styles 19 and 7)


def test_warm_params_are_the_distinct_parameter_sets_of_warm_steps(tmp_path: Path) -> None:
    from cuepipe.orchestrator.daemon import warm_params

    text = pipelines_toml(
        {"stall_timeout": 0},
        a=[step(stage="matting", warm=True, ratio=0.25), step(stage="composite")],
        b=[step(stage="matting", warm=True, ratio=0.25)],  # the same set once
        c=[step(stage="matting", warm=True, ratio=0.5), step(stage="matting", ratio=0.75)])  # not warm: none
    assert warm_params(parse(text, tmp_path / "pipelines.toml")) == {"matting": [{"ratio": 0.25}, {"ratio": 0.5}]}


def test_a_new_resident_matting_worker_preloads_its_model_before_the_first_job(tmp_path: Path) -> None:
    """Issue 12: the first trigger on a warm worker paid for imports, the session and ORT's first run
    (~500 ms at 720p); a worker now preloads them when it starts, and the job reuses that session."""
    from tests.support.rgba import person_frames, write_rgba

    clip = write_rgba(tmp_path / "take.mkv", person_frames(2, width=64, height=48))
    params = {"outputs": "alpha", "provider": "cpu", "ratio": 1.0}
    pool = WorkerPool(tmp_path / "workers", preloads={"matting": [params]})
    try:
        pool.warm("matting")
        [log_file] = (tmp_path / "workers").glob("matting-*.log")
        deadline = time.monotonic() + 60
        while "preloaded in" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "preloaded in" in log_file.read_text()
        pipelines = parse(pipelines_toml({"stall_timeout": 0}, m=[step(stage="matting", warm=True, **params)]),
                          tmp_path / "pipelines.toml")
        events: list[Message] = []
        result = Job(pipelines.pipelines["m"], clip, events.append, out_dir=tmp_path / "out", pool=pool).run()
        assert result.state is JobState.DONE, [e.fields for e in events]
    finally:
        pool.stop()
    assert pool.started == 1 and log_file.read_text().count("session on") == 1  # loaded once: at preload
