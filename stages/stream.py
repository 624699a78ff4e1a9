"""Streams between stages: the next stage takes frames from a frame ring while the previous one makes them.

A streamed pipeline (``stream = true`` in ``pipelines.toml``) starts its stages together. The launcher
names one ring per edge and gives the upstream stage ``--stream-out NAME`` and the downstream one
``--input ring://NAME``::

    python -m cuepipe.stages.preprocess --input clip.mp4 --output-dir w/0 --stream-out cp1a2b3c4d5e6f &
    python -m cuepipe.stages.matting --input ring://cp1a2b3c4d5e6f --output-dir w/1 --outputs alpha

The upstream stage writes the frames of its first output (the next stage's input) into the ring
instead of that output's file, exactly as it would have given them to the file's encoder (BGR,
BGRA or gray uint8; policy ``block``: nothing is dropped), and describes the stream in the ring's
info area: frame rate, expected frame count, and the audio the file would have carried (as an
``AudioSource``: the downstream stage muxes it from the original file). The downstream stage reads
the frames as its file reader would have decoded them from a lossless intermediate, so a streamed
job's outputs are the same, bit for bit, as a sequential one's (``tests/test_stream.py``).

End of stream: the writer closes the ring after its last frame (it waits for the reader to have
attached); the reader drains it and stops. A failure or an interrupt on either side ends the other
with ``stream_broken`` within ~0.1 s (the ring's abort state and peer checks, ``stages/ring.py``),
and the launcher stops every stage of the job and removes any ring a killed process left behind.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.framepipe import ClosedOrAborted, FrameWriter
from cuepipe.stages.ring import (
    EndOfStream,
    RingError,
    RingGeometryError,
    RingNotFound,
    RingPolicy,
    RingReader,
    RingTimeout,
    RingWriter,
)
from cuepipe.stages.stage import STREAM_SCHEME, StageError, is_stream
from cuepipe.stages.videowriter import AudioSource, Codec, VideoWriter

__all__ = ["StreamInfo", "StreamReader", "StreamWriter", "output_writer", "ring_name", "stream_url"]

log = logging.getLogger(__name__)

SLOTS = 4  # frames in flight between two stages: enough to ride out jitter, little memory (4 x 3.7 MB at 720p BGRA)
ATTACH_WAIT_S = 300.0  # how long a reader waits for its writer to create the ring (the upstream opens its input)
WAIT_S = 24 * 3600.0  # how long one end waits for the other's next step: the launcher's timeouts govern
_SLICE_S = 0.25  # waits run in slices, so that abort() from another thread is taken within one


def stream_url(name: str) -> str:
    return f"{STREAM_SCHEME}://{name}"


def ring_name(url: str | Path) -> str:
    """``ring://NAME`` -> ``NAME`` (BAD_ARGUMENT for anything else)."""
    text = str(url)
    if not is_stream(text) or not text.partition("://")[2]:
        raise StageError(ErrorKind.BAD_ARGUMENT, f"not a stream URL (ring://NAME): {text!r}")
    return text.partition("://")[2]


def _broken(exc: RingError, what: str) -> StageError:
    """A ring failure as the stage reports it: a geometry mistake is a bug, everything else a broken stream."""
    kind = ErrorKind.INTERNAL if isinstance(exc, RingGeometryError) else ErrorKind.STREAM_BROKEN
    return StageError(kind, f"{what}: {exc}")


