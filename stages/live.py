"""Live inputs for frame stages: sources that run until stopped, newest frame first, and live numbers.

    with open_source("ndi://STUDIO (TouchDesigner)?ip=10.0.0.5") as source:  # or camera://0, or play://clip.mp4
        stats = LiveStats()
        while (frame := source.next(timeout_s=1.0)) is not None:
            ...                                               # inference, output
            stats.frame_out(frame.captured_ns)
            if stats.due():
                events.live(*stats.snapshot(source.dropped))

Inputs (``cuepipe.stages.stage.is_live`` tells them from files):

- ``ndi://NAME[?ip=...|?url=HOST:PORT]``: an NDI source (``stages/ndi.py``, the optional ``ndi`` extra);
  its timecode rides along so the output frame can carry it on;
- ``camera://N``: OpenCV capture device N (a webcam, a capture card);
- ``play://PATH[?loop=0]``: a video file played at its own frame rate, looped by default: a file
  standing in for a camera, for demos and tests.

Newest frame first: a reader thread takes frames from the source as fast as it delivers them and
keeps only the newest; the stage takes it when it is ready for one. A frame that was replaced
before the stage took it is **dropped** (counted). So when inference is slower than the source, the
output runs at inference speed with bounded latency instead of falling further behind.
Latency: from when a frame arrived from the source (``captured_ns``, monotonic) to when the stage
says it was sent on (``LiveStats.frame_out``).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.stage import LIVE_SCHEMES

__all__ = ["LiveError", "LiveFrame", "LiveSource", "LiveStats", "open_source"]

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0


class LiveError(CuepipeError):
    """A live input cannot be opened or read (bad URL, no camera, the source went away for good)."""

    kind = ErrorKind.INPUT_INVALID


@dataclass(frozen=True)
class LiveFrame:
    """One frame from a live source: BGR or BGRA uint8, when it arrived, and its source timecode."""

    image: np.ndarray
    captured_ns: int  # time.monotonic_ns() when the source delivered it
    seq: int  # the source's frame count (gaps are frames the stage never took)
    timecode: int  # to carry on to the output: the NDI input's timecode, else the capture time (100 ns units)


class _Reader(Protocol):
    def read(self) -> tuple[np.ndarray, int | None] | None: ...  # (image, timecode); None: nothing yet

    def close(self) -> None: ...


class LiveSource:
    """Newest-frame-first reading of one live input (module docstring); a context manager."""

    def __init__(self, reader: _Reader, name: str, now_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.name, self._reader, self._now_ns = name, reader, now_ns
        self._cond = threading.Condition()
        self._latest: LiveFrame | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self.received = 0  # frames the source delivered
        self.dropped = 0  # frames replaced before the stage took them
        self._thread = threading.Thread(target=self._pump, name=f"live-{name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while not self._stopping:
                got = self._reader.read()
                if got is None:
                    continue
                image, timecode = got
                if timecode is None:  # a camera or a file: the capture time, as NDI counts it (100 ns units)
                    timecode = time.time_ns() // 100
                frame = LiveFrame(image, self._now_ns(), self.received, timecode)
                with self._cond:
                    self.dropped += self._latest is not None
                    self._latest = frame
                    self.received += 1
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the stage's thread by next()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def next(self, timeout_s: float = 1.0) -> LiveFrame | None:
        """The newest frame not yet taken; None after ``timeout_s`` without one. Raises the reader's error."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._latest is None and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            frame, self._latest = self._latest, None
            return frame

    def __iter__(self) -> Iterator[LiveFrame]:
        """Frames until the source fails or the consumer stops iterating; waits through gaps."""
        while True:
            frame = self.next()
            if frame is not None:
                yield frame

    def close(self) -> None:
        self._stopping = True
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            log.warning("live source %s: its reader did not stop within 5 s", self.name)
        self._reader.close()

    def __enter__(self) -> LiveSource:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Player:
    """``play://``: a file's frames at its own frame rate, looped (a camera stand-in)."""

    def __init__(self, path: Path, loop: bool, sleep: Callable[[float], None] = time.sleep,
                 now: Callable[[], float] = time.monotonic) -> None:
        from cuepipe.stages.video import VideoReader

        self._reader = VideoReader(path)  # INPUT_MISSING / INPUT_INVALID for what is not a video
        self._period = 1.0 / self._reader.fps if self._reader.fps > 0 else 1.0 / 30
        self._loop, self._sleep, self._now = loop, sleep, now
        self._frames: Iterator[np.ndarray] = iter(self._reader)
        self._due = now()

    def read(self) -> tuple[np.ndarray, int | None] | None:
        frame = next(self._frames, None)
        if frame is None:
            if not self._loop:
                raise LiveError(f"{self._reader.path}: the file ended (play:// without loop)")
            self._frames = iter(self._reader)  # a second pass decodes again from the start
            frame = next(self._frames, None)
            if frame is None:
                raise LiveError(f"{self._reader.path}: no frames to play")
        self._due += self._period
        wait = self._due - self._now()
        if wait > 0:
            self._sleep(wait)
        else:
            self._due = self._now()  # fell behind (a slow decode): do not try to catch up in a burst
        return frame, None

    def close(self) -> None:
        self._reader.close()


