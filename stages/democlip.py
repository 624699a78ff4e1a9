"""Synthetic demo clip: a person-like figure over a textured background.

Generates a short, license-free video clip together with its exact
ground-truth alpha mask, entirely from numpy/cv2 drawing (no downloads).
The figure (head with hair and face, neck, shoulders, shaded torso and arms)
is designed so that RobustVideoMatting recognises it as a person, which makes
the clip usable for end-to-end tests and demos with a known answer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

_SHIFT = 4  # fixed-point bits for sub-pixel cv2 drawing
_SCALE = 1 << _SHIFT
_NOISE_BANK = 4


def _smooth_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 5) -> np.ndarray:
    """Multi-octave value noise in roughly [-1, 1], float32 HxW."""
    acc = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = 3 * 2**o
        grid = rng.standard_normal((cells, max(2, cells * w // max(h, 1)))).astype(np.float32)
        acc += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.55
    return acc / total


@functools.lru_cache(maxsize=8)
def _background(width: int, height: int, seed: int) -> np.ndarray:
    """Static textured background: lit wall of tiles with smooth noise, BGR uint8."""
    rng = np.random.default_rng(seed + 1000)
    base = np.array(rng.uniform(110, 190, 3), np.float32)
    tint = np.array(rng.uniform(-30, 30, 3), np.float32)
    noise = _smooth_noise(rng, height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.75 + 0.35 * np.exp(-(((xx / width - 0.3) ** 2) + ((yy / height - 0.2) ** 2)) * 3.0)
    img = (base + noise[..., None] * tint * 1.5) * light[..., None]
    tile = max(8, min(width, height) // 9)
    row = (yy // (tile * 0.5)).astype(np.int32)
    offs = (row % 2) * tile * 0.5
    grout = ((np.mod(yy, tile * 0.5) < 2) | (np.mod(xx + offs, tile) < 2)).astype(np.float32)
    grout = cv2.GaussianBlur(grout, (3, 3), 0)
    img *= (1.0 - 0.35 * grout)[..., None]
    fine = rng.standard_normal((height, width)).astype(np.float32)
    img += cv2.GaussianBlur(fine, (3, 3), 0)[..., None] * 6.0
    return np.clip(img, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _noise_bank(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed sensor-noise fields (positive and negative uint8 parts) cycled over frames."""
    rng = np.random.default_rng(seed + 2000)
    n = np.round(rng.normal(0, 2.5, (_NOISE_BANK, height, width, 3)))
    return np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)


Shape = Callable[[np.ndarray], object]
Color = tuple[float, float, float]


class _Canvas:
    """Figure canvas: a float colour ROI plus the union alpha of all drawn parts."""

    def __init__(self, roi: np.ndarray, x0: int, y0: int, size: tuple[int, int]) -> None:
        self.color = roi.astype(np.float32)
        self.alpha = np.zeros(roi.shape[:2], np.uint8)
        self.off = np.array([x0, y0], np.float32)
        h, w = roi.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.light = 1.1 - 0.25 * (x0 + xx) / size[0] - 0.3 * (y0 + yy) / size[1]

    def pts(self, p: np.ndarray) -> np.ndarray:
        """Frame coordinates to fixed-point canvas coordinates."""
        return np.round((p - self.off) * _SCALE).astype(np.int32)

    def part(self, draw: Shape, bgr: Color, round_px: float = 0.0, union: bool = True) -> None:
        """Draw a shape with rounded (distance-based) shading and merge it into the figure."""
        m: np.ndarray = np.zeros_like(self.alpha)
        draw(m)
        x, y, w, h = cv2.boundingRect(m)
        if w == 0 or h == 0:
            return
        x0, y0 = max(0, x - 2), max(0, y - 2)
        x1, y1 = min(m.shape[1], x + w + 2), min(m.shape[0], y + h + 2)
        sub = m[y0:y1, x0:x1]
        shade = self.light[y0:y1, x0:x1]
        if round_px > 0:
            d = cv2.distanceTransform((sub > 127).astype(np.uint8), cv2.DIST_L2, 3)
            shade = shade * (0.5 + 0.5 * np.sqrt(np.minimum(d * (1.0 / round_px), 1.0)))
        a = (sub.astype(np.float32) * (1.0 / 255.0))[..., None]
        col = np.array(bgr, np.float32) * shade[..., None]
        dst = self.color[y0:y1, x0:x1]
        dst += (col - dst) * a
        if union:
            np.maximum(self.alpha[y0:y1, x0:x1], sub, out=self.alpha[y0:y1, x0:x1])


