"""The ``preprocess`` stage: trim, re-time, rotate and resize a clip into one clean intermediate.

    python -m stages.preprocess --input clip.mp4 --output-dir work/ --report 127.0.0.1:7000 \\
        --width 1280 --height 720 --fit pad --fps 30 --start-seconds 1 --end-seconds 3

The input is a video file or a folder of numbered images (``--image-fps``, default 30). The output
is ``<output-dir>/preprocessed.mkv`` (``.mp4`` with ``--codec h264``). Every parameter is optional;
the defaults keep the source as it is.

Trim: source frame i is at time i / source_fps (a constant frame rate is assumed). ``start_frame``
/ ``end_frame`` select frames directly (end exclusive); ``start_seconds`` keeps frames at or after
that time and ``end_seconds`` frames before it. Frame and seconds bounds for the same end clash.
A range that reaches past the frames a truncated file still decodes, into those its container
declares, fails with ``input_invalid`` unless ``allow_truncated`` (``stages.video.check_complete``).

Frame rate (``fps``): for the M trimmed frames (M / source_fps seconds) the output has
``n = floor(M * fps / source_fps + 1/2)`` frames, and output frame k shows trimmed frame
``floor(k * source_fps / fps)``: the newest source frame at or before time k / fps. Frames are
dropped or repeated, never blended. Without ``fps`` all trimmed frames are kept at the source rate.

Geometry: ``rotate`` (clockwise) comes first, then the resize to ``width`` x ``height``. ``fit``:
``stretch`` ignores the aspect ratio, ``crop`` fills the frame and cuts the overflow (centred),
``pad`` (default) letterboxes with ``pad_color`` (centred). Giving only one of width / height keeps
the aspect ratio (the other is rounded to an even number) and makes ``fit`` irrelevant.

Audio: the source's first audio stream, from the first kept frame's time (``start / source_fps``)
for the output's duration (``n / fps``: the trimmed range's ``M / source_fps`` within half an output
frame, since resampling the frame rate keeps the duration), is muxed into the intermediate as
16-bit PCM (AAC in ``.mp4``) in the same ffmpeg process, padded with silence if the source's audio
is shorter. So it stays aligned and ends with the last frame, and later stages can carry it on as
it is (``stages.video.AudioSource(preprocessed.mkv)``). When the source's frame count is unknown the
audio runs to its end. Image folders and silent clips have none.

Codec: ``utvideo`` (default) is lossless RGB, so later stages see exactly these pixels (quality
loss between stages: none), and it decodes at ~185 fps at 720p on 2 cores, so reading the
intermediate never competes with inference. The cost is disk space: ~1.6 MB per 720p frame, about
48 MB per second at 30 fps (~100x h264). ``ffv1`` is lossless too, ~12% smaller but ~6x slower to
decode (~30 fps at 720p). ``h264`` (crf 16, yuv420p) is small and plays anywhere but is lossy
(chroma subsampling) and needs an even width and height. See ``stages/video.py``.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.events import ErrorKind
from stages.stage import (
    ALLOW_TRUNCATED,
    MAX_FRAME_SIDE,
    Param,
    StageError,
    StageEvents,
    StageResult,
    bad_argument,
    coerce_all,
    option,
    stage_main,
)

if TYPE_CHECKING:  # numpy, OpenCV and stages.video are imported in run(): reading PARAMS stays cheap
    import numpy as np

log = logging.getLogger(__name__)

NAME = "preprocess"
OUTPUT_STEM = "preprocessed"
CODECS = ("utvideo", "ffv1", "h264")  # the intermediate ones of stages.video.Codec (checked by a test)


class Fit(StrEnum):
    """How a source of another aspect ratio is fitted into ``width`` x ``height``."""

    STRETCH = "stretch"
    CROP = "crop"
    PAD = "pad"


PARAMS: dict[str, Param] = {
    "start_frame": Param(int, None, "first source frame to keep", minimum=0),
    "end_frame": Param(int, None, "source frame to stop before (exclusive)", minimum=1),
    "start_seconds": Param(float, None, "keep frames at or after this time", minimum=0.0),
    "end_seconds": Param(float, None, "keep frames before this time", minimum=0.0),
    "width": Param(int, None, "output width in pixels", minimum=1, maximum=MAX_FRAME_SIDE),
    "height": Param(int, None, "output height in pixels", minimum=1, maximum=MAX_FRAME_SIDE),
    "fit": Param(str, Fit.PAD.value, "stretch, crop or pad (letterbox)", choices=tuple(f.value for f in Fit)),
    "pad_color": Param(str, "#000000", "letterbox colour as #rrggbb"),
    "fps": Param(float, None, "output frame rate (frames are dropped or repeated)", minimum=0.0),
    "rotate": Param(int, 0, "clockwise rotation in degrees, before resizing", choices=(0, 90, 180, 270)),
    "image_fps": Param(float, 30.0, "frame rate of an image-folder input", minimum=0.0),
    "codec": Param(str, CODECS[0], "utvideo or ffv1 (lossless .mkv), or h264 (.mp4)", choices=CODECS),
    "allow_truncated": ALLOW_TRUNCATED,
}

_ROTATE = {90: "ROTATE_90_CLOCKWISE", 180: "ROTATE_180", 270: "ROTATE_90_COUNTERCLOCKWISE"}  # cv2 names
_HALF = Fraction(1, 2)


#: Colour names accepted besides ``#rrggbb`` where a colour is asked for (backgrounds).
NAMED_COLOURS = {"black": "#000000", "white": "#ffffff", "gray": "#808080", "grey": "#808080",
                 "green": "#00ff00", "blue": "#0000ff"}
#: Background values that are words, not files: colour names and the transparent ones.
BACKGROUND_WORDS = frozenset(NAMED_COLOURS) | {"none", "transparent", "alpha"}


def parse_color(text: str, name: str = "pad_color") -> tuple[int, int, int]:
    """``"#rrggbb"`` -> a BGR tuple; raises BAD_ARGUMENT naming parameter ``name`` for anything else."""
    m = re.fullmatch(r"#?([0-9a-fA-F]{2})([0-9a-fA-F]{2})([0-9a-fA-F]{2})", text.strip())
    if not m:
        raise bad_argument(name, f"expected a colour like #1a2b3c, got {text!r}")
    r, g, b = (int(x, 16) for x in m.groups())
    return b, g, r


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


@dataclass(frozen=True)
class Geometry:
    """A per-frame transform: rotate, crop a source rectangle, resize it, place it on the canvas."""

    rotate: int
    crop: tuple[int, int, int, int]  # x, y, w, h in the rotated source
    inner: tuple[int, int, int, int]  # x, y, w, h of the resized picture on the output canvas
    size: tuple[int, int]  # output width, height
    pad_bgr: tuple[int, int, int]

    @classmethod
    def plan(cls, src_w: int, src_h: int, rotate: int, width: int | None, height: int | None,
             fit: Fit, pad_bgr: tuple[int, int, int]) -> Geometry:
        sw, sh = (src_h, src_w) if rotate in (90, 270) else (src_w, src_h)
        if width is None or height is None:  # keep the aspect ratio: nothing to fit
            fit = Fit.STRETCH
            if width is not None:
                height = _even(width * sh / sw)
            elif height is not None:
                width = _even(height * sw / sh)
            else:
                width, height = sw, sh
        crop, inner = (0, 0, sw, sh), (0, 0, width, height)
        if fit is Fit.CROP:
            scale = max(width / sw, height / sh)
            cw, ch = min(sw, max(1, round(width / scale))), min(sh, max(1, round(height / scale)))
            crop = ((sw - cw) // 2, (sh - ch) // 2, cw, ch)
        elif fit is Fit.PAD:
            scale = min(width / sw, height / sh)
            iw, ih = min(width, max(1, round(sw * scale))), min(height, max(1, round(sh * scale)))
            inner = ((width - iw) // 2, (height - ih) // 2, iw, ih)
        return cls(rotate, crop, inner, (width, height), pad_bgr)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Transform one BGR frame (returns a new array unless nothing changes)."""
        import cv2
        import numpy as np

        if self.rotate:
            frame = cv2.rotate(frame, getattr(cv2, _ROTATE[self.rotate]))
        x, y, w, h = self.crop
        if (w, h) != (frame.shape[1], frame.shape[0]):
            frame = frame[y : y + h, x : x + w]
        ix, iy, iw, ih = self.inner
        if (iw, ih) != (w, h):
            shrink = iw * ih < w * h
            frame = cv2.resize(frame, (iw, ih), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if (iw, ih) == self.size:
            return np.ascontiguousarray(frame)
        canvas = np.empty((self.size[1], self.size[0], 3), np.uint8)
        canvas[:] = self.pad_bgr
        canvas[iy : iy + ih, ix : ix + iw] = frame
        return canvas


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + _HALF)


