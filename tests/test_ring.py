"""The shared-memory frame ring (``stages/ring.py``, issue 12 part 2): lossless, ordered, never torn,
both policies, a dead end detected by the other, and no segment left behind after any exit.

The other end runs as a real process (``tests/support/ring_peer.py``) wherever it matters: killing
it, its own resource tracker, timing across processes. Everything else runs in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.ring import (
    EndOfStream,
    RingAborted,
    RingClosed,
    RingError,
    RingGeometryError,
    RingNotFound,
    RingPeerGone,
    RingPolicy,
    RingReader,
    RingTimeout,
    RingWriter,
    exists,
)
from cuepipe.stages.ringshm import HEADER, H, S, new_name
from tests.support.env import ROOT, subprocess_env
from tests.support.ring_peer import frame_for, frame_ok, stamp_for

SHAPE = (48, 64, 4)  # the peer's default --size 64x48x4
DETECT_S = 2.0  # how soon a dead end must be noticed (checked every 0.1 s; generous for a loaded CI)


@pytest.fixture(scope="module", autouse=True)
def tracker_started() -> None:
    """This process's resource tracker (a child process) starts with its first ring; start it before the
    leak check of any test (tests/conftest.py) takes its list of children."""
    if os.name == "posix":
        resource_tracker.ensure_running()


class Peer:
    """A ``ring_peer`` process; its report is polled from a file (no pipe: its tracker inherits pipes)."""

    def __init__(self, tmp: Path, role: str, name: str, *args: str) -> None:
        self.report = tmp / f"{role}-{name}.jsonl"
        self.errlog = tmp / f"{role}-{name}.err"
        with self.errlog.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.ring_peer", role, name, str(self.report), *args],
                cwd=ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.report.read_text().splitlines() if self.report.exists() else []
            for event in map(json.loads, lines):
                if event["event"] in (name, "error"):
                    assert event["event"] == name, event
                    return event
            exited = self.proc.poll() is not None
            if exited or time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} from the peer (exit {self.proc.poll()}): "
                                     f"{lines} {self.errlog.read_text()}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL on POSIX, TerminateProcess on Windows: no cleanup of any kind runs in it."""
        self.proc.kill()
        self.proc.wait(10)

    def finish(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def start(role: str, name: str, *args: str) -> Peer:
        peers.append(Peer(tmp_path, role, name, *args))
        return peers[-1]

    yield start
    for peer in peers:
        if peer.proc.poll() is None:
            peer.kill()


def gone(name: str) -> bool:
    """The segment no longer exists: attaching fails (and on Linux it is not in /dev/shm either).

    Presence is probed untracked (``exists``): a plain ``SharedMemory(name=...)`` that succeeds would
    register the segment with this process's resource tracker, which would then unlink it at exit."""
    if exists(name):
        return False
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=name)
    return not (sys.platform.startswith("linux") and os.path.exists(f"/dev/shm/{name}"))


def wait_gone(name: str, timeout: float) -> float:
    start = time.monotonic()
    while not gone(name):
        assert time.monotonic() - start < timeout, f"segment {name} still exists after {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_round_trip_in_one_process() -> None:
    frames = [frame_for(seq, SHAPE, "random") for seq in range(1, 6)]
    with RingWriter.create(slots=3, width=64, height=48, channels=4) as writer:
        reader = RingReader.attach(writer.name)
        assert (reader.geometry, reader.policy) == (writer.geometry, RingPolicy.BLOCK)
        assert reader.geometry.shape == SHAPE and writer.name.startswith("cp") and len(writer.name) == 14
        got = []
        for seq, frame in enumerate(frames, 1):
            assert writer.put(frame, timestamp_ns=stamp_for(seq)) is True
            got.append(reader.get())
    assert [(f.seq, f.timestamp_ns) for f in got] == [(s, stamp_for(s)) for s in range(1, 6)]
    assert all(np.array_equal(f.image, frame) and f.image.flags.writeable for f, frame in zip(got, frames, strict=True))
    with pytest.raises(EndOfStream):
        reader.get()
    assert list(reader) == []
    assert gone(writer.name) or sys.platform == "win32"  # unlinked by the writer; Windows: the reader's handle
    reader.close()
    assert gone(writer.name)
    assert writer.stats.frames == reader.stats.frames == 5


