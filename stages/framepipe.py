"""A generic threaded frame pipeline: decoding, model work and encoding overlap.

    reader thread    next(source) -> prepare(item)            (decode, crop, tensor packing)
                       | queue (``queue_size``)
    calling thread   process(batch of up to ``batch`` items)  (inference, post-processing, in order)
                       | one queue per sink (``queue_size``)
    a thread a sink  sink.convert(result) -> sink.writer.write (ffmpeg encodes in its own process)

The same shape as ``stages/matting_pipeline.py`` (which is RVM-specific), with the model work and the
per-frame types left to the caller. Every queue is bounded, so memory stays flat however long the
clip. The first exception in any thread (or a KeyboardInterrupt in the calling thread) stops all
the others; every thread is joined before ``run_frames`` re-raises it, and a writer stuck in ffmpeg
after a failure is aborted to unblock it. Writers are owned by the caller (close on success, abort
on failure), as with ``VideoWriter`` in a ``with`` block.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

__all__ = ["FrameWriter", "Sink", "run_frames"]

log = logging.getLogger(__name__)

_END = object()  # end of stream marker in every queue
_POLL_S = 0.05  # how often a blocked thread checks whether to stop
_JOIN_S = 10.0  # how long to wait for a thread before aborting the writers to unblock it

S = TypeVar("S")  # a source item
P = TypeVar("P")  # a prepared item
R = TypeVar("R")  # a processed result


class FrameWriter(Protocol):
    def write(self, frame: np.ndarray) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class Sink(Generic[R]):
    """An output: how to turn a result into the frame its writer takes (runs in the sink's thread)."""

    name: str
    writer: FrameWriter
    convert: Callable[[R], np.ndarray]


class _Stopped(Exception):
    """Raised inside a thread when another one failed: unwinds it quietly."""


class _Control:
    """The shared stop flag and the first error."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not isinstance(exc, _Stopped):
                self.error = exc
        self.stop.set()

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
               queue_size: int = 2, name: str = "frames") -> int:
    """Run every source item through ``prepare`` -> ``process`` -> every sink; the number of results.

    ``process`` gets up to ``batch`` prepared items in source order (fewer only at the end) and
    returns one result per item, in order. ``on_frame(n)`` runs on the calling thread after the
    n-th result was queued for the sinks.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    ctl = _Control()
    inputs: queue.Queue[Any] = queue.Queue(max(queue_size, batch))
    outputs: list[queue.Queue[Any]] = [queue.Queue(queue_size) for _ in sinks]
    done = 0

    def read() -> None:
        try:
            for item in source:
                prepared = prepare(item)
                ctl.put(inputs, prepared)
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
    for t in threads:
        t.start()
    try:
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
    """Join every thread; a writer stuck in ffmpeg after a failure is aborted to unblock it."""
    for t in threads:
        t.join(_JOIN_S if ctl.stop.is_set() else None)
    if any(t.is_alive() for t in threads):
        log.warning("a pipeline thread did not stop within %.0f s: aborting the writers", _JOIN_S)
        for s in sinks:
            s.writer.abort()
        for t in threads:
            t.join()
