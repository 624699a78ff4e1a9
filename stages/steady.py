"""Temporal steadiness of generated video: what keeps a restyled person from flickering.

A style network amplifies small frame-to-frame changes of its input many times over (measured in
``bench/flicker.py``: sensor noise of ~1.6 levels becomes ~25 levels of shimmer), and it
normalises over its whole input, so a crop that moves by a pixel restyles everything a little
differently. Four tools, used by ``stages/framing.py``'s ``FramePass`` in this order:

- ``BoxHold``: one person box for as long as the person stays inside it.
- ``Stillness``: per pixel, how still the input is (1: unchanged since the previous frame, 0: changed
  by ``threshold`` levels or more), from consecutive input frames, blurred and widened so that
  motion also covers the surroundings whose style it disturbs.
- ``Denoiser``: the model's input averaged over time where it is still (motion-gated), so the
  network sees the person's picture rather than its noise; what is kept of the frame stays exact.
- ``Smoother``: an exponential moving average of the generated pixels, gated by ``Stillness`` when
  given, so a moving arm leaves no trail while a still body keeps its texture.

All work in frame coordinates on the current box, so a box that changes keeps its history where
the old and new boxes overlap.
"""

from __future__ import annotations

import cv2
import numpy as np

from cuepipe.stages.geometry import Box

__all__ = ["HOLD_ROOM", "HOLD_SLACK", "BoxHold", "Denoiser", "Smoother", "Stillness"]

HOLD_ROOM = 0.05  # a new held box gets this fraction of its longer side as room on every side
HOLD_SLACK = 1.6  # ... and is given up when it has more than this times the area the person needs
_STILL_BLUR = 5  # box blur of the frame difference (noise is not motion)
_STILL_WIDEN = 9  # motion is widened by this (a min filter of the stillness): its surroundings follow it


class _Blend:
    """``out = current + weight * (previous - current)`` per pixel (HxWx3 float32; ``weight`` HxW) in
    OpenCV, into buffers kept between frames (a fresh 3 MB temporary per frame costs more in page
    faults than the arithmetic); ``out`` may be a view of a larger array (a box)."""

    def __init__(self) -> None:
        self._shape: tuple[int, ...] = ()
        self._difference = self._weight3 = np.empty((0, 0, 3), np.float32)

    def __call__(self, current: np.ndarray, previous: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        if current.shape != self._shape:
            self._shape = current.shape
            self._difference, self._weight3 = np.empty_like(current), np.empty_like(current)
        cv2.subtract(previous, current, dst=self._difference)
        cv2.merge((weight, weight, weight), dst=self._weight3)
        cv2.multiply(self._difference, self._weight3, dst=self._difference)
        cv2.add(current, self._difference, dst=out)


class BoxHold:
    """Steady person boxes: a new box gets ``room`` on every side and is then kept for as long as the
    person's box fits inside it and is not much smaller (``slack`` x its area), so a still or
    swaying person is cropped identically frame after frame. ``reset`` at a frame without a person."""

    def __init__(self, width: int, height: int, room: float = HOLD_ROOM, slack: float = HOLD_SLACK) -> None:
        self.width, self.height, self.room, self.slack = width, height, room, slack
        self._held: Box | None = None
        self.changes = 0  # how many times a new box was taken

    def reset(self) -> None:
        self._held = None

    def __call__(self, box: Box) -> Box:
        held = self._held
        if held is not None and held.contains(box) and held.area <= self.slack * box.area:
            return held
        pad = round(self.room * max(box.width, box.height))
        self._held = Box(max(0, box.x0 - pad), max(0, box.y0 - pad), min(self.width, box.x1 + pad),
                         min(self.height, box.y1 + pad))
        self.changes += 1
        return self._held


class Stillness:
    """Per-pixel stillness in 0..1 of the input at a box, from this frame and the previous one."""

    def __init__(self, threshold: float) -> None:
        if not threshold > 0:
            raise ValueError(f"the motion threshold must be > 0 levels, got {threshold}")
        self.threshold = threshold
        self._previous: np.ndarray | None = None

    def reset(self) -> None:
        self._previous = None

    def __call__(self, frame: np.ndarray, box: Box) -> np.ndarray:
        """float32 HxW for ``box`` of ``frame`` (BGR uint8); all 0 on the first frame (no history)."""
        previous, self._previous = self._previous, frame
        if previous is None:
            return np.zeros((box.height, box.width), np.float32)
        diff = cv2.cvtColor(cv2.absdiff(frame[box.slices], previous[box.slices]), cv2.COLOR_BGR2GRAY)
        diff = cv2.blur(diff.astype(np.float32), (_STILL_BLUR, _STILL_BLUR))
        still = np.clip(1.0 - diff / self.threshold, 0.0, 1.0)
        return cv2.erode(still, np.ones((_STILL_WIDEN, _STILL_WIDEN), np.uint8))


class Denoiser:
    """The model's input, averaged over time where it is still: ``state += (1 - w) * (current - state)``
    with ``w = strength * stillness`` per pixel; pixels never seen start from the current value."""

    def __init__(self, strength: float, width: int, height: int) -> None:
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"denoise must be in [0, 1), got {strength}")
        self.strength = strength
        self._state = np.zeros((height, width, 3), np.float32) if strength else None
        self._valid = np.zeros((height, width), bool) if strength else None
        self._blend = _Blend()

    def reset(self) -> None:
        if self._valid is not None:
            self._valid[:] = False

    def __call__(self, image: np.ndarray, box: Box, stillness: np.ndarray | None) -> np.ndarray:
        """The steadied BGR uint8 crop at ``box`` whose current pixels are ``image``."""
        if self._state is None or self._valid is None:
            return image
        if stillness is None:
            raise ValueError("the denoiser needs the input's stillness (a motion threshold)")
        state, valid = self._state[box.slices], self._valid[box.slices]
        weight = stillness * self.strength
        weight[~valid] = 0.0
        self._blend(image.astype(np.float32), state, weight, state)
        valid[:] = True
        return cv2.convertScaleAbs(state)  # rounded to nearest; values are already in 0..255


class Smoother:
    """EMA of generated pixels: ``out = w * previous + (1 - w) * current`` where the previous frame's
    box overlaps this one's (elsewhere, and on the first frame, ``current``); ``w = strength``, or
    ``strength * stillness`` per pixel when a stillness is given."""

    def __init__(self, strength: float, width: int, height: int) -> None:
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {strength}")
        self.strength = strength
        self._state = np.zeros((height, width, 3), np.float32) if strength else None
        self._box: Box | None = None
        self._blend = _Blend()

    def reset(self) -> None:
        """Forget the history (no person in this frame, or a new shot)."""
        self._box = None

    def __call__(self, image: np.ndarray, box: Box, stillness: np.ndarray | None = None) -> np.ndarray:
        """The smoothed version of ``image``, the generated BGR uint8 crop at ``box``."""
        if self._state is None:
            return image
        current = image.astype(np.float32)
        overlap = self._box.intersect(box) if self._box is not None else None
        if overlap is not None:
            rows = slice(overlap.y0 - box.y0, overlap.y1 - box.y0)
            cols = slice(overlap.x0 - box.x0, overlap.x1 - box.x0)
            if stillness is None:
                current[rows, cols] *= 1.0 - self.strength
                current[rows, cols] += self.strength * self._state[overlap.slices]
            else:
                region = current[rows, cols]
                self._blend(region, self._state[overlap.slices], self.strength * stillness[rows, cols], region)
        self._state[box.slices] = current
        self._box = box
        return cv2.convertScaleAbs(current)  # rounded to nearest; values are already in 0..255
