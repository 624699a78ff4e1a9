"""The ``matting`` stage: Robust Video Matting (RVM) of people in a clip -> alpha, foreground, composites.

    python -m cuepipe.stages.matting --input clip.mp4 --output-dir out/ --report 127.0.0.1:7000 \\
        --outputs alpha,composite --background '#00b140' --provider auto

``outputs`` (comma-separated, in this order in ``done``; the FIRST is the next stage's input):

| name | file | what |
|---|---|---|
| ``alpha`` | ``alpha.mp4`` | the matte, gray H.264 |
| ``foreground`` | ``foreground.mp4`` | RVM's predicted foreground colours, H.264 |
| ``composite`` | ``composite.mp4`` | foreground over ``background``, H.264, with the input's audio |
| ``rgba`` | ``matte_rgba.mkv`` | foreground + alpha, BGRA, lossless Ut Video: for later stages |
| ``rgba_png`` | ``rgba/`` | foreground + alpha as an RGBA PNG sequence (lossless) |
| ``source_rgba`` | ``source_rgba.mkv`` | the input's own pixels + alpha, BGRA, lossless Ut Video, audio |
| ``hap_alpha`` | ``matte.mov`` | HAP Alpha (TouchDesigner decodes it on the GPU) |
| ``prores4444`` | ``matte_prores.mov`` | ProRes 4444 with alpha |

**Live** (``LIVE``): with a live ``--input`` (``ndi://SOURCE``, ``camera://N`` or ``play://clip.mp4``,
``stages/live.py``) the stage mattes the newest frame whenever it is ready for one and sends the
person with alpha (RVM's foreground, BGRA) as the NDI source ``ndi_name`` (output ``ndi``, the only
one live), each frame carrying its source frame's timecode, until it is cancelled. With
``style_model`` (e.g. ``multistyle26``, ``style``) the person is restyled first, with the ``stylize``
pipeline's steadiness (``stages/steady.py``: held box, denoise and smoothing 0.8, motion 12). Frames the
source delivered while inference was busy are dropped and counted; a ``stage/live`` Event reports
output fps, drops and source-to-output latency about once a second. The loop has no queue on
purpose: every frame waiting behind another would add a whole inference to the latency.

    python -m cuepipe.stages.matting --input 'ndi://STUDIO (TouchDesigner)?ip=10.0.0.5' --output-dir work/ \
        --outputs ndi --ndi-name cuepipe-matte --report 127.0.0.1:7000

``source_rgba`` is the whole picture with its matte: ``generate`` restyles the person in it and
keeps the rest byte for byte (the ``stylize`` pipeline).

``background`` is ``#rrggbb``, an image or a video file (``cuepipe.stages.blend.parse_background``).
Every output has the input's frame count, frame rate and size. ``ratio`` is RVM's downsample
ratio; by default it comes from RVM's published table for the frame size and ``subject``:
``portrait`` (default: head and shoulders, e.g. 0.375 at 720p, the fast choice) or ``full_body``
(people small in the frame, 0.6 at 720p: slower, as inference cost grows with the ratio).
``provider``: ``auto`` uses CUDA when onnxruntime-gpu is installed, else the CPU; an explicit
``cuda`` / ``tensorrt`` that is not available fails with ``provider_unavailable`` instead of
running on the CPU. ``scene_cut`` > 0
resets the recurrent state at hard cuts (``cuepipe.stages.rvm.SceneCut``; try 0.08).

Decoding, inference and encoding run concurrently (``matte_frames`` on ``stages/framepipe.py``);
``docs/performance.md`` has the measured speeds.

Streams (``stages/stream.py``): ``--input ring://NAME`` reads the previous stage's frames from a frame ring;
``--stream-out NAME`` (set by the launcher) sends the first output's frames to the next stage instead of its file.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.geometry import BACKGROUND_WORDS
from cuepipe.stages.stage import (
    ALLOW_TRUNCATED,
    PROVIDER,
    STREAM_OUT,
    Param,
    ParamKind,
    StageError,
    StageEvents,
    StageResult,
    bad_argument,
    coerce_all,
    is_live,
    stage_main,
)
from cuepipe.stages.stage import parse_outputs as stage_parse_outputs

if TYPE_CHECKING:  # heavy modules (onnxruntime, numpy, cv2) are imported in run()
    import numpy as np

    from cuepipe.stages.framepipe import Sink
    from cuepipe.stages.rvm import RVM, InputBuffer
    from cuepipe.stages.stream import StreamInfo
    from cuepipe.stages.video import AudioSource

log = logging.getLogger(__name__)

NAME = "matting"
STREAM_IN = True  # takes a stream from the previous stage (ring://NAME, stages/stream.py)
LIVE = True  # takes live inputs (stages/live.py): the orchestrator lets ndi://, camera://, play:// through
LIVE_OUTPUTS = ("ndi",)
PRELOAD_SIZE = (1280, 720)  # a resident worker's warm-up frame (preload): the most common show size
SUBJECTS = ("portrait", "full_body")
AUDIO_OUTPUTS = ("composite", "rgba", "source_rgba")
#: output name -> (file or folder name, stages.video.Codec value, channels)
OUTPUTS: dict[str, tuple[str, str, int]] = {
    "alpha": ("alpha.mp4", "h264", 1),
    "foreground": ("foreground.mp4", "h264", 3),
    "composite": ("composite.mp4", "h264", 3),
    "rgba": ("matte_rgba.mkv", "utvideo", 4),
    "rgba_png": ("rgba", "png", 4),
    "hap_alpha": ("matte.mov", "hap_alpha", 4),
    "prores4444": ("matte_prores.mov", "prores4444", 4),
    "source_rgba": ("source_rgba.mkv", "utvideo", 4),
}
SOURCE_OUTPUTS = ("source_rgba",)  # made from the input frame, not from RVM's foreground

PARAMS: dict[str, Param] = {
    "model": Param(str, "rvm_mobilenetv3_fp32", "RVM model: a manifest name or an .onnx path",
                   kind=ParamKind.MODEL),
    "ratio": Param(float, None, "downsample ratio in (0, 1]; default: from RVM's table for the size and subject",
                   minimum=0.0, maximum=1.0),
    "subject": Param(str, "portrait", "portrait or full_body: picks the default ratio", choices=SUBJECTS),
    "provider": PROVIDER,
    "threads": Param(int, 0, "onnxruntime intra-op threads (0: one per core)", minimum=0),
    "outputs": Param(str, "alpha,composite", f"comma-separated, first = next stage's input: {', '.join(OUTPUTS)}"),
    "background": Param(str, "#00b140", "composite background: #rrggbb, a colour name, an image or a video file",
                        kind=ParamKind.MEDIA, words=BACKGROUND_WORDS),
    "scene_cut": Param(float, 0.0, "reset the state at cuts above this frame difference (0: off)",
                       minimum=0.0, maximum=1.0),
    "io_binding": Param(str, "auto", "onnxruntime IO binding: auto (on for GPU providers), on, off",
                        choices=("auto", "on", "off")),
    "allow_truncated": ALLOW_TRUNCATED,
    "ndi_name": Param(str, "cuepipe-matte", "live: the NDI source name the matted person is sent as"),
    "ndi_unique": Param(bool, False, "live: add a short suffix to the NDI name (several live jobs on one machine; "
                        "the name used is in the started info). Off: a name already taken fails the stage"),
    "live_timeout": Param(float, 30.0, "live: seconds to wait for the first frame of the source", minimum=0.1),
    "style_model": Param(str, None, "live: restyle the person with this generator before sending (e.g. "
                         "multistyle26; as the stylize pipeline's generate stage does)", kind=ParamKind.MODEL),
    "style": Param(str, None, "live, with style_model: its style, e.g. 19 or 19:0.7,7:0.3"),
    "stream_out": STREAM_OUT,
}


def _coerce(params: dict[str, Any], live: bool = False) -> dict[str, Any]:
    """Validate keyword parameters exactly as argv values are (run() is called directly too)."""
    out = coerce_all(NAME, PARAMS, params)
    if out["ratio"] is not None and not out["ratio"] > 0:
        raise bad_argument("ratio", f"must be > 0, got {out['ratio']}")
    if live:
        out["outputs"] = stage_parse_outputs(out["outputs"], dict.fromkeys(LIVE_OUTPUTS, ("", "", 4)))
    else:
        out["outputs"] = parse_outputs(out["outputs"])
    return out


def parse_outputs(text: str) -> tuple[str, ...]:
    """``"alpha,composite"`` -> ("alpha", "composite"); BAD_ARGUMENT for unknown, repeated or none."""
    return stage_parse_outputs(text, OUTPUTS)


def resolve_model(name: str) -> tuple[Path, Any]:
    """The model file and its manifest spec (for a bare .onnx path: the RVM family's first spec)."""
    from cuepipe.models import ModelError, load_manifest, resolve

    try:
        path = resolve(name)
        specs = load_manifest()
    except ModelError as exc:  # missing, invalid or a bad manifest: the error's own kind
        raise StageError(exc.kind, str(exc)) from None
    spec = specs.get(name) or next(s for s in specs.values() if s.family == "rvm")
    return path, spec


def run(input: Path, output_dir: Path, events: StageEvents | None = None, cache: dict[str, Any] | None = None,
        **params: Any) -> StageResult:
    """Matte ``input`` into ``output_dir``; see the module docstring.

    ``cache`` (resident workers, ``docs/stages.md``): loaded sessions are kept in it between jobs.
    """
    from cuepipe.stages.stream import StreamInfo, check_input, input_audio, open_frames

    events = events or StageEvents(NAME, None)
    if is_live(input):
        return run_live(str(input), events, cache, _coerce(params, live=True))
    opts = _coerce(params)
    output_dir = Path(output_dir)
    model_path, spec = resolve_model(opts["model"])
    with open_frames(input, 3) as reader, contextlib.ExitStack() as writers:
        w, h, fps = reader.width, reader.height, reader.fps
        ratio = opts["ratio"] or spec.recommended_downsample_ratio(w, h, opts["subject"])
        model = _model(cache, model_path, opts["provider"], opts["threads"], opts["io_binding"])
        expected, first = reader.frame_count, opts["outputs"][0]
        # only if an output carries it: probing a file for audio costs a warm trigger ~50 ms
        audio = input_audio(input, reader) if any(n in AUDIO_OUTPUTS for n in opts["outputs"]) else None
        stream = None if opts["stream_out"] is None else (opts["stream_out"], StreamInfo(
            fps, expected, audio if first in AUDIO_OUTPUTS else None, str(input)))
        sinks = [_sink(name, output_dir, w, h, fps, opts["background"], audio if name in AUDIO_OUTPUTS else None,
                       writers, stream if name == first else None) for name in opts["outputs"]]
        events.started(input=str(input), frames=expected, fps=fps, width=w, height=h, model=opts["model"],
                       provider=model.provider, precision=model.precision, ratio=ratio,
                       io_binding=model.io_binding, threads=opts["threads"], outputs=list(opts["outputs"]),
                       scene_cut=opts["scene_cut"])

        def progress(n: int) -> None:
            events.progress(n, expected if n <= expected else -1)

        stats = matte_frames(reader, model, ratio, sinks, w, h, scene_cut=opts["scene_cut"],
                             foreground=any(_needs_foreground(n) for n in opts["outputs"]),
                             source=any(n in SOURCE_OUTPUTS for n in opts["outputs"]), on_frame=progress)
        check_input(input, reader, expected, stats.frames, allow=opts["allow_truncated"], events=events)
    if stats.frames != expected:
        log.info("%d frames (the container estimated %d)", stats.frames, expected)
        events.progress(stats.frames, stats.frames)
    if stats.scene_cuts:
        log.info("%d scene cut(s) reset the state", stats.scene_cuts)
    files = opts["outputs"][1:] if opts["stream_out"] else opts["outputs"]  # the first one streamed: no file
    return StageResult(outputs=tuple(output_dir / OUTPUTS[name][0] for name in files), frames=stats.frames)


@dataclass(frozen=True)
class Matte:
    """One frame's result: ``alpha`` uint8 HxW, ``foreground`` BGR uint8 HxWx3, ``source`` the input frame
    (each None when no output uses it)."""

    index: int
    alpha: np.ndarray
    foreground: np.ndarray | None
    source: np.ndarray | None = None


@dataclass
class MattingStats:
    """What ran: frames, and how many times a scene cut reset the state."""

    frames: int = 0
    scene_cuts: int = 0


def matte_frames(frames: Iterable[np.ndarray], model: RVM, ratio: float, sinks: Sequence[Sink[Matte]], width: int,
                 height: int, scene_cut: float = 0.0, foreground: bool = False, source: bool = False,
                 on_frame: Callable[[int], None] | None = None, queue_size: int = 2) -> MattingStats:
    """Matte every frame into every sink on the threaded pipeline (``stages/framepipe.py``).

    Reader thread: scene-cut check, BGR uint8 into a pooled float NCHW ``InputBuffer``. Calling
    thread, in order: state reset at a cut, RVM inference, ``to_alpha`` (+ ``to_foreground`` when
    ``foreground``: a sink needs it), buffer back to the pool; the input frame rides along when
    ``source``. Returns the stats or re-raises the first error of any thread.
    """
    from cuepipe.stages.framepipe import BufferPool, run_frames
    from cuepipe.stages.rvm import InputBuffer, SceneCut, to_alpha, to_foreground

    stats, detector, read = MattingStats(), SceneCut(scene_cut), 0
    # one being filled, queue_size waiting, one in inference
    pool = BufferPool(lambda: InputBuffer(width, height, model.input_dtype), queue_size + 2)

    def prepare(frame: np.ndarray) -> tuple[InputBuffer, bool, np.ndarray | None]:
        nonlocal read
        buffer = pool.get()
        cut = detector(frame)
        if cut:
            log.info("scene cut before frame %d (difference %.3f): state reset", read, detector.last_score)
        buffer.fill(frame)
        read += 1
        return buffer, cut, frame if source else None  # each decoded frame is a new array: kept as is

    def process(items: list[tuple[InputBuffer, bool, np.ndarray | None]]) -> list[Matte]:
        (buffer, cut, frame), = items  # batch 1: the recurrent state goes frame by frame
        if cut:
            model.reset()
            stats.scene_cuts += 1
        fgr, pha = model.infer(buffer.array, ratio)
        matte = Matte(stats.frames, to_alpha(pha), to_foreground(fgr) if foreground else None, frame)
        pool.put(buffer)
        stats.frames += 1
        return [matte]

    run_frames(frames, prepare, process, sinks, on_frame=on_frame, queue_size=queue_size, name=NAME, pools=[pool])
    return stats


def _needs_foreground(output: str) -> bool:
    """Every output but the gray alpha and the source ones is made from RVM's foreground colours."""
    return OUTPUTS[output][2] != 1 and output not in SOURCE_OUTPUTS


def _model(cache: dict[str, Any] | None, path: Path, provider: str, threads: int, io_binding: str) -> RVM:
    """A session for these settings: from ``cache`` when a resident worker has one, state reset."""
    from cuepipe.stages.rvm import RVM

    key = f"rvm:{path.resolve()}:{path.stat().st_mtime_ns}:{provider}:{threads}:{io_binding}"
    model = cache.get(key) if cache is not None else None
    if model is None:
        binding = {"auto": None, "on": True, "off": False}[io_binding]
        model = RVM(path, provider, threads=threads, io_binding=binding)
        if cache is not None:
            cache[key] = model
    model.reset()
    return model


def _sink(name: str, output_dir: Path, width: int, height: int, fps: float, background: str,
          audio: AudioSource | None, writers: contextlib.ExitStack,
          stream: tuple[str, StreamInfo] | None = None) -> Sink[Matte]:
    """Open the writer of one output (registered on ``writers``) and say how to fill it. ``audio``: what it
    carries (the composite to watch and the lossless RGBA for the next stage carry the input's); ``stream``:
    (ring name, description) to send its frames to the next stage instead of writing its file."""
    import numpy as np

    from cuepipe.stages.blend import composite, parse_background, to_bgra
    from cuepipe.stages.framepipe import Sink
    from cuepipe.stages.stream import output_writer

    file, codec, channels = OUTPUTS[name]
    bg = writers.enter_context(parse_background(background, width, height)) if name == "composite" else None
    # lazy: ffmpeg starts with the first frame, after its inference (videowriter.py)
    writer = writers.enter_context(output_writer(output_dir / file, width, height, fps, codec, channels, audio, stream))
    if name in SOURCE_OUTPUTS:
        source_out = np.empty((height, width, channels), np.uint8)

        def convert_source(m: Matte) -> np.ndarray:
            assert m.source is not None  # matte_frames keeps the input frame when an output needs it
            return to_bgra(m.source, m.alpha, source_out, clear_transparent=False)
        return Sink(name, writer, convert_source)
    if not _needs_foreground(name):
        return Sink(name, writer, lambda m: m.alpha)
    # write() has copied a frame into ffmpeg's pipe when it returns: one buffer per sink is enough
    out = np.empty((height, width, channels), np.uint8)

    def convert(m: Matte) -> np.ndarray:
        assert m.foreground is not None  # matte_frames converts it when an output needs it
        if bg is not None:
            return composite(m.foreground, m.alpha, bg.frame(m.index), out)
        return m.foreground if channels == 3 else to_bgra(m.foreground, m.alpha, out)
    return Sink(name, writer, convert)


def run_live(url: str, events: StageEvents, cache: dict[str, Any] | None, opts: dict[str, Any]) -> StageResult:
    """The live loop (module docstring): newest frame -> RVM -> NDI with alpha, until cancelled."""
    import cv2
    import numpy as np

    from cuepipe.stages.blend import to_bgra
    from cuepipe.stages.live import LiveStats, open_source
    from cuepipe.stages.ndi import NdiSender, load_ndi
    from cuepipe.stages.rvm import InputBuffer, to_alpha, to_foreground

    load_ndi()  # the output is NDI: without the extra, provider_unavailable now, before the model loads
    model_path, spec = resolve_model(opts["model"])
    model = _model(cache, model_path, opts["provider"], opts["threads"], opts["io_binding"])
    with open_source(url) as source:
        frame = source.next(timeout_s=opts["live_timeout"])
        if frame is None:
            raise StageError(ErrorKind.INPUT_INVALID, f"{url}: no frame within {opts['live_timeout']:g} s")
        h, w = frame.image.shape[:2]
        ratio = opts["ratio"] or spec.recommended_downsample_ratio(w, h, opts["subject"])
        restyle = _live_restyle(cache, opts, w, h)  # a bad style_model / style fails here, before any output
        with NdiSender(opts["ndi_name"], unique=opts["ndi_unique"]) as sender:
            events.started(input=url, live=True, width=w, height=h, model=opts["model"], provider=model.provider,
                           ratio=ratio, ndi=sender.name, outputs=list(opts["outputs"]),
                           style_model=opts["style_model"] or "", style=opts["style"] or "")
            stats, buffer, out = LiveStats(), InputBuffer(w, h, model.input_dtype), np.empty((h, w, 4), np.uint8)
            while True:
                image = frame.image if frame.image.ndim == 3 and frame.image.shape[2] == 3 else \
                    cv2.cvtColor(frame.image, cv2.COLOR_BGRA2BGR)
                if image.shape[:2] != (h, w):  # the source changed size: a new shot for the recurrent state
                    h, w = image.shape[:2]
                    buffer, out = InputBuffer(w, h, model.input_dtype), np.empty((h, w, 4), np.uint8)
                    model.reset()
                    restyle = _live_restyle(cache, opts, w, h)
                fgr, pha = model.infer(buffer.fill(image), ratio)
                alpha = to_alpha(pha)
                if restyle is None:
                    colour = to_foreground(fgr)
                else:  # the picture and its matte, as matting's source_rgba output holds them
                    [generated] = restyle.process([restyle.prepare((cv2.merge((*cv2.split(image), alpha)), None))])
                    colour = generated.colour
                sender.send(to_bgra(colour, alpha, out), timecode=frame.timecode)
                stats.frame_out(frame.captured_ns)
                events.progress(stats.frames, -1)
                if stats.due():
                    events.live(*stats.snapshot(source.dropped))
                while (frame := source.next(timeout_s=1.0)) is None:  # NDI reconnects meanwhile
                    if stats.due():
                        events.live(*stats.snapshot(source.dropped))


def _live_restyle(cache: dict[str, Any] | None, opts: dict[str, Any], width: int, height: int) -> Any:
    """The ``style_model`` generator's per-frame work for a ``width`` x ``height`` source, or None."""
    if not opts["style_model"]:
        return None
    from cuepipe.stages.framing import FramePass
    from cuepipe.stages.generate import resolve_contract
    from cuepipe.stages.generator import Generator

    path, contract = resolve_contract({"model": opts["style_model"]})
    key = f"live-style:{path.resolve()}:{contract}:{opts['provider']}:{opts['threads']}"
    gen = cache.get(key) if cache is not None else None
    if gen is None:
        gen = Generator(path, contract, opts["provider"], threads=opts["threads"])
        if cache is not None:
            cache[key] = gen
    return FramePass(gen, "person", width, height, smoothing=0.8, hold=True, weights=gen.weights(opts["style"]),
                     denoise=0.8, motion=12.0)


def preload(cache: dict[str, Any], **params: Any) -> None:
    """Resident workers (``--serve``): the session for these parameters, warmed by two inferences at
    1280x720 (imports, session, ORT's first run, and its first run with a recurrent state: other tensor
    shapes), so the first trigger costs what later ones do."""
    import numpy as np

    from cuepipe.stages import blend, framepipe, stream, video  # noqa: F401 - imported now, not on the first trigger
    from cuepipe.stages.rvm import InputBuffer

    video.ffmpeg_exe()  # found (and cached) now
    opts = _coerce(params, live=params.get("outputs") in LIVE_OUTPUTS)
    model_path, spec = resolve_model(opts["model"])
    model = _model(cache, model_path, opts["provider"], opts["threads"], opts["io_binding"])
    w, h = PRELOAD_SIZE
    frame = InputBuffer(w, h, model.input_dtype).fill(np.zeros((h, w, 3), np.uint8))
    for _ in range(2):
        model.infer(frame, opts["ratio"] or spec.recommended_downsample_ratio(w, h, opts["subject"]))
    model.reset()


def main() -> int:
    return stage_main(NAME, PARAMS, run, doc=__doc__, preload=preload)


if __name__ == "__main__":
    sys.exit(main())
