"""Issue 13, part 5: the same batch on Ray (``--engine ray``; ``orchestrator/rayjobs.py``).

One local Ray (2 CPUs) for the whole module, started once. Real Jobs of the fast ``preprocess`` stage:
the Ray engine gives the local engine's statuses and outputs (decoded frames equal), resumes from the
same journal, and finishes every clip when its actor is killed in the middle of one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cuepipe.orchestrator.batch import collect, run_batch
from cuepipe.orchestrator.pipeline import Pipeline, parse
from cuepipe.stages.democlip import write_clip
from cuepipe.stages.video import VideoReader
from tests.support.fake_td import FakeTD

ray = pytest.importorskip("ray")

from cuepipe.orchestrator.rayjobs import RayExecutor  # noqa: E402 - only with the extra

PIPELINES = """version = 1
[pipelines.small]
[[pipelines.small.stages]]
stage = "preprocess"
params = { width = 48, height = 32 }
"""


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """~4 s to start, ~1 s to stop: once for all the tests here."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Pipeline, Path]:
    inbox = tmp_path / "in"
    (inbox / "sub dir").mkdir(parents=True)
    write_clip(inbox / "a.mp4", None, width=96, height=64, frames=8, seed=1)
    write_clip(inbox / "sub dir" / "été.mp4", None, width=96, height=64, frames=12, seed=2)
    write_clip(inbox / "long.mp4", None, width=640, height=360, frames=360, seed=3)
    (inbox / "broken.mov").write_bytes(b"not a video")
    path = tmp_path / "pipelines.toml"
    path.write_text(PIPELINES)
    return inbox, parse(PIPELINES, path).pipelines["small"], path


def frames(path: str) -> list[bytes]:
    with VideoReader(Path(path)) as reader:
        return [f.tobytes() for f in reader]


def test_the_ray_engine_gives_the_local_engines_results(tmp_path: Path, setup: tuple[Path, Pipeline, Path]) -> None:
    inbox, pipeline, pipelines = setup
    inputs = collect([inbox])
    local = run_batch(pipeline, inputs, tmp_path / "local")
    remote = RayExecutor(pipelines, "small", [], tmp_path / "ray", pipeline.resource, actors=2)
    try:
        on_ray = run_batch(pipeline, inputs, tmp_path / "ray", remote=remote)
        again = run_batch(pipeline, inputs, tmp_path / "ray", remote=remote)  # resumed from the same journal
    finally:
        remote.close()
    assert [(i.relative, i.status, i.frames) for i in on_ray.items] == [
        (i.relative, i.status, i.frames) for i in local.items]
    assert {i.relative: i.status for i in on_ray.items} == {
        "a.mp4": "done", "broken.mov": "failed", "long.mp4": "done", "sub dir/été.mp4": "done"}
    assert next(i for i in on_ray.items if i.relative == "broken.mov").kind == "input_invalid"
    for a, b in zip(local.items, on_ray.items, strict=True):
        assert [Path(p).relative_to(tmp_path / "local") for p in a.outputs] == [
            Path(p).relative_to(tmp_path / "ray") for p in b.outputs]
        for pa, pb in zip(a.outputs, b.outputs, strict=True):
            assert frames(pa) == frames(pb)
    assert [i.status for i in again.items] == ["skipped", "failed", "skipped", "skipped"]
    summary = json.loads((tmp_path / "ray" / "batch_summary.json").read_text(encoding="utf-8"))
    assert [i["status"] for i in summary["items"]] == ["skipped", "failed", "skipped", "skipped"]
    assert (tmp_path / "ray" / "report.html").is_file()


def test_a_clip_whose_actor_dies_is_run_again(tmp_path: Path, setup: tuple[Path, Pipeline, Path],
                                              fake_td: FakeTD) -> None:
    """The actor is killed (SIGKILL) while it runs the long clip: Ray restarts it and the clip runs again;
    every clip ends done and the output is whole."""
    inbox, pipeline, pipelines = setup
    (inbox / "broken.mov").unlink()
    inputs = [i for i in collect([inbox]) if i.relative.name == "long.mp4"]
    remote = RayExecutor(pipelines, "small", [], tmp_path / "ray", pipeline.resource, actors=1,
                         reports=[("127.0.0.1", fake_td.port)])
    killed: list[int] = []
    pid = remote.pids()[0]  # now: a busy actor answers only after its clip

    def kill_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(e.spec.name == "job/progress" and e["frame"] >= 5 for e in list(fake_td.events)):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    try:
        summary = run_batch(pipeline, inputs, tmp_path / "ray", remote=remote)
    finally:
        killer.join()
        remote.close()
    assert killed, "the clip finished before its actor could be killed"
    (item,) = summary.items
    assert (item.status, item.frames) == ("done", 360), item
    assert len(frames(item.outputs[0])) == 360
    assert len({e["job"] for e in fake_td.events if e.spec.name == "job/started"}) == 2  # run twice
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
