"""Where the ``generate`` stage runs its model in a frame, and how the result goes back.

``FramePass`` is the stage's per-frame work on top of the pieces below: ``prepare`` (reader thread:
box, crop, placement, tensors) and ``process`` (calling thread, in order: inference, back to the
frame, smoothing, paste under the alpha).

- ``person_box``: the bounding box of ``alpha > threshold`` plus a margin (a fraction of the box's
  longer side), clipped to the frame. ``fit_aspect`` widens it (within the frame) towards a fixed-size
  model's aspect ratio, so that the model sees more of the frame and less letterbox.
- ``plan`` / ``Placement``: a crop of ``src`` size becomes the model's input size and back.
  A fixed size (``WxH``): ``letterbox`` scales the crop to fit inside and centres it on black bars,
  ``resize`` stretches it. A dynamic size: the crop is scaled by ``scale`` (fixed for a job, so the
  style's strokes keep one size however the person box changes), then so its longer side is at most
  ``max_side`` (0: no limit), then ``letterbox`` pads it (centred) up to the next multiple of
  ``multiple``, ``resize`` stretches it to the nearest multiple. Padding is black (``pad = zero``)
  or the crop's mirror image (``reflect``: no dark border for a network to restyle into the
  picture). ``from_model`` cuts the inner rectangle out of the model's output (scaled if the
  output's size differs from the input's, as for a 2x upscaler) and resizes it back to ``src``.
  When nothing needs resizing nothing is resampled, so an identity model round-trips pixels exactly.
- Steadiness against flicker (``stages/steady.py``): ``BoxHold``, ``Stillness``, ``Denoiser`` (the
  input, where still) and ``Smoother`` (the output, gated by stillness when ``motion`` is set).

Resizing uses INTER_AREA when shrinking and INTER_LINEAR when enlarging.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.geometry import Box
from cuepipe.stages.stage import StageError
from cuepipe.stages.steady import BoxHold, Denoiser, Smoother, Stillness

if TYPE_CHECKING:
    from cuepipe.stages.generator import Generator

__all__ = ["Box", "BoxHold", "Denoiser", "FramePass", "Generated", "Placement", "Prepared", "Smoother", "Stillness",
           "fit_aspect", "frame_source", "person_box", "plan"]

FITS = ("letterbox", "resize")


def person_box(alpha: np.ndarray, threshold: int, margin: float) -> Box | None:
    """The box around ``alpha > threshold`` grown by ``margin`` x its longer side; None when empty."""
    _, binary = cv2.threshold(alpha, threshold, 255, cv2.THRESH_BINARY)
    x, y, w, h = cv2.boundingRect(binary)
    if w == 0 or h == 0:
        return None
    pad = round(margin * max(w, h))
    height, width = alpha.shape[:2]
    return Box(max(0, x - pad), max(0, y - pad), min(width, x + w + pad), min(height, y + h + pad))


def fit_aspect(box: Box, aspect: float, width: int, height: int) -> Box:
    """``box`` widened (or heightened) about its centre towards ``aspect`` = w/h, kept inside the frame."""
    w, h = box.width, box.height
    want_w, want_h = (min(width, round(h * aspect)), h) if w < h * aspect else (w, min(height, round(w / aspect)))
    want_w, want_h = max(w, want_w), max(h, want_h)

    def span(lo: int, size: int, want: int, limit: int) -> tuple[int, int]:
        start = lo - (want - size) // 2
        start = min(max(0, start), limit - want)
        return start, start + want

    x0, x1 = span(box.x0, w, want_w, width)
    y0, y1 = span(box.y0, h, want_h, height)
    return Box(x0, y0, x1, y1)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    shrink = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Placement:
    """A crop of ``src`` = (w, h) placed at ``inner`` = (x, y, w, h) in the model's ``model`` = (w, h) input."""

    src: tuple[int, int]
    model: tuple[int, int]
    inner: tuple[int, int, int, int]
    pad: str = "zero"  # outside ``inner``: black (zero) or the crop mirrored (reflect)

    def to_model(self, image: np.ndarray) -> np.ndarray:
        """The crop (BGR HxWx3 or gray HxW uint8) at the model's input size, padded outside ``inner``."""
        x, y, w, h = self.inner
        scaled = _resize(image, (w, h))
        if (w, h) == self.model:
            return scaled
        if self.pad == "reflect":
            return cv2.copyMakeBorder(scaled, y, self.model[1] - y - h, x, self.model[0] - x - w,
                                      cv2.BORDER_REFLECT_101)
        canvas = np.zeros((self.model[1], self.model[0], *image.shape[2:]), np.uint8)
        canvas[y : y + h, x : x + w] = scaled
        return canvas

    def from_model(self, output: np.ndarray) -> np.ndarray:
        """The model's output image cut back to ``inner`` and resized to ``src``."""
        kx, ky = output.shape[1] / self.model[0], output.shape[0] / self.model[1]
        x, y, w, h = self.inner
        x0, y0 = round(x * kx), round(y * ky)
        cut = output[y0 : y0 + max(1, round(h * ky)), x0 : x0 + max(1, round(w * kx))]
        return np.ascontiguousarray(_resize(cut, self.src))