def _figure(
    cv: _Canvas,
    cx: float,
    top: float,
    s: float,
    phase: float,
    lean: float,
    pal: dict[str, Color],
    long_hair: bool,
) -> None:
    """Draw a waist-up person; (cx, top) is the top of the head, s the head height in px."""
    ca, sa = math.cos(lean), math.sin(lean)
    pivot = np.array([cx, top + 5.0 * s], np.float32)
    deg = math.degrees(lean)

    def P(*xy: float) -> np.ndarray:
        d = np.array(xy, np.float32).reshape(-1, 2) * s + np.array([cx, top]) - pivot
        return np.stack(
            [pivot[0] + d[:, 0] * ca - d[:, 1] * sa, pivot[1] + d[:, 0] * sa + d[:, 1] * ca], axis=1
        )

    def ell(x: float, y: float, ax: float, ay: float) -> Shape:
        c = cv.pts(P(x, y))[0]
        axes = (int(ax * s * _SCALE), int(ay * s * _SCALE))
        return lambda m: cv2.ellipse(
            m, (int(c[0]), int(c[1])), axes, deg, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT
        )

    def poly(*xy: float) -> Shape:
        q = cv.pts(P(*xy))
        return lambda m: cv2.fillPoly(m, [q], 255, cv2.LINE_AA, _SHIFT)

    def limb(thick: float, *xy: float) -> Shape:
        q = [(int(a), int(b)) for a, b in cv.pts(P(*xy))]
        t = max(1, int(thick * s))
        return lambda m: cv2.polylines(m, [np.array(q)], False, 255, t, cv2.LINE_AA, _SHIFT)

    skin, hair, shirt = pal["skin"], pal["hair"], pal["shirt"]

    def dim(c: Color, k: float) -> Color:
        return (c[0] * k, c[1] * k, c[2] * k)

    sw = 0.15 * math.sin(phase)
    if long_hair:
        cv.part(poly(-0.45, 0.4, 0.45, 0.4, 0.55, 1.5, -0.55, 1.5), dim(hair, 0.8), 0.15 * s)
    half = (0.3, 1.1, 0.8, 1.27, 1.02, 1.45, 1.12, 1.8, 1.02, 9.0)  # right torso outline
    pairs = list(zip(half[::2], half[1::2], strict=True))
    outline = [(-x, y) for x, y in pairs] + pairs[::-1]
    cv.part(poly(*[v for p in outline for v in p]), shirt, 0.45 * s)
    for side, k in ((-1.0, sw), (1.0, -sw)):  # arms with hands
        arm = (side * 0.95, 1.6, side * (1.18 + 0.1 * k), 3.0 + 0.2 * k, side * (1.02 + k), 4.2)
        cv.part(limb(0.42, *arm), dim(shirt, 0.9), 0.2 * s)
        cv.part(ell(arm[4], arm[5] + 0.12, 0.17, 0.22), skin, 0.1 * s)
    cv.part(poly(-0.19, 0.75, 0.19, 0.75, 0.21, 1.2, 0.0, 1.45, -0.21, 1.2), skin, 0.12 * s)
    cv.part(ell(0.0, 0.44, 0.43, 0.5), hair, 0.15 * s)
    for side in (-1.0, 1.0):
        cv.part(ell(side * 0.38, 0.57, 0.07, 0.13), dim(skin, 0.92), 0.04 * s)
    cv.part(ell(0.0, 0.53, 0.37, 0.48), skin, 0.22 * s)
    cv.part(ell(0.0, 0.2, 0.4, 0.2), hair, 0.1 * s)
    # face details lie inside the head, so they do not change the mask
    for side in (-1.0, 1.0):
        cv.part(ell(side * 0.15, 0.5, 0.08, 0.04), (230.0, 230.0, 230.0), 0, False)
        cv.part(ell(side * 0.15, 0.5, 0.035, 0.035), (40.0, 35.0, 30.0), 0, False)
        cv.part(ell(side * 0.15, 0.41, 0.09, 0.022), dim(hair, 0.7), 0, False)
    cv.part(ell(0.0, 0.64, 0.045, 0.09), dim(skin, 0.85), 0, False)
    cv.part(ell(0.0, 0.8, 0.11, 0.03), (70.0, 70.0, 160.0), 0, False)


