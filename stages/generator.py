"""An image-to-image ONNX generator behind its declared contract: uint8 images in, uint8 images out.

    gen = Generator(model_path, contract, provider="auto")  # validated before the first frame
    x, c = gen.pack(image_bgr, alpha)                       # the model's tensors (reader thread)
    [out_bgr] = gen.run([x], [c], weights)                  # BGR uint8 at the model's output size

``weights`` feeds the contract's ``vector_input`` (a style blend: ``gen.weights("19:0.7,7:0.3")``); it
is an argument of ``run``, not state, so one loaded Generator serves jobs with different styles.

The contract (``cuepipe.models.contract.GeneratorContract``) is checked against the model's real inputs
and outputs when the ``Generator`` is created: names, ranks, dtypes, fixed channel / size / batch
dims, then one test run on zeros of the planned shape. Any mismatch is ``StageError(MODEL_INVALID)``
saying what was declared and what the model has, so a stage fails before its first frame.

Pixel mapping: input ``p`` in 0..255 -> ``lo + p * (hi - lo) / 255``; output ``y`` -> pixel
``(y - lo) * 255 / (hi - lo)``, rounded to nearest and clipped (``cv2.addWeighted`` into uint8).
An identity model therefore returns every uint8 pixel exactly, whatever the layout, order and range.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cuepipe.models.contract import ContractError, GeneratorContract, parse_weights
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.stage import StageError

__all__ = ["Generator", "ModelIO", "TensorFormat", "check_contract"]

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
               "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
               "tensor(int8)": "int8", "tensor(bool)": "bool"}
_NUMPY = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
_PROBE_SIDE = 64  # a dynamic model's test run uses about this size


@dataclass(frozen=True)
class ModelIO:
    """What the contract check resolved: tensor names, sizes and channel counts."""

    input_name: str
    output_name: str
    condition_name: str | None
    condition_channels: int  # 1 or 3 (0 without a condition input)
    fixed_size: tuple[int, int] | None  # (width, height) the model takes, None when dynamic
    fixed_batch: int | None  # the model's own fixed batch dim, if any
    vector_name: str | None = None  # the constant weight-vector input (contract vector_input)
    vector_size: int = 0  # its fixed length


def _fixed(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def _dtype(arg: Any) -> str:
    return _ORT_DTYPES.get(arg.type, arg.type)


def _describe(args: list[Any]) -> str:
    return ", ".join(f"{a.name}[{','.join(str(d) if d else '?' for d in a.shape)}] {_dtype(a)}" for a in args)


class TensorFormat:
    """Pixels <-> tensor values for one contract (module docstring); one image, no batch dim."""

    def __init__(self, contract: GeneratorContract) -> None:
        self.nchw, self.rgb = contract.layout == "nchw", contract.channels == "rgb"
        self.dtype = _NUMPY[contract.dtype]
        lo, hi = contract.input_range
        self._scale, self._offset = np.float32((hi - lo) / 255.0), np.float32(lo)
        lo, hi = contract.out_range
        self._out_scale = 255.0 / (hi - lo)
        self._out_offset = -lo * self._out_scale

    def pack(self, image: np.ndarray, channels: int = 3) -> np.ndarray:
        """BGR uint8 HxWx3 or gray HxW -> a CHW / HWC tensor with ``channels`` (1 or 3) channels."""
        if image.ndim == 2 and channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.ndim == 3 and channels == 1:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        if image.ndim == 3 and self.rgb:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        hwc = image.reshape(image.shape[0], image.shape[1], channels)
        if self.dtype is np.uint8:
            arr = hwc
        else:
            arr = hwc.astype(np.float32)
            arr *= self._scale
            if self._offset:
                arr += self._offset
            if self.dtype is not np.float32:
                arr = arr.astype(self.dtype)
        return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.nchw else arr)

    def unpack(self, tensor: np.ndarray) -> np.ndarray:
        """One output image (CHW / HWC, 1 or 3 channels, any float or uint8) -> BGR uint8 HxWx3."""
        hwc = tensor.transpose(1, 2, 0) if self.nchw else tensor
        channels = hwc.shape[2]
        if hwc.dtype == np.uint8 and self._out_scale == 1.0 and self._out_offset == 0.0:
            image = np.ascontiguousarray(hwc)
        else:
            y = np.ascontiguousarray(hwc, dtype=np.float32)
            y = y.reshape(y.shape[0], y.shape[1]) if channels == 1 else y
            image = cv2.addWeighted(y, self._out_scale, y, 0.0, self._out_offset, dtype=cv2.CV_8U)
        if channels == 1:
            return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2BGR)
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if self.rgb else image


def check_contract(session: Any, contract: GeneratorContract, where: str) -> ModelIO:
    """Compare ``contract`` with the session's inputs and outputs; MODEL_INVALID naming both on a mismatch."""
    ins, outs = session.get_inputs(), session.get_outputs()

    def fail(problem: str) -> StageError:
        return StageError(ErrorKind.MODEL_INVALID,
                          f"{where}: {problem}. Declared contract: {contract.describe()}. Found: inputs "
                          f"{_describe(ins)}; outputs {_describe(outs)}")

    by_name, out_by_name = {i.name: i for i in ins}, {o.name: o for o in outs}
    cond, vector = contract.condition_input, contract.vector_input
    if cond is not None and cond not in by_name:
        raise fail(f"the model has no input {cond!r} (condition_input)")
    vector_size = 0
    if vector is not None:
        if vector not in by_name:
            raise fail(f"the model has no input {vector!r} (vector_input)")
        arg = by_name[vector]
        vector_size = (_fixed(arg.shape[0]) or 0) if len(arg.shape) == 1 else 0
        if not vector_size or _dtype(arg) != "float32":
            raise fail(f"vector_input {vector!r} must be a float32 vector of fixed length, not "
                       f"[{','.join(str(d) for d in arg.shape)}] {_dtype(arg)}")
    image_name = contract.input_name or next((i.name for i in ins if i.name not in (cond, vector)), "")
    if image_name not in by_name:
        raise fail(f"the model has no input {image_name!r} (input_name)")
    if extra := [n for n in by_name if n not in (image_name, cond, vector)]:
        raise fail(f"input(s) {extra} are not fed by the contract (declare condition_input for a second image, "
                   "vector_input for a weight vector)")
    axes = (1, 2, 3) if contract.layout == "nchw" else (3, 1, 2)  # channel, height, width
    other, other_channel_axis = ("nhwc", 3) if contract.layout == "nchw" else ("nchw", 1)

    def image_tensor(arg: Any, role: str, channels: tuple[int, ...], dtypes: tuple[str, ...]) -> int | None:
        shape = list(arg.shape)
        if len(shape) != 4:
            raise fail(f"{role} {arg.name!r} has rank {len(shape)}; a {contract.layout} image tensor has rank 4")
        if _dtype(arg) not in dtypes:
            raise fail(f"{role} {arg.name!r} is {_dtype(arg)}, expected {' or '.join(dtypes)}")
        c, looks_other = _fixed(shape[axes[0]]), _fixed(shape[other_channel_axis]) in channels
        if (c is not None and c not in channels) or (c is None and looks_other):
            hint = f" (it looks {other}: declare layout = {other!r})" if looks_other else ""
            raise fail(f"{role} {arg.name!r} has {c or shape[axes[0]]} at the channel axis {axes[0]} of layout "
                       f"{contract.layout}, expected {' or '.join(map(str, channels))}{hint}")
        return c

    image = by_name[image_name]
    image_tensor(image, "input", (3,), (contract.dtype,))
    h, w = _fixed(image.shape[axes[1]]), _fixed(image.shape[axes[2]])
    model_size = (w, h) if w is not None and h is not None else None
    if (w is None) != (h is None) and not isinstance(contract.size, tuple):
        raise fail(f"input {image_name!r} fixes only one of height / width; declare size = 'WxH'")
    if contract.size == "dynamic" and model_size is not None:
        raise fail(f"size is declared dynamic but input {image_name!r} is fixed at {w}x{h}")
    if isinstance(contract.size, tuple) and (w not in (None, contract.size[0]) or h not in (None, contract.size[1])):
        raise fail(f"size is declared {contract.size[0]}x{contract.size[1]} but input {image_name!r} is "
                   f"{w or '?'}x{h or '?'}")
    fixed_size = contract.size if isinstance(contract.size, tuple) else model_size
    batch = _fixed(image.shape[0])
    if batch is not None and batch != contract.batch:
        raise fail(f"input {image_name!r} has a fixed batch of {batch}, declared batch {contract.batch}")
    output_name = contract.output_name or outs[0].name
    if output_name not in out_by_name:
        raise fail(f"the model has no output {output_name!r} (output_name)")
    image_tensor(out_by_name[output_name], "output", (1, 3), ("float32", "float16", "uint8"))
    cond_channels = 0
    if cond is not None:
        arg = by_name[cond]
        found = image_tensor(arg, "condition input", (1, 3), (contract.dtype,))
        cond_channels = found or (1 if contract.condition == "alpha" else 3)
        ch, cw = _fixed(arg.shape[axes[1]]), _fixed(arg.shape[axes[2]])
        if fixed_size is not None and (cw not in (None, fixed_size[0]) or ch not in (None, fixed_size[1])):
            raise fail(f"condition input {cond!r} is {cw}x{ch}, the image input {fixed_size[0]}x{fixed_size[1]}")
    return ModelIO(image_name, output_name, cond, cond_channels, fixed_size, batch, vector, vector_size)