def test_round_trip_across_processes(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    name = new_name()
    writer = spawn("write", name, "--frames", "20", "--slots", "3")
    writer.event("ready")
    with RingReader.attach(name) as reader:
        frames = list(reader)
    assert [f.seq for f in frames] == list(range(1, 21))
    assert all(f.timestamp_ns == stamp_for(f.seq) and frame_ok(f.seq, f.image, "random") for f in frames)
    assert writer.finish() == 0 and writer.event("done")["dropped"] == 0
    assert gone(name)


def test_the_readers_exit_leaves_the_writers_segment(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    with RingWriter.create(4, 64, 48, 4) as writer:
        reader = spawn("read", writer.name, "--frames", "3")
        writer.wait_for_reader()
        for seq in range(1, 4):
            writer.put(frame_for(seq, SHAPE, "random"), timestamp_ns=stamp_for(seq))
        done = reader.event("done")
        assert (done["seqs"], done["bad"], done["stamps_ok"]) == ([1, 2, 3], [], True)
        assert reader.finish() == 0
        time.sleep(0.3)  # its resource tracker has seen it exit by now
        assert exists(writer.name)
        with pytest.raises(RingClosed, match="the reader closed it") as closed:
            writer.put(frame_for(4, SHAPE, "random"))
        assert closed.value.kind == ErrorKind.OUTPUT_ERROR
    assert gone(writer.name)


def test_block_a_slow_reader_gets_every_frame(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    name = new_name()
    writer = spawn("write", name, "--frames", "30", "--slots", "2", "--policy", "block")
    writer.event("ready")
    with RingReader.attach(name) as reader:
        frames = []
        for frame in reader:
            frames.append(frame)
            time.sleep(0.005)
    assert [f.seq for f in frames] == list(range(1, 31))
    assert all(frame_ok(f.seq, f.image, "random") for f in frames) and reader.stats.dropped == 0
    done = writer.event("done")
    assert done["dropped"] == 0 and done["waited_s"] > 0.05  # it waited for the reader instead of dropping
    assert writer.finish() == 0


def test_drop_oldest_never_waits_and_keeps_the_newest() -> None:
    with RingWriter.create(4, 64, 48, 4, "drop_oldest") as writer, RingReader.attach(writer.name) as reader:
        stored, longest = [], 0.0
        for seq in range(1, 51):  # the reader reads nothing meanwhile
            start = time.monotonic()
            stored.append(writer.put(frame_for(seq, SHAPE, "uniform"), timestamp_ns=stamp_for(seq)))
            longest = max(longest, time.monotonic() - start)
        assert stored == [True] * 4 + [False] * 46 and writer.stats.dropped == 46 and longest < 0.05
        writer.close()
        frames = list(reader)
    assert [f.seq for f in frames] == [47, 48, 49, 50] and all(frame_ok(f.seq, f.image, "uniform") for f in frames)
    assert (reader.stats.frames, reader.stats.dropped) == (4, 46)


def test_drop_oldest_with_a_slow_reader_process(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    with RingWriter.create(3, 64, 48, 4, RingPolicy.DROP_OLDEST) as writer:
        reader = spawn("read", writer.name, "--frames", "0", "--delay", "0.01", "--pattern", "uniform")
        writer.wait_for_reader()
        longest = 0.0
        for seq in range(1, 201):
            start = time.monotonic()
            writer.put(frame_for(seq, SHAPE, "uniform"), timestamp_ns=stamp_for(seq))
            longest = max(longest, time.monotonic() - start)
            time.sleep(0.001)
    done = reader.event("done")
    seqs = done["seqs"]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 200 and done["bad"] == [] and done["end_of_stream"]
    assert len(seqs) + done["dropped"] == 200 and 0 < done["dropped"] <= writer.stats.dropped
    assert longest < 0.05, f"put waited {longest * 1000:.1f} ms under drop_oldest"
    assert reader.finish() == 0


def test_the_writer_detects_a_killed_reader(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    with RingWriter.create(2, 64, 48, 4, "block") as writer:
        reader = spawn("read", writer.name, "--frames", "2", "--then", "hold")
        writer.wait_for_reader()
        for seq in range(1, 5):  # 2 read, 2 fill the ring
            writer.put(frame_for(seq, SHAPE, "random"))
        assert reader.event("done")["seqs"] == [1, 2]
        reader.kill()
        start = time.monotonic()
        with pytest.raises(RingPeerGone, match="its reader") as dead:
            writer.put(frame_for(5, SHAPE, "random"), timeout_s=30)
        assert time.monotonic() - start < DETECT_S and dead.value.kind == ErrorKind.OUTPUT_ERROR
        time.sleep(0.3)  # the killed reader's tracker has exited by now: it must not have unlinked the ring
        assert exists(writer.name)
    assert gone(writer.name)


def test_the_reader_drains_then_detects_a_killed_writer(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    name = new_name()
    writer = spawn("write", name, "--frames", "3", "--then", "hold")
    writer.event("ready")
    with RingReader.attach(name) as reader:
        writer.event("done")
        writer.kill()
        start = time.monotonic()
        assert [reader.get().seq for _ in range(3)] == [1, 2, 3]  # what it published before it died
        with pytest.raises(RingPeerGone, match="its writer") as dead:
            reader.get(timeout_s=30)
        assert time.monotonic() - start < DETECT_S and dead.value.kind == ErrorKind.INPUT_INVALID
    wait_gone(name, 5.0)


def test_a_killed_creator_leaves_no_segment(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    """No reader: only the dead writer's resource tracker can unlink it."""
    name = new_name()
    writer = spawn("write", name, "--frames", "2", "--then", "hold")
    writer.event("done")
    assert exists(name)
    writer.kill()
    wait_gone(name, 5.0)


def test_no_segment_after_close_abort_or_exception() -> None:
    with RingWriter.create(2, 8, 8, 1) as closed:
        pass
    assert gone(closed.name)
    with pytest.raises(ZeroDivisionError), RingWriter.create(2, 8, 8, 1) as failed:
        reader = RingReader.attach(failed.name)
        failed.put(np.zeros((8, 8, 1), np.uint8))
        _ = 1 / 0
    with reader, pytest.raises(RingAborted):  # at once, although a frame is unread
        reader.get()
    assert gone(failed.name)
    with pytest.raises(ValueError), RingWriter.create(2, 8, 8, 1, name=new_name()) as named:
        raise ValueError
    assert gone(named.name)


def test_the_seqlock_never_returns_a_torn_frame(tmp_path: Path, spawn: Callable[..., Peer]) -> None:
    """A writer lapping a 2-slot ring of 1 MB uniform frames: every frame read is one frame, whole."""
    name = new_name()
    writer = spawn("write", name, "--frames", "1500", "--slots", "2", "--size", "512x512x4", "--policy",
                   "drop_oldest", "--pattern", "uniform")
    writer.event("ready")
    with RingReader.attach(name) as reader:
        seqs = []
        for frame in reader:
            assert frame_ok(frame.seq, frame.image, "uniform"), f"torn frame {frame.seq}"
            seqs.append(frame.seq)
    assert seqs == sorted(set(seqs)) and seqs[-1] == 1500 and writer.finish() == 0
    print(f"read {len(seqs)} of 1500, skipped {reader.stats.dropped}, discarded {reader.stats.torn} torn copies")


def test_a_slot_being_written_is_never_read() -> None:
    """White box: a slot whose seqlock is odd (the writer inside it) is not returned, even if published."""
    with RingWriter.create(2, 8, 8, 1, "drop_oldest") as writer, RingReader.attach(writer.name) as reader:
        writer.put(np.ones((8, 8, 1), np.uint8))
        reader._seg.meta[0][S.LOCK] += 1  # as if the writer had died in the middle of rewriting slot 0
        with pytest.raises(RingTimeout):
            reader.get(timeout_s=0.1)
        assert reader.stats.torn == 1
        reader._seg.meta[0][S.LOCK] += 1
        assert reader.get().seq == 1


def test_borrow_lends_the_slot_until_the_block_ends() -> None:
    with RingWriter.create(1, 8, 8, 3) as writer, RingReader.attach(writer.name) as reader:
        writer.put(np.full((8, 8, 3), 7, np.uint8))
        with reader.borrow() as frame:
            assert frame.seq == 1 and (frame.image == 7).all() and not frame.image.flags.writeable
            with pytest.raises(RingTimeout):  # its only slot is lent
                writer.put(np.zeros((8, 8, 3), np.uint8), timeout_s=0.05)
            with pytest.raises(RingError, match="borrow block"):
                reader.get()
            del frame
        assert writer.put(np.zeros((8, 8, 3), np.uint8)) and reader.get().seq == 2


def test_bad_geometry_frames_and_closed_ends_are_named_errors() -> None:
    for args in [(0, 8, 8, 4), (2, 0, 8, 4), (2, 8, 8, 17), (2, 8, 8, 4, "newest")]:
        with pytest.raises(RingGeometryError) as bad:
            RingWriter.create(*args)  # type: ignore[arg-type]
        assert bad.value.kind == ErrorKind.BAD_ARGUMENT
    for kwargs in [{"dtype": "complex64"}, {"dtype": "no-such-type"}, {"name": "x" * 31}, {"name": "a/b"}]:
        with pytest.raises(RingGeometryError):
            RingWriter.create(2, 8, 8, 4, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(RingNotFound):
        RingReader.attach(new_name())
    with RingWriter.create(2, 8, 8, 4, "drop_oldest", timeout_s=0.05) as writer:
        for frame in [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 4), np.float32), np.zeros((8, 9, 4), np.uint8)]:
            with pytest.raises(RingGeometryError, match=r"\(8, 8, 4\) uint8"):
                writer.put(frame)
        reader = RingReader.attach(writer.name)
        with pytest.raises(RingError, match="one reader"):
            RingReader.attach(writer.name)
        with pytest.raises(RingError, match="needs policy block"), reader.borrow():
            pass
        with pytest.raises(RingTimeout) as slow:
            reader.get(timeout_s=0.05)
        assert slow.value.kind == ErrorKind.INPUT_INVALID
        reader.close()
        with pytest.raises(RingClosed):
            reader.get()
    with pytest.raises(RingClosed):
        writer.put(np.zeros((8, 8, 4), np.uint8))


def test_not_a_ring_and_a_full_ring_time_out() -> None:
    junk = SharedMemory(create=True, size=4096)
    try:
        header = np.ndarray((HEADER // 8,), np.int64, buffer=junk.buf)
        header[H.WRITER_PID] = os.getpid()  # tracker entry stays ours
        with pytest.raises(RingNotFound, match="being created"):  # no magic yet: its creator may be writing it
            RingReader.attach(junk.name)
        header[H.MAGIC] = 12345
        del header
        with pytest.raises(RingError, match="not a frame ring"):
            RingReader.attach(junk.name)
    finally:
        junk.close()
        junk.unlink()
    clock = iter(range(1_000_000))  # a fake clock: one second a look, so the timeout comes without sleeping
    with RingWriter.create(1, 8, 8, 4, now=lambda: float(next(clock))) as writer:
        writer.put(np.zeros((8, 8, 4), np.uint8))
        with pytest.raises(RingTimeout, match="no free slot") as full:
            writer.put(np.zeros((8, 8, 4), np.uint8), timeout_s=5)
        assert full.value.kind == ErrorKind.OUTPUT_ERROR and writer.stats.waited_s >= 5
        with pytest.raises(RingTimeout, match="no reader"):
            writer.wait_for_reader(timeout_s=3)
