"""Issue 12, part 3: stages that stream to each other through a frame ring (``stream = true``).

The stream's two ends (``stages/stream.py``) in one process; the pipeline file's ``stream`` keys; and
real Jobs on the real models (RVM, the built-in ``cuepipe_toon`` generator) on small synthetic clips:
a streamed job's outputs equal a sequential one's bit for bit, its stages overlap, and a failure, a
SIGKILL or a cancel anywhere stops every stage of the job and leaves no shared-memory segment behind.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np
import psutil
import pytest

from cuepipe.orchestrator.job import Job, JobState
from cuepipe.orchestrator.pipeline import ConfigError, Pipeline, parse
from cuepipe.stages.codec import Message
from cuepipe.stages.democlip import write_clip
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.ring import RingReader, RingWriter
from cuepipe.stages.ringshm import new_name
from cuepipe.stages.stage import StageError
from cuepipe.stages.stream import StreamInfo, StreamReader, StreamWriter, stream_url
from cuepipe.stages.video import AudioSource, VideoReader
from tests.support.pipelines import pipelines_toml
from tests.support.rgba import read_all


@pytest.fixture(scope="module", autouse=True)
def tracker_started() -> None:
    """This process's resource tracker (a child process) starts with its first ring (or the Job's sweep of
    rings); start it before the leak check of any test (tests/conftest.py) takes its list of children."""
    if os.name == "posix":
        resource_tracker.ensure_running()


# --- the two ends ---------------------------------------------------------------------------------------


def test_ring_info_travels_with_the_ring() -> None:
    info = StreamInfo(29.97, 120, AudioSource(Path("/clips/a b.mp4"), 1.5, 4.0), "/clips/a b.mp4")
    with RingWriter.create(2, 8, 4, 3, info=info.encode()) as writer, RingReader.attach(writer.name) as reader:
        assert StreamInfo.decode(reader.info) == info
    with pytest.raises(ValueError, match="4096"):
        RingWriter.create(2, 8, 4, 3, info=b"x" * 5000)


@pytest.mark.parametrize(("have", "want"), [(3, 3), (4, 3), (3, 4), (4, 4), (1, 3), (1, 4)])
def test_a_stream_gives_the_frames_a_file_reader_would(have: int, want: int) -> None:
    """BGR, BGRA or gray in; BGR (VideoReader) or BGRA (RgbaReader: alpha 255 where there is none) out."""
    rng = np.random.default_rng(have * 10 + want)
    frames = [rng.integers(0, 256, (6, 10) if have == 1 else (6, 10, have), np.uint8) for _ in range(7)]
    name = new_name()
    got: list[np.ndarray] = []

    def read() -> None:
        with StreamReader(stream_url(name), want) as reader:
            assert (reader.width, reader.height, reader.fps, reader.frame_count) == (10, 6, 25.0, 7)
            assert reader.has_alpha == (have == 4)
            got.extend(reader.frames())

    thread = threading.Thread(target=read)
    thread.start()  # the reader waits for the ring to appear, as a downstream stage does
    with StreamWriter(name, 10, 6, have, StreamInfo(25.0, 7, None, "test"), slots=2) as writer:
        for f in frames:
            writer.write(f)
    thread.join(10)
    assert len(got) == 7
    for f, g in zip(frames, got, strict=True):
        colour = np.repeat(f[..., None], 3, axis=2) if have == 1 else f[..., :3]
        assert g.shape == (6, 10, want) and np.array_equal(g[..., :3], colour)
        if want == 4:
            assert np.array_equal(g[..., 3], f[..., 3] if have == 4 else np.full((6, 10), 255, np.uint8))


def test_a_writer_that_fails_breaks_the_readers_stream_at_once() -> None:
    name = new_name()
    errors: list[StageError] = []
    frames = 0

    attached = threading.Event()

    def read() -> None:
        nonlocal frames
        try:
            with StreamReader(stream_url(name), 3) as reader:
                attached.set()
                for _ in reader:
                    frames += 1
        except StageError as exc:
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    with pytest.raises(RuntimeError), StreamWriter(name, 4, 4, 3, StreamInfo(25.0, -1, None, "t")) as writer:
        assert attached.wait(10)
        writer.write(np.zeros((4, 4, 3), np.uint8))
        raise RuntimeError("the stage failed")
    thread.join(10)
    assert [e.kind for e in errors] == [ErrorKind.STREAM_BROKEN] and "aborted" in errors[0].message
    assert frames <= 1


def test_a_reader_with_no_writer_gives_up_with_a_clear_error() -> None:
    with pytest.raises(StageError) as caught:
        StreamReader(stream_url(new_name()), 3, attach_wait_s=0.2)
    assert caught.value.kind is ErrorKind.STREAM_BROKEN and "no stream appeared" in caught.value.message


def test_a_blocked_write_ends_when_aborted_from_another_thread() -> None:
    """The frame pipeline aborts its writers from another thread: a write waiting for a slow reader ends."""
    name = new_name()
    writer = StreamWriter(name, 2, 2, 3, StreamInfo(1.0, -1, None, "t"), slots=1)
    reader = RingReader.attach(name)  # attached, never reads
    try:
        writer.write(np.zeros((2, 2, 3), np.uint8))  # fills the only slot
        failure: list[StageError] = []

        def write() -> None:
            try:
                writer.write(np.zeros((2, 2, 3), np.uint8))
            except StageError as exc:
                failure.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting for the reader
        writer.abort()
        thread.join(2)
        assert not thread.is_alive() and failure[0].kind is ErrorKind.STREAM_BROKEN
    finally:
        reader.close()


# --- pipelines.toml -----------------------------------------------------------------------------------


def _file(text: str, tmp_path: Path) -> Pipeline:
    return next(iter(parse(text, tmp_path / "pipelines.toml").pipelines.values()))


def test_stream_true_joins_every_stage_into_one_group(tmp_path: Path) -> None:
    text = pipelines_toml(None, p={"stream": True, "stages": [
        {"stage": "preprocess"}, {"stage": "matting", "params": {"outputs": "source_rgba"}},
        {"stage": "generate", "params": {"model": "cuepipe_toon"}}, {"stage": "composite", "stream": False}]})
    pipeline = _file(text, tmp_path)
    assert [s.stream for s in pipeline.stages] == [False, True, True, False]
    assert pipeline.groups() == [(0, 1, 2), (3,)]
    sequential = _file(text.replace("stream = true\n", "", 1), tmp_path)
    assert sequential.groups() == [(0,), (1,), (2,), (3,)]


@pytest.mark.parametrize(("stages", "message"), [
    ([{"stage": "matting", "stream": True}], "the first stage has no stage before it"),
    ([{"stage": "matting"}, {"stage": "preprocess", "stream": True}], "'preprocess' cannot take a stream"),
    ([{"stage": "matting", "params": {"stream_out": "x"}}], "set by the launcher"),
    ([{"stage": "matting"}, {"stage": "composite", "stream": "yes"}], "stream must be true or false"),
])
def test_a_stream_that_cannot_work_is_refused_when_the_file_is_read(tmp_path: Path, stages: list[dict[str, object]],
                                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _file(pipelines_toml(None, p=stages), tmp_path)


# --- real jobs --------------------------------------------------------------------------------------------

STYLIZE = [  # the shipped stylize pipeline, on the built-in generator (fast; no download)
    {"stage": "preprocess", "params": {"width": 128, "height": 80, "fit": "crop"}},
    {"stage": "matting", "params": {"outputs": "source_rgba", "ratio": 0.5}},
    {"stage": "generate", "params": {"model": "cuepipe_toon", "mode": "person", "outputs": "video,rgba"}},
]


# the same chain at the source's size, ratio 1: seconds of matting, so a kill or a cancel lands mid-stream
# (at 128x80 the whole clip can be through before the launcher has read the Event that triggers it)
LONG = [{"stage": "preprocess", "params": {}}, {"stage": "matting", "params": {"outputs": "source_rgba", "ratio": 1.0}},
        STYLIZE[2]]


def _pipeline(tmp_path: Path, stream: bool, stages: list[dict[str, object]] | None = None) -> Pipeline:
    table = {"stream": stream, "stages": stages or STYLIZE}
    return _file(pipelines_toml({"stall_timeout": 0}, p=table), tmp_path)


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("cp")} if os.path.isdir("/dev/shm") else set()


def _job(tmp_path: Path, pipeline: Pipeline, clip: Path, out: str,
         on_event: Callable[[Message, threading.Event], None] | None = None) -> tuple[Job, list[Message]]:
    events: list[Message] = []
    cancel = threading.Event()

    def sink(message: Message) -> None:
        events.append(message)
        if on_event is not None:
            on_event(message, cancel)

    return Job(pipeline, clip, sink, out_dir=tmp_path / out, cancel=cancel, python=sys.executable), events


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "take one.mp4"
    write_clip(path, None, width=160, height=96, frames=12, fps=24.0, seed=3)
    return path


def test_a_streamed_job_gives_the_sequential_jobs_outputs_bit_for_bit(tmp_path: Path, clip: Path) -> None:
    before = _segments()
    results = {}
    for stream in (False, True):
        job, events = _job(tmp_path, _pipeline(tmp_path, stream), clip, f"out_{stream}")
        result = job.run()
        assert result.state is JobState.DONE, [e.fields for e in events if e.spec.name == "job/failed"]
        results[stream] = (result, events)
    plain, streamed = results[False][0], results[True][0]
    assert [p.name for p in plain.outputs] == [p.name for p in streamed.outputs] == [
        "take one_generated.mp4", "take one_generated_rgba.mkv"]
    a, b = read_all(plain.outputs[1]), read_all(streamed.outputs[1])
    assert len(a) == len(b) == 12 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with VideoReader(plain.outputs[0]) as ra, VideoReader(streamed.outputs[0]) as rb:
        assert all(np.array_equal(x, y) for x, y in zip(ra, rb, strict=True))
    # streamed: the three stages ran at once (each started before the one before it was done)
    order = [(e.spec.name, e["index"]) for e in results[True][1] if e.spec.name in ("job/stage_started",
                                                                                     "job/stage_done")]
    assert order.index(("job/stage_started", 2)) < order.index(("job/stage_done", 1))
    assert order.index(("job/stage_started", 1)) < order.index(("job/stage_done", 0))
    # sequential: never
    order = [(e.spec.name, e["index"]) for e in results[False][1] if e.spec.name in ("job/stage_started",
                                                                                      "job/stage_done")]
    assert order == [("job/stage_started", 0), ("job/stage_done", 0), ("job/stage_started", 1),
                     ("job/stage_done", 1), ("job/stage_started", 2), ("job/stage_done", 2)]
    overall = [e["overall"] for e in results[True][1] if e.spec.name == "job/progress"]
    assert overall and max(overall) <= 1.0
    assert _segments() <= before


def test_a_stage_that_fails_stops_the_whole_streamed_job_and_is_the_one_reported(tmp_path: Path,
                                                                                  clip: Path) -> None:
    """generate refuses its style after matting started streaming: matting (blocked on a full ring) and
    preprocess are stopped; the Job names generate's own failure, not the streams it broke."""
    stages = [dict(s) for s in STYLIZE]
    stages[2] = {"stage": "generate", "params": {"model": "cuepipe_toon", "mode": "person", "layout": "nhwc"}}
    job, events = _job(tmp_path, _pipeline(tmp_path, True, stages), clip, "out")
    result = job.run()
    failed = [e for e in events if e.spec.name == "job/failed"]
    assert result.state is JobState.FAILED and len(failed) == 1
    assert (failed[0]["index"], failed[0]["stage"]) == (2, "generate")
    assert failed[0]["kind"] not in (ErrorKind.STREAM_BROKEN.value, ErrorKind.CRASHED.value)
    assert not any((tmp_path / "out").glob("take*"))  # nothing published


