"""VideoReader / VideoWriter: lossless round trip, image folders, conversions, atomic output, errors;
gray / BGRA input, the alpha codecs (HAP Alpha, ProRes 4444, PNG sequences), audio, ``probe``.

The clip helpers (``noise_frames``, ``pattern_frame``, ``frame_index``, ``write_clip``, ``read_all``,
``bad_input``, ``av_clip``, ``audio_samples``, ``ffmpeg``) are in ``tests/support/video.py``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

from cuepipe.stages import video, videowriter
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.stage import StageError
from cuepipe.stages.video import (
    AudioSource,
    Codec,
    VideoOutputError,
    VideoReader,
    VideoWriter,
    has_audio,
    probe,
    to_bgr8,
)
from tests.support.video import (
    audio_samples,
    av_clip,
    bad_input,
    ffmpeg,
    frame_index,
    noise_frames,
    pattern_frame,
    read_all,
    write_clip,
)


def test_ffv1_round_trip_is_lossless_even_at_odd_sizes(tmp_path: Path) -> None:
    src = noise_frames(12, width=65, height=47)
    out = write_clip(tmp_path / "clip.mkv", src, fps=24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mkv"]  # no temp file left behind
    with VideoReader(out) as reader:
        assert (reader.width, reader.height, reader.fps, reader.frame_count) == (65, 47, 24.0, 12)
        got = list(reader)
    assert len(got) == 12
    assert all(np.array_equal(a, b) for a, b in zip(src, got, strict=True))
    frames, fps = read_all(out)
    assert fps == 24.0 and all(np.array_equal(a, b) for a, b in zip(src, frames, strict=True))


def test_utvideo_is_lossless_too(tmp_path: Path) -> None:
    src = noise_frames(6, width=33, height=21)
    frames, fps = read_all(write_clip(tmp_path / "clip.mkv", src, fps=30, codec=Codec.UTVIDEO))
    assert fps == 30.0 and all(np.array_equal(a, b) for a, b in zip(src, frames, strict=True))


def test_h264_writes_mp4_that_decodes_to_the_same_frames(tmp_path: Path) -> None:
    out = write_clip(tmp_path / "clip.mp4", [pattern_frame(i) for i in range(10)], fps=25, codec=Codec.H264)
    frames, fps = read_all(out)
    assert fps == 25.0
    assert [frame_index(f) for f in frames] == list(range(10))
    assert Codec.H264.suffix == ".mp4" and Codec.FFV1.suffix == ".mkv"


def test_h264_rejects_odd_sizes_before_starting(tmp_path: Path) -> None:
    with pytest.raises(VideoOutputError) as err:
        VideoWriter(tmp_path / "odd.mp4", 65, 48, 30, Codec.H264)
    assert err.value.kind is ErrorKind.BAD_ARGUMENT and "even" in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_exception_mid_write_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "clip.mkv"
    out.write_bytes(b"previous run")
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, 64, 48, 30) as writer:
        for frame in noise_frames(5):
            writer.write(frame)
        raise RuntimeError("boom")
    assert out.read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mkv"]


def test_ffmpeg_failure_is_reported_and_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = videowriter._Preset(".mkv", ("-c:v", "no_such_encoder"), {3: "bgr0"})
    monkeypatch.setitem(videowriter._PRESETS, Codec.UTVIDEO, bad)  # the default codec
    with pytest.raises(VideoOutputError) as err, VideoWriter(tmp_path / "x.mkv", 64, 48, 30) as writer:
        for frame in noise_frames(3):
            writer.write(frame)
    assert err.value.kind is ErrorKind.OUTPUT_ERROR
    assert "no_such_encoder" in err.value.message  # ffmpeg's own complaint is passed on
    assert list(tmp_path.iterdir()) == []


def test_no_frames_and_wrong_frames_are_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoOutputError, match="no frames"), VideoWriter(tmp_path / "empty.mkv", 64, 48, 30):
        pass
    with pytest.raises(ValueError, match="48x64x3"), VideoWriter(tmp_path / "bad.mkv", 64, 48, 30) as writer:
        writer.write(np.zeros((48, 63, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("codec", [Codec.UTVIDEO, Codec.PNG])
def test_a_lazy_writer_starts_ffmpeg_with_its_first_frame(tmp_path: Path, codec: Codec) -> None:
    """lazy=True: everything is checked at once, ffmpeg starts at the first write; no frame is still an error
    and leaves nothing behind, and the output equals an eager writer's."""
    import psutil

    def encoders() -> int:  # this process's ffmpeg children (it may have others, e.g. a resource tracker)
        return sum("ffmpeg" in p.name() for p in psutil.Process().children())

    with pytest.raises(VideoOutputError, match="even"):  # checked at once, lazy or not
        VideoWriter(tmp_path / "odd.mp4", 63, 48, 30, codec=Codec.H264, lazy=True)
    with pytest.raises(VideoOutputError, match="no frames"), VideoWriter(tmp_path / "empty", 64, 48, 30,
                                                                         codec=codec, lazy=True):
        assert encoders() == 0
    frames = noise_frames(3, width=64, height=48)
    outputs = []
    for lazy in (True, False):
        with VideoWriter(tmp_path / f"out_{lazy}{codec.suffix}", 64, 48, 30, codec=codec, lazy=lazy) as writer:
            assert encoders() == (0 if lazy else 1)
            for f in frames:
                writer.write(f)
            assert encoders() == 1
        outputs.append(writer.path)
    with VideoWriter(tmp_path / "aborted", 64, 48, 30, codec=codec, lazy=True) as writer:
        writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out_False{codec.suffix}", f"out_True{codec.suffix}"]
    decoded = []
    for path in outputs:
        with VideoReader(path) as reader:
            decoded.append(list(reader))
    assert len(decoded[0]) == len(decoded[1]) == 3
    assert all(np.array_equal(a, b) for a, b in zip(*decoded, strict=True))