class Generator:
    """One session with its validated contract (module docstring). Stateless between calls."""

    def __init__(self, model_path: Path | str, contract: GeneratorContract, provider: str = "auto",
                 threads: int = 0, inter_threads: int = 0, spinning: bool = False, device_id: int = 0) -> None:
        from cuepipe.stages.inference import open_session

        self.model_path, self.contract = Path(model_path), contract
        self.session, self.provider = open_session(model_path, provider, threads, inter_threads, spinning, device_id)
        self.io = check_contract(self.session, contract, str(model_path))
        self.format = TensorFormat(contract)
        self._probe()

    def _probe(self) -> None:
        """One run on zeros of the planned shape, so a wrong layout fails now, not at frame 1."""
        if self.io.fixed_size is not None:
            w, h = self.io.fixed_size
        else:
            w = h = self.contract.multiple * math.ceil(_PROBE_SIDE / self.contract.multiple)
        zeros = np.zeros((h, w, 3), np.uint8)
        alpha = np.zeros((h, w), np.uint8) if self.io.condition_name else None
        x, c = self.pack(zeros, alpha)
        batch = self.contract.batch
        try:
            out = self._run(np.stack([x] * batch), None if c is None else np.stack([c] * batch), self.weights(None))
        except Exception as exc:  # onnxruntime's run errors share no base class (InvalidArgument, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(ErrorKind.MODEL_INVALID,
                             f"{self.model_path}: a test run with a {list(x.shape)} {self.contract.dtype} image "
                             f"({self.contract.describe()}) failed: {first}") from None
        channel_axis = 1 if self.format.nchw else 3
        if out.ndim != 4 or out.shape[0] != self.contract.batch or out.shape[channel_axis] not in (1, 3):
            raise StageError(ErrorKind.MODEL_INVALID,
                             f"{self.model_path}: for a {list(x.shape)} input the output {self.io.output_name!r} is "
                             f"{list(out.shape)}: expected batch {self.contract.batch} and 1 or 3 channels at axis "
                             f"{channel_axis} ({self.contract.layout}); is the layout right?")
        log.info("%s: contract ok (%s); test run %s -> %s", self.model_path.name, self.contract.describe(),
                 list(x.shape), list(out.shape))

    def pack(self, image: np.ndarray, condition: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's image tensor (and condition tensor) for one BGR uint8 image (and its condition)."""
        x = self.format.pack(image)
        if self.io.condition_name is None:
            return x, None
        if condition is None:
            raise ValueError("this model needs a condition image")
        return x, self.format.pack(condition, self.io.condition_channels)

    def weights(self, spec: str | None) -> np.ndarray | None:
        """The ``vector_input`` feed for a ``style`` value (``models.contract.parse_weights``; None: entry 0).

        None for a model without a vector input, where a given ``spec`` is a ``bad_argument``."""
        if self.io.vector_name is None:
            if spec is not None:
                raise StageError(ErrorKind.BAD_ARGUMENT, f"style: {self.model_path.name} takes no style (its "
                                 "contract declares no vector_input)")
            return None
        try:
            values = parse_weights(spec if spec is not None else "0", self.io.vector_size)
        except ContractError as exc:
            raise StageError(ErrorKind.BAD_ARGUMENT, str(exc)) from None
        return np.asarray(values, np.float32)

    def _run(self, x: np.ndarray, c: np.ndarray | None, w: np.ndarray | None) -> np.ndarray:
        feeds = {self.io.input_name: x}
        if self.io.condition_name is not None and c is not None:
            feeds[self.io.condition_name] = c
        if self.io.vector_name is not None:
            if w is None:
                raise ValueError("this model needs its weight vector (Generator.weights)")
            feeds[self.io.vector_name] = w
        out: np.ndarray = self.session.run([self.io.output_name], feeds)[0]
        return out

    def run(self, xs: list[np.ndarray], cs: list[np.ndarray | None], w: np.ndarray | None = None) -> list[np.ndarray]:
        """Generate for up to ``batch`` packed images of one size: BGR uint8 images at the output size.

        ``w``: the weight vector from ``weights`` (required when the model has a ``vector_input``)."""
        n = len(xs)
        pad = (self.io.fixed_batch or n) - n  # a fixed batch dim is filled up with the last image
        x = xs[0][None] if n == 1 and not pad else np.stack(xs + [xs[-1]] * pad)
        c = None
        if self.io.condition_name is not None:
            conds = [a for a in cs if a is not None]
            c = conds[0][None] if n == 1 and not pad else np.stack(conds + [conds[-1]] * pad)
        out = self._run(x, c, w)
        return [self.format.unpack(out[i]) for i in range(n)]
