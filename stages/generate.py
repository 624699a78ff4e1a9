"""The ``generate`` stage: any image-to-image ONNX generator, frame by frame, on the person or the frame.

    python -m cuepipe.stages.generate --input source_rgba.mkv --output-dir out/ --report 127.0.0.1:7000 \\
        --model multistyle26 --style 19:0.7,7:0.3 --mode person --smoothing 0.5 --outputs video,rgba

    python -m cuepipe.stages.generate --input matte_rgba.mkv --output-dir out/ \\
        --model models/weights/AnimeGANv2_Hayao.onnx --layout nhwc --channels rgb \\
        --input-range '[-1,1]' --size dynamic --multiple 32 --mode person --smoothing 0.3

The input is a video or image folder, ideally with alpha: the ``matting`` stage's ``source_rgba``
output (``source_rgba.mkv``: the source picture with the matte, BGRA lossless), or its ``rgba`` one
(RVM's foreground, black outside the person). ``mode``: ``person`` crops to the box around ``alpha >
threshold`` (plus ``margin``), generates there and puts the result back only where alpha > 0, so
every pixel outside the alpha keeps the input's exact colour (frames without a person pass through);
``frame`` generates the whole frame; ``auto`` (default) is ``person`` when the input has alpha.

The model's contract (``models/contract.py``: layout, channel order, value ranges, size, batch,
condition input) comes from its manifest entry when ``model`` is a manifest name; the contract
parameters below override it, or declare it for a plain ``.onnx`` path. It is checked against the
model's real inputs and outputs before the first frame (``model_invalid`` on a mismatch, naming both).
``docs/models.md`` shows how to plug in a public generator such as AnimeGANv2.

``style``: for a model whose contract has a ``vector_input`` (``multistyle26``: 26 styles), an
index (``19``) or a blend (``19:0.7,7:0.3``, weights normalised); unset: style 0. It is fed per job,
so a resident worker changes style without reloading the model. ``cuepipe models list`` shows each
model's range of styles; ``cuepipe styles multistyle26 --image frame.png`` renders them all on a
picture (``style_sheet``; they have numbers, not names).

Steadiness (``stages/steady.py``; style transfer amplifies frame-to-frame noise: ``bench/flicker.py``):
``hold_box`` keeps the person's crop fixed while the person stays inside it, ``scale`` fixes the size
the crop is styled at for the whole job (``max_side`` instead rescales per frame as the box
changes), ``denoise`` averages the model's input over time and ``smoothing`` its output, both only
where the input is still: a change of ``motion`` levels or more counts as motion and is taken at
once, so a moving arm leaves no trail (``motion = 0``: ``smoothing`` is a plain average).

``outputs`` (comma-separated; the FIRST is the next stage's input):

| name | file | what |
|---|---|---|
| ``rgba`` | ``generated_rgba.mkv`` | generated colours + the input's alpha, UT Video BGRA (lossless), input's audio |
| ``video`` | ``generated.mp4`` | the generated colours over the input frame under the alpha, H.264, input's audio |
| ``rgba_png`` | ``generated_rgba/`` | as ``rgba``, an RGBA PNG sequence |

Besides them, ``contact_sheet`` > 0 writes ``contact.png`` (``stages/contactsheet.py``): that many
frames, spread over the clip, as source / matte / result (the ``video`` output's picture).

``provider``: as ``matting`` (``stages/inference.py``: auto = CUDA if available, else CPU;
an explicit GPU provider that is missing fails with ``provider_unavailable``). Decoding (an ffmpeg
process + the reader thread: crop, resize, tensor packing), inference and encoding run concurrently
(``stages/framepipe.py``).

Streams (``stages/stream.py``): ``--input ring://NAME`` reads the previous stage's frames from a frame ring;
``--stream-out NAME`` (set by the launcher) sends the first output's frames to the next stage instead of its file.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.protocol import WarningKind
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
    parse_outputs,
    stage_main,
)

if TYPE_CHECKING:  # heavy modules (onnxruntime, numpy, cv2) are imported in run()
    from cuepipe.models.contract import GeneratorContract
    from cuepipe.stages.contactsheet import ContactSheet
    from cuepipe.stages.framepipe import Sink
    from cuepipe.stages.generator import Generator
    from cuepipe.stages.stream import StreamInfo
    from cuepipe.stages.video import AudioSource

log = logging.getLogger(__name__)

NAME = "generate"
STREAM_IN = True  # takes a stream from the previous stage (ring://NAME, stages/stream.py)
CONTACT_SHEET = "contact.png"
MODES = ("auto", "person", "frame")
#: output name -> (file or folder name, stages.video.Codec value, channels)
OUTPUTS: dict[str, tuple[str, str, int]] = {
    "rgba": ("generated_rgba.mkv", "utvideo", 4),
    "video": ("generated.mp4", "h264", 3),
    "rgba_png": ("generated_rgba", "png", 4),
}

PARAMS: dict[str, Param] = {
    "model": Param(str, None, "generator model: a manifest name or an .onnx path (required)", kind=ParamKind.MODEL),
    "mode": Param(str, "auto", "person (the alpha's box), frame (everything) or auto (person if the input has alpha)",
                  choices=MODES),
    "threshold": Param(int, 8, "alpha above this counts as the person (person mode)", minimum=0, maximum=254),
    "margin": Param(float, 0.1, "person box margin, as a fraction of its longer side", minimum=0.0, maximum=2.0),
    "fit": Param(str, "letterbox", "to the model's size: letterbox (keep aspect, pad) or resize (stretch)",
                 choices=("letterbox", "resize")),
    "max_side": Param(int, 0, "dynamic-size models: scale the crop's longer side down to this (0: as is)",
                      minimum=0),
    "smoothing": Param(float, 0.0, "temporal smoothing (EMA weight of the previous frame; 0: off)",
                       minimum=0.0, maximum=0.95),
    "style": Param(str, None, "models with a vector_input (multistyle26): a style index, or a blend such as "
                   "19:0.7,7:0.3 (unset: 0); see them: cuepipe styles multistyle26"),
    "scale": Param(float, 1.0, "dynamic-size models: the crop is styled at this scale, fixed for the job",
                   minimum=0.05, maximum=4.0),
    "denoise": Param(float, 0.0, "temporal noise reduction of the model's input where it is still (0: off)",
                     minimum=0.0, maximum=0.95),
    "motion": Param(float, 12.0, "an input change of this many levels (of 255) is motion: smoothing and denoise "
                    "hold back there, so nothing trails (0: smoothing is a plain average)", minimum=0.0,
                    maximum=255.0),
    "hold_box": Param(bool, True, "person mode: keep the crop while the person stays inside it (less flicker)"),
    "contact_sheet": Param(int, 0, "frames on contact.png (source / matte / result; 0: none)", minimum=0,
                           maximum=24),
    "provider": PROVIDER,
    "threads": Param(int, 0, "onnxruntime intra-op threads (0: one per core)", minimum=0),
    "outputs": Param(str, "rgba", f"comma-separated, first = next stage's input: {', '.join(OUTPUTS)}"),
    "condition_video": Param(str, None, "video feeding the condition input when condition = video",
                             kind=ParamKind.PATH),
    "allow_truncated": ALLOW_TRUNCATED,
    # the contract (models/contract.py); unset: the manifest's, else the defaults
    "input_name": Param(str, None, "contract: the image input's name (default: the first input)"),
    "output_name": Param(str, None, "contract: the generated image output's name (default: the first output)"),
    "layout": Param(str, None, "contract: nchw or nhwc (default nchw)", choices=("nchw", "nhwc")),
    "channels": Param(str, None, "contract: rgb or bgr (default rgb)", choices=("rgb", "bgr")),
    "input_range": Param(str, None, "contract: input value range, [0,1] (default), [-1,1] or [0,255]"),
    "output_range": Param(str, None, "contract: output value range (default: the input range)"),
    "dtype": Param(str, None, "contract: float32 (default), float16 or uint8",
                   choices=("float32", "float16", "uint8")),
    "size": Param(str, None, "contract: model (default: as the model declares), dynamic, or WxH"),
    "multiple": Param(int, None, "contract: dynamic sizes are made a multiple of this (default 1)", minimum=1),
    "batch": Param(int, None, "contract: frames per inference run (default 1)", minimum=1),
    "condition_input": Param(str, None, "contract: name of a second (conditioning) image input"),
    "condition": Param(str, None, "contract: what feeds condition_input: alpha (default) or video",
                       choices=("alpha", "video")),
    "pad": Param(str, None, "contract: padding up to the model's size: zero (default) or reflect",
                 choices=("zero", "reflect")),
    "vector_input": Param(str, None, "contract: name of a constant weight-vector input, fed from style"),
    "stream_out": STREAM_OUT,
}


def _coerce(params: dict[str, Any]) -> dict[str, Any]:
    """Validate keyword parameters exactly as argv values are (run() is called directly too)."""
    out = coerce_all(NAME, PARAMS, params)
    if not out["model"]:
        raise bad_argument("model", "required: a manifest name or an .onnx path")
    out["outputs"] = parse_outputs(out["outputs"], OUTPUTS)
    out["style"] = out["style"] or None  # empty: unset
    if out["denoise"] and not out["motion"]:
        raise bad_argument("denoise", "needs a motion threshold > 0 (it averages only where the input is still)")
    return out


def resolve_contract(opts: dict[str, Any]) -> tuple[Path, GeneratorContract]:
    """The model file and its contract: the manifest's (if any) with the contract parameters applied."""
    from cuepipe.models import ModelError, load_manifest, resolve
    from cuepipe.models.contract import CONTRACT_KEYS, ContractError, GeneratorContract

    try:
        path = resolve(opts["model"])
        spec = load_manifest().get(opts["model"])
    except ModelError as exc:  # missing, invalid or a bad manifest: the error's own kind
        raise StageError(exc.kind, str(exc)) from None
    overrides = {k: opts[k] for k in CONTRACT_KEYS if opts.get(k) is not None}
    try:
        return path, GeneratorContract.from_mapping(overrides, spec.generator if spec is not None else None)
    except ContractError as exc:
        raise StageError(ErrorKind.BAD_ARGUMENT, f"contract: {exc}") from None


