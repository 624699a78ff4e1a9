"""Frame geometry and colours, shared by ``preprocess``, ``blend`` and ``generate``.

``Fit`` (how a source of another aspect ratio fills a frame), ``Geometry`` (one frame's rotate, crop,
resize and placement on a canvas), ``Box`` (a rectangle of frame pixels: the person's box) and
colour parsing (``#rrggbb`` and the ``NAMED_COLOURS``). The ``preprocess`` docstring says what each
``fit`` does to a clip.

A library, not a stage program, and cheap to import: stage ``PARAMS`` (which name ``Fit`` and
``BACKGROUND_WORDS``) are read by the orchestrator without running anything, so numpy and OpenCV are
imported only where a frame is transformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from cuepipe.stages.stage import bad_argument

if TYPE_CHECKING:  # numpy and OpenCV are imported in Geometry.apply(): importing this module stays cheap
    import numpy as np

_ROTATE = {90: "ROTATE_90_CLOCKWISE", 180: "ROTATE_180", 270: "ROTATE_90_COUNTERCLOCKWISE"}  # cv2 names


class Fit(StrEnum):
    """How a source of another aspect ratio is fitted into ``width`` x ``height``."""

    STRETCH = "stretch"
    CROP = "crop"
    PAD = "pad"


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


@dataclass(frozen=True)
class Box:
    """A rectangle in frame pixels: x0 <= x < x1, y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``image[box.slices]`` is the crop."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def area(self) -> int:
        return self.width * self.height

    def contains(self, other: Box) -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and other.x1 <= self.x1 and other.y1 <= self.y1

    def intersect(self, other: Box) -> Box | None:
        x0, y0, x1, y1 = max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1)
        return Box(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
