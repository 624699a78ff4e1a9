"""The composite stage, the RGBA reader, and a stylize chain through ``cuepipe run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cuepipe.stages import composite, matting
from cuepipe.stages.blend import composite as reference_composite
from cuepipe.stages.blend import place
from cuepipe.stages.democlip import render_frames, write_clip
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.rgba import RgbaReader, has_alpha_format
from cuepipe.stages.stage import StageError
from cuepipe.stages.video import Codec, VideoReader, VideoWriter, ffmpeg_exe, has_audio, probe
from tests.support import genmodels
from tests.support.env import subprocess_env
from tests.support.fake_td import FakeTD
from tests.support.rgba import image_folder, person_frames, read_all, write_rgba

W, H = 160, 96


def colour_of(hex_colour: str) -> np.ndarray:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return np.array([b, g, r], np.uint8)


def with_audio(video: Path, out: Path, seconds: float) -> Path:
    """``video`` with a ``seconds`` long sine tone added (PCM in mkv, AAC in mp4)."""
    codec = "pcm_s16le" if out.suffix == ".mkv" else "aac"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(video), "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds}", "-map", "0:v", "-map", "1:a", "-c:v", "copy",
                    "-c:a", codec, str(out)], check=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-frame BGRA layer (the figure and its exact mask) with audio."""
    folder = tmp_path_factory.mktemp("layer")
    return with_audio(write_rgba(folder / "silent.mkv", person_frames(5)), folder / "layer.mkv", 5 / 24)


# --- the RGBA reader -------------------------------------------------------------------------------


def test_rgba_reader_returns_alpha_bit_exact(tmp_path: Path, layer: Path) -> None:
    frames = person_frames(5)
    with RgbaReader(layer) as reader:
        assert (reader.width, reader.height, reader.fps, reader.frame_count, reader.has_alpha) == (W, H, 24.0, 5, True)
        got = list(reader)
        assert all(np.array_equal(a, b) for a, b in zip(got, frames, strict=True))
        assert len(list(reader)) == 5  # a second pass decodes again
    png = tmp_path / "png"
    with VideoWriter(png, W, H, 24, codec=Codec.PNG, channels=4) as w:
        for f in frames:
            w.write(f)
    assert all(np.array_equal(a, b) for a, b in zip(read_all(png), frames, strict=True))
    clip = tmp_path / "clip.mp4"
    write_clip(clip, None, W, H, frames=3)
    with RgbaReader(clip) as reader, VideoReader(clip) as plain:
        assert not reader.has_alpha
        for a, b in zip(reader, plain, strict=True):
            assert (a[:, :, 3] == 255).all() and np.abs(a[:, :, :3].astype(int) - b).max() <= 2
    assert has_alpha_format("yuva444p12le") and has_alpha_format("gbrap") and not has_alpha_format("yuv420p")


def test_rgba_reader_applies_a_stored_rotation_like_video_reader(tmp_path: Path) -> None:
    clip, rotated = tmp_path / "clip.mp4", tmp_path / "rotated.mp4"
    write_clip(clip, None, W, H, frames=2)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(clip), "-c", "copy",
                    str(rotated)], check=True, timeout=60)
    with RgbaReader(rotated) as reader, VideoReader(rotated) as plain:
        assert (reader.width, reader.height) == (plain.width, plain.height) == (H, W)
        assert all(np.array_equal(a[:, :, :3], b) for a, b in zip(reader, plain, strict=True))


def test_rgba_reader_stops_its_ffmpeg_when_abandoned(layer: Path, tmp_path: Path) -> None:
    reader = RgbaReader(layer)
    frames = iter(reader)
    next(frames)
    reader.close()  # the leak fixture fails the test if ffmpeg is still running
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(layer.read_bytes()[:3000])  # the header, no whole frame
    with pytest.raises(StageError) as err, RgbaReader(broken) as bad:
        list(bad)
    assert err.value.kind is ErrorKind.INPUT_INVALID
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(StageError) as err:
        RgbaReader(garbage)
    assert err.value.kind is ErrorKind.INPUT_INVALID


# --- the stage -------------------------------------------------------------------------------------