def _generator(path: Path, contract: GeneratorContract, opts: dict[str, Any],
               cache: dict[str, Any] | None) -> Generator:
    """A validated Generator; resident workers keep the last one in ``cache``."""
    from cuepipe.stages.generator import Generator

    key = f"{NAME}:{path.resolve()}:{path.stat().st_mtime_ns}:{contract}:{opts['provider']}:{opts['threads']}"
    if cache is not None and key in cache:
        cached: Generator = cache[key]
        return cached
    gen = Generator(path, contract, opts["provider"], threads=opts["threads"])
    if cache is not None:
        for old in [k for k in cache if k.startswith(f"{NAME}:")]:
            del cache[old]
        cache[key] = gen
    return gen


def run(input: Path, output_dir: Path, events: StageEvents | None = None, cache: dict[str, Any] | None = None,
        **params: Any) -> StageResult:
    """Generate from ``input`` into ``output_dir``; see the module docstring."""
    from cuepipe.stages.contactsheet import ContactSheet
    from cuepipe.stages.framepipe import run_frames
    from cuepipe.stages.framing import FramePass, frame_source
    from cuepipe.stages.rgba import RgbaReader
    from cuepipe.stages.stream import StreamInfo, check_input, input_audio, open_frames

    events = events or StageEvents(NAME, None)
    opts = _coerce(params)
    model_path, contract = resolve_contract(opts)
    output_dir = Path(output_dir)
    with open_frames(input, 4) as reader, contextlib.ExitStack() as stack:
        mode = opts["mode"] if opts["mode"] != "auto" else ("person" if reader.has_alpha else "frame")
        if mode == "person" and not reader.has_alpha:
            raise bad_argument("mode", f"person mode needs an input with alpha, and {input} has none (use the matting "
                               "stage's rgba output, or --mode frame)")
        condition = None
        if contract.condition_input is not None and contract.condition == "video":
            if not opts["condition_video"]:
                raise bad_argument("condition_video", "the contract feeds the condition input from a video: name it")
            condition = stack.enter_context(RgbaReader(opts["condition_video"]))
        gen = _generator(model_path, contract, opts, cache)  # MODEL_INVALID here: before any output exists
        style = opts["style"]
        if style is not None and gen.io.vector_name is None:  # e.g. stylize switched to cuepipe_toon
            events.warning(WarningKind.PARAMETER_IGNORED, f"style {style!r} ignored: {opts['model']} has no styles "
                           "(its contract declares no vector_input)")
            style = None
        weights = gen.weights(style)  # BAD_ARGUMENT for a bad style, before any output exists
        if contract.batch > 1 and mode == "person" and gen.io.fixed_size is None:
            raise bad_argument("batch", "batch > 1 in person mode needs a fixed size (crops differ per frame): "
                               "declare size")
        w, h, fps, expected = reader.width, reader.height, reader.fps, reader.frame_count
        framer = FramePass(gen, mode, w, h, opts["threshold"], opts["margin"], opts["fit"], opts["max_side"],
                           opts["smoothing"], opts["scale"], opts["hold_box"], weights, opts["denoise"],
                           opts["motion"])
        audio, first = input_audio(input, reader), opts["outputs"][0]
        stream = None if opts["stream_out"] is None else (opts["stream_out"], StreamInfo(
            fps, expected, audio if OUTPUTS[first][1] != "png" else None, str(input)))
        sinks = [_sink(name, output_dir, w, h, fps, audio, stack, stream if name == first else None)
                 for name in opts["outputs"]]
        sheet = None
        if opts["contact_sheet"]:
            sheet = stack.enter_context(ContactSheet(output_dir / CONTACT_SHEET, ("source", "matte", "result"),
                                                     expected, opts["contact_sheet"]))
            sinks.append(_sheet_sink(sheet, w, h))
        events.started(input=str(input), frames=expected, fps=fps, width=w, height=h, model=opts["model"],
                       provider=gen.provider, mode=mode, contract=contract.to_mapping(),
                       model_size="dynamic" if gen.io.fixed_size is None else "{}x{}".format(*gen.io.fixed_size),
                       smoothing=opts["smoothing"], outputs=list(opts["outputs"]), threads=opts["threads"],
                       style=(style or "0") if weights is not None else "", scale=opts["scale"],
                       hold_box=opts["hold_box"], denoise=opts["denoise"], motion=opts["motion"],
                       contact_sheet=opts["contact_sheet"])

        def progress(n: int) -> None:
            events.progress(n, expected if n <= expected else -1)

        frames = run_frames(frame_source(reader, condition), framer.prepare, framer.process, sinks,
                            batch=contract.batch, on_frame=progress, name=NAME)
        check_input(input, reader, expected, frames, allow=opts["allow_truncated"], events=events)
    if frames != expected:
        log.info("%d frames (the container estimated %d)", frames, expected)
        events.progress(frames, frames)
    log.info("generated %d of %d frames (the others had no person)%s", framer.generated, frames,
             f"; {framer.hold.changes} person box(es)" if framer.hold is not None else "")
    files = opts["outputs"][1:] if opts["stream_out"] else opts["outputs"]  # the first one streamed: no file
    outputs = tuple(output_dir / OUTPUTS[n][0] for n in files)
    if sheet is not None and sheet.path.is_file():
        outputs += (sheet.path,)
    return StageResult(outputs=outputs, frames=frames)


