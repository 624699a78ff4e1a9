"""Models that cuepipe builds itself, offline and byte for byte the same every time.

``cuepipe_toon`` (``build_toon``) is a small image-to-image ONNX network with FIXED, hand-set
weights: a "toon" filter, not a trained model and not a GAN. It lets the ``stylize`` pipeline run
from a fresh clone without downloading a generator, and stands in until a real one is plugged in
(docs/models.md). Per frame, NCHW RGB float32 in [0,1] -> the same, any height and width:

1. **edge-aware smoothing**: 9-tap binomial blurs (~Gaussian; separable depthwise convolutions,
   edge-padded) of the colours (sigma ~1.4) and of the luma (sigma ~1.4 and ~2.4); where the Sobel
   gradient of the blurred luma is strong the sharp input is blended back in, so flat areas lose
   noise and texture while edges stay crisp;
2. **posterisation**: the smoothed luma is cut into ``LEVELS`` flat bands (``Floor``; a short linear
   ramp between two bands instead of a hard step, so noise at a band edge does not speckle); the
   chroma (colour - luma) is kept, boosted by ``SATURATION``, and added back: flat, hue-true fills;
3. **outlines**: a difference of Gaussians of the luma (the ~2.4 blur minus the ~1.4 one),
   thresholded with ``Clip``: dark ink wherever the image is darker than its surroundings (the dark
   side of every edge, thin dark lines).

Every weight is an exact binary fraction or a decimal constant converted once to float32 (no
transcendental functions, no randomness), and the ONNX metadata is fixed, so the serialised bytes
do not depend on the machine: the manifest pins their sha256.

``onnx`` is imported inside the builders only: importing this module is cheap (``models`` is
stdlib-only at import time).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cuepipe.stages.errors import CuepipeError, ErrorKind

__all__ = ["BUILDERS", "TOON_INPUT", "TOON_OUTPUT", "BuiltinError", "build", "build_toon", "toon_bytes"]

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.10 reads it
PRODUCER = "cuepipe.models.builtin"
TOON_VERSION = "1"  # bump with any change to the graph or its weights (and update the manifest's sha256)
TOON_INPUT = "image"
TOON_OUTPUT = "toon"

# The toon filter's knobs (changing one changes the model's bytes: update the manifest).
BLUR_TAPS = (1, 8, 28, 56, 70, 56, 28, 8, 1)  # binomial, /256: ~Gaussian sigma sqrt(2)
KEEP_GAIN = 8.0  # smoothing: weight of the sharp input = clip(KEEP_GAIN * gradient, 0, 1)
LEVELS = 6  # luma bands: 0, 0.2, ..., 1 (pixels 0, 51, 102, 153, 204, 255: no ties when rounded)
RAMP_GAIN = 3.0  # the ramp between two bands is 1 / RAMP_GAIN of a band wide
SATURATION = 1.3  # chroma (colour - luma) gain
INK_LOW = 0.01  # outlines start where the luma is this much darker than its blurred surroundings ...
INK_GAIN = 25.0  # ... and are full at INK_LOW + 1 / INK_GAIN
INK_DARKNESS = 0.85  # a full outline keeps 15% of the colour underneath
LUMA = (0.299, 0.587, 0.114)  # Rec. 601, RGB order


class BuiltinError(CuepipeError, RuntimeError):
    """A built-in model cannot be built (unknown name, or onnx is not installed)."""

    kind = ErrorKind.MODEL_MISSING


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise BuiltinError("building a built-in model needs the 'onnx' package: pip install onnx") from exc
    return onnx


def toon_bytes() -> bytes:
    """The serialised ``cuepipe_toon`` model (deterministic: same bytes on every call and machine)."""
    onnx = _onnx()
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    f32 = np.float32
    taps = np.array(BLUR_TAPS, f32) / f32(sum(BLUR_TAPS))
    k, r = len(BLUR_TAPS), len(BLUR_TAPS) // 2
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], f32) / f32(8)
    inits = [
        numpy_helper.from_array(np.tile(taps.reshape(1, 1, 1, k), (3, 1, 1, 1)), "blur3_row_w"),
        numpy_helper.from_array(np.tile(taps.reshape(1, 1, k, 1), (3, 1, 1, 1)), "blur3_col_w"),
        numpy_helper.from_array(taps.reshape(1, 1, 1, k), "blur1_row_w"),
        numpy_helper.from_array(taps.reshape(1, 1, k, 1), "blur1_col_w"),
        numpy_helper.from_array(np.array(LUMA, f32).reshape(1, 3, 1, 1), "luma_w"),
        numpy_helper.from_array(np.stack([sobel_x, sobel_x.T]).reshape(2, 1, 3, 3), "sobel_w"),
        numpy_helper.from_array(np.array([0, 0, 0, r, 0, 0, 0, r], np.int64), "pad_row"),
        numpy_helper.from_array(np.array([0, 0, r, 0, 0, 0, r, 0], np.int64), "pad_col"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pad_sobel"),
        numpy_helper.from_array(np.array([1], np.int64), "channel_axis"),
    ]
    scalars = {"zero": 0.0, "half": 0.5, "one": 1.0, "steps": LEVELS - 1, "ramp_gain": RAMP_GAIN,
               "keep_gain": KEEP_GAIN, "saturation": SATURATION, "ink_low": INK_LOW, "ink_gain": INK_GAIN,
               "ink_darkness": INK_DARKNESS}
    inits += [numpy_helper.from_array(np.array(v, f32), n) for n, v in scalars.items()]

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    def blur(src: str, out: str, channels: int) -> list[Any]:
        w = f"blur{channels}"
        return [node("Pad", [src, "pad_row"], f"{out}_pad_row", mode="edge"),
                node("Conv", [f"{out}_pad_row", f"{w}_row_w"], f"{out}_row", group=channels),
                node("Pad", [f"{out}_row", "pad_col"], f"{out}_pad_col", mode="edge"),
                node("Conv", [f"{out}_pad_col", f"{w}_col_w"], out, group=channels)]

    nodes = [
        node("Clip", [TOON_INPUT, "zero", "one"], "x"),
        # blurs (edge padding: no dark border): the colours (sigma ~1.4); the luma once (sigma ~1.4,
        # the luma of the colour blur) and three times (sigma ~2.4)
        *blur("x", "blur", 3),
        node("Conv", ["x", "luma_w"], "x_luma"),
        *blur("x_luma", "luma_blur", 1),
        *blur("luma_blur", "luma_blur_mid", 1),
        *blur("luma_blur_mid", "luma_blur2", 1),
        # 1. edge-aware smoothing: the blur, with the sharp input blended back in where the gradient
        # (Sobel of the blurred luma, /8: a step of height h peaks near h/2) is strong
        node("Pad", ["luma_blur", "pad_sobel"], "luma_blur_pad", mode="edge"),
        node("Conv", ["luma_blur_pad", "sobel_w"], "grad_xy"),
        node("Mul", ["grad_xy", "grad_xy"], "grad_sq"),
        node("ReduceSum", ["grad_sq", "channel_axis"], "grad_sq_sum", keepdims=1),
        node("Sqrt", ["grad_sq_sum"], "grad"),
        node("Mul", ["grad", "keep_gain"], "keep_raw"),
        node("Clip", ["keep_raw", "zero", "one"], "keep"),
        node("Sub", ["x", "blur"], "detail"),
        node("Mul", ["detail", "keep"], "kept_detail"),
        node("Add", ["blur", "kept_detail"], "smooth"),
        # the same for the luma (by linearity luma(smooth)), and with the stronger blur for the bands
        node("Sub", ["x_luma", "luma_blur"], "luma_detail"),
        node("Mul", ["luma_detail", "keep"], "luma_kept_detail"),
        node("Add", ["luma_blur", "luma_kept_detail"], "luma"),
        node("Sub", ["x_luma", "luma_blur2"], "luma_detail2"),
        node("Mul", ["luma_detail2", "keep"], "luma_kept_detail2"),
        node("Add", ["luma_blur2", "luma_kept_detail2"], "luma_smooth"),
        # 2. colour: the luma posterised to LEVELS flat bands (a short linear ramp between two bands
        # instead of a hard step, so noise near a band edge does not speckle), the chroma boosted
        node("Sub", ["smooth", "luma"], "chroma"),
        node("Mul", ["chroma", "saturation"], "chroma_boost"),
        node("Mul", ["luma_smooth", "steps"], "luma_t"),
        node("Floor", ["luma_t"], "luma_floor"),
        node("Sub", ["luma_t", "luma_floor"], "luma_frac"),
        node("Sub", ["luma_frac", "half"], "luma_frac_c"),
        node("Mul", ["luma_frac_c", "ramp_gain"], "ramp_c"),
        node("Add", ["ramp_c", "half"], "ramp_raw"),
        node("Clip", ["ramp_raw", "zero", "one"], "ramp"),
        node("Add", ["luma_floor", "ramp"], "luma_level"),
        node("Div", ["luma_level", "steps"], "luma_band"),
        node("Add", ["luma_band", "chroma_boost"], "colour_raw"),
        node("Clip", ["colour_raw", "zero", "one"], "colour"),
        # 3. outlines (difference of Gaussians): ink where the luma is darker than its surroundings,
        # fading in from INK_LOW to INK_LOW + 1 / INK_GAIN
        node("Sub", ["luma_blur2", "luma_blur"], "dog"),
        node("Sub", ["dog", "ink_low"], "dog_over"),
        node("Mul", ["dog_over", "ink_gain"], "ink_raw"),
        node("Clip", ["ink_raw", "zero", "one"], "ink_amount"),
        node("Mul", ["ink_amount", "ink_darkness"], "ink"),
        node("Sub", ["one", "ink"], "shade"),
        node("Mul", ["colour", "shade"], TOON_OUTPUT),
    ]
    shape: list[str | int | None] = [1, 3, "H", "W"]
    graph = helper.make_graph(
        nodes, "cuepipe_toon",
        [helper.make_tensor_value_info(TOON_INPUT, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(TOON_OUTPUT, TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    model.producer_name = PRODUCER
    model.producer_version = TOON_VERSION
    model.doc_string = (
        "cuepipe_toon: a fixed-weight toon filter (edge-aware blur, luma posterisation, chroma boost, "
        "difference-of-Gaussians outlines); not a trained model, not a GAN. "
        "NCHW RGB float32 [0,1] in and out, batch 1, any height and width."
    )
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def build(name: str) -> bytes:
    """The bytes of built-in model ``name`` (a manifest entry's ``builtin`` key)."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise BuiltinError(f"unknown built-in model {name!r}; known: {', '.join(BUILDERS)}") from None
    return builder()


def build_toon(path: Path) -> None:
    """Write the toon model to ``path`` atomically (temp file beside it, then rename)."""
    path = Path(path)
    data = toon_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    log.info("built %s (%d bytes)", path, len(data))


#: built-in name (the manifest's ``builtin`` key) -> a function returning the model's bytes
BUILDERS: dict[str, Callable[[], bytes]] = {"toon": toon_bytes}