def test_image_folder_is_read_in_natural_order_and_converted(tmp_path: Path) -> None:
    src = noise_frames(12, width=32, height=24)
    for i, frame in enumerate(src):  # 1..12: lexical order would put 10, 11, 12 before 2
        cv2.imwrite(str(tmp_path / f"shot_{i + 1}.png"), frame)
    (tmp_path / "notes.txt").write_text("not an image")
    cv2.imwrite(str(tmp_path / "._shot_0.png"), src[0])  # macOS metadata file: hidden, ignored
    with VideoReader(tmp_path, image_fps=12.5) as reader:
        assert (reader.width, reader.height, reader.fps, reader.frame_count) == (32, 24, 12.5, 12)
        assert reader.is_image_folder
        got = list(reader)
    assert all(np.array_equal(a, b) for a, b in zip(src, got, strict=True))


def test_folder_of_gray_16bit_and_bgra_images(tmp_path: Path) -> None:
    gray = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)
    cv2.imwrite(str(tmp_path / "f1.png"), gray)
    cv2.imwrite(str(tmp_path / "f2.png"), gray.astype(np.uint16) * 257)
    bgra = np.dstack([cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), np.full_like(gray, 7)])
    cv2.imwrite(str(tmp_path / "f3.tif"), bgra)
    expected = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    with VideoReader(tmp_path) as reader:
        got = list(reader)
    assert len(got) == 3
    for frame in got:
        assert frame.dtype == np.uint8 and frame.shape == (24, 32, 3)
        assert np.array_equal(frame, expected)


def test_to_bgr8_conversions() -> None:
    assert to_bgr8(np.full((2, 2, 1), 9, np.uint8)).tolist() == [[[9, 9, 9]] * 2] * 2
    assert to_bgr8(np.full((2, 2), 65535, np.uint16)).max() == 255
    assert to_bgr8(np.full((2, 2, 3), 0.5, np.float32)).tolist() == [[[128] * 3] * 2] * 2
    with pytest.raises(ValueError, match="unsupported"):
        to_bgr8(np.zeros((2, 2, 3), np.int32))