def test_sigkill_of_a_streaming_stage_fails_the_job_and_leaves_no_segment(tmp_path: Path) -> None:
    """The middle stage (matting: reads one ring, writes the next) is killed hard mid-stream."""
    long_clip = tmp_path / "long.mp4"
    write_clip(long_clip, None, width=320, height=192, frames=300, fps=24.0, seed=4)
    before = _segments()
    killed: list[int] = []

    def kill_matting(message: Message, cancel: threading.Event) -> None:
        if message.spec.name == "job/progress" and message["index"] == 1 and message["frame"] >= 10 and not killed:
            pid = next(e["pid"] for e in events if e.spec.name == "job/stage_started" and e["index"] == 1)
            psutil.Process(pid).kill()  # SIGKILL on POSIX, TerminateProcess on Windows
            killed.append(pid)

    job, events = _job(tmp_path, _pipeline(tmp_path, True, LONG), long_clip, "out", kill_matting)
    result = job.run()
    assert killed and result.state is JobState.FAILED
    failed = next(e for e in events if e.spec.name == "job/failed")
    assert (failed["index"], failed["kind"]) == (1, ErrorKind.CRASHED.value), failed.fields
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert _segments() <= before


def test_cancel_mid_stream_stops_every_stage(tmp_path: Path) -> None:
    long_clip = tmp_path / "long.mp4"
    write_clip(long_clip, None, width=320, height=192, frames=300, fps=24.0, seed=5)
    before = _segments()

    def cancel_at_frame_10(message: Message, cancel: threading.Event) -> None:
        if message.spec.name == "job/progress" and message["index"] == 2 and message["frame"] >= 10:
            cancel.set()

    job, events = _job(tmp_path, _pipeline(tmp_path, True, LONG), long_clip, "out", cancel_at_frame_10)
    result = job.run()
    assert result.state is JobState.CANCELLED
    assert [e.spec.name for e in events if e.spec.name.startswith("job/") and e.spec.name in (
        "job/done", "job/failed", "job/cancelled")] == ["job/cancelled"]
    pids = [e["pid"] for e in events if e.spec.name == "job/stage_started"]
    assert len(pids) == 3 and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                      for p in pids)
    assert _segments() <= before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux lists its segments (/dev/shm)")
