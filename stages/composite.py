"""The ``composite`` stage: a foreground with alpha, placed and scaled, over a background.

    python -m cuepipe.stages.composite --input generated_rgba.mkv --output-dir out/ --report 127.0.0.1:7000 \\
        --background stage_backdrop.mp4 --background-mode loop --position '[0.5,1]' --scale 0.8 \\
        --outputs video,png --audio input

The input is the layer: a video with alpha (``generate``'s ``generated_rgba.mkv``, ``matting``'s
``matte_rgba.mkv``, HAP Alpha, ProRes 4444), a folder of RGBA PNGs, or any video (opaque: then this is
picture-in-picture). The compositing itself is ``stages/blend.py``, shared with ``matting``'s
own ``composite`` output: exact straight-alpha rounding, backgrounds scaled to cover and centre-cropped.

- ``background``: ``#rrggbb``, a colour name, an image, a video or image folder (``background_mode``
  ``loop`` or ``hold`` after its last frame), or ``none`` (transparent: only ``png`` / ``lossless``).
- ``size``: the output canvas: ``input`` (default: the layer's size), ``background`` (the background
  image's or video's own size) or ``WxH``. ``scale`` scales the layer; ``position`` = ``[x,y]`` aligns
  it like a percentage background position (``[0,0]`` top-left, ``[0.5,0.5]`` centred, ``[0.5,1]``
  bottom-centre; outside 0..1 moves it past the edges: ``cuepipe.stages.blend.place``).
- ``audio``: ``input`` (default: the layer's own audio, if any), ``background`` (the background
  video's), ``none``, or a path to any file with audio. It is cut or padded to the video's length.

``outputs`` (comma-separated; the FIRST is the next stage's input):

| name | file | what |
|---|---|---|
| ``video`` | ``composite.mp4`` | H.264 with the chosen audio |
| ``lossless`` | ``composite.mkv`` | UT Video, bit-exact (BGRA when the background is ``none``), with audio |
| ``png`` | ``composite_rgba/`` | RGBA PNG sequence (opaque unless the background is ``none``) |

Frame count and rate are the layer's. Decoding (ffmpeg), placing, compositing and encoding run
concurrently (``stages/framepipe.py``).

Streams (``stages/stream.py``): ``--input ring://NAME`` reads the previous stage's frames from a frame ring.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.geometry import BACKGROUND_WORDS, NAMED_COLOURS
from cuepipe.stages.stage import (
    ALLOW_TRUNCATED,
    MAX_FRAME_SIDE,
    Param,
    ParamKind,
    StageError,
    StageEvents,
    StageResult,
    bad_argument,
    coerce_all,
    option,
    parse_outputs,
    stage_main,
)

if TYPE_CHECKING:  # numpy / cv2 / ffmpeg helpers are imported in run()
    import numpy as np

    from cuepipe.stages.framepipe import Sink
    from cuepipe.stages.video import AudioSource

log = logging.getLogger(__name__)

NAME = "composite"
STREAM_IN = True  # takes a stream from the previous stage (ring://NAME, stages/stream.py)
TRANSPARENT = ("none", "transparent")
#: output name -> (file or folder name, stages.video.Codec value)
OUTPUTS: dict[str, tuple[str, str]] = {
    "video": ("composite.mp4", "h264"),
    "lossless": ("composite.mkv", "utvideo"),
    "png": ("composite_rgba", "png"),
}

PARAMS: dict[str, Param] = {
    "background": Param(str, "#00b140", "#rrggbb, a colour name, an image, a video or folder, or none",
                        kind=ParamKind.MEDIA, words=BACKGROUND_WORDS),
    "background_mode": Param(str, "loop", "a video background after its last frame: loop or hold",
                             choices=("loop", "hold")),
    "size": Param(str, "input", "output size: input, background or WxH"),
    "position": Param(str, "[0.5,0.5]", "layer alignment [x,y]: [0,0] top-left, [0.5,0.5] centre, [1,1] bottom-right"),
    "scale": Param(float, 1.0, "layer scale", minimum=0.01, maximum=100.0),
    "audio": Param(str, "input", "audio from: input, background, none, or a file path", kind=ParamKind.MEDIA,
                   words=frozenset({"input", "background", "none"})),
    "outputs": Param(str, "video", f"comma-separated, first = next stage's input: {', '.join(OUTPUTS)}"),
    "allow_truncated": ALLOW_TRUNCATED,
}


def parse_position(text: str) -> tuple[float, float]:
    """``"[0.5,1]"`` or ``"0.5,1"`` -> (0.5, 1.0); BAD_ARGUMENT otherwise (brackets allow a leading -)."""
    import math

    parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    try:
        x, y = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)):
        raise bad_argument("position", f"expected [x,y] such as [0.5,0.5], got {text!r}")
    return x, y


def _coerce(params: dict[str, Any]) -> dict[str, Any]:
    """Validate keyword parameters exactly as argv values are (run() is called directly too)."""
    from cuepipe.models.contract import ContractError, parse_size

    out = coerce_all(NAME, PARAMS, params)
    out["position"] = parse_position(out["position"])
    out["outputs"] = parse_outputs(out["outputs"], OUTPUTS)
    out["transparent"] = out["background"].strip().lower() in TRANSPARENT
    if out["transparent"] and "video" in out["outputs"]:
        raise bad_argument("outputs", "an H.264 video has no alpha: with background none write png or lossless")
    size = out["size"].strip().lower()
    if size not in ("input", "background"):
        try:
            out["size"] = parse_size(size, "size")
        except ContractError as exc:
            raise bad_argument("size", f"expected input, background or WxH; {exc}") from None
        if isinstance(out["size"], str):
            raise bad_argument("size", f"expected input, background or WxH, got {size!r}")
        if max(out["size"]) > MAX_FRAME_SIDE:
            raise bad_argument("size", f"at most {MAX_FRAME_SIDE} pixels a side, got {size!r}")
    else:
        out["size"] = size
    return out


def _canvas(opts: dict[str, Any], layer: tuple[int, int]) -> tuple[int, int]:
    """The output size: the layer's, the background's own, or given."""
    if isinstance(opts["size"], tuple):
        return opts["size"]
    if opts["size"] == "input" or opts["transparent"]:
        return layer
    from cuepipe.stages.video import IMAGE_SUFFIXES, probe, read_image

    spec = opts["background"].strip()
    if spec.startswith("#") or spec.lower() in NAMED_COLOURS:
        return layer  # a colour has no size of its own
    path = Path(spec).expanduser()
    if not path.exists():
        raise StageError(ErrorKind.INPUT_MISSING, f"background not found: {path}")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        image = read_image(path)
        return image.shape[1], image.shape[0]
    info = probe(path)
    return info.width, info.height


def _audio(opts: dict[str, Any], input: Path | str, reader: Any, duration: float | None) -> AudioSource | None:
    import dataclasses

    from cuepipe.stages.stream import input_audio
    from cuepipe.stages.video import AudioSource, has_audio

    choice = opts["audio"].strip()
    if choice.lower() == "none":
        return None
    if choice.lower() == "input":  # a file's own track, or the one a stream describes (the source's)
        found = input_audio(input, reader)
        return found if found is None or found.duration is not None else dataclasses.replace(found, duration=duration)
    if choice.lower() == "background":
        source = None if opts["transparent"] else Path(opts["background"].strip()).expanduser()
        if source is None or not source.is_file():
            raise bad_argument("audio", f"the background {opts['background']!r} is not a file that can hold audio")
    else:
        source = Path(choice).expanduser()
        if not source.is_file():
            raise StageError(ErrorKind.INPUT_MISSING, f"{option('audio')}: file not found: {source}")
    if not has_audio(source):
        log.warning("%s has no audio: the output is silent", source)
        return None
    return AudioSource(source, duration=duration)


def run(input: Path, output_dir: Path, events: StageEvents | None = None, **params: Any) -> StageResult:
    """Composite ``input`` into ``output_dir``; see the module docstring."""

    from cuepipe.stages.blend import BackgroundMode, composite, parse_background, place
    from cuepipe.stages.framepipe import run_frames
    from cuepipe.stages.stream import check_input, open_frames

    events = events or StageEvents(NAME, None)
    opts = _coerce(params)
    output_dir = Path(output_dir)
    with open_frames(input, 4) as reader, contextlib.ExitStack() as stack:
        width, height = _canvas(opts, (reader.width, reader.height))
        background = None
        if not opts["transparent"]:
            background = stack.enter_context(parse_background(opts["background"], width, height,
                                                              BackgroundMode(opts["background_mode"])))
        expected, fps = reader.frame_count, reader.fps
        audio = _audio(opts, input, reader, expected / fps if expected > 0 else None)
        sinks = [_sink(n, output_dir, width, height, fps, background is None, audio, stack) for n in opts["outputs"]]
        events.started(input=str(input), frames=expected, fps=fps, width=width, height=height,
                       layer_width=reader.width, layer_height=reader.height, has_alpha=reader.has_alpha,
                       background=opts["background"], position=list(opts["position"]), scale=opts["scale"],
                       audio=str(audio.path) if audio else None, outputs=list(opts["outputs"]))
        index = itertools.count()

        def prepare(frame: np.ndarray) -> Layer:
            import cv2

            fgr, alpha = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR), cv2.extractChannel(frame, 3)
            return Layer(next(index), *place(fgr, alpha, (width, height), opts["position"], opts["scale"]))

        def process(layers: list[Layer]) -> list[Layer]:  # in order: a video background decodes sequentially
            if background is not None:
                for layer in layers:
                    layer.composite = composite(layer.fgr, layer.alpha, background.frame(layer.index))
            return layers

        def progress(n: int) -> None:
            events.progress(n, expected if n <= expected else -1)

        frames = run_frames(reader.frames(), prepare, process, sinks, on_frame=progress, name=NAME)
        check_input(input, reader, expected, frames, allow=opts["allow_truncated"], events=events)
    if frames != expected:
        log.info("%d frames (the container estimated %d)", frames, expected)
        events.progress(frames, frames)
    return StageResult(outputs=tuple(output_dir / OUTPUTS[n][0] for n in opts["outputs"]), frames=frames)


@dataclass
class Layer:
    """One frame: the placed layer at the canvas size, and (when opaque) the composite."""

    index: int
    fgr: np.ndarray
    alpha: np.ndarray
    composite: np.ndarray | None = None


def _sink(name: str, output_dir: Path, width: int, height: int, fps: float, transparent: bool,
          audio: AudioSource | None, stack: contextlib.ExitStack) -> Sink[Layer]:
    """Open one output's writer (registered on ``stack``) and say how to fill it."""
    import numpy as np

    from cuepipe.stages.blend import to_bgra
    from cuepipe.stages.framepipe import Sink
    from cuepipe.stages.video import Codec, VideoWriter

    file, codec = OUTPUTS[name]
    channels = 4 if codec == "png" or transparent else 3
    writer = stack.enter_context(VideoWriter(output_dir / file, width, height, fps, codec=Codec(codec),
                                             channels=channels, audio=audio))
    out = np.empty((height, width, channels), np.uint8)  # write() has copied it into ffmpeg's pipe on return
    opaque = np.full((height, width), 255, np.uint8)

    def convert(layer: Layer) -> np.ndarray:
        if layer.composite is None:
            return to_bgra(layer.fgr, layer.alpha, out)
        return layer.composite if channels == 3 else to_bgra(layer.composite, opaque, out)
    return Sink(name, writer, convert)


def main() -> int:
    return stage_main(NAME, PARAMS, run, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