_PALETTES: dict[str, list[Color]] = {  # BGR
    "skin": [(160, 190, 230), (120, 155, 205), (90, 125, 175), (60, 85, 125)],
    "hair": [(30, 35, 45), (40, 70, 110), (20, 20, 25), (70, 120, 170)],
    "shirt": [(150, 80, 40), (60, 60, 180), (80, 150, 70), (70, 70, 70), (190, 170, 140), (40, 150, 200)],
}


def render_frames(
    width: int, height: int, frames: int, seed: int = 0, background_only: bool = False, still: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (BGR uint8 HxWx3 frame, uint8 HxW ground-truth alpha) per frame.

    Deterministic for a given seed. With ``background_only`` the frames hold
    only the (static) background and the masks are all zeros. Motion is defined
    per frame index (nominal 24 fps); ``still`` holds the figure in its first
    pose (only the sensor noise changes: a flicker test). Any size works here, but
    ``write_clip`` needs even dimensions.
    """
    rng = np.random.default_rng(seed)
    pal = {k: v[int(rng.integers(len(v)))] for k, v in _PALETTES.items()}
    long_hair = bool(rng.integers(2))
    phase0 = float(rng.uniform(0, 2 * math.pi))
    bg = _background(width, height, seed)
    pos, neg = _noise_bank(width, height, seed)
    s = min(height * 0.16, width * 0.22)  # head height in pixels
    amp = max(0.0, min(0.2, 0.5 - 1.5 * s / width))  # horizontal sway, figure stays inside
    for i in range(frames):
        frame = bg.copy()
        mask = np.zeros((height, width), np.uint8)
        if not background_only:
            t = 0.0 if still else i / 24.0
            cx = width * (0.5 + amp * math.sin(0.9 * t + phase0))
            top = height * 0.3 + 0.06 * s * abs(math.sin(3.0 * t))
            lean = 0.05 * math.sin(1.3 * t + phase0)
            x0, x1 = max(0, int(cx - 1.8 * s)), min(width, int(cx + 1.8 * s) + 1)
            y0 = max(0, int(top - 0.4 * s))
            if x1 > x0 and y0 < height:
                cv = _Canvas(frame[y0:, x0:x1], x0, y0, (width, height))
                _figure(cv, cx, top, s, 3.0 * t + phase0, lean, pal, long_hair)
                frame[y0:, x0:x1] = np.clip(cv.color, 0, 255)
                mask[y0:, x0:x1] = cv.alpha
        cv2.add(frame, pos[i % _NOISE_BANK], dst=frame)
        cv2.subtract(frame, neg[i % _NOISE_BANK], dst=frame)
        yield frame, mask


def write_clip(
    path: Path,
    mask_path: Path | None,
    width: int = 640,
    height: int = 360,
    frames: int = 48,
    fps: float = 24.0,
    seed: int = 0,
    background_only: bool = False,
    still: bool = False,
) -> None:
    """Write the clip as H.264 mp4 and (optionally) the exact mask as lossless FFV1 mkv.

    ``width`` and ``height`` must be even (libx264 with yuv420p); otherwise
    ``ValueError`` is raised.
    """
    import imageio_ffmpeg

    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"width and height must be positive and even, got {width}x{height}")
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    common = {"fps": fps, "macro_block_size": 1, "quality": None, "ffmpeg_log_level": "error"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clip = imageio_ffmpeg.write_frames(
        str(path), (width, height), codec="libx264", pix_fmt_in="bgr24", pix_fmt_out="yuv420p",
        output_params=["-crf", "14", "-preset", "medium"], **common,
    )  # fmt: skip
    clip.send(None)
    writer_m = None
    if mask_path is not None:
        mask_path = Path(mask_path)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        writer_m = imageio_ffmpeg.write_frames(
            str(mask_path), (width, height), codec="ffv1", pix_fmt_in="gray", pix_fmt_out="gray",
            **common,
        )  # fmt: skip
        writer_m.send(None)
    try:
        for frame, mask in render_frames(width, height, frames, seed, background_only, still):
            clip.send(np.ascontiguousarray(frame))
            if writer_m is not None:
                writer_m.send(np.ascontiguousarray(mask))
    finally:
        clip.close()
        if writer_m is not None:
            writer_m.close()
    suffix = f" and mask {mask_path}" if mask_path is not None else ""
    log.info("wrote %s (%dx%d, %d frames)%s", path, width, height, frames, suffix)