def style_sheet(model: str, image: Any, provider: str = "cpu", max_side: int = 640, columns: int = 4) -> Any:
    """Every style of a model with a ``vector_input`` on one BGR ``image`` (scaled to ``max_side``), as a
    labelled grid (the original last): the styles have numbers, not names, so this is how to choose."""
    import cv2
    import numpy as np

    from cuepipe.stages.contactsheet import grid
    from cuepipe.stages.framing import plan
    from cuepipe.stages.generator import Generator

    path, contract = resolve_contract({"model": model})
    gen = Generator(path, contract, provider)
    if gen.io.vector_name is None:
        raise bad_argument("model", f"{model} has no styles (its contract declares no vector_input)")
    h, w = image.shape[:2]
    s = min(1.0, max_side / max(w, h))
    small = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    placement = plan(small.shape[1], small.shape[0], gen.io.fixed_size, contract.multiple, pad=contract.pad)
    x, c = gen.pack(placement.to_model(small), None)
    tiles = [(str(i), placement.from_model(gen.run([x], [c], gen.weights(str(i)))[0]))
             for i in range(gen.io.vector_size)]
    return grid([*tiles, ("original", np.ascontiguousarray(small))], columns, tile_height=min(180, small.shape[0]))


def _sheet_sink(sheet: ContactSheet, width: int, height: int) -> Sink[Any]:
    """The contact sheet as a sink: a labelled row for its frames (source / matte / result), SKIP otherwise."""
    import numpy as np

    from cuepipe.stages.blend import composite
    from cuepipe.stages.contactsheet import SKIP
    from cuepipe.stages.framepipe import Sink
    from cuepipe.stages.framing import Generated

    out = np.empty((height, width, 3), np.uint8)

    def convert(g: Generated) -> np.ndarray:
        if not sheet.wanted(g.index):
            return SKIP
        return sheet.row(g.index, [g.original, g.alpha, composite(g.colour, g.alpha, g.original, out)])
    return Sink("contact_sheet", sheet, convert)


