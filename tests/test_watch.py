"""Issue 13, part 3: watch folders (``orchestrator/watch.py``, ``cuepipe watch``).

Real watchdog observers (native events and polling) on a real inbox, real Jobs of the fast ``preprocess``
stage: a slow writer is taken only once its file is complete, a rename into the inbox at once, partial
and hidden names never; inputs move to done/ or failed/ (with the reason beside); a restart neither
re-processes nor skips; and the command line sends every Job's Events over OSC.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cuepipe.orchestrator.batch import Item, Runner
from cuepipe.orchestrator.pipeline import Pipeline, parse
from cuepipe.orchestrator.watch import Watcher, WatchService
from cuepipe.stages.codec import Message
from cuepipe.stages.democlip import write_clip
from tests.support.env import subprocess_env
from tests.support.fake_td import FakeTD

PIPELINES = """version = 1
[pipelines.small]
[[pipelines.small.stages]]
stage = "preprocess"
params = { width = 48, height = 32 }
"""


@pytest.fixture
def clip(tmp_path: Path) -> bytes:
    path = tmp_path / "source.mp4"
    write_clip(path, None, width=96, height=64, frames=8, seed=1)
    return path.read_bytes()


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    return parse(PIPELINES, tmp_path / "pipelines.toml").pipelines["small"]


class Service:
    """A WatchService on ``inbox`` driven by a thread, recording Events and settled inputs."""

    def __init__(self, tmp_path: Path, pipeline: Pipeline, settle_s: float, polling: bool) -> None:
        self.inbox = tmp_path / "inbox"
        self.inbox.mkdir(exist_ok=True)
        self.events: list[tuple[float, Message]] = []
        self.settled: list[tuple[Item, Path]] = []
        self.stop = threading.Event()
        runner = Runner(pipeline, tmp_path / "out", lambda e: self.events.append((time.monotonic(), e)),
                        cancel=self.stop)
        self.service = WatchService(Watcher(self.inbox, settle_s, polling), runner,
                                    on_item=lambda item, where: self.settled.append((item, where)))
        self.thread = threading.Thread(target=self.service.serve, args=(self.stop, 0.05))

    def __enter__(self) -> Service:
        self.thread.start()
        time.sleep(0.3)  # the observer is watching
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def wait(self, count: int, timeout: float = 60) -> list[tuple[Item, Path]]:
        deadline = time.monotonic() + timeout
        while len(self.settled) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.settled) >= count, f"only {len(self.settled)} settled: {self.settled}"
        return self.settled

    def started_at(self, name: str) -> float:
        return next(t for t, e in self.events if e.spec.name == "job/started" and e["input"].endswith(name))


def slow_write(path: Path, data: bytes, chunks: int = 8, pause: float = 0.2) -> Callable[[], float]:
    """Write ``data`` into ``path`` in ``chunks`` pieces with ``pause`` between them, in a thread; the
    returned function joins it and gives the time the file was closed."""
    closed: list[float] = []

    def write() -> None:
        step = -(-len(data) // chunks)
        with path.open("wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(pause)
        closed.append(time.monotonic())

    thread = threading.Thread(target=write)
    thread.start()

    def finished() -> float:
        thread.join(30)
        return closed[0]
    return finished


@pytest.mark.parametrize("polling", [False, True], ids=["events", "polling"])
def test_a_slow_writer_is_taken_only_once_its_file_is_complete(tmp_path: Path, pipeline: Pipeline, clip: bytes,
                                                              polling: bool) -> None:
    """Native events: the close after writing; polling (network shares): size and time unchanged for the
    settle time, longer than the writer's pauses."""
    with Service(tmp_path, pipeline, settle_s=1.0, polling=polling) as s:
        closed_at = slow_write(s.inbox / "slow take.mp4", clip)()
        (item, where), = s.wait(1)
        assert item.status == "done" and item.frames == 8, item
        assert s.started_at("slow take.mp4") >= closed_at  # never on a half-written file
        assert where == s.inbox / "done" / "slow take.mp4" and not (s.inbox / "slow take.mp4").exists()
        assert (tmp_path / "out" / "slow take_preprocessed.mkv").is_file()


def test_a_rename_into_the_inbox_is_taken_at_once_and_partial_names_never(tmp_path: Path, pipeline: Pipeline,
                                                                         clip: bytes) -> None:
    (tmp_path / "inbox" / "sub").mkdir(parents=True)  # the inbox's folders exist (a new one is scanned when seen)
    with Service(tmp_path, pipeline, settle_s=30.0, polling=False) as s:  # settle far longer than the test
        for name in ("copying.mp4.part", ".hidden.mp4", "download.tmp", "~$lock.mp4"):
            (s.inbox / "sub" / name).write_bytes(clip)
        (s.inbox / "notes.txt").write_text("not a video")
        staged = s.inbox / "sub" / ".incoming.mp4.part"
        staged.write_bytes(clip)
        t = time.monotonic()
        staged.rename(s.inbox / "sub" / "été.mp4")  # moved in: complete
        (item, where), = s.wait(1, timeout=20)
        assert item.status == "done" and where == s.inbox / "done" / "sub" / "été.mp4"
        assert s.started_at("été.mp4") - t < 10  # not after the 30 s settle time
        time.sleep(0.5)
        assert len(s.settled) == 1  # the partial, hidden and non-video names stayed where they were
        assert sorted(p.name for p in (s.inbox / "sub").iterdir()) == [
            ".hidden.mp4", "copying.mp4.part", "download.tmp", "~$lock.mp4"]
        assert (s.inbox / "notes.txt").exists()