def plan(src_w: int, src_h: int, fixed: tuple[int, int] | None, multiple: int = 1, fit: str = "letterbox",
         max_side: int = 0, scale: float = 1.0, pad: str = "zero") -> Placement:
    """How a ``src_w`` x ``src_h`` crop becomes the model's input (module docstring)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, not {fit!r}")
    if fixed is not None:
        mw, mh = fixed
        if fit == "resize":
            return Placement((src_w, src_h), fixed, (0, 0, mw, mh), pad)
        s = min(mw / src_w, mh / src_h)
        iw, ih = min(mw, max(1, round(src_w * s))), min(mh, max(1, round(src_h * s)))
        return Placement((src_w, src_h), fixed, ((mw - iw) // 2, (mh - ih) // 2, iw, ih), pad)
    s = scale
    if max_side:
        s = min(s, max_side / max(src_w, src_h))
    tw, th = max(1, round(src_w * s)), max(1, round(src_h * s))
    if fit == "resize":
        mw, mh = (max(multiple, multiple * round(v / multiple)) for v in (tw, th))
        return Placement((src_w, src_h), (mw, mh), (0, 0, mw, mh), pad)
    mw, mh = (multiple * math.ceil(v / multiple) for v in (tw, th))
    return Placement((src_w, src_h), (mw, mh), ((mw - tw) // 2, (mh - th) // 2, tw, th), pad)


@dataclass
class Prepared:
    """One frame after the reader thread's work: the input, and the model's tensors (None: no person)."""

    index: int
    frame: np.ndarray  # the input, BGRA uint8 HxWx4
    original: np.ndarray  # its colours, BGR uint8 HxWx3
    alpha: np.ndarray  # its alpha, uint8 HxW
    box: Box | None = None
    placement: Placement | None = None
    x: np.ndarray | None = None
    c: np.ndarray | None = None
    stillness: np.ndarray | None = None  # per pixel of ``box``, when a motion threshold is set


@dataclass(frozen=True)
class Generated:
    """One frame's result: ``colour`` is BGR (generated where the model ran, the input's elsewhere)."""

    index: int
    original: np.ndarray
    alpha: np.ndarray
    colour: np.ndarray


def frame_source(reader: Iterable[np.ndarray], condition: Iterable[np.ndarray] | None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(BGRA frame, condition frame or None) pairs; INPUT_INVALID if the condition video ends first."""
    if condition is None:
        for frame in reader:
            yield frame, None
        return
    cond = iter(condition)
    for i, frame in enumerate(reader):
        c = next(cond, None)
        if c is None:
            raise StageError(ErrorKind.INPUT_INVALID, f"the condition video ends after {i} frames, before the input")
        yield frame, c


class FramePass:
    """The ``generate`` stage's per-frame work: ``prepare`` (reader thread) and ``process`` (in order)."""

    def __init__(self, gen: Generator, mode: str, width: int, height: int, threshold: int = 8, margin: float = 0.1,
                 fit: str = "letterbox", max_side: int = 0, smoothing: float = 0.0, scale: float = 1.0,
                 hold: bool = False, weights: np.ndarray | None = None, denoise: float = 0.0,
                 motion: float = 0.0) -> None:
        self.gen, self.person = gen, mode == "person"
        self.width, self.height = width, height
        self.threshold, self.margin, self.fit, self.max_side, self.scale = threshold, margin, fit, max_side, scale
        self.weights = weights  # the contract's vector_input feed (Generator.weights), the same every frame
        self.smoother = Smoother(smoothing, width, height)
        self.hold = BoxHold(width, height) if hold and self.person else None
        self.denoiser = Denoiser(denoise, width, height)
        if denoise and not motion:
            raise ValueError("denoise needs a motion threshold (> 0 levels)")
        self.stillness = Stillness(motion) if motion and (smoothing or denoise) else None
        self.generated = 0  # frames the model ran on
        self._index = 0

    def prepare(self, item: tuple[np.ndarray, np.ndarray | None]) -> Prepared:
        frame, cond = item
        p = Prepared(self._index, frame, cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR), cv2.extractChannel(frame, 3))
        self._index += 1
        fixed = self.gen.io.fixed_size
        if self.person:
            box = person_box(p.alpha, self.threshold, self.margin)
            if box is None:
                for part in (self.hold, self.denoiser, self.stillness):
                    if part is not None:
                        part.reset()
                return p
            if self.hold is not None:
                box = self.hold(box)
            if fixed is not None:
                box = fit_aspect(box, fixed[0] / fixed[1], self.width, self.height)
        else:
            box = Box(0, 0, self.width, self.height)
        p.box = box
        p.placement = plan(box.width, box.height, fixed, self.gen.contract.multiple, self.fit, self.max_side,
                           self.scale, self.gen.contract.pad)
        condition = None
        if self.gen.io.condition_name is not None:
            if cond is None:
                source = p.alpha
            else:
                source = cv2.cvtColor(cond, cv2.COLOR_BGRA2BGR)
                if source.shape[:2] != (self.height, self.width):
                    source = cv2.resize(source, (self.width, self.height), interpolation=cv2.INTER_AREA)
            condition = p.placement.to_model(source[box.slices])
        if self.stillness is not None:
            p.stillness = self.stillness(p.original, box)
        crop = self.denoiser(p.original[box.slices], box, p.stillness)
        p.x, p.c = self.gen.pack(p.placement.to_model(crop), condition)
        return p

    def process(self, items: list[Prepared]) -> list[Generated]:
        todo = [p for p in items if p.x is not None]
        outputs = iter(self.gen.run([p.x for p in todo if p.x is not None], [p.c for p in todo], self.weights)
                       if todo else [])
        results = []
        for p in items:
            if p.box is None or p.placement is None:  # no person: the frame passes through untouched
                self.smoother.reset()
                results.append(Generated(p.index, p.original, p.alpha, p.original))
                continue
            self.generated += 1
            crop = self.smoother(p.placement.from_model(next(outputs)), p.box, p.stillness)
            if self.person:
                colour = p.original.copy()
                cv2.copyTo(crop, p.alpha[p.box.slices], colour[p.box.slices])  # where alpha > 0 (~20x np.copyto)
            else:
                colour = crop
            results.append(Generated(p.index, p.original, p.alpha, colour))
        return results
