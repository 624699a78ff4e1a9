"""Truncated inputs (issue 9, defect 6): a file that decodes fewer frames than its container declares.

A faststart mp4 cut to 30 % of its bytes keeps its full sample table (50 frames) but decodes only the
first ~15: every stage that reads its input to the end fails with ``input_invalid`` naming both
counts, unless ``allow_truncated`` is set; then it succeeds and the shortfall is a ``warning`` Event
that ``cuepipe run`` prints. Files whose declared count legitimately overshoots (an mkv whose audio
runs longer, variable frame rate, a stream-copy cut) and image folders must never fail.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cuepipe.stages import composite, generate, matting, preprocess
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.protocol import WarningKind
from cuepipe.stages.stage import StageEvents
from cuepipe.stages.video import (
    AudioSource,
    Codec,
    InputTruncated,
    VideoReader,
    VideoWriter,
    check_complete,
    ffmpeg_exe,
)
from tests.support import genmodels
from tests.support.env import ROOT, subprocess_env
from tests.support.fake_td import FakeTD

FRAMES = 50


class Recorder(StageEvents):
    """Stage Events kept in memory: the warnings a stage sent."""

    def __init__(self) -> None:
        super().__init__("test", None)
        self.warnings: list[tuple[WarningKind, str]] = []

    def warning(self, kind: WarningKind, message: str) -> None:
        self.warnings.append((kind, message))


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-y", "-nostdin", "-v", "error", *args], check=True, timeout=60)


def decoded_by_opencv(path: Path) -> tuple[int, int]:
    """(the count OpenCV says the container declares, the frames it really decodes)."""
    with VideoReader(path) as reader:
        return reader.frame_count, sum(1 for _ in reader)


@dataclass(frozen=True)
class Clips:
    """``full``: 50 frames of faststart H.264 (all key frames: the bytes spread evenly over the frames);
    ``cut``: its first 30 % of bytes, which still decode to ``decoded`` frames."""

    full: Path
    cut: Path
    decoded: int

    @property
    def shortfall(self) -> str:
        return f"decoded {self.decoded} of {FRAMES} frames"


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    folder = tmp_path_factory.mktemp("trunc")
    full, cut = folder / "full.mp4", folder / "cut.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-frames:v", str(FRAMES), "-c:v", "libx264",
           "-g", "1", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(full))
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 10])
    assert decoded_by_opencv(full) == (FRAMES, FRAMES)
    declared, decoded = decoded_by_opencv(cut)
    assert declared == FRAMES and 0 < decoded < FRAMES // 2, (declared, decoded)  # the defect's premise
    return Clips(full, cut, decoded)


# --- the stages, called directly ---------------------------------------------------------------------


def test_preprocess_refuses_a_truncated_file(clips: Clips, tmp_path: Path) -> None:
    with pytest.raises(InputTruncated) as err:
        preprocess.run(clips.cut, tmp_path / "out")
    assert err.value.kind is ErrorKind.INPUT_INVALID
    assert clips.shortfall in err.value.message and "allow_truncated" in err.value.message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "a partial output was kept"


def test_preprocess_accepts_it_when_allowed_and_warns(clips: Clips, tmp_path: Path) -> None:
    events = Recorder()
    result = preprocess.run(clips.cut, tmp_path / "out", events=events, allow_truncated=True)
    assert result.frames == clips.decoded
    [(kind, message)] = events.warnings
    assert kind is WarningKind.INPUT_TRUNCATED and clips.shortfall in message


@pytest.mark.parametrize(("params", "frames"), [
    ({"end_frame": 10}, 10),  # stops early on purpose, inside what decodes: not truncation
    ({"start_frame": 5, "end_frame": 40}, None),  # reaches past the decoded frames into the declared ones
    ({"start_frame": 30, "end_frame": 40}, None),  # wholly past them: truncation, not "the trim selects none"
    ({"end_seconds": 1.0}, None),
])
def test_a_trim_is_truncated_only_where_it_wants_missing_frames(clips: Clips, tmp_path: Path,
                                                                params: dict[str, Any], frames: int | None) -> None:
    if frames is not None:
        assert preprocess.run(clips.cut, tmp_path / "out", **params).frames == frames
        return
    with pytest.raises(InputTruncated) as err:
        preprocess.run(clips.cut, tmp_path / "out", **params)
    assert err.value.declared == FRAMES and err.value.decoded < FRAMES


def test_matting_refuses_a_truncated_file(clips: Clips, tmp_path: Path) -> None:
    """The real RVM model on tiny frames."""
    with pytest.raises(InputTruncated) as err:
        matting.run(clips.cut, tmp_path / "out", outputs="alpha", threads=1)
    assert clips.shortfall in err.value.message
    events = Recorder()
    result = matting.run(clips.cut, tmp_path / "ok", events=events, outputs="alpha", threads=1,
                         allow_truncated=True)
    assert result.frames == clips.decoded and len(events.warnings) == 1


def test_generate_and_composite_refuse_a_truncated_file(clips: Clips, tmp_path: Path) -> None:
    """Both read through ``cuepipe.stages.rgba.RgbaReader`` (ffmpeg), not OpenCV."""
    model = genmodels.identity(tmp_path / "id.onnx")
    for name, run in (("generate", lambda out, **p: generate.run(clips.cut, out, model=str(model),
                                                                  mode="frame", **p)),
                      ("composite", lambda out, **p: composite.run(clips.cut, out, **p))):
        with pytest.raises(InputTruncated) as err:
            run(tmp_path / name)
        assert clips.shortfall in err.value.message, name
        events = Recorder()
        assert run(tmp_path / f"{name}_ok", events=events, allow_truncated=True).frames == clips.decoded
        assert [k for k, _ in events.warnings] == [WarningKind.INPUT_TRUNCATED], name


def test_complete_inputs_pass_without_a_warning(clips: Clips, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((48, 64, 3), i * 40, np.uint8))
    for source, frames in ((clips.full, FRAMES), (folder, 4)):
        events = Recorder()
        assert preprocess.run(source, tmp_path / "out" / source.name, events=events).frames == frames
        assert events.warnings == []


# --- declared counts that overshoot legitimately --------------------------------------------------------


def _long_audio_mkv(folder: Path) -> Path:
    """What matting writes as ``matte_rgba.mkv`` from an input whose audio outlasts its video."""
    audio = folder / "long.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=2.5", str(audio))
    path = folder / "long_audio.mkv"
    with VideoWriter(path, 64, 48, 25, codec=Codec.UTVIDEO, channels=4, audio=AudioSource(audio)) as writer:
        for i in range(10):
            writer.write(np.full((48, 64, 4), i * 20, np.uint8))
    return path


def _vfr_mkv(folder: Path) -> Path:
    path = folder / "vfr.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=60:duration=2", "-vf",
           "select='lt(mod(n\\,10)\\,3)+gt(n\\,90)'", "-fps_mode", "vfr", "-c:v", "utvideo", str(path))
    return path


def _stream_copy_cut(folder: Path) -> Path:
    """``ffmpeg -ss 1.3 -i long.mp4 -c copy``: the samples from the last key frame on, and an edit list."""
    source, path = folder / "gop.mp4", folder / "copy_cut.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-frames:v", "100", "-c:v", "libx264", "-g", "250",
           "-pix_fmt", "yuv420p", str(source))
    ffmpeg("-ss", "1.3", "-i", str(source), "-c", "copy", str(path))
    return path


@pytest.mark.parametrize("make", [_long_audio_mkv, _vfr_mkv, _stream_copy_cut])
def test_overshooting_declared_counts_are_not_truncation(tmp_path: Path, make: Any) -> None:
    path = make(tmp_path)
    declared, decoded = decoded_by_opencv(path)
    assert decoded < declared, "the container no longer overshoots: this case tests nothing"
    events = Recorder()
    assert check_complete(path, declared, decoded, allow=False, events=events) is None
    assert events.warnings == []


# --- through the launcher ---------------------------------------------------------------------------------

PIPELINES = """
version = 1
[defaults]
stall_timeout = 0
[pipelines.prep]
[[pipelines.prep.stages]]
stage = "preprocess"
"""


def cuepipe(tmp_path: Path, td: FakeTD, source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(tmp_path / "pipelines.toml"), "run",
           "prep", str(source), "--report", td.address, "--out", str(tmp_path / "out"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_cuepipe_run_fails_the_job(clips: Clips, tmp_path: Path, fake_td: FakeTD) -> None:
    proc = cuepipe(tmp_path, fake_td, clips.cut, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = fake_td.wait_for("job/failed")
    assert (failed["index"], failed["stage"], failed["kind"]) == (0, "preprocess", "input_invalid")
    assert clips.shortfall in failed["message"]
    assert "job/done" not in fake_td.names() and not (tmp_path / "out" / "cut_preprocessed.mkv").exists()


def test_cuepipe_run_with_allow_truncated_reports_the_shortfall(clips: Clips, tmp_path: Path,
                                                                 fake_td: FakeTD) -> None:
    proc = cuepipe(tmp_path, fake_td, clips.cut, "--set", "preprocess.allow_truncated=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fake_td.wait_for("job/done")
    names = fake_td.names()
    warning = fake_td.wait_for("job/warning")
    assert (warning["index"], warning["stage"], warning["kind"]) == (0, "preprocess", "input_truncated")
    assert clips.shortfall in warning["message"]
    assert names.index("job/warning") < names.index("job/stage_done")
    assert (tmp_path / "out" / "cut_preprocessed.mkv").is_file()
    # printed: when it arrived, and again below the job's final line
    lines = proc.stderr.splitlines()
    done = next(i for i, line in enumerate(lines) if " done in " in line)
    assert "with 1 warning" in lines[done]
    assert any(clips.shortfall in line for line in lines[:done])
    assert any("input_truncated" in line and clips.shortfall in line for line in lines[done + 1:])


def test_the_stage_program_exits_1_with_input_invalid(clips: Clips, tmp_path: Path,
                                                      fake_td: FakeTD) -> None:
    cmd = [sys.executable, "-m", "cuepipe.stages.preprocess", "--input", str(clips.cut), "--output-dir",
           str(tmp_path / "out"), "--report", fake_td.address]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    failed = fake_td.wait_for("stage/failed")
    assert failed["kind"] == "input_invalid" and clips.shortfall in failed["message"]
