"""RGBA test clips: democlip's figure with its exact mask as alpha, written and read as matting's output."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cuepipe.stages.democlip import render_frames
from cuepipe.stages.rgba import RgbaReader
from cuepipe.stages.video import Codec, VideoWriter

W, H = 160, 96


def person_frames(n: int, seed: int = 1, width: int = W, height: int = H) -> list[np.ndarray]:
    """democlip's figure with its exact mask as alpha: BGRA frames, as matting's rgba output holds them."""
    return [np.dstack([f, m]) for f, m in render_frames(width, height, n, seed=seed)]


def write_rgba(path: Path, frames: list[np.ndarray], fps: float = 24.0) -> Path:
    with VideoWriter(path, frames[0].shape[1], frames[0].shape[0], fps, codec=Codec.UTVIDEO, channels=4) as w:
        for f in frames:
            w.write(f)
    return path


def image_folder(folder: Path, frames: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"f{i:04d}.png"), f)
    return folder


def read_all(path: Path) -> list[np.ndarray]:
    with RgbaReader(path) as reader:
        return list(reader)