def _coerce(params: dict[str, Any]) -> dict[str, Any]:
    """Validate keyword parameters exactly as argv values are validated (run() is called directly too)."""
    out = coerce_all(NAME, PARAMS, params)
    for name in ("fps", "image_fps"):
        if out[name] is not None and not out[name] > 0:
            raise bad_argument(name, f"must be > 0, got {out[name]!r}")
    for end in ("start", "end"):
        frame, seconds = f"{end}_frame", f"{end}_seconds"
        if out[frame] is not None and out[seconds] is not None:
            raise bad_argument(frame, f"give {option(frame)} or {option(seconds)}, not both")
    return out


def _trim(opts: dict[str, Any], src_fps: Fraction) -> tuple[int, int | None]:
    """The selected source frames as ``start`` <= i < ``stop`` (``stop`` None: to the end)."""
    def to_frame(seconds: float) -> int:  # first frame at or after ``seconds`` (with float slack)
        return max(0, math.ceil(seconds * float(src_fps) - 1e-6))

    start_t = opts["start_seconds"] if opts["start_frame"] is None else opts["start_frame"] / src_fps
    end_t = opts["end_seconds"] if opts["end_frame"] is None else opts["end_frame"] / src_fps
    if start_t is not None and end_t is not None and start_t >= end_t:
        raise StageError(ErrorKind.BAD_ARGUMENT, f"trim start ({float(start_t):g} s) is not before its end "
                                                 f"({float(end_t):g} s)")
    start = opts["start_frame"] if opts["start_seconds"] is None else to_frame(opts["start_seconds"])
    stop = opts["end_frame"] if opts["end_seconds"] is None else to_frame(opts["end_seconds"])
    return start or 0, stop


