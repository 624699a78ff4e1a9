"""Steadiness against flicker (stages/steady.py): stillness, the motion-gated input denoiser and output smoother."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cuepipe.stages.geometry import Box
from cuepipe.stages.steady import Denoiser, Smoother, Stillness

W, H = 64, 48
BOX = Box(8, 4, 56, 44)


def noisy(rng: np.random.Generator, level: int = 100, sigma: float = 2.0) -> np.ndarray:
    return np.clip(rng.normal(level, sigma, (H, W, 3)), 0, 255).astype(np.uint8)


def test_stillness_is_zero_without_history_one_when_unchanged_and_zero_around_motion() -> None:
    frame = np.full((H, W, 3), 100, np.uint8)
    fresh = Stillness(12.0)
    first = fresh(frame, BOX)
    assert first.shape == (BOX.height, BOX.width) and not first.any()  # no history: nothing counts as still
    assert np.all(fresh(frame.copy(), BOX) == 1.0)  # unchanged: fully still
    moved = frame.copy()
    moved[20:28, 28:36] = 200  # a block moves in
    s = fresh(moved, BOX)
    assert s[20 - BOX.y0 + 4, 28 - BOX.x0 + 4] == 0.0  # inside the change
    assert s[20 - BOX.y0 - 5, 28 - BOX.x0 + 4] == 0.0  # and a few pixels around it (widened)
    assert s[0, 0] == 1.0 and s[-1, -1] == 1.0  # far from it: still
    with pytest.raises(ValueError, match="> 0"):
        Stillness(0.0)


def test_denoiser_averages_still_noise_and_takes_motion_at_once() -> None:
    rng = np.random.default_rng(0)
    still, denoise = Stillness(12.0), Denoiser(0.8, W, H)
    outputs = []
    for _ in range(30):
        frame = noisy(rng)
        outputs.append(denoise(frame[BOX.slices], BOX, still(frame, BOX)).astype(int))
    raw_change = np.abs(noisy(rng).astype(int) - noisy(rng).astype(int)).mean()
    steady_change = np.mean([np.abs(a - b).mean() for a, b in itertools.pairwise(outputs[10:])])
    assert steady_change < raw_change / 2  # frame-to-frame change of the model's input at least halved
    assert abs(np.mean(outputs[-1]) - 100) < 1  # converged on the picture, not biased
    jump = np.full((H, W, 3), 220, np.uint8)  # everything changes by 120 levels: motion
    assert np.array_equal(denoise(jump[BOX.slices], BOX, still(jump, BOX)), jump[BOX.slices])
    with pytest.raises(ValueError, match="stillness"):
        denoise(jump[BOX.slices], BOX, None)


def test_denoiser_off_returns_the_input_itself() -> None:
    image = np.zeros((BOX.height, BOX.width, 3), np.uint8)
    assert Denoiser(0.0, W, H)(image, BOX, None) is image


def test_gated_smoother_averages_where_still_and_follows_where_stillness_is_zero() -> None:
    smooth = Smoother(0.5, W, H)
    first = np.full((BOX.height, BOX.width, 3), 100, np.uint8)
    smooth(first, BOX, np.zeros((BOX.height, BOX.width), np.float32))
    second = np.full_like(first, 200)
    stillness = np.zeros((BOX.height, BOX.width), np.float32)
    stillness[:, : BOX.width // 2] = 1.0  # the left half is still, the right half moved
    out = smooth(second, BOX, stillness)
    assert np.all(out[:, : BOX.width // 2] == 150)  # averaged with the previous frame
    assert np.all(out[:, BOX.width // 2 :] == 200)  # taken at once: no trail


def test_steadiness_keeps_history_only_where_boxes_overlap() -> None:
    """A box that moves keeps the state of the overlapping part; the rest starts from the new frame."""
    smooth = Smoother(0.5, W, H)
    a, b = Box(0, 0, 32, 32), Box(16, 0, 48, 32)
    smooth(np.full((32, 32, 3), 100, np.uint8), a, np.ones((32, 32), np.float32))
    out = smooth(np.full((32, 32, 3), 200, np.uint8), b, np.ones((32, 32), np.float32))
    assert np.all(out[:, :16] == 150) and np.all(out[:, 16:] == 200)
