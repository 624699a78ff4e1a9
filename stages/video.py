"""Shared video I/O for stages: read a video file or an image folder; probe files; write via ffmpeg.

``VideoReader`` yields BGR uint8 HxWx3 frames from anything OpenCV can decode, or from a folder of
numbered images. ``probe`` / ``has_audio`` ask the ffmpeg shipped by ``imageio-ffmpeg`` what a file
holds. Writing (``VideoWriter``, ``Codec``, ``AudioSource``) lives in ``cuepipe.stages.videowriter`` and is
re-exported here; its docstring lists the codec presets and what each costs.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import cv2
import numpy as np

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.protocol import WarningKind
from cuepipe.stages.stage import StageError, StageEvents
from cuepipe.stages.videowriter import (
    NO_WINDOW,
    AudioSource,
    Codec,
    VideoOutputError,
    VideoWriter,
    ffmpeg_exe,
    fps_fraction,
    reap,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "AudioSource",
    "Codec",
    "DataExtent",
    "InputTruncated",
    "VideoInfo",
    "VideoInputError",
    "VideoOutputError",
    "VideoReader",
    "VideoWriter",
    "check_complete",
    "convert_image",
    "data_extent",
    "decode_image",
    "fps_fraction",
    "has_audio",
    "list_images",
    "probe",
    "read_image",
    "to_bgr8",
]

log = logging.getLogger(__name__)

#: Image types a folder input may hold (``.exr`` only where this OpenCV build can read it).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".exr"})
_FALLBACK_FPS = 30.0


class VideoInputError(StageError):
    """The input is missing (INPUT_MISSING) or is not a readable video / has no frames (INPUT_INVALID)."""


class InputTruncated(VideoInputError):
    """INPUT_INVALID: the file decoded fewer frames than its container declares, and its data ends early."""

    def __init__(self, message: str, decoded: int, declared: int) -> None:
        super().__init__(ErrorKind.INPUT_INVALID, message)
        self.decoded, self.declared = decoded, declared


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Convert a gray / BGRA / 16-bit / float (0..1) image to BGR uint8 HxWx3 (no copy if already so)."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype.kind == "f":
        image = (np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"unsupported image shape {image.shape}")


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting ``img2.png`` before ``img10.png`` (numbers compare as numbers)."""
    return [(0, int(c)) if c.isdigit() else (1, c.lower()) for c in re.split(r"(\d+)", name) if c]


def list_images(folder: Path) -> list[Path]:
    """The images in ``folder`` in natural order (hidden files skipped); INPUT_INVALID if there are none."""
    images = sorted(
        (p for p in folder.iterdir()
         if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
        key=lambda p: _natural_key(p.name),
    )
    if not images:
        kinds = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"no images ({kinds}) in folder {folder}")
    return images


def decode_image(path: Path) -> np.ndarray:
    """One image as stored (gray / BGR / BGRA, 8 or 16 bit); JPEGs turned by their EXIF orientation.

    Via imdecode, so non-ASCII paths work on Windows too. The one decode path of both readers.
    """
    suffix = path.suffix.lower()
    if suffix == ".exr" and not cv2.haveImageReader(str(path)):
        raise VideoInputError(
            ErrorKind.INPUT_INVALID,
            f"{path}: this OpenCV cannot read EXR (set OPENCV_IO_ENABLE_OPENEXR=1 before starting)",
        )
    flags = cv2.IMREAD_COLOR if suffix in (".jpg", ".jpeg") else cv2.IMREAD_UNCHANGED  # jpg: EXIF rotate
    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), flags)
    except (OSError, cv2.error) as exc:
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"{path}: cannot read image: {exc}") from None
    if image is None:
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"{path}: not a readable image")
    return image