def test_failures_go_to_failed_with_the_reason_beside_them(tmp_path: Path, pipeline: Pipeline) -> None:
    with Service(tmp_path, pipeline, settle_s=0.3, polling=False) as s:
        (s.inbox / "broken.mov").write_bytes(b"no video in here")
        (item, where), = s.wait(1)
    assert item.status == "failed" and where == s.inbox / "failed" / "broken.mov"
    reason = (s.inbox / "failed" / "broken.mov.error.txt").read_text(encoding="utf-8")
    assert reason.startswith("input_invalid: ") and "the stages' logs: " in reason
    log_folder = Path(reason.split("the stages' logs: ")[1].strip())
    assert (log_folder / "00-preprocess.log").is_file()


def test_a_restart_neither_redoes_nor_skips(tmp_path: Path, pipeline: Pipeline, clip: bytes) -> None:
    with Service(tmp_path, pipeline, settle_s=0.3, polling=False) as s:
        (s.inbox / "first.mp4").write_bytes(clip)
        s.wait(1)
    # while nobody watches, a new file arrives
    (s.inbox / "second.mp4").write_bytes(clip)
    with Service(tmp_path, pipeline, settle_s=0.3, polling=False) as again:
        (item, _where), = again.wait(1)
        time.sleep(0.5)
    assert item.relative == "second.mp4" and item.status == "done" and len(again.settled) == 1
    assert sorted(p.name for p in (s.inbox / "done").iterdir()) == ["first.mp4", "second.mp4"]


def test_a_file_running_when_the_watcher_stops_stays_in_the_inbox(tmp_path: Path, pipeline: Pipeline) -> None:
    long_clip = tmp_path / "long.mp4"
    write_clip(long_clip, None, width=640, height=360, frames=600, seed=3)
    with Service(tmp_path, pipeline, settle_s=0.3, polling=False) as s:
        (s.inbox / "long.mp4").write_bytes(long_clip.read_bytes())
        deadline = time.monotonic() + 30
        while not any(e.spec.name == "job/progress" for _, e in s.events) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert any(e.spec.name == "job/cancelled" for _, e in s.events)
    assert (s.inbox / "long.mp4").is_file() and not (s.inbox / "done").exists()  # taken again after a restart


@pytest.fixture
def watching(tmp_path: Path, fake_td: FakeTD) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(tmp_path / "pipelines.toml"),
           "watch", "small", str(inbox), "--out", str(tmp_path / "out"), "--settle", "0.3", "--report",
           fake_td.address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        yield inbox, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.skipif(sys.platform == "win32", reason="stops the watcher with SIGTERM")
def test_the_watch_command_sends_job_events_to_touchdesigner(watching: tuple[Path, subprocess.Popen[str]],
                                                            fake_td: FakeTD, clip: bytes) -> None:
    inbox, proc = watching
    time.sleep(1.5)  # started and watching
    (inbox / "take.mp4").write_bytes(clip)
    done = fake_td.wait_for("job/done", timeout=60)
    assert done["outputs"][0].endswith("take_preprocessed.mkv")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"done: take.mp4 -> {inbox / 'done' / 'take.mp4'}" in out


def test_a_folder_moved_into_the_inbox_is_looked_through(tmp_path: Path, pipeline: Pipeline, clip: bytes) -> None:
    """Its files arrived before the folder's own watch could exist: the folder is scanned when it appears."""
    shoot = tmp_path / "shoot day 2"
    shoot.mkdir()
    (shoot / "take 1.mp4").write_bytes(clip)
    with Service(tmp_path, pipeline, settle_s=0.3, polling=False) as s:
        shoot.rename(s.inbox / "shoot day 2")
        (item, where), = s.wait(1)
    assert item.status == "done" and where == s.inbox / "done" / "shoot day 2" / "take 1.mp4"
    assert (tmp_path / "out" / "shoot day 2" / "take 1_preprocessed.mkv").is_file()


def test_cuepipe_serve_watches_a_folder_and_tells_its_subscribers(tmp_path: Path, fake_td: FakeTD,
                                                                 clip: bytes) -> None:
    """``cuepipe serve --watch PIPELINE=INBOX``: the daemon runs the watch folder beside its queue and sends
    those Jobs' Events to every subscriber (TouchDesigner)."""
    from cuepipe.orchestrator.daemon import Daemon, DaemonConfig, DaemonError

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pipelines = parse(PIPELINES, tmp_path / "pipelines.toml")
    with pytest.raises(DaemonError, match="unknown pipeline"):
        Daemon(DaemonConfig(port=0, roots=(tmp_path,), state_dir=tmp_path / "state0",
                            watch=(("nope", inbox, None),)), pipelines)
    daemon = Daemon(DaemonConfig(port=0, roots=(tmp_path,), state_dir=tmp_path / "state",
                                 watch=(("small", inbox, tmp_path / "out"),)), pipelines)
    daemon.subscribe(("127.0.0.1", fake_td.port))
    stop = threading.Event()
    serving = threading.Thread(target=daemon.serve, args=(stop,))
    serving.start()
    try:
        time.sleep(0.5)
        (inbox / "take.mp4").write_bytes(clip)
        done = fake_td.wait_for("job/done", timeout=60)
        assert list(done["outputs"]) == [str(tmp_path / "out" / "take_preprocessed.mkv")]
        deadline = time.monotonic() + 10
        while not (inbox / "done" / "take.mp4").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (inbox / "done" / "take.mp4").is_file()
    finally:
        stop.set()
        serving.join(30)