def test_sweep_removes_the_rings_of_dead_writers_and_keeps_the_others() -> None:
    """What is left when a writer dies together with its resource tracker (a whole tree killed hard) and
    no launcher remains: the daemon's start sweeps it (``ringshm.sweep``)."""
    import subprocess
    from multiprocessing.shared_memory import SharedMemory

    from cuepipe.stages.ringshm import HEADER, H, identity, sweep

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    segments = {}
    for who, (pid, created) in {"dead": (gone.pid, 1), "alive": identity()}.items():
        shm = SharedMemory(name=new_name(), create=True, size=HEADER)
        resource_tracker.unregister(getattr(shm, "_name", "/" + shm.name), "shared_memory")  # as if orphaned
        header = np.ndarray((HEADER // 8,), np.int64, buffer=shm.buf)
        header[H.WRITER_PID], header[H.WRITER_CREATED] = pid, created
        del header
        segments[who] = shm
    try:
        removed = sweep()
        assert segments["dead"].name in removed and segments["alive"].name not in removed
        assert segments["dead"].name not in _segments() and segments["alive"].name in _segments()
    finally:
        for shm in segments.values():
            shm.close()
        resource_tracker.register(getattr(segments["alive"], "_name", ""), "shared_memory")  # unlink unregisters
        segments["alive"].unlink()


def test_resident_workers_stream_too(tmp_path: Path, clip: Path) -> None:
    """Under ``cuepipe serve`` warm Steps run on resident Workers: the stream's name reaches them in the job
    request, and a second streamed job reuses the same processes (models kept loaded)."""
    from cuepipe.orchestrator.resident import WorkerPool

    stages = [dict(s) for s in STYLIZE]
    stages[1] = {**stages[1], "warm": True}
    stages[2] = {**stages[2], "warm": True}
    pipeline = _pipeline(tmp_path, True, stages)
    pool = WorkerPool(tmp_path / "workers")
    try:
        pids = []
        for n in range(2):
            events: list[Message] = []
            result = Job(pipeline, clip, events.append, out_dir=tmp_path / f"out{n}", pool=pool).run()
            assert result.state is JobState.DONE, [e.fields for e in events if e.spec.name == "job/failed"]
            assert len(read_all(result.outputs[1])) == 12
            started = {e["index"]: e["pid"] for e in events if e.spec.name == "job/stage_started"}  # any order
            pids.append([started[i] for i in range(3)])
        assert pids[0][1:] == pids[1][1:]  # matting and generate: the same resident processes
        assert pids[0][0] != pids[1][0]  # preprocess is not warm: a new process each time
    finally:
        pool.stop()