def convert_image(path: Path, image: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``convert(image)`` (e.g. to_bgr8), its ValueError turned into INPUT_INVALID naming ``path``."""
    try:
        return convert(image)
    except ValueError as exc:
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"{path}: {exc}") from None


def read_image(path: Path) -> np.ndarray:
    """Read one image as BGR uint8."""
    return convert_image(path, decode_image(path), to_bgr8)


class VideoReader:
    """Frames of a video file or of a folder of numbered images, as BGR uint8 HxWx3 arrays.

    Opening reads the first frame, so a reader that opened has at least one frame and knows its
    size. ``frame_count`` is exact for image folders but only an estimate for files (OpenCV derives
    it from the container's duration and frame rate; -1 if unknown): count what you read when it
    matters, and ``check_complete`` it. ``fps`` falls back to 30 (with a warning) when a file reports
    none. ``position``: how many source frames the last pass got through (decoded or skipped).
    Iterating again starts from the first frame (one iteration at a time: they share the decoder).
    """

    def __init__(self, path: Path | str, image_fps: float = 30.0) -> None:
        self.path = Path(path)
        self._cap: cv2.VideoCapture | None = None
        self._first: np.ndarray | None = None
        self._images: list[Path] = []
        self.position = 0
        if not self.path.exists():
            raise VideoInputError(ErrorKind.INPUT_MISSING, f"input not found: {self.path}")
        if not image_fps > 0:
            raise StageError(ErrorKind.BAD_ARGUMENT, f"image fps must be > 0, got {image_fps}")
        if self.path.is_dir():
            self._images = list_images(self.path)
            first = read_image(self._images[0])
            self.fps = float(image_fps)
            self.frame_count = len(self._images)
        else:
            self._cap = self._open_capture()
            ok, frame = self._cap.read()
            if not ok or frame is None:
                self.close()
                raise VideoInputError(ErrorKind.INPUT_INVALID, f"no readable frames in {self.path}")
            first = to_bgr8(frame)
            fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
            if not 0.0 < fps < 1000.0:
                log.warning("%s has no usable frame rate (%r); assuming %g", self.path, fps, _FALLBACK_FPS)
                fps = _FALLBACK_FPS
            self.fps = fps
            count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            self.frame_count = count if count > 0 else -1
        self._first = first
        self.height, self.width = first.shape[:2]
        self.is_image_folder = bool(self._images)

    def _open_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise VideoInputError(ErrorKind.INPUT_INVALID, f"not a readable video: {self.path}")
        return cap

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.frames()

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Yield frames ``start`` <= i < ``stop`` (skipped frames of a file are decoded, not converted)."""
        if self._images:
            self.position = min(start, len(self._images))
            for image in self._images[start:stop]:
                frame = read_image(image)
                if frame.shape[:2] != (self.height, self.width):
                    raise VideoInputError(
                        ErrorKind.INPUT_INVALID,
                        f"{image}: size {frame.shape[1]}x{frame.shape[0]} differs from the first image's "
                        f"{self.width}x{self.height}",
                    )
                self.position += 1
                yield frame
            return
        cap, first = self._cap, self._first
        self._first = None
        if cap is None or first is None:  # a second pass (or after close()): start again
            if cap is not None:
                cap.release()
            cap = self._cap = self._open_capture()
        index = self.position = 0
        if first is not None:  # frame 0 was decoded when opening
            index = self.position = 1
            if start == 0 and (stop is None or stop > 0):
                yield first
        while stop is None or index < stop:
            if index < start:
                if not cap.grab():
                    return
                index = self.position = index + 1
            else:
                ok, frame = cap.read()
                if not ok or frame is None:
                    return
                index = self.position = index + 1
                yield to_bgr8(frame)

    def close(self) -> None:
        """Release the decoder (idempotent)."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._first = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` found in a video file or image folder (its first video stream)."""

    width: int
    height: int
    fps: float | None  # as ffmpeg prints it (two decimals: 29.97); None for an image folder
    frames: int | None  # counted when asked (folders: always); None when not counted
    pix_fmt: str  # e.g. yuv420p, rgba, yuva444p12le (ProRes decodes to 12 bits)
    codec: str  # e.g. h264, hap, prores, png, utvideo
    has_audio: bool
    duration: float | None  # the container's duration in seconds; None if it has none
    audio_codec: str | None = None  # the first audio stream's codec, e.g. aac, pcm_s16le


_VIDEO_LINE = re.compile(r"Stream #0:\d+\S*: Video: (?P<codec>\w+)[^\n]*?, (?P<pix>\w+)(?:\([^)\n]*\))?, "
                         r"(?P<w>\d+)x(?P<h>\d+)[^\n]*")
_AUDIO_LINE = re.compile(r"Stream #0:\d+\S*: Audio: (\w+)")
_FPS = re.compile(r"([\d.]+)(k?) (?:fps|tbr)")
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


def _ffmpeg_input_report(path: Path, extra: Sequence[str] = (), timeout: float = 120.0) -> tuple[str, str]:
    """What ffmpeg prints about ``path`` as its input: (the ``Input #0`` section, all of stderr)."""
    if not path.exists():
        raise VideoInputError(ErrorKind.INPUT_MISSING, f"not found: {path}")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), *extra]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout, creationflags=NO_WINDOW)
    except subprocess.TimeoutExpired:
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"ffmpeg took over {timeout:g} s to read {path}") from None
    except OSError as exc:
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"cannot run ffmpeg: {exc}") from None
    text = proc.stderr.decode("utf-8", "replace")
    section = re.split(r"\nStream mapping:|\nOutput #0", text, maxsplit=1)[0]
    return section, text