@dataclass(frozen=True)
class StreamInfo:
    """What a stream carries besides frames: written once by the upstream stage into the ring's info area."""

    fps: float
    frames: int  # expected frame count (-1: unknown)
    audio: AudioSource | None  # the audio the streamed output's file would have carried
    source: str  # the upstream stage's input, for messages

    def encode(self) -> bytes:
        audio = None if self.audio is None else {
            "path": str(self.audio.path), "start": self.audio.start, "duration": self.audio.duration}
        return json.dumps({"fps": self.fps, "frames": self.frames, "audio": audio, "source": self.source}).encode()

    @classmethod
    def decode(cls, data: bytes) -> StreamInfo:
        try:
            raw = json.loads(data.decode())
            audio = raw["audio"]
            return cls(float(raw["fps"]), int(raw["frames"]), None if audio is None else AudioSource(
                Path(audio["path"]), float(audio["start"]),
                None if audio["duration"] is None else float(audio["duration"])), str(raw["source"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StageError(ErrorKind.INPUT_INVALID, f"the stream's description is unreadable: {exc}") from None


class StreamReader:
    """A stage's input ``ring://NAME``, with the surface of ``VideoReader`` / ``RgbaReader``.

    ``channels``: 3 gives BGR frames (as ``VideoReader`` decodes a file), 4 BGRA (as ``RgbaReader``:
    alpha 255 when the stream has none). Attaches at once, waiting up to ``attach_wait_s`` for the ring.
    One pass: a stream cannot be read twice.
    """

    is_image_folder = False

    def __init__(self, url: str | Path, channels: int = 3, attach_wait_s: float = ATTACH_WAIT_S) -> None:
        if channels not in (3, 4):
            raise ValueError(f"channels must be 3 or 4, got {channels}")
        self.path = str(url)
        self.channels = channels
        self.position = 0
        self._read = False
        name = ring_name(url)
        deadline = time.monotonic() + attach_wait_s
        while True:
            try:
                self._ring = RingReader.attach(name, timeout_s=WAIT_S)
                break
            except RingNotFound:
                if time.monotonic() > deadline:
                    raise StageError(ErrorKind.STREAM_BROKEN, f"{self.path}: no stream appeared within "
                                     f"{attach_wait_s:g} s (is the stage that writes it running?)") from None
                time.sleep(0.02)
            except RingError as exc:
                raise _broken(exc, self.path) from None
        try:
            self.info = StreamInfo.decode(self._ring.info)
        except BaseException:
            self._ring.close()
            raise
        g = self._ring.geometry
        self.width, self.height, self.fps, self.frame_count = g.width, g.height, self.info.fps, self.info.frames
        self.has_alpha = g.channels == 4
        log.info("reading stream %s: %dx%d x%d, %g fps, %d frames expected, from %s", name, g.width, g.height,
                 g.channels, self.fps, self.frame_count, self.info.source)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.frames()

    def frames(self) -> Iterator[np.ndarray]:
        """Every frame until the writer's end of stream, converted to ``channels``."""
        import cv2

        if self._read:
            raise StageError(ErrorKind.INTERNAL, f"{self.path}: a stream is read once")
        self._read = True
        have = self._ring.geometry.channels
        to = {(1, 3): cv2.COLOR_GRAY2BGR, (1, 4): cv2.COLOR_GRAY2BGRA, (3, 4): cv2.COLOR_BGR2BGRA}.get(
            (have, self.channels))
        while True:
            try:
                image = self._ring.get().image
            except EndOfStream:
                return
            except RingError as exc:
                raise _broken(exc, f"{self.path} after {self.position} frames") from None
            self.position += 1
            if to is not None:
                image = cv2.cvtColor(image, to)
            elif have > self.channels:
                image = np.ascontiguousarray(image[..., :self.channels])
            yield image

    def close(self) -> None:
        self._ring.close()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamWriter(ClosedOrAborted):
    """A stage's first output sent to the stream ``name`` instead of its file: a ``FrameWriter`` for the
    frame pipeline and a context manager like ``VideoWriter`` (close on success, abort on an exception).

    ``write`` takes HxW (gray) or HxWxC uint8 frames of the given size; it waits while the reader is
    behind (policy ``block``). ``abort`` may come from another thread: a waiting ``write`` ends within
    a quarter of a second.
    """

    def __init__(self, name: str, width: int, height: int, channels: int, info: StreamInfo,
                 slots: int = SLOTS) -> None:
        self.name = name
        self.path = stream_url(name)
        self._lock = threading.Lock()
        self._aborted = False
        try:
            self._ring = RingWriter.create(slots, width, height, channels, RingPolicy.BLOCK, name=name,
                                           timeout_s=_SLICE_S, info=info.encode())
        except RingError as exc:
            raise _broken(exc, f"cannot create stream {name}") from None
        log.info("streaming %dx%d x%d at %g fps to %s", width, height, channels, info.fps, self.path)

    def _until(self, step: Any, what: str) -> None:
        """Run ``step`` (one wait slice) until it returns; abort and the overall wait are checked between slices."""
        deadline = time.monotonic() + WAIT_S
        while True:
            with self._lock:
                if self._aborted:
                    raise StageError(ErrorKind.STREAM_BROKEN, f"{self.path}: aborted")
                try:
                    step()
                    return
                except RingTimeout:
                    if time.monotonic() > deadline:
                        raise StageError(ErrorKind.STREAM_BROKEN, f"{self.path}: {what} for {WAIT_S:g} s") from None
                except RingError as exc:
                    raise _broken(exc, self.path) from None

    def write(self, frame: np.ndarray) -> None:
        image = frame[..., None] if frame.ndim == 2 else frame
        self._until(lambda: self._ring.put(image), "no reader took a frame")

    def close(self) -> None:
        """End of stream, once a reader has attached (the name is gone after this)."""
        self._until(self._ring.wait_for_reader, "no reader attached")
        with self._lock:
            self._ring.close()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            self._ring.abort()


def output_writer(path: Path, width: int, height: int, fps: float | Fraction, codec: Codec | str, channels: int,
                  audio: AudioSource | None, stream: tuple[str, StreamInfo] | None,
                  lazy: bool = True) -> AbstractContextManager[FrameWriter]:
    """The one way a frame stage opens an output's writer (a context manager): its file's ``VideoWriter``,
    or, when the launcher streams it (``stream``: the ring's name and what it carries), a ``StreamWriter``
    instead. ``lazy``: ffmpeg starts with the first frame (``VideoWriter``)."""
    if stream is not None:
        return StreamWriter(stream[0], width, height, channels, stream[1])
    return VideoWriter(path, width, height, fps, codec=Codec(codec), channels=channels, audio=audio, lazy=lazy)


def open_frames(input: str | Path, channels: int, image_fps: float = 30.0) -> Any:
    """The one way a frame stage opens its input: a stream, or a file / image folder (BGR: ``VideoReader``,
    BGRA: ``RgbaReader``)."""
    if is_stream(input):
        return StreamReader(input, channels)
    if channels == 3:
        from cuepipe.stages.video import VideoReader

        return VideoReader(input, image_fps=image_fps)
    from cuepipe.stages.rgba import RgbaReader

    return RgbaReader(input, image_fps=image_fps)


def input_audio(input: str | Path, reader: Any) -> AudioSource | None:
    """The audio an output made from ``input`` carries: a stream's (as described), a file's own, or none."""
    if isinstance(reader, StreamReader):
        return reader.info.audio
    if reader.is_image_folder:
        return None
    from cuepipe.stages.video import has_audio

    return AudioSource(Path(input)) if has_audio(Path(input)) else None


def check_input(input: str | Path, reader: Any, expected: int, frames: int, *, allow: bool, events: Any) -> None:
    """``check_complete`` for a file; a stream needs none (its writer checked its own input, and a stream that
    broke raised already)."""
    if isinstance(reader, StreamReader):
        return
    from cuepipe.stages.video import check_complete

    check_complete(Path(input), expected, frames, allow=allow, events=events)
