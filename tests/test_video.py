"""VideoReader / VideoWriter: lossless round trip, image folders, conversions, atomic output, errors.

The helpers (``noise_frames``, ``pattern_frame``, ``frame_index``, ``write_clip``, ``read_all``,
``bad_input``) are shared with ``test_preprocess.py``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

from stages import video
from stages.events import ErrorKind
from stages.stage import StageError
from stages.video import Codec, VideoOutputError, VideoReader, VideoWriter, to_bgr8

BLOCK = 8  # frame-index bits are drawn as BLOCKxBLOCK black/white squares along the top row


def noise_frames(n: int, width: int = 64, height: int = 48, seed: int = 0) -> list[np.ndarray]:
    """Random BGR frames: each is unique, so an exact match identifies the source frame."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def pattern_frame(index: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A gray frame with ``index`` in binary along the top row; survives lossy h264."""
    frame = np.full((height, width, 3), 128, np.uint8)
    for bit in range(width // BLOCK):
        frame[:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 255 if index >> bit & 1 else 0
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Decode ``pattern_frame``'s index from the centre of each block."""
    bits = frame.shape[1] // BLOCK
    centres = [frame[2 : BLOCK - 2, b * BLOCK + 2 : (b + 1) * BLOCK - 2].mean() for b in range(bits)]
    return sum(1 << b for b, v in enumerate(centres) if v > 128)


def write_clip(path: Path, frames: list[np.ndarray], fps: float = 30.0, codec: Codec = Codec.FFV1) -> Path:
    with VideoWriter(path, frames[0].shape[1], frames[0].shape[0], fps, codec) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def read_all(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame and the fps, read with plain OpenCV (independent of VideoReader)."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return frames, fps


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
    bad = video._Preset(".mkv", ("-c:v", "no_such_encoder"), False)
    monkeypatch.setitem(video._PRESETS, Codec.FFV1, bad)
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


def bad_input(folder: Path, which: str) -> Path:
    """``missing``: no such path; ``text``: a text file named .mp4; ``empty``: an empty folder."""
    path = folder / {"missing": "missing.mp4", "text": "fake.mp4", "empty": "empty"}[which]
    if which == "text":
        path.write_text("hello")
    elif which == "empty":
        path.mkdir()
    return path


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
