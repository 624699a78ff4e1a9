"""The threaded frame pipeline of every frame stage: decoding, model work and encoding overlap.

    reader thread    next(source) -> prepare(item)            (decode, crop, tensor packing)
                       | queue (``queue_size``)
    calling thread   process(batch of up to ``batch`` items)  (inference, post-processing, in order)
                       | one queue per sink (``queue_size``)
    a thread a sink  sink.convert(result) -> sink.writer.write (ffmpeg encodes in its own process)

The model work and the per-frame types are the caller's (``stages/matting.py``: RVM with its
recurrent state and scene cuts; ``stages/generate.py``; ``stages/composite.py``). Every queue is
bounded, and a ``BufferPool`` lets ``prepare`` borrow reusable buffers (matting's input tensors)
that ``process`` gives back, so memory stays flat however long the clip.

The first batch is processed alone: the reader waits with the second until it is done, so the
first result of a trigger (``cuepipe serve``'s warm path) is not slowed by decoding the next frame
on the same cores; from then on decoding runs ahead as usual.

One control stops everything: the first exception in any thread (or a KeyboardInterrupt in the
calling thread) is kept, and every other thread is woken - from a full or empty queue, or from a
pool with no free buffer - and unwinds quietly. Every thread is joined before ``run_frames``
re-raises that first exception; a writer stuck in ffmpeg after a failure is aborted to unblock it.
Writers are owned by the caller (close on success, abort on failure), as with ``VideoWriter`` in a
``with`` block.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

import numpy as np

__all__ = ["BufferPool", "ClosedOrAborted", "FrameWriter", "Sink", "run_frames"]

log = logging.getLogger(__name__)

_END = object()  # end of stream marker in every queue
_POLL_S = 0.05  # how often a thread blocked on a queue checks whether to stop
_JOIN_S = 10.0  # how long to wait for a thread before aborting the writers to unblock it

S = TypeVar("S")  # a source item
P = TypeVar("P")  # a prepared item
R = TypeVar("R")  # a processed result
B = TypeVar("B")  # a pooled buffer


class FrameWriter(Protocol):
    def write(self, frame: np.ndarray) -> None: ...

    def abort(self) -> None: ...


class ClosedOrAborted:
    """What every frame writer is as a ``with`` block (a file, a frame ring, a stream): ``close()`` when it
    ends cleanly, ``abort()`` when it ends by an exception, so a failure never leaves a half output."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class Sink(Generic[R]):
    """An output: how to turn a result into the frame its writer takes (runs in the sink's thread)."""

    name: str
    writer: FrameWriter
    convert: Callable[[R], np.ndarray]


class _Stopped(Exception):
    """Raised inside a thread when another one failed: unwinds it quietly."""


class BufferPool(Generic[B]):
    """``count`` buffers made by ``make``, borrowed with ``get`` and given back with ``put``.

    Serves one ``run_frames`` call (pass it as ``pools``): ``get`` blocks while every buffer is out,
    and wakes as soon as that run stops (a failure anywhere, an interrupt), so a reader waiting for a
    buffer never holds up the shutdown. FIFO, as a queue.
    """

    def __init__(self, make: Callable[[], B], count: int) -> None:
        if count < 1:
            raise ValueError(f"a pool needs at least one buffer, got {count}")
        self._free: collections.deque[B] = collections.deque(make() for _ in range(count))
        self._cond = threading.Condition()
        self._stopped = False
        self._bound = False

    def get(self) -> B:
        """A free buffer; raises (quietly ending the thread) once the run has stopped."""
        with self._cond:
            while not self._stopped and not self._free:
                self._cond.wait()
            if self._stopped:
                raise _Stopped
            return self._free.popleft()

    def put(self, buffer: B) -> None:
        """Give ``buffer`` back."""
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()

    def _bind(self) -> None:
        if self._bound:
            raise ValueError("a BufferPool serves one run_frames call: make a new one")
        self._bound = True

    def _stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class _Control:
    """The shared stop flag, the first error, and what to wake when stopping."""

    def __init__(self, pools: Sequence[BufferPool[Any]]) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._pools = pools
        for pool in pools:
            pool._bind()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not isinstance(exc, _Stopped):
                self.error = exc
        self.stop.set()
        for pool in self._pools:
            pool._stop()

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue[Any]) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue


def run_frames(source: Iterable[S], prepare: Callable[[S], P], process: Callable[[list[P]], list[R]],
               sinks: Sequence[Sink[R]], batch: int = 1, on_frame: Callable[[int], None] | None = None,
               queue_size: int = 2, name: str = "frames", pools: Sequence[BufferPool[Any]] = ()) -> int:
    """Run every source item through ``prepare`` -> ``process`` -> every sink; the number of results.

    ``prepare`` runs on the reader thread, ``process`` on the calling thread: it gets up to
    ``batch`` prepared items in source order (fewer only at the end) and returns one result per
    item, in order. ``on_frame(n)`` runs on the calling thread after the n-th result was queued for
    the sinks. ``pools``: the ``BufferPool``s that ``prepare`` borrows from (woken on a stop).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ctl = _Control(pools)
    inputs: queue.Queue[Any] = queue.Queue(max(queue_size, batch))
    outputs: list[queue.Queue[Any]] = [queue.Queue(queue_size) for _ in sinks]
    done = 0

    first_done = threading.Event()  # the first batch is processed alone (module docstring)

    def read() -> None:
        try:
            for count, item in enumerate(source, 1):
                prepared = prepare(item)
                ctl.put(inputs, prepared)
                if count == batch:
                    while not first_done.wait(_POLL_S):
                        if ctl.stop.is_set():
                            raise _Stopped
            ctl.put(inputs, _END)
        except BaseException as exc:
            ctl.fail(exc)

    def write(sink: Sink[R], q: queue.Queue[Any]) -> None:
        try:
            while (result := ctl.get(q)) is not _END:
                sink.writer.write(sink.convert(result))
        except BaseException as exc:
            ctl.fail(exc)

    threads = [threading.Thread(target=read, name=f"{name}-read", daemon=True)]
    threads += [threading.Thread(target=write, args=(s, q), name=f"{name}-{s.name}", daemon=True)
                for s, q in zip(sinks, outputs, strict=True)]
    try:
        for t in threads:
            t.start()
        ended = False
        while not ended:
            group: list[P] = []
            while len(group) < batch:
                item = ctl.get(inputs)
                if item is _END:
                    ended = True
                    break
                group.append(item)
            if not group:
                break
            results = process(group)
            first_done.set()
            if len(results) != len(group):
                raise RuntimeError(f"process returned {len(results)} results for {len(group)} items")
            for result in results:
                for q in outputs:
                    ctl.put(q, result)
                done += 1
                if on_frame is not None:
                    on_frame(done)
        for q in outputs:
            ctl.put(q, _END)
    except BaseException as exc:
        ctl.fail(exc)
    finally:
        _join(threads, sinks, ctl)
    if ctl.error is not None:
        raise ctl.error
    return done


def _join(threads: Sequence[threading.Thread], sinks: Sequence[Sink[Any]], ctl: _Control) -> None:
    """Join every started thread; a writer stuck in ffmpeg after a failure is aborted to unblock it."""
    started = [t for t in threads if t.ident is not None]
    for t in started:
        t.join(_JOIN_S if ctl.stop.is_set() else None)
    if any(t.is_alive() for t in started):
        log.warning("a pipeline thread did not stop within %.0f s: aborting the writers", _JOIN_S)
        for s in sinks:
            s.writer.abort()
        for t in started:
            t.join()