def has_audio(path: Path) -> bool:
    """Whether ``path`` holds at least one audio stream (an image folder has none)."""
    path = Path(path)
    if path.is_dir():
        return False
    return bool(_AUDIO_LINE.search(_ffmpeg_input_report(path)[0]))


def probe(path: Path, count_frames: bool = False) -> VideoInfo:
    """Size, rate, pixel format, codec, audio and duration of a video file or image folder.

    ``count_frames`` counts the video packets by demuxing the whole file (stream copy, no decoding:
    cheap in CPU, but it reads every byte). Image folders: the first image is probed, all counted.
    """
    path = Path(path)
    images = list_images(path) if path.is_dir() else []
    extra = ["-map", "0:v:0", "-c", "copy", "-f", "null", "-"] if count_frames and not images else []
    section, text = _ffmpeg_input_report(images[0] if images else path, extra)
    video = _VIDEO_LINE.search(section)
    if video is None:
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"no video stream in {path}")
    fps = _FPS.search(video.group(0))
    duration = _DURATION.search(section)
    audio = None if images else _AUDIO_LINE.search(section)
    frames: int | None = len(images) if images else None
    if extra:
        counted = re.findall(r"frame=\s*(\d+)", text)
        frames = int(counted[-1]) if counted else None
    return VideoInfo(
        width=int(video["w"]), height=int(video["h"]),
        fps=None if images or fps is None else float(fps[1]) * (1000 if fps[2] else 1),
        frames=frames, pix_fmt=video["pix"], codec=video["codec"],
        has_audio=audio is not None,
        duration=None if images or duration is None else
        int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3]),
        audio_codec=None if audio is None else audio[1],
    )


@dataclass(frozen=True)
class DataExtent:
    """How long a container says it is, and where its video and audio packets really end (seconds)."""

    duration: float | None  # None: the container declares none (or ffmpeg only estimated it from the bitrate)
    end: float | None  # the latest packet end over its video and audio streams; None: no packet

    def covers(self, declared_frames: int) -> bool:
        """Whether the packets last the declared duration, give or take three frames and 1 %."""
        if self.duration is None or self.end is None or declared_frames <= 0:
            return self.duration is None and self.end is not None  # nothing declared: nothing missing
        slack = max(3 * self.duration / declared_frames, 0.01 * self.duration)
        return self.end >= self.duration - slack


_PACKET = re.compile(r"^(\d+),\s*(-?\d+),\s*(-?\d+),\s*(\d+),")
_TIME_BASE = re.compile(r"^#tb (\d+): (\d+)/(\d+)")
_NO_TIMESTAMP = -(2**62)  # AV_NOPTS_VALUE prints as -2**63


