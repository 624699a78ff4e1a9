"""Small real generator models for tests and benchmarks, built with ``onnx.helper`` (fixed seeds).

Each function writes an ``.onnx`` file and returns its path. Spatial dims are symbolic (``H``, ``W``)
unless a fixed size is given; the batch dim is ``N`` unless fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime reads newer ones too; 8 keeps the files loadable by older runtimes
_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}


def image_shape(layout: str, channels: int | str = 3, size: tuple[int, int] | None = None,
                batch: int | str = "N") -> list[int | str]:
    """``[N, C, H, W]`` or ``[N, H, W, C]`` with H/W symbolic unless ``size`` = (width, height)."""
    h, w = ("H", "W") if size is None else (size[1], size[0])
    return [batch, channels, h, w] if layout == "nchw" else [batch, h, w, channels]


def _save(path: Path, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = ()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cuepipe-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity(path: Path, layout: str = "nchw", dtype: str = "float32", size: tuple[int, int] | None = None,
             input_name: str = "image", output_name: str = "generated") -> Path:
    """Output = input."""
    shape = image_shape(layout, size=size)
    return _save(path, [helper.make_node("Identity", [input_name], [output_name])],
                 [helper.make_tensor_value_info(input_name, _TYPES[dtype], shape)],
                 [helper.make_tensor_value_info(output_name, _TYPES[dtype], shape)])


def invert(path: Path, layout: str = "nchw", size: tuple[int, int] | None = None, batch: int | str = "N",
           total: float = 1.0) -> Path:
    """Output = ``total`` - input: with range [0,1] every pixel p becomes 255 - p (shows where it ran)."""
    shape = image_shape(layout, size=size, batch=batch)
    one = numpy_helper.from_array(np.array(total, np.float32), "total")
    return _save(path, [helper.make_node("Sub", ["total", "image"], ["generated"])],
                 [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                 [helper.make_tensor_value_info("generated", TensorProto.FLOAT, shape)], [one])


def conv(path: Path, seed: int = 0, layout: str = "nchw", hidden: int = 8, out_activation: str = "Sigmoid",
         size: tuple[int, int] | None = None) -> Path:
    """A random 3x3 conv -> ReLU -> 3x3 conv -> ``out_activation`` (Sigmoid: [0,1], Tanh: [-1,1]) generator.

    ``layout`` nhwc wraps the NCHW convolutions in Transposes, as TensorFlow exports do.
    """
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((hidden, 3, 3, 3)) * 0.4).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((3, hidden, 3, 3)) * 0.4).astype(np.float32)
    b2 = (rng.standard_normal(3) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    pads = [1, 1, 1, 1]
    nodes = []
    first = "image"
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["image"], ["x_nchw"], perm=[0, 3, 1, 2]))
        first = "x_nchw"
    nodes += [
        helper.make_node("Conv", [first, "w1", "b1"], ["h1"], pads=pads),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], pads=pads),
        helper.make_node(out_activation, ["h2"], ["y_nchw" if layout == "nhwc" else "generated"]),
    ]
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["y_nchw"], ["generated"], perm=[0, 2, 3, 1]))
    shape = image_shape(layout, size=size)
    return _save(path, nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                 [helper.make_tensor_value_info("generated", TensorProto.FLOAT, shape)], inits)


def masked(path: Path) -> Path:
    """Two inputs, NCHW [0,1]: ``image`` x ``condition`` (1 channel, broadcast): a conditioned generator."""
    return _save(path, [helper.make_node("Mul", ["image", "condition"], ["generated"])],
                 [helper.make_tensor_value_info("image", TensorProto.FLOAT, image_shape("nchw")),
                  helper.make_tensor_value_info("condition", TensorProto.FLOAT, image_shape("nchw", 1))],
                 [helper.make_tensor_value_info("generated", TensorProto.FLOAT, image_shape("nchw"))])


def upscale2x(path: Path) -> Path:
    """Output = input resized 2x (nearest): the output is larger than the input."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    return _save(path, [helper.make_node("Resize", ["image", "", "scales"], ["generated"], mode="nearest")],
                 [helper.make_tensor_value_info("image", TensorProto.FLOAT, image_shape("nchw"))],
                 [helper.make_tensor_value_info("generated", TensorProto.FLOAT, ["N", 3, "H2", "W2"])], [scales])
