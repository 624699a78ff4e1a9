"""Write video through the ffmpeg that ``imageio-ffmpeg`` ships: codecs, alpha, audio, atomic output.

``VideoWriter`` pipes raw frames (gray, BGR or BGRA uint8) into one ffmpeg process and publishes
the result with an atomic rename, so a reader of the final path never sees a half-written file
(``docs/glossary.md``: final output). ffmpeg is started directly, not via
``imageio_ffmpeg.write_frames``, so that its exit code is checked, its stderr is captured for the
error message, it stays in the stage's process group (the launcher's tree kill reaches it) and it is
always reaped. ``cuepipe.stages.video`` re-exports everything here.

Codec presets (``Codec``); accepted input channels in brackets (1 gray, 3 BGR, 4 BGRA):

- ``utvideo`` -> ``.mkv`` [1, 3, 4], Ut Video ``gbrp`` / ``gbrap``: bit-exact, the default for
  intermediates; decodes at ~185 fps at 720p on 2 cores. Gray is stored as three equal planes.
- ``ffv1`` -> ``.mkv`` [1, 3, 4], FFV1 level 3, intra-only, ``gray`` / ``bgr0`` / ``bgra``:
  lossless and ~12% smaller, but ~6x slower to decode (~30 fps at 720p).
- ``h264`` -> ``.mp4`` [1, 3], libx264 ``ultrafast`` crf 16, ``yuv420p``: plays everywhere; lossy,
  even width and height only. Gray becomes luma with neutral chroma (a proper grayscale video,
  full-range gray mapped to TV range as players expect). ``ultrafast`` because the stage's
  inference needs the CPU: ``veryfast`` makes 4-9x smaller files for ~2x the encode CPU (below).
- ``hap_alpha`` -> ``.mov`` [3, 4], HAP Alpha (DXT5 + snappy): the codec TouchDesigner decodes on
  the GPU. Lossy (4x4-block texture compression); width and height must be multiples of 4.
- ``prores4444`` -> ``.mov`` [3, 4], ``prores_ks`` profile 4444 at fixed quantiser 4,
  ``yuva444p10le``: 10-bit alpha within 1 level; colour ~47 dB PSNR on a noisy clip (the encoder's
  default rate control: ~59 dB, but 4.5x the CPU and 2.2x the size); for editing software.
- ``png`` -> a FOLDER of ``frame_000000.png``... [1, 3, 4]: RGBA PNGs (BGR input: opaque alpha;
  gray input: 8-bit gray PNGs), zlib level 1, compressed inside the ffmpeg process; for TD's Movie
  File In TOP. Lossless, no frame rate stored, no audio. (Level 3: 5% smaller, 2x the CPU.)

BGR into an alpha codec gets an opaque alpha channel (ffmpeg's pixel-format conversion fills it).
Every encoder runs with ``ENCODER_THREADS`` threads (1 on 2 cores).

Encode cost per 1280x720 frame: ffmpeg's own CPU (user+sys, its own process, so it competes with
inference on 2 cores) and output size; 60 frames of ``cuepipe.stages.democlip``'s figure, 1 thread,
this 2-core machine (medians of noisy runs; one-off measurements while developing, not a ``bench/``
script):

=====================================================  ==========  ===========
what                                                   CPU ms      kB / frame
=====================================================  ==========  ===========
h264, 1 ch (alpha matte)                               4-5         4
h264, 3 ch composite over a colour                     7.5         38
h264, 3 ch composite over a textured, noisy image      10          73
h264 ``veryfast`` instead: matte / over colour         10 / 14     0.9 / 4
hap_alpha, 4 ch (``to_bgra``, transparent cleared)     7           113
prores4444, 4 ch (same)                                21-22       151
png, 4 ch (same)                                       21          306
the same three with the transparent area's colour      25 / 45 /   518 / 906 /
kept (``to_bgra(clear_transparent=False)``)            62          2033
utvideo / ffv1, 3 ch (intermediates)                   11 / 22     526 / 178
=====================================================  ==========  ===========

Python's side of ``write`` (copying the frame into the pipe) is 0.2-0.8 ms per frame.

Audio (``AudioSource``): the file's first audio stream, from ``start`` for ``duration`` seconds, is
muxed in the same ffmpeg process (``-ss``/``-t`` input options, ``-map 1:a:0?``: a file without
audio is not an error) and encoded per container (AAC 192k in mp4, 16-bit PCM in mov/mkv). With a
``duration`` the track is exactly that long (cut, or padded with silence where the file's audio
ends sooner): give the video's duration (frames / fps) when you know it. Without one it runs to the
end of the file's audio. The writer cannot cut the audio at the last frame itself: it learns where
that is only at ``close()``, and ffmpeg's ``-shortest`` cut depends on timing (measured: 0.1 s
(mkv) to 0.5 s (mp4) of extra audio when frames arrive at inference speed), and would cut the
VIDEO when the audio is the shorter stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.framepipe import ClosedOrAborted
from cuepipe.stages.stage import StageError

log = logging.getLogger(__name__)

class VideoOutputError(StageError):
    """A video could not be written (OUTPUT_ERROR), or the writer was asked for something impossible."""


def fps_fraction(fps: float | Fraction) -> Fraction:
    """An exact frame rate: ``29.97002997`` (as OpenCV reports 30000/1001) -> ``Fraction(30000, 1001)``."""
    return Fraction(fps).limit_denominator(1001)


def ffmpeg_exe() -> str:
    """The ffmpeg binary shipped with imageio-ffmpeg (or named by its IMAGEIO_FFMPEG_EXE variable)."""
    import imageio_ffmpeg  # deferred: locating the binary is only needed when ffmpeg runs

    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError as exc:  # no binary for this platform
        raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"no ffmpeg found: {exc}") from None


#: Windows: no console window flashes up for ffmpeg when the stage runs without one.
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
#: How much lower than the stage the ffmpeg processes that stream its frames run (POSIX niceness;
#: Windows: below-normal priority class). The model's threads then preempt the codec: on a busy
#: machine a stalled inference thread holds up every other one of its operator, a stalled encoder
#: only fills its queue (``bench/generate.py``, ``docs/performance.md``: +4 % at 720p on 2 cores).
CODEC_NICENESS = 4
_CODEC_FLAGS = NO_WINDOW | (getattr(subprocess, "BELOW_NORMAL_PRIORITY_CLASS", 0) if sys.platform == "win32" else 0)


def start_codec(cmd: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start an ffmpeg that streams frames (a decoder or an encoder) below the stage's priority."""
    proc = subprocess.Popen(cmd, creationflags=_CODEC_FLAGS, **popen)
    if hasattr(os, "setpriority"):  # POSIX; on Windows the creation flag did it
        try:
            os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + CODEC_NICENESS)
        except OSError as exc:  # it already exited (its error surfaces where it is read), or a policy refuses
            log.debug("could not lower ffmpeg's priority: %s", exc)
    return proc