def test_colour_background_is_exact_and_audio_is_kept(tmp_path: Path, layer: Path) -> None:
    result = composite.run(layer, tmp_path / "out", background="#203040", outputs="lossless,video,png")
    out = tmp_path / "out"
    assert result.outputs == (out / "composite.mkv", out / "composite.mp4", out / "composite_rgba")
    bg = np.empty((H, W, 3), np.uint8)
    bg[:] = colour_of("#203040")
    want = [reference_composite(f[:, :, :3].copy(), f[:, :, 3].copy(), bg) for f in person_frames(5)]
    got = read_all(out / "composite.mkv")
    assert all(np.array_equal(g[:, :, :3], w) for g, w in zip(got, want, strict=True))
    pngs = read_all(out / "composite_rgba")
    assert all(np.array_equal(p[:, :, :3], w) and (p[:, :, 3] == 255).all() for p, w in zip(pngs, want, strict=True))
    assert has_audio(out / "composite.mp4") and has_audio(out / "composite.mkv")
    assert probe(out / "composite.mp4", count_frames=True).frames == 5


def test_image_background_position_and_scale(tmp_path: Path, layer: Path) -> None:
    backdrop = np.random.default_rng(5).integers(0, 256, (H * 2, W * 2, 3), dtype=np.uint8)
    image = tmp_path / "backdrop.png"
    cv2.imwrite(str(image), backdrop)
    result = composite.run(layer, tmp_path / "out", background=str(image), size="background", scale=0.5,
                           position="[1,0]", outputs="lossless", audio="none")
    got = read_all(result.outputs[0])
    assert got[0].shape[:2] == (H * 2, W * 2) and not has_audio(result.outputs[0])
    frame = person_frames(5)[2]
    fgr, alpha = place(frame[:, :, :3].copy(), frame[:, :, 3].copy(), (W * 2, H * 2), (1.0, 0.0), 0.5)
    assert np.array_equal(got[2][:, :, :3], reference_composite(fgr, alpha, backdrop))
    assert alpha[:, : W * 2 - W // 2].max() == 0  # the half-size layer sits in the top-right corner


def test_transparent_png_keeps_the_layer_alpha(tmp_path: Path, layer: Path) -> None:
    result = composite.run(layer, tmp_path / "out", background="none", outputs="png", scale=0.5,
                           position="[-0.5,0.5]")
    frame = person_frames(5)[1]
    fgr, alpha = place(frame[:, :, :3].copy(), frame[:, :, 3].copy(), (W, H), (-0.5, 0.5), 0.5)
    got = read_all(result.outputs[0])[1]
    assert np.array_equal(got[:, :, 3], alpha)
    visible = alpha > 0
    assert np.array_equal(got[:, :, :3][visible], fgr[visible])
    with pytest.raises(StageError) as err:
        composite.run(layer, tmp_path / "out2", background="none", outputs="video")
    assert err.value.kind is ErrorKind.BAD_ARGUMENT


@pytest.mark.parametrize(("mode", "index_of_frame_3"), [("loop", 0), ("hold", 2)])
def test_video_background_loops_or_holds(tmp_path: Path, layer: Path, mode: str, index_of_frame_3: int) -> None:
    backgrounds = [np.full((H, W, 3), v, np.uint8) for v in (10, 120, 230)]
    video = tmp_path / "bg.mkv"
    with VideoWriter(video, W, H, 24, codec=Codec.UTVIDEO) as w:
        for b in backgrounds:
            w.write(b)
    bg_audio = with_audio(video, tmp_path / "bg_audio.mkv", 3 / 24)
    result = composite.run(layer, tmp_path / "out", background=str(bg_audio), background_mode=mode,
                           outputs="lossless", audio="background")
    got = read_all(result.outputs[0])
    corner = [int(g[0, 0, 0]) for g in got]  # the figure never reaches the corner
    assert corner[:3] == [10, 120, 230] and corner[3] == [10, 120, 230][index_of_frame_3]
    assert has_audio(result.outputs[0])


def test_an_opaque_video_is_picture_in_picture(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip, None, W, H, frames=3)
    result = composite.run(clip, tmp_path / "out", background="black", scale=0.5, position="[0,0]",
                           outputs="lossless")
    got = read_all(result.outputs[0])[0]
    assert got[: H // 2, : W // 2, :3].mean() > 50 and got[H // 2 :, :, :3].max() == 0


def test_bad_parameters(tmp_path: Path, layer: Path) -> None:
    cases: list[tuple[dict[str, Any], ErrorKind]] = [
        ({"position": "middle"}, ErrorKind.BAD_ARGUMENT),
        ({"size": "huge"}, ErrorKind.BAD_ARGUMENT),
        ({"outputs": "gif"}, ErrorKind.BAD_ARGUMENT),
        ({"background": str(tmp_path / "missing.png")}, ErrorKind.INPUT_MISSING),
        ({"audio": str(tmp_path / "missing.wav")}, ErrorKind.INPUT_MISSING),
    ]
    for params, kind in cases:
        with pytest.raises(StageError) as err:
            composite.run(layer, tmp_path / "out", **params)
        assert err.value.kind is kind, params
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- stylize end to end --------------------------------------------------------------------------


STYLIZE = """
version = 1
[defaults]
stall_timeout = 0
[pipelines.stylize]
description = "preprocess -> matting -> generate -> composite"
[[pipelines.stylize.stages]]
stage = "preprocess"
[[pipelines.stylize.stages]]
stage = "matting"
params = {{ outputs = "rgba", provider = "cpu" }}
[[pipelines.stylize.stages]]
stage = "generate"
params = {{ model = "{model}", mode = "person", provider = "cpu", smoothing = 0.2 }}
[[pipelines.stylize.stages]]
stage = "composite"
params = {{ background = "#203040", outputs = "lossless,video" }}
[pipelines.stylize_rgba]
description = "generate -> composite, from an RGBA input"
[[pipelines.stylize_rgba.stages]]
stage = "generate"
params = {{ model = "{model}", mode = "person", provider = "cpu", smoothing = 0.2 }}
[[pipelines.stylize_rgba.stages]]
stage = "composite"
params = {{ background = "#203040", outputs = "lossless,video" }}
"""


@pytest.mark.parametrize("pipeline", ["stylize", "stylize_rgba"])
def test_stylize_chain_transforms_only_the_person(tmp_path: Path, fake_td: FakeTD, pipeline: str) -> None:
    """cuepipe run: preprocess -> matting (rgba) -> generate (person) -> composite; and the same from an
    RGBA input (what matting's rgba output holds: here the figure with its exact mask) without matting."""
    if pipeline == "stylize" and "rgba" not in matting.OUTPUTS:
        pytest.skip("the matting stage has no rgba output yet")
    model = genmodels.conv(tmp_path / "style.onnx", seed=11)
    (tmp_path / "pipelines.toml").write_text(STYLIZE.format(model=model.as_posix()))
    frames = [f for f, _ in render_frames(W, H, 8, seed=1)]
    masks = [m for _, m in render_frames(W, H, 8, seed=1)]
    if pipeline == "stylize":
        source = with_audio(_clip(tmp_path / "silent.mkv", frames), tmp_path / "clip.mkv", 8 / 24)
    else:
        rgba = [np.dstack(p) for p in zip(frames, masks, strict=True)]
        source = with_audio(write_rgba(tmp_path / "silent.mkv", rgba), tmp_path / "clip.mkv", 8 / 24)
    env = dict(subprocess_env(), CUEPIPE_STAGES=os.environ["CUEPIPE_STAGES"]
               + ",generate=stages.generate,composite=stages.composite")
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(tmp_path / "pipelines.toml"), "run",
           pipeline, str(source), "--report", fake_td.address, "--json"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fake_td.wait_for("job/done")
    assert (tmp_path / "out" / "clip_composite.mp4").is_file()
    if pipeline == "stylize_rgba":  # (matting's rgba output carries no audio yet)
        assert has_audio(tmp_path / "out" / "clip_composite.mp4")
    got = read_all(tmp_path / "out" / "clip_composite.mkv")
    assert len(got) == 8
    background = colour_of("#203040").astype(int)
    for frame, mask, out in zip(frames, masks, got, strict=True):
        far = cv2.dilate(mask, np.ones((9, 9), np.uint8)) == 0  # well away from the person
        assert (np.abs(out[:, :, :3][far].astype(int) - background).max(axis=1) <= 2).mean() > 0.99
        inside = cv2.erode(mask, np.ones((5, 5), np.uint8)) == 255
        changed = np.abs(out[:, :, :3][inside].astype(int) - frame[inside]).max(axis=1) > 8
        assert changed.mean() > 0.8  # the person is there, transformed


def _clip(path: Path, frames: list[np.ndarray]) -> Path:
    with VideoWriter(path, W, H, 24, codec=Codec.UTVIDEO) as w:
        for f in frames:
            w.write(f)
    return path


def test_image_folder_input(tmp_path: Path) -> None:
    frames = person_frames(2)
    folder = image_folder(tmp_path / "rgba", frames)
    result = composite.run(folder, tmp_path / "out", background="white", outputs="lossless")
    white = np.full((H, W, 3), 255, np.uint8)
    want = reference_composite(frames[1][:, :, :3].copy(), frames[1][:, :, 3].copy(), white)
    assert np.array_equal(read_all(result.outputs[0])[1][:, :, :3], want)
