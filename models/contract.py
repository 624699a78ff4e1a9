"""The contract of an image-to-image generator model: how frames become its input tensor and back.

Declared in the manifest (a family's ``[families.NAME.generator]`` table) or as ``generate`` stage
parameters (same keys; a parameter overrides the manifest). Stdlib-only, like ``models``.

| key | values | default | meaning |
|---|---|---|---|
| ``input_name`` | a model input name | the first input | the image input |
| ``output_name`` | a model output name | the first output | the generated image |
| ``layout`` | ``nchw`` / ``nhwc`` | ``nchw`` | tensor layout, input and output |
| ``channels`` | ``rgb`` / ``bgr`` | ``rgb`` | channel order, input and output |
| ``input_range`` | ``[0,1]``, ``[-1,1]``, ``[0,255]``, any ``[lo,hi]`` | ``[0,1]`` | pixel 0 -> lo, 255 -> hi |
| ``output_range`` | same | the input range | lo -> pixel 0, hi -> 255 (clipped) |
| ``dtype`` | ``float32`` / ``float16`` / ``uint8`` | ``float32`` | the image input's element type |
| ``size`` | ``model``, ``dynamic`` or ``WxH`` | ``model`` | ``model``: fixed if the model fixes it |
| ``multiple`` | int >= 1 | 1 | a dynamic size is made a multiple of this |
| ``batch`` | int >= 1 | 1 | frames per run (a model with a fixed batch dim needs exactly that) |
| ``condition_input`` | a model input name, or empty | none | a second, conditioning image input |
| ``condition`` | ``alpha`` / ``video`` | ``alpha`` | what feeds it: the matte, or the ``condition_video`` |
| ``pad`` | ``zero`` / ``reflect`` | ``zero`` | how a crop is padded up to the model's size or ``multiple`` |
| ``vector_input`` | a model input name, or empty | none | a constant 1-D weight vector (e.g. a style blend) |

``vector_input`` names a float input of fixed length N fed the same vector on every frame of a job:
non-negative weights summing to 1, set by the ``generate`` stage's ``style`` parameter and parsed by
``parse_weights`` (``"19"`` = one entry, ``"19:0.7,7:0.3"`` = a blend, normalised). Being per job,
not part of the contract, it can change between jobs without reloading the model.

Ranges are written in brackets (``"[-1,1]"``) so that a value never starts with ``-`` on a command line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from cuepipe.stages.errors import CuepipeError, ErrorKind

__all__ = ["CONTRACT_KEYS", "ContractError", "GeneratorContract", "parse_range", "parse_size", "parse_weights"]

LAYOUTS = ("nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
DTYPES = ("float32", "float16", "uint8")
CONDITIONS = ("alpha", "video")
PADS = ("zero", "reflect")
_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")
_NAMED_RANGES = {"unit": (0.0, 1.0), "tanh": (-1.0, 1.0), "byte": (0.0, 255.0)}


class ContractError(CuepipeError, ValueError):
    """A contract value is malformed; the message names the key."""

    kind = ErrorKind.BAD_ARGUMENT


def parse_range(value: Any, key: str = "range") -> tuple[float, float]:
    """``"[-1,1]"``, ``"-1..1"``, ``"0,255"``, ``[0, 1]`` or a name (unit/tanh/byte) -> (lo, hi), lo < hi."""
    if isinstance(value, str) and value.strip().lower() in _NAMED_RANGES:
        return _NAMED_RANGES[value.strip().lower()]
    parts: list[Any]
    if isinstance(value, list | tuple):
        parts = list(value)
    elif isinstance(value, str):
        parts = [p for p in re.split(r",|\.\.", value.strip().strip("[]()")) if p.strip()]
    else:
        parts = []
    try:
        lo, hi = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ContractError(f"{key}: expected a range like [0,1], [-1,1] or [0,255], got {value!r}")
    return lo, hi


def parse_size(value: Any, key: str = "size") -> tuple[int, int] | str:
    """``"model"``, ``"dynamic"``, ``"512x512"`` or ``[512, 512]`` -> "model" / "dynamic" / (width, height)."""
    if isinstance(value, str) and value.strip().lower() in ("model", "dynamic"):
        return value.strip().lower()
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m:
        w, h = int(m[1]), int(m[2])
    elif isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int for v in value):
        w, h = value
    else:
        w = h = 0
    if w <= 0 or h <= 0:
        raise ContractError(f"{key}: expected model, dynamic or WIDTHxHEIGHT (e.g. 512x512), got {value!r}")
    return w, h


def _range_text(r: tuple[float, float]) -> str:
    return f"[{r[0]:g},{r[1]:g}]"


@dataclass(frozen=True)
class GeneratorContract:
    """A validated contract (module docstring). Build with ``from_mapping``; immutable."""

    input_name: str | None = None
    output_name: str | None = None
    layout: str = "nchw"
    channels: str = "rgb"
    input_range: tuple[float, float] = (0.0, 1.0)
    output_range: tuple[float, float] | None = None
    dtype: str = "float32"
    size: tuple[int, int] | str = "model"
    multiple: int = 1
    batch: int = 1
    condition_input: str | None = None
    condition: str = "alpha"
    pad: str = "zero"
    vector_input: str | None = None

    @property
    def out_range(self) -> tuple[float, float]:
        """The output range (the input's unless declared)."""
        return self.output_range or self.input_range

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: GeneratorContract | None = None) -> GeneratorContract:
        """``base`` (default: all defaults) with the keys in ``data`` applied; ContractError names a bad key."""
        if unknown := sorted(set(data) - set(CONTRACT_KEYS)):
            raise ContractError(f"unknown contract key(s) {unknown}; known: {', '.join(CONTRACT_KEYS)}")
        changes: dict[str, Any] = {}
        for key, value in data.items():
            changes[key] = _parse(key, value)
        contract = replace(base or cls(), **changes)
        if contract.dtype == "uint8" and contract.input_range != (0.0, 255.0):
            raise ContractError(f"dtype: a uint8 input takes pixels as they are: input_range must be [0,255], "
                                f"not {_range_text(contract.input_range)}")
        if contract.condition_input is not None and contract.condition_input == contract.input_name:
            raise ContractError("condition_input: must differ from input_name")
        if contract.vector_input is not None and contract.vector_input in (contract.input_name,
                                                                           contract.condition_input):
            raise ContractError("vector_input: must differ from input_name and condition_input")
        return contract

    def to_mapping(self) -> dict[str, Any]:
        """The contract as strings and numbers (for ``started`` and logs); unset names are empty."""
        size = self.size if isinstance(self.size, str) else f"{self.size[0]}x{self.size[1]}"
        return {"input_name": self.input_name or "", "output_name": self.output_name or "", "layout": self.layout,
                "channels": self.channels, "input_range": _range_text(self.input_range),
                "output_range": _range_text(self.out_range), "dtype": self.dtype, "size": size,
                "multiple": self.multiple, "batch": self.batch, "condition_input": self.condition_input or "",
                "condition": self.condition, "pad": self.pad, "vector_input": self.vector_input or ""}

    def describe(self) -> str:
        """One line: ``nhwc rgb [-1,1] -> [-1,1] float32, size dynamic (multiple of 32), batch 1``."""
        m = self.to_mapping()
        multiple = f" (multiple of {self.multiple})" if self.multiple > 1 else ""
        cond = f", condition {m['condition_input']} <- {self.condition}" if self.condition_input else ""
        pad = f", {self.pad} padding" if self.pad != "zero" else ""
        vector = f", weights {self.vector_input}" if self.vector_input else ""
        return (f"{self.layout} {self.channels} {m['input_range']} -> {m['output_range']} {self.dtype}, size "
                f"{m['size']}{multiple}{pad}, batch {self.batch}{cond}{vector}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in choices:
        raise ContractError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return str(text)


def _positive_int(key: str, value: Any) -> int:
    try:
        number = int(value) if not isinstance(value, bool | float) else 0
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ContractError(f"{key}: expected an integer >= 1, got {value!r}")
    return number


def _name(key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        raise ContractError(f"{key}: expected a tensor name, got {value!r}")
    return value.strip() or None


def _parse(key: str, value: Any) -> Any:
    if key in ("input_name", "output_name", "condition_input", "vector_input"):
        return _name(key, value)
    if key == "layout":
        return _choice(key, value, LAYOUTS)
    if key == "channels":
        return _choice(key, value, CHANNEL_ORDERS)
    if key == "dtype":
        return _choice(key, value, DTYPES)
    if key == "condition":
        return _choice(key, value, CONDITIONS)
    if key == "pad":
        return _choice(key, value, PADS)
    if key in ("input_range", "output_range"):
        return parse_range(value, key)
    if key == "size":
        return parse_size(value, key)
    return _positive_int(key, value)  # multiple, batch


def parse_weights(text: Any, size: int, key: str = "style") -> tuple[float, ...]:
    """``"19"`` or ``"19:0.7,7:0.3"`` -> ``size`` non-negative weights summing to 1 (the blend normalised).

    An index alone has weight 1; an index may appear once. ContractError (BAD_ARGUMENT) names ``key``,
    the valid range and the syntax otherwise.
    """
    syntax = f"an index 0..{size - 1} or a blend like 19:0.7,7:0.3"
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text.strip():
        raise ContractError(f"{key}: expected {syntax}, got {text!r}")
    weights = [0.0] * size
    seen: set[int] = set()
    for part in text.split(","):
        index_text, colon, weight_text = part.partition(":")
        try:
            index = int(index_text.strip())
            weight = float(weight_text) if colon else 1.0  # "19:" is an error, not weight 1
        except ValueError:
            raise ContractError(f"{key}: {part.strip()!r} is not INDEX or INDEX:WEIGHT; expected {syntax}") from None
        if not 0 <= index < size:
            raise ContractError(f"{key}: index {index} is out of range: this model has {size} (0..{size - 1})")
        if index in seen:
            raise ContractError(f"{key}: index {index} appears twice in {text!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ContractError(f"{key}: weight {weight_text.strip()!r} of index {index} must be a number >= 0")
        seen.add(index)
        weights[index] = weight
    top = max(weights)
    if not top > 0:
        raise ContractError(f"{key}: the weights in {text!r} are all zero")
    scaled = [w / top for w in weights]  # first to at most 1, so that huge weights cannot sum to inf
    total = sum(scaled)
    return tuple(w / total for w in scaled)


#: Every contract key, in the order of the module docstring's table.
CONTRACT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GeneratorContract))
