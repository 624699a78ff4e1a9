"""cuepipe.stages.blend: exact compositing, BGRA packing, backgrounds (colour, image, video loop / hold),
bad background specs, and placing a scaled layer on a canvas."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cuepipe.stages.blend import (
    BackgroundMode,
    StillBackground,
    VideoBackground,
    composite,
    parse_background,
    place,
    to_bgra,
)
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.stage import StageError
from tests.support.video import noise_frames, write_clip


def reference(fgr: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The float formula, rounded to nearest: fgr * a + bg * (1 - a) with a = alpha / 255."""
    a = alpha[..., None] / 255.0
    return np.floor(fgr * a + bg * (1.0 - a) + 0.5)


def test_composite_is_exact_for_every_fgr_bg_alpha_combination() -> None:
    """All 256^3 (fgr, bg, alpha) values: each row has one alpha, its pixels' channels every (fgr, bg) pair."""
    pairs = np.arange(256 * 256)
    width = -(-pairs.size // 3)  # 21846 pixels x 3 channels hold the 65536 pairs (and 2 spare)
    flat_f, flat_b = np.zeros(width * 3, np.uint8), np.zeros(width * 3, np.uint8)
    flat_f[: pairs.size], flat_b[: pairs.size] = pairs // 256, pairs % 256
    fgr, bg = flat_f.reshape(1, width, 3), flat_b.reshape(1, width, 3)
    out = np.empty((32, width, 3), np.uint8)
    for first in range(0, 256, 32):  # 32 alphas at a time keeps memory small
        alpha = np.repeat(np.arange(first, first + 32, dtype=np.uint8)[:, None], width, axis=1)
        f, b = np.broadcast_to(fgr, out.shape).copy(), np.broadcast_to(bg, out.shape).copy()
        got = composite(f, alpha, b, out=out)
        a = alpha[..., None].astype(np.int64)
        exact = (2 * (f * a + b * (255 - a)) + 255) // 510  # round half up of the exact rational value
        assert np.array_equal(got, exact)
        assert np.abs(got - reference(f, alpha, b)).max() == 0  # the float reference agrees everywhere


def test_alpha_0_is_the_background_and_255_the_foreground_exactly() -> None:
    fgr, bg = noise_frames(2, 1280, 720)
    for value, expected in ((0, bg), (255, fgr)):
        assert np.array_equal(composite(fgr, np.full((720, 1280), value, np.uint8), bg), expected)


def test_composite_into_its_own_inputs_and_shape_errors() -> None:
    fgr, bg, noise = noise_frames(3, 64, 48, seed=4)
    alpha = noise[..., 0]
    expected = reference(fgr, alpha, bg)
    assert np.array_equal(composite(fgr.copy(), alpha, bg), expected)
    f2, b2 = fgr.copy(), bg.copy()
    assert composite(f2, alpha, bg, out=f2) is f2 and np.array_equal(f2, expected)
    assert composite(fgr, alpha, b2, out=b2) is b2 and np.array_equal(b2, expected)
    with pytest.raises(ValueError, match="alpha: expected uint8 48x64"):
        composite(fgr, alpha[:, :10], bg)
    with pytest.raises(ValueError, match="background"):
        composite(fgr, alpha, bg.astype(np.float32))
    with pytest.raises(ValueError, match="fgr"):
        composite(alpha, alpha, bg)


def test_to_bgra_packs_colour_and_alpha() -> None:
    fgr, noise = noise_frames(2, 64, 48, seed=5)
    alpha = noise[..., 1]
    alpha[:8] = 0  # fully transparent rows: colour cleared unless asked to keep it
    out = np.empty((48, 64, 4), np.uint8)
    assert to_bgra(fgr, alpha, out=out, clear_transparent=False) is out
    assert np.array_equal(out, np.dstack([fgr, alpha]))
    expected = np.dstack([np.where(alpha[..., None] > 0, fgr, 0), alpha])
    assert to_bgra(fgr, alpha, out=out) is out and np.array_equal(out, expected)
    assert np.array_equal(to_bgra(fgr, alpha), expected) and (out[:8] == 0).all() and out[8:, :, :3].any()
    with pytest.raises(ValueError, match="out"):
        to_bgra(fgr, alpha, out=np.empty((48, 64, 3), np.uint8))


def test_colour_backgrounds() -> None:
    bg = parse_background("#102030", 64, 48)
    assert isinstance(bg, StillBackground)
    frame = bg.frame(0)
    assert frame.shape == (48, 64, 3) and (frame.reshape(-1, 3) == (0x30, 0x20, 0x10)).all()  # BGR
    assert bg.frame(999) is frame and not frame.flags.writeable  # shared and read-only
    assert (parse_background(" Green ", 8, 6).frame(3) == (0, 255, 0)).all()
    assert (parse_background("black", 8, 6).frame(0) == 0).all()


def test_image_background_covers_and_centre_crops(tmp_path: Path) -> None:
    image = np.zeros((40, 80, 3), np.uint8)  # 2:1; into 1:1 the centre 40x40 must remain
    image[:, :20], image[:, 20:60], image[:, 60:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    cv2.imwrite(str(tmp_path / "wall.png"), image)
    frame = parse_background(str(tmp_path / "wall.png"), 20, 20).frame(0)
    assert frame.shape == (20, 20, 3) and (frame == (0, 255, 0)).all()
    big = parse_background(str(tmp_path / "wall.png"), 160, 80).frame(5)  # enlarged, same aspect: no crop
    assert np.array_equal(big, cv2.resize(image, (160, 80), interpolation=cv2.INTER_LINEAR))


def test_video_background_loop_and_hold(tmp_path: Path) -> None:
    src = noise_frames(5, 64, 48, seed=6)
    path = write_clip(tmp_path / "bg.mkv", src)  # lossless, same size: frames come back exactly
    with parse_background(str(path), 64, 48) as loop:
        assert isinstance(loop, VideoBackground)
        got = [loop.frame(i) for i in range(12)]
        assert [next(k for k, s in enumerate(src) if np.array_equal(s, g)) for g in got] == [i % 5 for i in range(12)]
        assert loop.length == 5
        assert np.array_equal(loop.frame(3), src[3]) and np.array_equal(loop.frame(1), src[1])  # backwards
    with parse_background(str(path), 64, 48, mode="hold") as hold:
        got = [hold.frame(i) for i in range(9)]
        assert all(np.array_equal(g, src[min(i, 4)]) for i, g in enumerate(got))
    with parse_background(str(path), 32, 24, mode=BackgroundMode.HOLD) as small:  # resized to the output
        assert np.array_equal(small.frame(2), cv2.resize(src[2], (32, 24), interpolation=cv2.INTER_LINEAR))
    with parse_background(str(path), 16, 16) as tiny:  # cover: centre 48x48, then shrunk 3x (INTER_AREA)
        assert np.array_equal(tiny.frame(0), cv2.resize(src[0][:, 8:56], (16, 16), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize(
    ("spec", "kind", "text"),
    [
        ("#12345", ErrorKind.BAD_ARGUMENT, "--background"),
        ("transparent", ErrorKind.BAD_ARGUMENT, "alpha output"),
        ("", ErrorKind.BAD_ARGUMENT, "empty"),
        ("nowhere.png", ErrorKind.INPUT_MISSING, "nowhere.png"),
        ("greenish", ErrorKind.INPUT_MISSING, "#rrggbb"),
        ("fake.png", ErrorKind.INPUT_INVALID, "fake.png"),
        ("fake.mp4", ErrorKind.INPUT_INVALID, "fake.mp4"),
    ],
)
def test_bad_background_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, kind: ErrorKind,
                              text: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path / "fake.mp4").write_text("not a video")
    with pytest.raises(StageError) as err:
        parse_background(spec, 64, 48)
    assert err.value.kind is kind and text in err.value.message


def test_bad_background_mode_and_size() -> None:
    for args in (("#000000", 64, 48, "bounce"), ("#000000", 0, 48, "loop")):
        with pytest.raises(StageError) as err:
            parse_background(*args)
        assert err.value.kind is ErrorKind.BAD_ARGUMENT


def test_place_positions_scales_and_clips_a_layer() -> None:
    fgr = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3) + 1
    alpha = np.full((2, 4), 200, np.uint8)

    def where(position: tuple[float, float], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        f, a = place(fgr, alpha, (10, 6), position, scale)
        assert f.shape == (6, 10, 3) and a.shape == (6, 10)
        return f, a

    f, a = where((0.0, 0.0))
    assert np.array_equal(f[:2, :4], fgr) and a[:2, :4].min() == 200 and a.sum() == 8 * 200
    f, a = where((1.0, 1.0))
    assert np.array_equal(f[4:, 6:], fgr) and a.sum() == 8 * 200
    f, a = where((0.5, 0.5))  # offsets round(0.5 * 6) = 3, round(0.5 * 4) = 2
    assert np.array_equal(f[2:4, 3:7], fgr) and a.sum() == 8 * 200
    f, a = where((0.0, 0.0), scale=2.0)  # 8x4, nearest-free check: the same area, resized
    assert np.array_equal(f[:4, :8], cv2.resize(fgr, (8, 4), interpolation=cv2.INTER_LINEAR))
    assert a[:4, :8].min() == 200 and a.sum() == 32 * 200
    f, a = where((-0.5, 0.0))  # x0 = round(-0.5 * 6) = -3: only the last column is visible
    assert np.array_equal(f[:2, :1], fgr[:, 3:]) and a.sum() == 2 * 200
    assert where((5.0, 5.0))[1].sum() == 0  # entirely off the canvas
    same_f, same_a = place(fgr, alpha, (4, 2))
    assert same_f is fgr and same_a is alpha  # nothing to do
    with pytest.raises(StageError) as err:
        place(fgr, alpha, (10, 6), scale=0.0)
    assert err.value.kind is ErrorKind.BAD_ARGUMENT


def test_layer_placed_then_composited() -> None:
    """The composite stage's path: place() then composite() over a background frame."""
    fgr = np.full((4, 4, 3), 200, np.uint8)
    alpha = np.full((4, 4), 255, np.uint8)
    f, a = place(fgr, alpha, (8, 8), (1.0, 0.0))
    out = composite(f, a, parse_background("#000000", 8, 8).frame(0))
    assert (out[:4, 4:] == 200).all() and (out[4:] == 0).all() and (out[:, :4] == 0).all()