def reap(proc: subprocess.Popen[bytes], pipe: IO[bytes] | None) -> None:
    """Stop an ffmpeg we started, now: kill it if it still runs, close our end of its pipe, wait for it
    (no zombie, and on Windows no open handle on its files). Safe on one that has already exited."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(OSError):
        if pipe is not None:
            pipe.close()
    proc.wait()
#: Encoder threads: 1 on 2 cores (the stage's inference needs them; more threads only add CPU), up to
#: 4 on big machines, where a fast GPU would otherwise wait for a single-threaded encoder.
ENCODER_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
_IN_PIX_FMT = {1: "gray", 3: "bgr24", 4: "bgra"}
_CHANNEL_NAMES = {1: "gray", 3: "BGR", 4: "BGRA"}
_AAC = ("-c:a", "aac", "-b:a", "192k")
_PCM = ("-c:a", "pcm_s16le")
PNG_PATTERN = "frame_%06d.png"  # numbered from 0; TouchDesigner: frame_$F6.png style sequences


class Codec(StrEnum):
    """Output codec presets of ``VideoWriter`` (see the module docstring)."""

    UTVIDEO = "utvideo"
    FFV1 = "ffv1"
    H264 = "h264"
    HAP_ALPHA = "hap_alpha"
    PRORES_4444 = "prores4444"
    PNG = "png"

    @property
    def suffix(self) -> str:
        """The file extension (container) this preset is written to; ``""`` for a PNG sequence folder."""
        return _PRESETS[self].suffix

    @property
    def channels(self) -> frozenset[int]:
        """The input channel counts this preset accepts (1 gray, 3 BGR, 4 BGRA)."""
        return frozenset(_PRESETS[self].pix_fmts)

    @property
    def is_sequence(self) -> bool:
        """True when the output is a folder of numbered images rather than one file."""
        return not _PRESETS[self].suffix


@dataclass(frozen=True)
class _Preset:
    suffix: str  # "" = a folder of numbered images
    args: tuple[str, ...]  # ffmpeg output options: codec, speed, quality (not the pixel format)
    pix_fmts: Mapping[int, str]  # input channels -> the pixel format encoded
    multiple: int = 1  # width and height must be multiples of this
    audio: tuple[str, ...] = _PCM  # audio codec options; () = no audio in this format


_PRESETS: dict[Codec, _Preset] = {
    Codec.UTVIDEO: _Preset(".mkv", ("-c:v", "utvideo"), {1: "gbrp", 3: "gbrp", 4: "gbrap"}),
    Codec.FFV1: _Preset(".mkv", ("-c:v", "ffv1", "-level", "3", "-g", "1"), {1: "gray", 3: "bgr0", 4: "bgra"}),
    Codec.H264: _Preset(".mp4", ("-c:v", "libx264", "-preset", "ultrafast", "-crf", "16"),
                        {1: "yuv420p", 3: "yuv420p"}, multiple=2, audio=_AAC),
    Codec.HAP_ALPHA: _Preset(".mov", ("-c:v", "hap", "-format", "hap_alpha"), {3: "rgba", 4: "rgba"}, multiple=4),
    Codec.PRORES_4444: _Preset(".mov", ("-c:v", "prores_ks", "-profile:v", "4444", "-q:v", "4", "-vendor", "apl0"),
                               {3: "yuva444p10le", 4: "yuva444p10le"}),
    Codec.PNG: _Preset("", ("-c:v", "png", "-compression_level", "1", "-f", "image2", "-start_number", "0"),
                       {1: "gray", 3: "rgba", 4: "rgba"}, audio=()),
}


@dataclass(frozen=True)
class AudioSource:
    """Audio to mux into a ``VideoWriter``'s output: ``path``'s first audio stream from ``start``
    seconds, exactly ``duration`` seconds long (padded with silence if the file's audio ends
    sooner), or to its end (None). See the module docstring: pass the video's duration if known."""

    path: Path
    start: float = 0.0
    duration: float | None = None

    def ffmpeg_input(self) -> list[str]:
        """ffmpeg input options and ``-i`` for this source (video, subtitles and data not read)."""
        if not self.start >= 0.0 or (self.duration is not None and not self.duration > 0.0):
            raise VideoOutputError(ErrorKind.BAD_ARGUMENT,
                                   f"audio start must be >= 0 and duration > 0, got {self.start}, {self.duration}")
        timing = ["-ss", f"{self.start:.6f}"] if self.start else []
        if self.duration is not None:
            timing += ["-t", f"{self.duration:.6f}"]
        return [*timing, "-vn", "-sn", "-dn", "-i", str(self.path)]

    def ffmpeg_filter(self) -> list[str]:
        """The audio filter option: pad to exactly ``duration`` (no filter without one)."""
        return [] if self.duration is None else ["-af", f"apad=whole_dur={self.duration:.6f}"]