def _sink(name: str, output_dir: Path, width: int, height: int, fps: float, audio: AudioSource | None,
          stack: contextlib.ExitStack, stream: tuple[str, StreamInfo] | None = None) -> Sink[Any]:
    """Open the writer of one output (registered on ``stack``) and say how to fill it; ``audio``: the
    input's, carried by every output but PNGs; ``stream``: (ring name, description) to send its frames to
    the next stage instead of writing its file."""
    import numpy as np

    from cuepipe.stages.blend import composite, to_bgra
    from cuepipe.stages.framepipe import Sink
    from cuepipe.stages.framing import Generated
    from cuepipe.stages.stream import output_writer

    file, codec, channels = OUTPUTS[name]
    writer = stack.enter_context(output_writer(output_dir / file, width, height, fps, codec, channels,
                                               None if codec == "png" else audio, stream))  # lazy: see matting
    out = np.empty((height, width, channels), np.uint8)  # write() has copied it into ffmpeg's pipe on return

    def convert(g: Generated) -> np.ndarray:
        if channels == 4:  # colours kept where alpha is 0: outside the person they are the input's, exactly
            return to_bgra(g.colour, g.alpha, out, clear_transparent=False)
        return composite(g.colour, g.alpha, g.original, out)
    return Sink(name, writer, convert)


def main() -> int:
    return stage_main(NAME, PARAMS, run, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