def test_frames_range_and_second_pass(tmp_path: Path) -> None:
    src = noise_frames(15)
    with VideoReader(write_clip(tmp_path / "c.mkv", src)) as reader:
        assert [f.tobytes() for f in reader.frames(4, 9)] == [f.tobytes() for f in src[4:9]]
        assert len(list(reader)) == 15  # iterating again starts from the first frame
        assert np.array_equal(next(iter(reader)), src[0])


def test_external_h264_file(tmp_path: Path) -> None:
    """A clip written by imageio-ffmpeg itself, as a user's file would be."""
    path = tmp_path / "ext.mp4"
    gen = imageio_ffmpeg.write_frames(str(path), (64, 48), pix_fmt_in="bgr24", fps=24, macro_block_size=1,
                                      ffmpeg_log_level="error")
    gen.send(None)
    for i in range(8):
        gen.send(pattern_frame(i))
    gen.close()
    with VideoReader(path) as reader:
        assert (reader.width, reader.height, reader.fps) == (64, 48, 24.0)
        assert [frame_index(f) for f in reader] == list(range(8))


@pytest.mark.parametrize(
    ("which", "kind", "text"),
    [
        ("missing", ErrorKind.INPUT_MISSING, "missing.mp4"),
        ("text", ErrorKind.INPUT_INVALID, "fake.mp4"),
        ("empty", ErrorKind.INPUT_INVALID, "no images"),
    ],
)
def test_reader_errors(tmp_path: Path, which: str, kind: ErrorKind, text: str) -> None:
    with pytest.raises(StageError) as err:
        VideoReader(bad_input(tmp_path, which))
    assert isinstance(err.value, video.VideoInputError)
    assert err.value.kind is kind and text in err.value.message


def test_image_of_another_size_is_named(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a1.png"), np.zeros((24, 32, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "a2.png"), np.zeros((20, 32, 3), np.uint8))
    with VideoReader(tmp_path) as reader, pytest.raises(StageError) as err:
        list(reader)
    assert err.value.kind is ErrorKind.INPUT_INVALID and "a2.png" in err.value.message


# --- gray / BGRA input, alpha codecs, audio, probe -------------------------------------------------


def decode_bgra(path: Path) -> np.ndarray:
    """Every frame of a video file as BGRA (N x H x W x 4), decoded by ffmpeg with its alpha."""
    info = probe(path)
    raw = ffmpeg("-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgra", "-")
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 4)