def _error_text(stderr: IO[bytes], message: str) -> str:
    """``message`` plus the end of ffmpeg's error output, if it wrote any."""
    detail = ""
    if not stderr.closed:
        stderr.seek(0)
        detail = stderr.read()[-2000:].decode("utf-8", "replace").strip()
    return f"{message}: {detail}" if message and detail else message or detail


class VideoWriter(ClosedOrAborted):
    """Writes uint8 frames to ``path`` through ffmpeg; the output appears there only on success.

    ``channels``: 1 = gray HxW, 3 = BGR HxWx3, 4 = BGRA HxWx4; ``Codec.channels`` says which a codec
    takes. Frames go to a temporary name in the same folder (``.<stem>.<random>.part<suffix>``, the
    suffix kept so ffmpeg picks the right muxer; a folder for ``png``) that ``close()`` renames onto
    ``path`` once ffmpeg has exited cleanly (an existing PNG folder is swapped out, then deleted).
    Any failure, or leaving the ``with`` block by an exception, kills ffmpeg, reaps it and deletes
    the temporary output. ``fps`` may be a ``Fraction`` for exact NTSC rates. ``audio``: see
    ``AudioSource`` (ignored for PNG sequences).

    ``lazy``: start ffmpeg at the first ``write`` instead of now (everything else is checked now). A
    stage's frame pipeline writes its first frame only after inferring it, so the encoder's start
    (a process spawn and codec set-up, ~20-40 ms of CPU) no longer competes with the first inference
    of a warm trigger (``bench/serve.py``).
    """

    def __init__(self, path: Path | str, width: int, height: int, fps: float | Fraction,
                 codec: Codec | str = Codec.UTVIDEO, channels: int = 3, audio: AudioSource | None = None,
                 lazy: bool = False) -> None:
        self.path, self.codec, self.channels = Path(path), Codec(codec), channels
        self.width, self.height = int(width), int(height)
        self.fps = fps_fraction(fps)
        self.frames_written = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._cmd: list[str] | None = None  # until ffmpeg is started (lazy)
        preset = _PRESETS[self.codec]
        self._shape = (self.height, self.width) if channels == 1 else (self.height, self.width, channels)
        if self.width <= 0 or self.height <= 0 or not self.fps > 0:
            raise VideoOutputError(ErrorKind.BAD_ARGUMENT,
                                   f"size and fps must be positive, got {width}x{height} @ {fps}")
        if channels not in preset.pix_fmts:
            takes = " or ".join(f"{c} ({_CHANNEL_NAMES[c]})" for c in sorted(preset.pix_fmts))
            hint = " (it has no alpha: composite first, or use hap_alpha, prores4444 or png)" if channels == 4 else ""
            raise VideoOutputError(ErrorKind.BAD_ARGUMENT,
                                   f"{self.codec.value} takes {takes} channels, not {channels}{hint}")
        if self.width % preset.multiple or self.height % preset.multiple:
            need = "an even" if preset.multiple == 2 else f"a multiple of {preset.multiple} as"
            raise VideoOutputError(
                ErrorKind.BAD_ARGUMENT,
                f"{self.codec.value} needs {need} width and height, got {self.width}x{self.height} "
                f"(resize, or use {Codec.UTVIDEO.value})",
            )
        if audio is not None and not Path(audio.path).is_file():
            raise StageError(ErrorKind.INPUT_MISSING, f"audio source not found: {audio.path}")
        audio_args: list[str] = []
        if audio is not None and preset.audio:
            audio_args = [*audio.ffmpeg_input(), "-map", "0:v:0", "-map", "1:a:0?", *preset.audio,
                          *audio.ffmpeg_filter()]
        elif audio is not None:
            log.info("%s: a %s sequence has no audio; %s is not used", self.path, self.codec.value, audio.path)
        exe = ffmpeg_exe()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.temp_path = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.part{preset.suffix}")
            if self.codec.is_sequence:
                self.temp_path.mkdir()
        except OSError as exc:
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"cannot create {self.path}: {exc}") from None
        target = self.temp_path / PNG_PATTERN if self.codec.is_sequence else self.temp_path
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: no deadlock
        cmd = [
            exe, "-hide_banner", "-nostats", "-v", "warning", "-y",
            "-f", "rawvideo", "-pix_fmt", _IN_PIX_FMT[channels], "-s", f"{self.width}x{self.height}",
            "-r", f"{self.fps.numerator}/{self.fps.denominator}", "-i", "-",
            *(audio_args or ["-an"]), *preset.args, "-threads", str(ENCODER_THREADS),
            "-pix_fmt", preset.pix_fmts[channels], str(target),
        ]
        log.debug("ffmpeg: %s", cmd)
        self._cmd = cmd
        if not lazy:
            self._start()

    def _start(self) -> None:
        cmd, self._cmd = self._cmd, None
        assert cmd is not None  # called once, by __init__ or the first write
        try:
            self._proc = start_codec(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)
        except OSError as exc:
            self._cleanup()
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"cannot start ffmpeg: {exc}") from None

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 frame of exactly the writer's size and channel count."""
        if self._proc is None and self._cmd is not None:  # lazy: the first frame starts ffmpeg
            self._start()
        if self._proc is None or self._proc.stdin is None:
            raise VideoOutputError(ErrorKind.INTERNAL, f"writer for {self.path} is closed")
        if frame.dtype != np.uint8 or frame.shape != self._shape:
            raise ValueError(f"expected a {'x'.join(map(str, self._shape))} uint8 "
                             f"({_CHANNEL_NAMES[self.channels]}) frame, got {frame.shape} {frame.dtype}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).data)
        except OSError:  # ffmpeg exited early (BrokenPipe; EINVAL on Windows)
            self._finish(self._proc, timeout=5.0)
            message = _error_text(self._stderr, f"ffmpeg stopped accepting frames for {self.path}")
            self.abort()
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR, message) from None
        self.frames_written += 1

    def close(self) -> None:
        """Finish the output and move it onto ``path``; raises VideoOutputError if anything failed."""
        if self._proc is None and self._cmd is not None:  # lazy, and never started: no frame came
            self.abort()
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"no frames were written to {self.path}")
        if self._proc is None:
            return
        try:
            if self.frames_written == 0:
                raise VideoOutputError(ErrorKind.OUTPUT_ERROR, f"no frames were written to {self.path}")
            code = self._finish(self._proc)
            if code != 0:
                raise VideoOutputError(
                    ErrorKind.OUTPUT_ERROR, _error_text(self._stderr, f"ffmpeg failed writing {self.path} "
                                                                      f"(exit code {code})"))
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._proc = None
        warnings = _error_text(self._stderr, "")
        self._stderr.close()
        if warnings:
            log.warning("ffmpeg (%s): %s", self.path.name, warnings)
        log.info("wrote %s (%d frames, %dx%d @ %s fps, %s, %d channels)", self.path, self.frames_written,
                 self.width, self.height, self.fps, self.codec.value, self.channels)

    def _publish(self) -> None:
        """Rename the finished temporary output onto ``path`` (a folder: swap the old one out first)."""
        old = None
        try:
            if self.codec.is_sequence and (self.path.exists() or self.path.is_symlink()):
                old = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.old")
                os.replace(self.path, old)
            os.replace(self.temp_path, self.path)
        except OSError as exc:
            if old is not None and not self.path.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, self.path)  # put the previous output back
            raise VideoOutputError(ErrorKind.OUTPUT_ERROR,
                                   f"cannot replace {self.path} (open elsewhere?): {exc}") from None
        if old is not None:
            _remove(old)

    def abort(self) -> None:
        """Stop ffmpeg at once and delete the temporary output; ``path`` is left untouched (idempotent)."""
        proc, self._proc, self._cmd = self._proc, None, None
        if proc is not None:
            reap(proc, proc.stdin)
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

    def _cleanup(self) -> None:
        if hasattr(self, "_stderr"):
            self._stderr.close()
        if hasattr(self, "temp_path"):
            _remove(self.temp_path)

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None or getattr(self, "_cmd", None) is not None:
            with contextlib.suppress(Exception):  # at interpreter shutdown nothing more can be done
                log.warning("VideoWriter for %s was never closed; discarding it", self.path)
                self.abort()


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists; log (never raise) when that fails."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