def data_extent(path: Path) -> DataExtent | None:
    """The declared duration of ``path`` and where its packets end; None if ffmpeg cannot demux it.

    Lists every video and audio packet (stream copy into ffmpeg's ``framecrc``: no decoding, but it
    reads every byte), as ffmpeg's own timestamps relative to the start, so the two compare.
    """
    path = Path(path)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-i", str(path),
           "-map", "0:v", "-map", "0:a?", "-c", "copy", "-f", "framecrc", "-"]
    bases: dict[int, float] = {}
    end: float | None = None
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: ffmpeg never blocks on it
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    creationflags=NO_WINDOW)
        except OSError as exc:
            log.warning("cannot run ffmpeg on %s: %s", path, exc)
            return None
        stdout = cast(IO[bytes], proc.stdout)
        try:
            for raw in stdout:
                line = raw.decode("ascii", "replace")
                packet = _PACKET.match(line)
                if packet is None:
                    base = _TIME_BASE.match(line)
                    if base:
                        bases[int(base[1])] = int(base[2]) / int(base[3])
                    continue
                stream, dts, pts, length = (int(x) for x in packet.groups())
                stamp = max(dts, pts)
                if stamp > _NO_TIMESTAMP and stream in bases:
                    packet_end = (stamp + length) * bases[stream]
                    end = packet_end if end is None else max(end, packet_end)
            code = proc.wait()
        finally:
            reap(proc, stdout)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    if code != 0:
        log.warning("ffmpeg could not demux %s (exit code %d): %s", path, code, text[-500:].strip())
        return None
    declared = _DURATION.search(text)
    estimated = "Estimating duration from bitrate" in text
    duration = None if declared is None or estimated else (
        int(declared[1]) * 3600 + int(declared[2]) * 60 + float(declared[3]))
    return DataExtent(duration, end)


def check_complete(path: Path, declared: int, decoded: int, *, allow: bool, events: StageEvents | None = None,
                   start: int = 0, stop: int | None = None) -> str | None:
    """Raise InputTruncated (INPUT_INVALID) if a file input decoded fewer frames than its container declares.

    ``declared``: the reader's ``frame_count``; ``decoded``: the source frames the decoder got
    through; ``start``/``stop``: the range that was asked for (a trim ending early on purpose is not
    a shortfall). The declared count is exact in mp4/mov (their sample count) but only estimated
    (duration x fps) elsewhere, and it exceeds the frames of legitimate files (an mkv whose audio
    runs longer, variable frame rate, a stream-copy cut's edit list). So a shortfall is confirmed by
    ``data_extent``: the file is truncated when its packets end before its declared duration by
    more than three frames and 1 %, or cannot be demuxed. With ``allow`` it is accepted: a
    ``stage/warning`` (``input_truncated``) is sent and its text returned. None when complete.
    """
    path = Path(path)
    wanted = declared if stop is None else min(stop, declared)
    if path.is_dir() or declared <= 0 or start >= wanted or decoded >= wanted:
        return None
    extent = data_extent(path)
    detail = ""
    if extent is not None:
        if extent.duration is None:
            log.info("%s: %d of %d frames, but its container declares no duration: not truncated",
                     path, decoded, declared)
            return None
        if extent.covers(declared):
            log.info("%s: %d of %d (estimated) frames; its data lasts its whole %.2f s: complete",
                     path, decoded, declared, extent.duration)
            return None
        detail = f"its data ends at {extent.end or 0.0:.2f} s of {extent.duration:.2f} s"
    else:
        detail = "ffmpeg cannot read it to its end either"
    what = f"{path}: input truncated: decoded {decoded} of {declared} frames the container declares ({detail})"
    if not allow:
        raise InputTruncated(f"{what}; set allow_truncated = true to accept", decoded, declared)
    message = f"{what}; accepted (allow_truncated)"
    if events is not None:
        events.warning(WarningKind.INPUT_TRUNCATED, message)
    else:
        log.warning("%s", message)
    return message
