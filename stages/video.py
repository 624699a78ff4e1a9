"""Shared video I/O for stages: read a video file or an image folder, write through ffmpeg.

``VideoReader`` yields BGR uint8 HxWx3 frames from anything OpenCV can decode, or from a folder of
numbered images. ``VideoWriter`` pipes BGR frames into the ffmpeg binary shipped by
``imageio-ffmpeg`` and publishes the file with an atomic rename, so a reader of the final path
never sees a half-written file (``docs/glossary.md``: final output).

Codec presets (``Codec``), measured on the 720p demo clip with this machine's 2 cores:

- ``ffv1`` -> ``.mkv``, FFV1 level 3, intra-only, ``bgr0``: lossless (a cv2 round trip is
  bit-exact), the default for intermediates. ~1.4 MB/frame; encode ~35 fps, cv2 decode ~30 fps.
- ``utvideo`` -> ``.mkv``, Ut Video ``gbrp``: also bit-exact, ~12% larger than ffv1 but about 6x
  faster to decode (~185 fps) and 4x faster to encode: the better choice when decoding the
  intermediate would otherwise slow the next stage down.
- ``h264`` -> ``.mp4``, libx264 crf 16, ``yuv420p``: ~0.015 MB/frame and plays everywhere, but
  lossy and needs an even width and height (4:2:0 chroma).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from stages.events import ErrorKind
from stages.stage import StageError

log = logging.getLogger(__name__)

#: Image types a folder input may hold (``.exr`` only where this OpenCV build can read it).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".exr"})
_FALLBACK_FPS = 30.0


class VideoInputError(StageError):
    """The input is missing (INPUT_MISSING) or is not a readable video / has no frames (INPUT_INVALID)."""


class VideoOutputError(StageError):
    """A video could not be written (OUTPUT_ERROR), or the writer was asked for something impossible."""


def fps_fraction(fps: float | Fraction) -> Fraction:
    """An exact frame rate: ``29.97002997`` (as OpenCV reports 30000/1001) -> ``Fraction(30000, 1001)``."""
    return Fraction(fps).limit_denominator(1001)


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


def _read_image(path: Path) -> np.ndarray:
    """Read one image as BGR uint8; via imdecode so non-ASCII paths work on Windows too."""
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
    try:
        return to_bgr8(image)
    except ValueError as exc:
        raise VideoInputError(ErrorKind.INPUT_INVALID, f"{path}: {exc}") from None


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
            self._images = sorted(
                (p for p in self.path.iterdir()
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()),
                key=lambda p: _natural_key(p.name),
            )
            if not self._images:
                kinds = ", ".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
                raise VideoInputError(ErrorKind.INPUT_INVALID, f"no images ({kinds}) in folder {self.path}")
            first = _read_image(self._images[0])
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
                frame = _read_image(image)
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


class Codec(StrEnum):
    """Output codec presets of ``VideoWriter`` (see the module docstring)."""

    UTVIDEO = "utvideo"
    FFV1 = "ffv1"
    H264 = "h264"

    @property
    def suffix(self) -> str:
        """The file extension (container) this preset is written to by default."""
        return _PRESETS[self].suffix


@dataclass(frozen=True)
class _Preset:
    suffix: str
    args: tuple[str, ...]  # ffmpeg output options: codec, pixel format, quality
    even_size: bool


_PRESETS: dict[Codec, _Preset] = {
    Codec.FFV1: _Preset(".mkv", ("-c:v", "ffv1", "-level", "3", "-g", "1", "-pix_fmt", "bgr0"), False),
    Codec.UTVIDEO: _Preset(".mkv", ("-c:v", "utvideo", "-pix_fmt", "gbrp"), False),
    Codec.H264: _Preset(
        ".mp4", ("-c:v", "libx264", "-preset", "medium", "-crf", "16", "-pix_fmt", "yuv420p"), True
    ),
}


def _ffmpeg_exe() -> str:
    """The ffmpeg binary shipped with imageio-ffmpeg (or named by its IMAGEIO_FFMPEG_EXE variable)."""
    import imageio_ffmpeg  # deferred: locating the binary is only needed when writing

    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError as exc:  # no binary for this platform
        raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"no ffmpeg to write video with: {exc}") from None


class VideoWriter:
    """Writes BGR uint8 frames to ``path`` through ffmpeg; the file appears there only on success.

    Frames go to a temporary file in the same folder (``.<stem>.<random>.part<suffix>``, the suffix
    kept so ffmpeg picks the right muxer) that ``close()`` renames onto ``path`` once ffmpeg has
    exited cleanly. Any failure, or leaving the ``with`` block by an exception, kills ffmpeg, reaps
    it and deletes the temporary file. ``fps`` may be a ``Fraction`` for exact NTSC rates.
    """

    def __init__(self, path: Path | str, width: int, height: int, fps: float | Fraction,
                 codec: Codec | str = Codec.FFV1) -> None:
        self.path, self.codec = Path(path), Codec(codec)
        self.width, self.height = int(width), int(height)
        self.fps = fps_fraction(fps)
        self.frames_written = 0
        self._proc: subprocess.Popen[bytes] | None = None
        preset = _PRESETS[self.codec]
        if self.width <= 0 or self.height <= 0 or not self.fps > 0:
            raise VideoOutputError(ErrorKind.BAD_ARGUMENT,
                                   f"size and fps must be positive, got {width}x{height} @ {fps}")
        if preset.even_size and (self.width % 2 or self.height % 2):
            raise VideoOutputError(
                ErrorKind.BAD_ARGUMENT,
                f"{self.codec.value} needs an even width and height, got {self.width}x{self.height} "
                f"(resize to an even size or use {Codec.FFV1.value})",
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            message = f"cannot create the folder {self.path.parent}: {exc}"
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR, message) from None
        # ffmpeg creates it, so it gets the usual permissions (mkstemp's would be 0600)
        temp_name = f".{self.path.stem}.{secrets.token_hex(4)}.part{self.path.suffix}"
        self.temp_path = self.path.with_name(temp_name)
        exe = _ffmpeg_exe()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: no deadlock
        cmd = [
            exe, "-hide_banner", "-nostats", "-v", "warning", "-y",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{self.width}x{self.height}",
            "-r", f"{self.fps.numerator}/{self.fps.denominator}", "-i", "-", "-an",
            *preset.args, str(self.temp_path),
        ]
        log.debug("ffmpeg: %s", cmd)
        no_window = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr, creationflags=no_window)
        except OSError as exc:
            self._cleanup()
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"cannot start ffmpeg: {exc}") from None

    def write(self, frame: np.ndarray) -> None:
        """Append one BGR uint8 frame of exactly the writer's size."""
        if self._proc is None or self._proc.stdin is None:
            raise VideoOutputError(ErrorKind.INTERNAL, f"writer for {self.path} is closed")
        if frame.dtype != np.uint8 or frame.shape != (self.height, self.width, 3):
            raise ValueError(f"expected a {self.height}x{self.width}x3 uint8 frame, got {frame.shape} "
                             f"{frame.dtype}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).data)
        except OSError:  # ffmpeg exited early (BrokenPipe; EINVAL on Windows)
            self._finish(self._proc, timeout=5.0)
            message = self._error(f"ffmpeg stopped accepting frames for {self.path}")
            self.abort()
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR, message) from None
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file and move it onto ``path``; raises VideoOutputError if anything failed."""
        if self._proc is None:
            return
        try:
            if self.frames_written == 0:
                raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"no frames were written to {self.path}")
            code = self._finish(self._proc)
            if code != 0:
                raise VideoOutputError(ErrorKind.OUTPUT_ERROR,
                                       self._error(f"ffmpeg failed writing {self.path} (exit code {code})"))
            try:
                os.replace(self.temp_path, self.path)
            except OSError as exc:
                raise VideoOutputError(ErrorKind.OUTPUT_ERROR,
                                       f"cannot replace {self.path} (open elsewhere?): {exc}") from None
        except BaseException:
            self.abort()
            raise
        self._proc = None
        warnings = self._error("")
        self._stderr.close()
        if warnings:
            log.warning("ffmpeg (%s): %s", self.path.name, warnings)
        log.info("wrote %s (%d frames, %dx%d @ %s fps, %s)", self.path, self.frames_written,
                 self.width, self.height, self.fps, self.codec.value)

    def abort(self) -> None:
        """Stop ffmpeg at once and delete the temporary file; ``path`` is left untouched (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            proc.wait()
        self._cleanup()

    @staticmethod
    def _finish(proc: subprocess.Popen[bytes], timeout: float | None = None) -> int | None:
        """Close ffmpeg's input and wait for it to exit; its exit code (None if still running)."""
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _error(self, message: str) -> str:
        """``message`` plus the end of ffmpeg's error output, if it wrote any."""
        detail = ""
        if not self._stderr.closed:
            self._stderr.seek(0)
            detail = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
        return f"{message}: {detail}" if message and detail else message or detail

    def _cleanup(self) -> None:
        if hasattr(self, "_stderr"):
            self._stderr.close()
        try:
            self.temp_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.temp_path, exc)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            with contextlib.suppress(Exception):  # at interpreter shutdown nothing more can be done
                log.warning("VideoWriter for %s was never closed; discarding it", self.path)
                self.abort()
