"""The matting stage's threaded pipeline: decoding, inference and encoding overlap.

    reader thread    decode -> scene-cut check -> BGR uint8 to float NCHW (pooled buffers)
                       | queue (``queue_size``)
    calling thread   RVM inference -> uint8 alpha (+ BGR foreground when a sink needs it)
                       | one queue per sink (``queue_size``)
    a thread a sink  composite / BGRA conversion -> ``write`` (ffmpeg encodes in its own process)

Every queue is bounded and input buffers are recycled, so memory stays flat however long the clip.
The first exception in any thread (or a KeyboardInterrupt in the calling thread) stops all the
others; every thread is joined before ``run_pipeline`` re-raises it. Writers are owned by the
caller, which closes them on success and aborts them on failure.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stages.rvm import RVM, InputBuffer, SceneCut, to_alpha, to_foreground

log = logging.getLogger(__name__)

_END = object()  # end of stream marker in every queue
_POLL_S = 0.05  # how often a blocked thread checks whether to stop
_JOIN_S = 10.0  # how long to wait for a thread before aborting its writer to unblock it


@dataclass(frozen=True)
class Matte:
    """One frame's result: ``alpha`` uint8 HxW, ``foreground`` BGR uint8 HxWx3 (None when unused)."""

    index: int
    alpha: np.ndarray
    foreground: np.ndarray | None


class FrameWriter(Protocol):
    def write(self, frame: np.ndarray) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class Sink:
    """An output: how to turn a ``Matte`` into the frame its writer takes."""

    name: str
    writer: FrameWriter
    convert: Callable[[Matte], np.ndarray]
    needs_foreground: bool = False


@dataclass
class PipelineStats:
    """What ran: frames, and how many times a scene cut reset the state."""

    frames: int = 0
    scene_cuts: int = 0


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


def run_pipeline(frames: Iterable[np.ndarray], model: RVM, ratio: float, sinks: Sequence[Sink], width: int,
                 height: int, scene_cut: float = 0.0, on_frame: Callable[[int], None] | None = None,
                 queue_size: int = 2) -> PipelineStats:
    """Matte every frame into every sink; returns the stats or re-raises the first error."""
    ctl, stats = _Control(), PipelineStats()
    free: queue.Queue[InputBuffer] = queue.Queue()
    for _ in range(queue_size + 2):  # one being filled, queue_size waiting, one in inference
        free.put(InputBuffer(width, height, model.input_dtype))
    inputs: queue.Queue[Any] = queue.Queue(queue_size)
    outputs: list[queue.Queue[Any]] = [queue.Queue(queue_size) for _ in sinks]
    need_foreground = any(s.needs_foreground for s in sinks)

    def read() -> None:
        detector = SceneCut(scene_cut)
        try:
            for frame in frames:
                buffer = ctl.get(free)
                cut = detector(frame)
                if cut:
                    log.info("scene cut before frame %d (difference %.3f): state reset",
                             stats.frames, detector.last_score)
                buffer.fill(frame)
                ctl.put(inputs, (buffer, cut))
            ctl.put(inputs, _END)
        except BaseException as exc:
            ctl.fail(exc)

    def write(sink: Sink, q: queue.Queue[Any]) -> None:
        try:
            while (matte := ctl.get(q)) is not _END:
                sink.writer.write(sink.convert(matte))
        except BaseException as exc:
            ctl.fail(exc)

    threads = [threading.Thread(target=read, name="matting-read", daemon=True)]
    threads += [threading.Thread(target=write, args=(s, q), name=f"matting-{s.name}", daemon=True)
                for s, q in zip(sinks, outputs, strict=True)]
    for t in threads:
        t.start()
    try:
        while (item := ctl.get(inputs)) is not _END:
            buffer, cut = item
            if cut:
                model.reset()
                stats.scene_cuts += 1
            fgr, pha = model.infer(buffer.array, ratio)
            matte = Matte(stats.frames, to_alpha(pha), to_foreground(fgr) if need_foreground else None)
            free.put(buffer)
            for q in outputs:
                ctl.put(q, matte)
            stats.frames += 1
            if on_frame is not None:
                on_frame(stats.frames)
        for q in outputs:
            ctl.put(q, _END)
    except BaseException as exc:
        ctl.fail(exc)
    finally:
        _join(threads, sinks, ctl)
    if ctl.error is not None:
        raise ctl.error
    return stats


def _join(threads: Sequence[threading.Thread], sinks: Sequence[Sink], ctl: _Control) -> None:
    """Join every thread; a writer stuck in ffmpeg after a failure is aborted to unblock it."""
    for t in threads:
        t.join(_JOIN_S if ctl.stop.is_set() else None)
    if any(t.is_alive() for t in threads):
        log.warning("a pipeline thread did not stop within %.0f s: aborting the writers", _JOIN_S)
        for s in sinks:
            s.writer.abort()
        for t in threads:
            t.join()