def run(input: Path, output_dir: Path, events: StageEvents | None = None, **params: Any) -> StageResult:
    """Preprocess ``input`` into ``output_dir/preprocessed.<mkv|mp4>``; see the module docstring."""
    from stages.video import AudioSource, Codec, VideoReader, VideoWriter, check_complete, fps_fraction

    events = events or StageEvents(NAME, None)
    opts = _coerce(params)
    pad_bgr = parse_color(opts["pad_color"])
    codec = Codec(opts["codec"])
    input, output = Path(input), Path(output_dir) / f"{OUTPUT_STEM}{codec.suffix}"
    with VideoReader(input, image_fps=opts["image_fps"]) as reader:
        src_fps = fps_fraction(reader.fps)
        out_fps = src_fps if opts["fps"] is None else fps_fraction(opts["fps"])
        ratio = out_fps / src_fps  # output frames per source frame
        start, stop = _trim(opts, src_fps)
        geometry = Geometry.plan(reader.width, reader.height, opts["rotate"], opts["width"], opts["height"],
                                 Fit(opts["fit"]), pad_bgr)
        ends = [x for x in (stop, reader.frame_count) if x is not None and x >= 0]  # count: -1 unknown
        expected = max(0, _round_half_up((min(ends) - start) * ratio)) if ends else -1
        audio = None  # the trimmed range's audio, if any (an empty range fails below, for want of frames)
        if not reader.is_image_folder and expected != 0:
            duration = float(expected / out_fps) if expected > 0 else None  # as long as the output video
            audio = AudioSource(input, start=float(start / src_fps), duration=duration)
        with VideoWriter(output, *geometry.size, fps=out_fps, codec=codec, audio=audio) as writer:
            events.started(input=str(input), width=geometry.size[0], height=geometry.size[1],
                           fps=float(out_fps), frames=expected, source_width=reader.width,
                           source_height=reader.height, source_fps=float(src_fps), codec=codec.value)
            queue: deque[np.ndarray] = deque()  # output frames decided but not yet certain
            written = seen = 0
            for r, frame in enumerate(reader.frames(start, stop)):
                seen = r + 1
                copies = math.ceil(seen * ratio) - math.ceil(r * ratio)  # outputs showing frame r
                if copies:
                    queue.extend([geometry.apply(frame)] * copies)
                certain = _round_half_up(seen * ratio)  # n >= this whatever the real frame count
                while written < certain:
                    writer.write(queue.popleft())
                    written += 1  # past an underestimated total, report it as unknown (-1)
                    events.progress(written, expected if written <= expected else -1)
            check_complete(input, reader.frame_count, reader.position, allow=opts["allow_truncated"], events=events,
                           start=start, stop=stop)
            if written == 0:  # leaving the with block by an exception discards the partial file
                where = f"source frames {start} to {'the end' if stop is None else stop}"
                found = "none exist" if seen == 0 else f"{seen} exist, too few at {float(out_fps):g} fps"
                raise StageError(ErrorKind.INPUT_INVALID,
                                 f"{input}: the trim selects no frames ({where}: {found})")
    if written != expected:
        log.warning("wrote %d frames, expected %d (the source has %d in range)", written, expected, seen)
        events.progress(written, written)
    return StageResult(outputs=(output,), frames=written)


def main() -> int:
    return stage_main(NAME, PARAMS, run, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
