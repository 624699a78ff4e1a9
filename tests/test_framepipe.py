"""The one threaded frame pipeline (stages/framepipe.py): results in order, errors from every thread, the pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from cuepipe.stages.framepipe import BufferPool, Sink, run_frames

PROMPT_S = 3.0  # well under the pipeline's 10 s join timeout: a stop that needed it is not prompt


class Boom(Exception):
    pass


class Collect:
    """An in-memory writer; ``fail_at``: raise on that write."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.frames: list[int] = []
        self.fail_at = fail_at
        self.aborted = False

    def write(self, frame: np.ndarray) -> None:
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise Boom("write")
        self.frames.append(int(frame[0]))

    def abort(self) -> None:
        self.aborted = True


def sink(writer: Collect, name: str = "out", convert: Callable[[int], np.ndarray] | None = None) -> Sink[int]:
    return Sink(name, writer, convert or (lambda r: np.array([r])))


def finish_within(seconds: float, fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it is still running after ``seconds`` (a hang)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=target, name="pipeline-under-test", daemon=True)
    start = time.monotonic()
    runner.start()
    runner.join(seconds)
    assert not runner.is_alive(), f"the pipeline did not stop within {seconds} s"
    assert time.monotonic() - start < seconds
    return outcome[0]


def test_results_arrive_in_order_in_every_sink_with_batches() -> None:
    a, b = Collect(), Collect()
    seen: list[int] = []

    def process(items: list[int]) -> list[int]:
        assert 1 <= len(items) <= 3
        return [i * 10 for i in items]

    n = run_frames(range(10), lambda i: i + 1, process, [sink(a, "a"), sink(b, "b")], batch=3, on_frame=seen.append)
    assert n == 10 and seen == list(range(1, 11))
    assert a.frames == b.frames == [i * 10 for i in range(1, 11)]


def source_failing() -> Iterator[int]:
    yield 0
    yield 1
    raise Boom("source")


def raise_at(where: str, value: int) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        if (x[0] if isinstance(x, list) else x) == value:
            raise Boom(where)
        return x
    return fn


@pytest.mark.parametrize("where", ["source", "prepare", "process", "convert", "write", "on_frame"])
def test_the_first_error_of_any_thread_stops_every_thread(where: str) -> None:
    """Reader (source, prepare), calling thread (process, on_frame), writer (convert, write)."""
    source: Any = source_failing() if where == "source" else range(1000)
    prepare = raise_at("prepare", 2) if where == "prepare" else (lambda i: i)
    process = raise_at("process", 2) if where == "process" else (lambda items: items)
    writer = Collect(fail_at=2 if where == "write" else None)
    convert = (lambda r: np.array([r]) if r != 2 else 1 / 0) if where == "convert" else None
    on_frame = raise_at("on_frame", 3) if where == "on_frame" else None
    other = Collect()  # a healthy second sink: stopped too
    error = finish_within(PROMPT_S, lambda: run_frames(source, prepare, process, [sink(writer, "w", convert),
                                                                                  sink(other, "other")],
                                                       on_frame=on_frame, name=f"fail-{where}"))
    if where == "convert":
        assert isinstance(error, ZeroDivisionError)
    else:
        assert isinstance(error, Boom) and str(error) == where
    assert len(other.frames) < 1000  # stopped early; the autouse fixture checks every thread was joined


def test_interrupt_in_the_calling_thread_stops_every_thread() -> None:
    def on_frame(n: int) -> None:
        if n == 3:
            raise KeyboardInterrupt

    error = finish_within(PROMPT_S, lambda: run_frames(range(1000), lambda i: i, lambda xs: xs, [sink(Collect())],
                                                       on_frame=on_frame))
    assert isinstance(error, KeyboardInterrupt)


class WatchedPool(BufferPool[np.ndarray]):
    """Says when a ``get`` finds no free buffer and has to wait."""

    def __init__(self, count: int) -> None:
        super().__init__(lambda: np.zeros(1, np.int64), count)
        self.waiting = threading.Event()
        self.borrowed = 0

    def get(self) -> np.ndarray:
        if self.borrowed >= 2:
            self.waiting.set()  # every buffer is out: this get blocks
        buffer = super().get()
        self.borrowed += 1
        return buffer


def test_a_writer_failing_while_the_reader_waits_on_an_empty_pool_ends_promptly() -> None:
    """The reader blocks in pool.get (process keeps every buffer); the writer's error must wake it."""
    pool = WatchedPool(2)
    held: list[np.ndarray] = []

    def prepare(i: int) -> np.ndarray:
        buffer = pool.get()
        buffer[0] = i
        return buffer

    def process(items: list[np.ndarray]) -> list[int]:
        held.extend(items)  # never given back: the pool runs dry
        return [int(b[0]) for b in items]

    class FailWhenReaderWaits(Collect):
        def write(self, frame: np.ndarray) -> None:
            assert pool.waiting.wait(PROMPT_S), "the reader never waited on the pool"
            time.sleep(0.1)  # let it really block in the pool's wait
            raise Boom("writer")

    error = finish_within(PROMPT_S * 2, lambda: run_frames(range(100), prepare, process,
                                                           [sink(FailWhenReaderWaits())], pools=[pool]))
    assert isinstance(error, Boom) and str(error) == "writer"
    assert len(held) == 2


def test_the_pool_recycles_buffers_and_serves_one_run() -> None:
    made: list[np.ndarray] = []

    def make() -> np.ndarray:
        made.append(np.zeros(1, np.int64))
        return made[-1]

    pool = BufferPool(make, 3)

    def prepare(i: int) -> np.ndarray:
        buffer = pool.get()
        buffer[0] = i
        return buffer

    def process(items: list[np.ndarray]) -> list[int]:
        out = [int(b[0]) for b in items]
        for b in items:
            pool.put(b)
        return out

    writer = Collect()
    assert run_frames(range(50), prepare, process, [sink(writer)], pools=[pool]) == 50
    assert writer.frames == list(range(50)) and len(made) == 3
    with pytest.raises(ValueError, match="one run_frames"):
        run_frames(range(1), prepare, process, [sink(Collect())], pools=[pool])
    with pytest.raises(ValueError):
        BufferPool(make, 0)