def alpha_frames(n: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """BGRA frames with known alpha: a 0..255 ramp on the left half, 4x4-block-constant values on the
    right (HAP's DXT5 compresses each 4x4 block: constant blocks survive it exactly)."""
    frames = []
    ys, xs = np.mgrid[0:height, 0:width]
    for i in range(n):
        alpha = np.where(xs < width // 2, xs * 255 // (width // 2 - 1),
                         ((ys // 4) * 37 + (xs // 4) * 11 + i * 29) % 256).astype(np.uint8)
        bgr = np.zeros((height, width, 3), np.uint8)
        bgr[..., 0], bgr[..., 1], bgr[..., 2] = (ys // 4 * 16) % 256, (xs // 4 * 32) % 256, 40 * (i % 6)
        frames.append(np.dstack([bgr, alpha]))
    return frames


def read_png_sequence(folder: Path) -> list[np.ndarray]:
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(len(names))]
    return [cv2.imread(str(folder / name), cv2.IMREAD_UNCHANGED) for name in names]


def test_codec_order_channels_and_suffixes() -> None:
    assert next(iter(Codec)) is Codec.UTVIDEO  # the default intermediate
    assert {c: set(c.channels) for c in Codec} == {
        Codec.UTVIDEO: {1, 3, 4}, Codec.FFV1: {1, 3, 4}, Codec.H264: {1, 3},
        Codec.HAP_ALPHA: {3, 4}, Codec.PRORES_4444: {3, 4}, Codec.PNG: {1, 3, 4},
    }
    assert [c.suffix for c in (Codec.HAP_ALPHA, Codec.PRORES_4444, Codec.PNG)] == [".mov", ".mov", ""]
    assert Codec.PNG.is_sequence and not Codec.H264.is_sequence


@pytest.mark.parametrize(
    ("codec", "channels", "codec_name", "pix_fmt"),
    [
        (Codec.H264, 1, "h264", "yuv420p"),
        (Codec.HAP_ALPHA, 4, "hap", "rgba"),
        (Codec.PRORES_4444, 4, "prores", "yuva444p12le"),  # 10-bit yuva444p10le, decoded as 12-bit
        (Codec.PNG, 4, "png", "rgba"),
        (Codec.FFV1, 4, "ffv1", "bgra"),
        (Codec.UTVIDEO, 1, "utvideo", "gbrp"),
    ],
)
def test_new_codecs_keep_size_fps_and_frame_count(tmp_path: Path, codec: Codec, channels: int, codec_name: str,
                                                   pix_fmt: str) -> None:
    frames = alpha_frames(12)
    path = tmp_path / f"out{codec.suffix}"
    with VideoWriter(path, 64, 48, 25, codec, channels=channels) as writer:
        for frame in frames:
            writer.write(frame[..., 3] if channels == 1 else frame)
    info = probe(path, count_frames=True)
    assert (info.width, info.height, info.frames, info.codec, info.pix_fmt) == (64, 48, 12, codec_name, pix_fmt)
    assert info.fps == (None if codec is Codec.PNG else 25.0)
    assert not info.has_audio
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file or folder left


@pytest.mark.parametrize(
    ("codec", "ramp_tolerance", "block_tolerance", "colour_tolerance"),
    [
        (Codec.PNG, 0, 0, 0),  # lossless
        (Codec.PRORES_4444, 1, 1, 2),  # near-lossless: 10-bit alpha plane (+-1), 4:4:4 10-bit colour
        # HAP Alpha = DXT5 per 4x4 block: alpha is 8 levels between two 8-bit endpoints (error up to
        # (block max - min) / 14: 2 on this ramp, 0 on constant blocks), colour two RGB565 endpoints
        (Codec.HAP_ALPHA, 2, 0, 4),
    ],
)
def test_alpha_survives_the_alpha_codecs(tmp_path: Path, codec: Codec, ramp_tolerance: int, block_tolerance: int,
                                         colour_tolerance: int) -> None:
    src = alpha_frames(6)
    path = tmp_path / f"matte{codec.suffix}"
    with VideoWriter(path, 64, 48, 30, codec, channels=4) as writer:
        for frame in src:
            writer.write(frame)
    got = read_png_sequence(path) if codec is Codec.PNG else list(decode_bgra(path))
    assert len(got) == len(src)
    for a, b in zip(src, got, strict=True):
        diff = np.abs(a.astype(int) - b)
        assert diff[:, :32, 3].max() <= ramp_tolerance  # the ramp: every value 0..255 in steps of ~8
        assert diff[:, 32:, 3].max() <= block_tolerance
        assert diff[..., :3].max() <= colour_tolerance


@pytest.mark.parametrize("codec", [Codec.HAP_ALPHA, Codec.PRORES_4444, Codec.PNG])
def test_bgr_into_an_alpha_codec_is_opaque(tmp_path: Path, codec: Codec) -> None:
    path = tmp_path / f"opaque{codec.suffix}"
    with VideoWriter(path, 64, 48, 30, codec, channels=3) as writer:
        for frame in noise_frames(3):
            writer.write(frame)
    got = read_png_sequence(path) if codec is Codec.PNG else decode_bgra(path)
    assert len(got) == 3 and all(f.shape == (48, 64, 4) and (f[..., 3] == 255).all() for f in got)


def test_gray_h264_is_a_grayscale_video(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # 48x64, 0..252
    path = tmp_path / "alpha.mp4"
    with VideoWriter(path, 64, 48, 30, Codec.H264, channels=1) as writer:
        for _ in range(5):
            writer.write(ramp)
    frames, fps = read_all(path)
    assert len(frames) == 5 and fps == 30.0
    for frame in frames:
        b, g, r = (frame[..., c].astype(int) for c in range(3))
        assert np.abs(b - r).max() <= 1 and np.abs(g - r).max() <= 1  # neutral chroma: gray
        assert np.abs(g - ramp).max() <= 3  # full-range gray, so black stays 0 and white 255
    assert frames[0][:, 0].max() <= 2 and frames[0][:, -1].min() >= 249


def test_writer_rejects_impossible_requests(tmp_path: Path) -> None:
    def refused(codec: Codec, channels: int, width: int = 64) -> str:
        with pytest.raises(VideoOutputError) as err:
            VideoWriter(tmp_path / f"x{codec.suffix}", width, 48, 30, codec, channels=channels)
        assert err.value.kind is ErrorKind.BAD_ARGUMENT
        return err.value.message

    assert "hap_alpha, prores4444 or png" in refused(Codec.H264, 4)  # no alpha in h264: say where it is
    assert "3 (BGR) or 4 (BGRA)" in refused(Codec.HAP_ALPHA, 1)
    assert "multiple of 4" in refused(Codec.HAP_ALPHA, 4, width=66)
    assert "channels" in refused(Codec.FFV1, 2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"48x64x4 uint8 \(BGRA\)"), \
            VideoWriter(tmp_path / "m.mov", 64, 48, 30, Codec.PRORES_4444, channels=4) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"48x64 uint8 \(gray\)"), \
            VideoWriter(tmp_path / "a.mp4", 64, 48, 30, Codec.H264, channels=1) as writer:
        writer.write(np.zeros((48, 64), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_png_sequence_replaces_a_previous_folder_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "rgba"
    out.mkdir()
    (out / "frame_000099.png").write_bytes(b"stale")
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, 64, 48, 30, Codec.PNG, channels=4) as writer:
        writer.write(alpha_frames(1)[0])
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["rgba"] and [p.name for p in out.iterdir()] == ["frame_000099.png"]
    src = alpha_frames(4)
    with VideoWriter(out, 64, 48, 30, Codec.PNG, channels=4) as writer:
        for frame in src:
            writer.write(frame)
    got = read_png_sequence(out)  # the stale frame is gone with the old folder
    assert all(np.array_equal(a, b) for a, b in zip(src, got, strict=True)) and len(got) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["rgba"]


def write_with_audio(path: Path, frames: int, audio: AudioSource | None, codec: Codec = Codec.H264,
                     fps: int = 30) -> Path:
    with VideoWriter(path, 64, 48, fps, codec, audio=audio) as writer:
        for i in range(frames):
            writer.write(pattern_frame(i))
    return path


def test_audio_is_muxed_and_ends_with_the_video(tmp_path: Path) -> None:
    clip = av_clip(tmp_path / "clip.mp4", seconds=2.0)
    assert has_audio(clip)
    full = write_with_audio(tmp_path / "composite.mp4", 60, AudioSource(clip))  # 2 s of video
    info = probe(full, count_frames=True)
    assert (info.frames, info.fps, info.has_audio, info.audio_codec) == (60, 30.0, True, "aac")
    assert info.duration == pytest.approx(2.0, abs=0.05)
    sound = audio_samples(full)
    assert len(sound) / 8000 == pytest.approx(2.0, abs=0.05)
    assert np.sqrt(np.mean(sound[800:-800] ** 2)) > 0.06  # the sine (lavfi: amplitude 1/8, rms 0.088)
    short = write_with_audio(tmp_path / "short.mov", 30, AudioSource(clip, duration=1.0), codec=Codec.HAP_ALPHA)
    info = probe(short, count_frames=True)  # 1 s of video and, as asked, of audio: PCM in .mov
    assert (info.frames, info.audio_codec) == (30, "pcm_s16le")
    assert info.duration == pytest.approx(1.0, abs=0.02) and len(audio_samples(short)) / 8000 == pytest.approx(
        1.0, abs=0.01)
    longer = write_with_audio(tmp_path / "longer.mkv", 30, AudioSource(clip), codec=Codec.UTVIDEO)
    assert len(audio_samples(longer)) / 8000 == pytest.approx(2.0, abs=0.05)  # no duration: all of it
    assert probe(longer, count_frames=True).frames == 30  # and the video is never cut


def test_audio_start_and_duration_padded_with_silence(tmp_path: Path) -> None:
    clip = av_clip(tmp_path / "clip.mp4", seconds=2.0)
    out = write_with_audio(tmp_path / "o.mkv", 30, AudioSource(clip, start=1.5, duration=1.0), Codec.UTVIDEO)
    sound = audio_samples(out)
    assert len(sound) / 8000 == pytest.approx(1.0, abs=0.01)  # the file has 0.5 s left: padded to 1 s
    loud = np.abs(sound) > 0.02
    assert loud[:3800].mean() > 0.5 and not loud[4200:].any()  # 0.5 s of sine from 1.5 s, then silence


def test_a_source_without_audio_is_no_error(tmp_path: Path) -> None:
    silent = av_clip(tmp_path / "silent.mp4", seconds=1.0, audio=None)
    assert not has_audio(silent)
    out = write_with_audio(tmp_path / "o.mp4", 15, AudioSource(silent))
    info = probe(out, count_frames=True)
    assert info.frames == 15 and not info.has_audio and info.audio_codec is None
    seq = write_with_audio(tmp_path / "seq", 3, AudioSource(av_clip(tmp_path / "a.mp4", 1.0)), Codec.PNG)
    assert len(list(seq.iterdir())) == 3 and not has_audio(seq)  # a PNG sequence takes no audio


def test_audio_source_errors(tmp_path: Path) -> None:
    with pytest.raises(StageError) as err:
        VideoWriter(tmp_path / "o.mp4", 64, 48, 30, Codec.H264, audio=AudioSource(tmp_path / "gone.wav"))
    assert err.value.kind is ErrorKind.INPUT_MISSING and "gone.wav" in err.value.message
    clip = av_clip(tmp_path / "clip.mp4", seconds=1.0)
    with pytest.raises(VideoOutputError) as err:
        VideoWriter(tmp_path / "o.mp4", 64, 48, 30, Codec.H264, audio=AudioSource(clip, start=-1.0))
    assert err.value.kind is ErrorKind.BAD_ARGUMENT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_probe_errors_and_folders(tmp_path: Path) -> None:
    for which, kind in (("missing", ErrorKind.INPUT_MISSING), ("text", ErrorKind.INPUT_INVALID),
                        ("empty", ErrorKind.INPUT_INVALID)):
        with pytest.raises(video.VideoInputError) as err:
            probe(bad_input(tmp_path, which))
        assert err.value.kind is kind
    cv2.imwrite(str(tmp_path / "empty" / "img1.png"), np.zeros((24, 32, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "empty" / "img2.png"), np.zeros((24, 32, 3), np.uint8))
    info = probe(tmp_path / "empty")
    assert (info.width, info.height, info.frames, info.fps, info.has_audio) == (32, 24, 2, None, False)


def test_bgr_and_rgba_readers_agree_on_an_image_folder(tmp_path: Path) -> None:
    """Both readers decode images through one path (stages.video.decode_image)."""
    from cuepipe.stages.rgba import RgbaReader

    rng = np.random.default_rng(4)
    written = [rng.integers(0, 256, (24, 32, 4), dtype=np.uint8) for _ in range(3)]
    for i, bgra in enumerate(written):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), bgra)
    with VideoReader(tmp_path) as bgr_reader:
        bgr = list(bgr_reader)
    rgba_reader = RgbaReader(tmp_path)
    try:
        rgba = list(rgba_reader)
        assert rgba_reader.has_alpha
    finally:
        rgba_reader.close()
    assert len(bgr) == len(rgba) == 3
    for a, b, w in zip(bgr, rgba, written, strict=True):
        assert np.array_equal(b, w)  # PNG alpha kept exactly
        assert np.array_equal(a, cv2.cvtColor(b, cv2.COLOR_BGRA2BGR))
