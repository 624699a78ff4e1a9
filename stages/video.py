"""Shared video I/O for stages: read a video file or an image folder; probe files; write via ffmpeg.

``VideoReader`` yields BGR uint8 HxWx3 frames from anything OpenCV can decode, or from a folder of
numbered images. ``probe`` / ``has_audio`` ask the ffmpeg shipped by ``imageio-ffmpeg`` what a file
holds. Writing (``VideoWriter``, ``Codec``, ``AudioSource``) lives in ``stages.videowriter`` and is
re-exported here; its docstring lists the codec presets and what each costs.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stages.events import ErrorKind
from stages.stage import StageError
from stages.videowriter import (
    NO_WINDOW,
    AudioSource,
    Codec,
    VideoOutputError,
    VideoWriter,
    ffmpeg_exe,
    fps_fraction,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "AudioSource",
    "Codec",
    "VideoInfo",
    "VideoInputError",
    "VideoOutputError",
    "VideoReader",
    "VideoWriter",
    "convert_image",
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
    matters. ``fps`` falls back to 30 (with a warning) when a file reports none.
    Iterating again starts from the first frame (one iteration at a time: they share the decoder).
    """

    def __init__(self, path: Path | str, image_fps: float = 30.0) -> None:
        self.path = Path(path)
        self._cap: cv2.VideoCapture | None = None
        self._first: np.ndarray | None = None
        self._images: list[Path] = []
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
            for image in self._images[start:stop]:
                frame = read_image(image)
                if frame.shape[:2] != (self.height, self.width):
                    raise VideoInputError(
                        ErrorKind.INPUT_INVALID,
                        f"{image}: size {frame.shape[1]}x{frame.shape[0]} differs from the first image's "
                        f"{self.width}x{self.height}",
                    )
                yield frame
            return
        cap, first = self._cap, self._first
        self._first = None
        if cap is None or first is None:  # a second pass (or after close()): start again
            if cap is not None:
                cap.release()
            cap = self._cap = self._open_capture()
        index = 0
        if first is not None:  # frame 0 was decoded when opening
            if start == 0 and (stop is None or stop > 0):
                yield first
            index = 1
        while stop is None or index < stop:
            if index < start:
                if not cap.grab():
                    return
            else:
                ok, frame = cap.read()
                if not ok or frame is None:
                    return
                yield to_bgr8(frame)
            index += 1

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
