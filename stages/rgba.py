"""Read video WITH its alpha channel: BGRA uint8 frames from any video file or image folder.

    with RgbaReader("matte_rgba.mkv") as reader:
        for frame in reader:          # HxWx4 BGRA; alpha 255 where the source has none
            ...

``cuepipe.stages.video.VideoReader`` decodes through OpenCV, which returns BGR only. Here a file is decoded
by the ffmpeg that ``imageio-ffmpeg`` ships (``-f rawvideo -pix_fmt bgra -``), in its own process,
so decoding also overlaps with the caller's work. Lossless sources (UT Video ``gbrap`` as written by
``VideoWriter(codec="utvideo", channels=4)``, PNG sequences, FFV1) come back bit-exact.

ffmpeg is started directly (not through ``imageio_ffmpeg.read_frames``) so that it stays in the
stage's process group, its exit code and stderr are checked, and ``close()`` always kills and
reaps it, also when iteration stops early. ``-fps_mode passthrough`` keeps every decoded frame:
ffmpeg neither drops nor repeats frames, so the count matches ``VideoReader``'s.

Metadata: ``width``/``height``/``has_alpha`` come from ``cuepipe.stages.video.probe`` (ffmpeg);
``fps`` and ``frame_count`` from OpenCV's container probe, as ``VideoReader`` reports them (exact
NTSC rates such as 30000/1001; the count is an estimate, -1 when unknown). A rotation stored in the
file (phone videos) is applied, as ``VideoReader`` does: the size is the displayed one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

import cv2
import numpy as np

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.stage import StageError
from cuepipe.stages.video import VideoInputError, convert_image, decode_image, list_images, probe
from cuepipe.stages.videowriter import ffmpeg_exe, reap, start_codec

__all__ = ["RgbaReader", "has_alpha_format", "to_bgra8"]

log = logging.getLogger(__name__)

_ALPHA_FORMATS = re.compile(r"^(yuva|gbrap|ya\d|rgba|bgra|argb|abgr|pal8)")  # ffmpeg pix_fmts that carry alpha
_FALLBACK_FPS = 30.0


def has_alpha_format(pix_fmt: str) -> bool:
    """Whether an ffmpeg pixel format name carries an alpha channel (``gbrap``, ``yuva444p10le``, ``rgba``...)."""
    return bool(_ALPHA_FORMATS.match(pix_fmt))


def to_bgra8(image: np.ndarray) -> np.ndarray:
    """Gray / gray+alpha / BGR / BGRA, 8- or 16-bit -> BGRA uint8 HxWx4 (alpha 255 where there is none)."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
    if image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        out = cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2BGRA)
        out[:, :, 3] = image[:, :, 1]
        return out
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    if image.ndim == 3 and image.shape[2] == 4:
        return image
    raise ValueError(f"unsupported image shape {image.shape}")


def _read_image(path: Path) -> np.ndarray:
    return convert_image(path, decode_image(path), to_bgra8)


class RgbaReader:
    """BGRA uint8 HxWx4 frames of a video file or a folder of numbered images (module docstring).

    ``has_alpha`` says whether the source stores alpha (else every alpha is 255). Iterating again
    starts a new decode from the first frame; one iteration at a time. Each frame is a new array.
    """

    def __init__(self, path: Path | str, image_fps: float = 30.0) -> None:
        self.path = Path(path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        if not self.path.exists():
            raise VideoInputError(ErrorKind.INPUT_MISSING, f"input not found: {self.path}")
        if not image_fps > 0:
            raise StageError(ErrorKind.BAD_ARGUMENT, f"image fps must be > 0, got {image_fps}")
        self._images = list_images(self.path) if self.path.is_dir() else []
        self.is_image_folder = bool(self._images)
        if self._images:
            raw = decode_image(self._images[0])
            first = convert_image(self._images[0], raw, to_bgra8)
            self.height, self.width = first.shape[:2]
            self.has_alpha = raw.ndim == 3 and raw.shape[2] in (2, 4)
            self.fps, self.frame_count = float(image_fps), len(self._images)
            return
        info = probe(self.path)
        self.width, self.height, self.has_alpha = info.width, info.height, has_alpha_format(info.pix_fmt)
        self.fps, self.frame_count = self._container_facts(info.fps)

    def _container_facts(self, probed_fps: float | None) -> tuple[float, int]:
        """(fps, estimated frame count) as OpenCV reads them from the container (see VideoReader); also
        the displayed size: ffmpeg, like OpenCV, applies a rotation stored in the file while decoding."""
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        try:
            opened = cap.isOpened()
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if opened else 0.0
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if opened else 0
            shown = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0))
        finally:
            cap.release()
        if opened and shown == (self.height, self.width) and shown != (self.width, self.height):
            self.width, self.height = shown  # rotated by 90 or 270 degrees for display
        if not 0.0 < fps < 1000.0:
            fps = probed_fps or 0.0
        if not 0.0 < fps < 1000.0:
            log.warning("%s has no usable frame rate; assuming %g", self.path, _FALLBACK_FPS)
            fps = _FALLBACK_FPS
        return fps, count if count > 0 else -1

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.frames()

    def frames(self) -> Iterator[np.ndarray]:
        """Yield every frame as BGRA uint8 HxWx4."""
        if self._images:
            for image in self._images:
                frame = _read_image(image)
                if frame.shape[:2] != (self.height, self.width):
                    raise VideoInputError(
                        ErrorKind.INPUT_INVALID, f"{image}: size {frame.shape[1]}x{frame.shape[0]} differs from "
                                                 f"the first image's {self.width}x{self.height}")
                yield frame
            return
        self.close()  # a second pass starts a fresh decoder
        proc = self._start()
        stdout = cast(io.BufferedIOBase, proc.stdout)
        size, count = self.width * self.height * 4, 0
        try:
            while True:
                frame = np.empty((self.height, self.width, 4), np.uint8)
                view, got = frame.data.cast("B"), 0
                while got < size:
                    n = stdout.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got < size:
                    if got:
                        log.warning("%s: the last frame is incomplete (%d of %d bytes); dropped", self.path, got, size)
                    break
                count += 1
                yield frame
            code = proc.wait()
            if code != 0 or count == 0:
                problem = f"exit code {code}" if code else "no frames"
                raise VideoInputError(ErrorKind.INPUT_INVALID,
                                      self._error_text(f"ffmpeg failed decoding {self.path} ({problem})"))
        finally:
            if self._proc is proc:  # not if a newer pass has started meanwhile
                self.close()

    def _start(self) -> subprocess.Popen[bytes]:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: no deadlock
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-v", "error", "-i", str(self.path),
               "-map", "0:v:0", "-an", "-sn", "-dn", "-fps_mode", "passthrough",
               "-f", "rawvideo", "-pix_fmt", "bgra", "-"]
        try:
            self._proc = start_codec(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
                                     bufsize=1 << 20)
        except OSError as exc:
            self.close()
            raise VideoInputError(ErrorKind.INPUT_INVALID, f"cannot start ffmpeg: {exc}") from None
        return self._proc

    def _error_text(self, message: str) -> str:
        if self._stderr is None or self._stderr.closed:
            return message
        self._stderr.seek(0)
        detail = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
        return f"{message}: {detail}" if detail else message

    def close(self) -> None:
        """Stop and reap the decoder (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            reap(proc, proc.stdout)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> RgbaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            with contextlib.suppress(Exception):
                self.close()
