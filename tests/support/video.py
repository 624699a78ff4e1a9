"""Test clips and frames: made, written and read back independently of ``cuepipe.stages.video``'s reader."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

from cuepipe.stages.video import Codec, VideoWriter

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()

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


def bad_input(folder: Path, which: str) -> Path:
    """``missing``: no such path; ``text``: a text file named .mp4; ``empty``: an empty folder."""
    path = folder / {"missing": "missing.mp4", "text": "fake.mp4", "empty": "empty"}[which]
    if which == "text":
        path.write_text("hello")
    elif which == "empty":
        path.mkdir()
    return path


def ffmpeg(*args: str) -> bytes:
    """Run the bundled ffmpeg (independent of VideoWriter); its stdout."""
    return subprocess.run([FFMPEG, "-hide_banner", "-v", "error", "-nostdin", "-y", *args], check=True,
                          capture_output=True, timeout=60).stdout


def av_clip(path: Path, seconds: float = 2.0, fps: int = 30, audio: str | None = "sine=frequency=440",
            size: str = "64x48") -> Path:
    """A test-pattern H.264 clip, with an AAC track from the lavfi audio source ``audio`` (None: silent
    file, no audio stream)."""
    sound = ["-f", "lavfi", "-i", f"{audio}:duration={seconds}" if audio.startswith("sine") else audio,
             "-c:a", "aac"] if audio else []
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}", *sound,
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-shortest", str(path))
    return path


def audio_samples(path: Path, rate: int = 8000) -> np.ndarray:
    """The first audio stream as mono float samples in -1..1 at ``rate`` Hz."""
    raw = ffmpeg("-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", str(rate), "-f", "s16le", "-")
    return np.frombuffer(raw, np.int16).astype(np.float64) / 32768.0
