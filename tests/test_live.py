"""Live inputs (stages/live.py), the live matting loop (stages/matting.py run_live) and live Jobs.

The end-to-end tests use the real RVM model, a synthetic clip played in real time (``play://``)
and NDI on loopback (the ``ndi`` extra, installed by the test extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from cuepipe.orchestrator.pipeline import RequestError, parse, resolve_request
from cuepipe.stages.democlip import write_clip
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.live import LiveError, LiveSource, LiveStats, open_source
from cuepipe.stages.stage import is_live, job_input
from tests.support.daemon_peer import Client, Server
from tests.support.env import ROOT, subprocess_env
from tests.support.fake_td import FakeTD
from tests.support.pipelines import pipelines_toml, step

W, H = 320, 192


class Counter:
    """A live reader that delivers numbered frames as fast as asked, or raises after ``fail_after``."""

    def __init__(self, period_s: float = 0.0, fail_after: int | None = None) -> None:
        self.n, self.period, self.fail_after, self.closed = 0, period_s, fail_after, False

    def read(self) -> tuple[np.ndarray, int | None] | None:
        if self.fail_after is not None and self.n >= self.fail_after:
            raise OSError("the camera went away (simulated)")
        time.sleep(self.period)
        self.n += 1
        return np.full((2, 2, 3), self.n % 256, np.uint8), None

    def close(self) -> None:
        self.closed = True


def test_live_urls_stay_text_and_files_become_paths() -> None:
    assert job_input("ndi://STUDIO (TD)?ip=10.0.0.5") == "ndi://STUDIO (TD)?ip=10.0.0.5"  # a Path would fold //
    assert job_input("camera://0") == "camera://0" and job_input("play:///takes/a.mp4") == "play:///takes/a.mp4"
    assert job_input("/takes/a.mp4") == Path("/takes/a.mp4") and not is_live("http://x") and not is_live("a.mp4")


def test_a_slow_consumer_gets_the_newest_frame_and_the_rest_count_as_dropped() -> None:
    with LiveSource(Counter(period_s=0.002), "counter") as source:
        first = source.next(timeout_s=2.0)
        time.sleep(0.1)  # the consumer is busy: ~50 frames arrive meanwhile
        newest = source.next(timeout_s=2.0)
        assert first is not None and newest is not None
        assert newest.seq > first.seq + 10  # not the next queued frame: the newest one
        assert source.dropped >= newest.seq - first.seq - 2 and source.received >= newest.seq + 1
        assert newest.timecode > 0 and newest.captured_ns >= first.captured_ns  # capture time as a timecode


def test_a_reader_error_reaches_the_stage_and_close_stops_the_thread() -> None:
    reader = Counter(fail_after=3)
    source = LiveSource(reader, "failing")
    try:
        with pytest.raises(OSError, match="went away"):
            for _ in range(100):
                source.next(timeout_s=1.0)
    finally:
        source.close()
    assert reader.closed and not any(t.name == "live-failing" for t in threading.enumerate())
    with LiveSource(Counter(period_s=0.5), "silent") as silent:  # a reader's read() returns within a frame or so
        assert silent.next(timeout_s=0.05) is None  # nothing within the timeout: None, not a hang


def test_live_stats_fps_and_latency_percentiles_from_an_injected_clock() -> None:
    clock = [0]
    stats = LiveStats(now_ns=lambda: clock[0], interval_s=1.0)
    for i in range(30):  # 30 frames a second, each sent 40 ms (10 of them 100 ms) after its capture
        clock[0] = int(i * 1e9 / 30)
        stats.frame_out(clock[0] - int((100 if i % 3 == 0 else 40) * 1e6))
    assert not stats.due()
    clock[0] = int(1.01e9)
    assert stats.due()
    frames, fps, dropped, p50, p95 = stats.snapshot(dropped=4)
    assert (frames, dropped) == (30, 4) and fps == pytest.approx(30.0, rel=1e-6)
    assert p50 == pytest.approx(40.0) and p95 == pytest.approx(100.0)
    assert not stats.due()


def test_play_paces_a_file_at_its_frame_rate_and_loops(tmp_path: Path) -> None:
    clip = tmp_path / "c.mp4"
    write_clip(clip, None, 64, 48, frames=5, fps=25.0)
    clock, sleeps = [0.0], []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock[0] += s

    with open_source(f"play://{clip}", sleep=sleep, now=lambda: clock[0]) as source:
        frames = [source.next(timeout_s=5.0) for _ in range(12)]  # past the end: it loops
    seqs = [f.seq for f in frames if f is not None]
    # 12 frames of a 5-frame clip: it looped; the fake clock never waits, so the reader may run ahead
    # of this consumer and replace a frame (newest first): seqs increase, gaps are allowed
    assert len(seqs) == 12 and seqs == sorted(set(seqs)) and seqs[-1] >= 11
    assert sleeps and all(s == pytest.approx(0.04) for s in sleeps)  # 1/25 s, one frame at a time
    with open_source(f"play://{clip}?loop=0", sleep=lambda s: None) as once, pytest.raises(LiveError, match="ended"):
        for _ in range(10):
            once.next(timeout_s=5.0)


def test_bad_live_urls_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(LiveError, match="camera://N"):
        open_source("camera://front")
    with pytest.raises(LiveError, match="not a live input"):
        open_source("rtsp://camera.local/stream")


def test_live_inputs_only_for_a_stage_that_takes_them_and_play_paths_under_the_roots(tmp_path: Path) -> None:
    text = pipelines_toml({"stall_timeout": 0}, live=[step(stage="matting", outputs="ndi")],
                          files=[step(stage="preprocess")])
    pipelines = parse(text, tmp_path / "pipelines.toml")
    assert resolve_request(pipelines, "live", input="ndi://STUDIO?ip=127.0.0.1", roots=[tmp_path]).name == "live"
    with pytest.raises(RequestError) as err:
        resolve_request(pipelines, "files", input="ndi://STUDIO")
    assert err.value.kind is ErrorKind.BAD_ARGUMENT and "takes files only" in str(err.value)
    with pytest.raises(RequestError) as err:
        resolve_request(pipelines, "live", input="play:///etc/clip.mp4", roots=[tmp_path])
    assert err.value.kind is ErrorKind.NOT_ALLOWED


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "walk.mp4"
    write_clip(path, None, W, H, frames=24, fps=24.0)
    return path


def receive(name: str, count: int, timeout_s: float = 60.0) -> list[np.ndarray]:
    from cuepipe.stages.ndi import NdiReceiver, parse_ndi_url

    frames: list[np.ndarray] = []
    with NdiReceiver(parse_ndi_url(f"ndi://{name}?ip=127.0.0.1"), connect_timeout_s=timeout_s) as receiver:
        deadline = time.monotonic() + timeout_s
        while len(frames) < count and time.monotonic() < deadline:
            frame = receiver.read(1.0)
            if frame is not None:
                frames.append(frame.image)
    return frames


def test_live_matting_sends_the_person_with_alpha_over_ndi_until_cancelled(clip: Path, tmp_path: Path,
                                                                           fake_td: FakeTD) -> None:
    name = f"cp-test-{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cuepipe.stages.matting", "--input", f"play://{clip}", "--output-dir",
         str(tmp_path / "out"), "--outputs", "ndi", "--ndi-name", name, "--provider", "cpu", "--report",
         fake_td.address], cwd=ROOT, env=subprocess_env(), stderr=subprocess.DEVNULL)
    try:
        frames = receive(name, 30)
        live = fake_td.wait_for("stage/live", timeout=30)
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    assert code == 130 and fake_td.wait_for("stage/failed")["kind"] == "cancelled"  # cancelled, not crashed
    assert len(frames) == 30 and frames[0].shape == (H, W, 4)
    alpha = frames[-1][:, :, 3]
    person = alpha > 128
    assert 0.02 < person.mean() < 0.5  # a person-sized cut-out, not an empty or full frame
    assert ((alpha == 0) | (alpha == 255)).mean() > 0.9  # a matte: mostly exact 0 / 255 (NDI keeps alpha)
    assert live["frames"] >= 1 and live["fps"] > 0 and live["latency_p95"] >= live["latency_p50"] > 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # live: no files


def test_a_live_job_cancelled_from_the_daemon_leaves_no_process(clip: Path, tmp_path: Path) -> None:
    (tmp_path / "pipelines.toml").write_text(pipelines_toml(
        {"stall_timeout": 0},
        live={"keep_running": True, "stages": [step(stage="matting", outputs="ndi", provider="cpu",
                                                    ndi_name=f"cp-daemon-{os.getpid()}")]}))
    server = Server(tmp_path)
    client = Client(server.port)
    try:
        job, started = client.run_until_started("live", f"play://{clip}", "lv")  # type: ignore[arg-type]
        client.wait("job/live", job=job, timeout=60)  # running: frames go out
        pid = started["pid"]
        client.send("cmd/cancel", tag="c", job=job)
        client.wait("job/cancelled", job=job)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        client.close()
        assert server.stop() == 0


def test_live_matting_without_the_ndi_extra_fails_with_provider_unavailable_naming_it(
        clip: Path, tmp_path: Path, fake_td: FakeTD) -> None:
    script = ("import sys; sys.modules['NDIlib'] = None; from cuepipe.stages import matting; "
              "raise SystemExit(matting.main())")
    proc = subprocess.run(
        [sys.executable, "-c", script, "--input", f"play://{clip}", "--output-dir", str(tmp_path / "out"),
         "--outputs", "ndi", "--provider", "cpu", "--report", fake_td.address],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    failed = fake_td.wait_for("stage/failed")
    assert proc.returncode == 1 and failed["kind"] == "provider_unavailable"
    assert "pip install -e '.[ndi]'" in failed["message"]


def test_live_matting_with_a_style_model_sends_the_restyled_person(tmp_path: Path, fake_td: FakeTD) -> None:
    """The live pipeline's "optionally generate": multistyle26 on the person, as stylize does it."""
    import cv2

    still = tmp_path / "still.mp4"
    write_clip(still, None, W, H, frames=12, fps=24.0, still=True)  # one picture: compare with it
    name = f"cp-style-{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cuepipe.stages.matting", "--input", f"play://{still}", "--output-dir",
         str(tmp_path / "out"), "--outputs", "ndi", "--ndi-name", name, "--provider", "cpu", "--style-model",
         "multistyle26", "--style", "19", "--report", fake_td.address],
        cwd=ROOT, env=subprocess_env(), stderr=subprocess.DEVNULL)
    try:
        frames = receive(name, 10)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 130
    source = cv2.VideoCapture(str(still))
    try:
        picture = source.read()[1]
    finally:
        source.release()
    image = frames[-1]
    person = image[:, :, 3] > 250
    assert 0.02 < person.mean() < 0.5
    assert np.abs(image[:, :, :3][person].astype(int) - picture[person]).mean() > 20  # restyled (~37 measured)
    info = json.loads(fake_td.wait_for("stage/started")["info"])
    assert (info["style_model"], info["style"]) == ("multistyle26", "19")
