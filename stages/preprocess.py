"""The ``preprocess`` stage: trim, re-time, rotate and resize a clip into one clean intermediate.

    python -m cuepipe.stages.preprocess --input clip.mp4 --output-dir work/ --report 127.0.0.1:7000 \\
        --width 1280 --height 720 --fit pad --fps 30 --start-seconds 1 --end-seconds 3

The input is a video file or a folder of numbered images (``--image-fps``, default 30). The output
is ``<output-dir>/preprocessed.mkv`` (``.mp4`` with ``--codec h264``). Every parameter is optional;
the defaults keep the source as it is.

Trim: source frame i is at time i / source_fps (a constant frame rate is assumed). ``start_frame``
/ ``end_frame`` select frames directly (end exclusive); ``start_seconds`` keeps frames at or after
that time and ``end_seconds`` frames before it. Frame and seconds bounds for the same end clash.
A range that reaches past the frames a truncated file still decodes, into those its container
declares, fails with ``input_invalid`` unless ``allow_truncated`` (``cuepipe.stages.video.check_complete``).

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
it is (``cuepipe.stages.video.AudioSource(preprocessed.mkv)``). When the source's frame count is unknown the
audio runs to its end. Image folders and silent clips have none.

Pass-through: when every other parameter is left at its default (nothing to trim, re-time, rotate
or resize) and the input is a file whose data lasts its declared duration (``data_extent``, as the
truncation check reads it: packets only, no decoding), the input is handed on as it is: hard-linked
as ``preprocessed.<its extension>``, else copied. A transcode would change nothing but cost time (2.2 s
of a 21.6 s ``matte`` job on a 300-frame 720p clip) and disk. A file that looks truncated, an image
folder, or ``passthrough = never`` takes the transcode below, with its checks.

Streaming (``stream_out``, set by the launcher for ``stream = true`` pipelines): the output's frames go
to the next stage through the frame ring of that name instead of into a file (``stages/stream.py``);
nothing is handed on as it is then (the input is decoded), and the audio the file would have carried
is described for the next stage to mux from the source.

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
import sys
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.geometry import Fit, Geometry, parse_color
from cuepipe.stages.stage import (
    ALLOW_TRUNCATED,
    MAX_FRAME_SIDE,
    STREAM_OUT,
    Param,
    StageError,
    StageEvents,
    StageResult,
    bad_argument,
    coerce_all,
    is_stream,
    option,
    stage_main,
)

if TYPE_CHECKING:  # numpy, OpenCV and stages.video are imported in run(): reading PARAMS stays cheap
    import numpy as np

log = logging.getLogger(__name__)

NAME = "preprocess"
OUTPUT_STEM = "preprocessed"
CODECS = ("utvideo", "ffv1", "h264")  # the intermediate ones of stages.video.Codec (checked by a test)


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
    "passthrough": Param(str, "auto", "auto: when no other parameter changes anything, hand the input on as it is "
                         "(linked, else copied) instead of transcoding it; never: always transcode",
                         choices=("auto", "never")),
    "stream_out": STREAM_OUT,
}

_HALF = Fraction(1, 2)


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
    from cuepipe.stages.stream import StreamInfo, input_audio, output_writer
    from cuepipe.stages.video import AudioSource, Codec, VideoReader, check_complete, fps_fraction

    events = events or StageEvents(NAME, None)
    opts = _coerce(params)
    pad_bgr = parse_color(opts["pad_color"])
    codec = Codec(opts["codec"])
    output = Path(output_dir) / f"{OUTPUT_STEM}{codec.suffix}"
    stream = opts["stream_out"]  # set: the output's frames go to the next stage's stream (stages/stream.py)
    if is_stream(input):
        raise StageError(ErrorKind.BAD_ARGUMENT, f"{input}: preprocess reads files, not streams (it comes first)")
    with VideoReader(input, image_fps=opts["image_fps"]) as reader:  # INPUT_INVALID for what is not a video
        if stream is None and opts["passthrough"] == "auto" and _changes_nothing(opts) and not reader.is_image_folder:
            passed = _pass_through(Path(input), Path(output_dir), reader.frame_count, events,
                                   dict(width=reader.width, height=reader.height, fps=reader.fps))
            if passed is not None:
                return passed
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
            audio = AudioSource(Path(input), start=float(start / src_fps), duration=duration)
        if stream is not None:  # the next stage muxes it from the source: only a track that exists, and for an
            has = input_audio(input, reader)  # input changed in nothing, as a handed-on file would have given it
            audio = has if _changes_nothing(opts) else audio if has is not None else None
        with output_writer(output, *geometry.size, out_fps, codec, 3, audio, None if stream is None else
                           (stream, StreamInfo(float(out_fps), expected, audio, str(input))), lazy=False) as writer:
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
            check_complete(Path(input), reader.frame_count, reader.position, allow=opts["allow_truncated"],
                           events=events, start=start, stop=stop)
            if written == 0:  # leaving the with block by an exception discards the partial file
                where = f"source frames {start} to {'the end' if stop is None else stop}"
                found = "none exist" if seen == 0 else f"{seen} exist, too few at {float(out_fps):g} fps"
                raise StageError(ErrorKind.INPUT_INVALID,
                                 f"{input}: the trim selects no frames ({where}: {found})")
    if written != expected:
        log.warning("wrote %d frames, expected %d (the source has %d in range)", written, expected, seen)
        events.progress(written, written)
    return StageResult(outputs=() if stream is not None else (output,), frames=written)


def _changes_nothing(opts: dict[str, Any]) -> bool:
    """Every parameter but ``passthrough`` (and the image folders' rate) at its default."""
    return all(opts[k] == p.default for k, p in PARAMS.items() if k not in ("passthrough", "image_fps", "stream_out"))


def _pass_through(input: Path, output_dir: Path, declared: int, events: StageEvents,
                  info: dict[str, Any]) -> StageResult | None:
    """Hand ``input`` on unchanged (module docstring); None when it must be transcoded after all."""
    import contextlib
    import os
    import shutil

    from cuepipe.stages.video import data_extent

    extent = data_extent(input)
    if extent is None or extent.duration is None or not extent.covers(declared):
        log.info("%s: not handed on as it is (its data may not last its declared duration): transcoding", input)
        return None
    output = output_dir / f"{OUTPUT_STEM}{input.suffix.lower()}"
    events.started(input=str(input), frames=declared, passthrough=True, **info)
    partial = output.with_name(f".{output.name}.part")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        try:
            os.link(input, partial)  # instant, no extra disk; a stage never writes to its input
            how = "linked"
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(input, partial)
            how = "copied"
        os.replace(partial, output)  # never a half-copied file at the output's name
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise StageError(ErrorKind.OUTPUT_ERROR, f"cannot hand {input} on as {output}: {exc}") from None
    log.info("%s: nothing to change: %s as %s", input, how, output)
    events.progress(max(declared, 0), max(declared, 0))
    return StageResult(outputs=(output,), frames=max(declared, 0))


def main() -> int:
    return stage_main(NAME, PARAMS, run, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