class _Camera:
    """``camera://N``: an OpenCV capture device."""

    def __init__(self, index: int) -> None:
        import cv2

        self._cap = cv2.VideoCapture(index)
        if not self._cap.isOpened():
            self._cap.release()
            raise LiveError(f"camera {index} cannot be opened (no such device, or it is in use)")
        self._failures = 0

    def read(self) -> tuple[np.ndarray, int | None] | None:
        ok, frame = self._cap.read()
        if not ok:
            self._failures += 1
            if self._failures > 100:
                raise LiveError("the camera stopped delivering frames")
            time.sleep(0.01)
            return None
        self._failures = 0
        return frame, None

    def close(self) -> None:
        self._cap.release()


class _Ndi:
    """``ndi://``: frames from an ``NdiReceiver`` with their timecodes."""

    def __init__(self, url: str) -> None:
        from cuepipe.stages.ndi import NdiReceiver, parse_ndi_url

        self._receiver = NdiReceiver(parse_ndi_url(url))

    def read(self) -> tuple[np.ndarray, int | None] | None:
        frame = self._receiver.read(0.5)
        return None if frame is None else (frame.image, frame.timecode)

    def close(self) -> None:
        self._receiver.close()


def open_source(url: str, **options: Any) -> LiveSource:
    """A running ``LiveSource`` for ``ndi://``, ``camera://`` or ``play://`` (module docstring)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    reader: _Reader
    if parts.scheme == "ndi":
        reader = _Ndi(url)
    elif parts.scheme == "camera":
        try:
            reader = _Camera(int(parts.netloc or parts.path.strip("/") or "0"))
        except ValueError:
            raise LiveError(f"{url}: expected camera://N with a device number N") from None
    elif parts.scheme == "play":
        path = urllib.parse.unquote(parts.netloc + parts.path)
        reader = _Player(Path(path), loop=query.get("loop", ["1"])[0] not in ("0", "false", "no"), **options)
    else:
        raise LiveError(f"{url}: not a live input (expected one of {', '.join(s + '://' for s in LIVE_SCHEMES)})")
    return LiveSource(reader, url)


class LiveStats:
    """Output frames, frames/s and latency percentiles over the last ``STATS_INTERVAL_S`` or so."""

    def __init__(self, now_ns: Callable[[], int] = time.monotonic_ns, interval_s: float = STATS_INTERVAL_S) -> None:
        self._now_ns, self._interval = now_ns, int(interval_s * 1e9)
        self.frames = 0
        self._latencies: deque[float] = deque(maxlen=512)  # ms, of the frames since the last snapshot
        self._window: deque[int] = deque(maxlen=512)  # output times (ns) for the rate
        self._last = now_ns()

    def frame_out(self, captured_ns: int) -> None:
        t = self._now_ns()
        self.frames += 1
        self._latencies.append((t - captured_ns) / 1e6)
        self._window.append(t)

    def due(self) -> bool:
        return self._now_ns() - self._last >= self._interval

    def snapshot(self, dropped: int) -> tuple[int, float, int, float, float]:
        """(frames, fps, dropped, latency p50 ms, latency p95 ms) and a new window."""
        t = self._now_ns()
        self._last = t
        while self._window and t - self._window[0] > 2 * self._interval:
            self._window.popleft()
        span = (self._window[-1] - self._window[0]) / 1e9 if len(self._window) > 1 else 0.0
        fps = (len(self._window) - 1) / span if span > 0 else 0.0
        latencies = np.asarray(self._latencies) if self._latencies else np.zeros(1)
        p50, p95 = (float(v) for v in np.percentile(latencies, [50, 95]))
        self._latencies.clear()
        return self.frames, fps, dropped, p50, p95
