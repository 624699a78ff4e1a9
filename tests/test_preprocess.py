"""The preprocess stage: trim, fps resampling, geometry, codecs, errors, events and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest

from cuepipe.stages import preprocess
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.protocol import MessageSpec
from cuepipe.stages.stage import StageError, StageEvents
from cuepipe.stages.video import Codec, VideoWriter, has_audio, probe
from tests.support.video import (
    audio_samples,
    av_clip,
    bad_input,
    frame_index,
    noise_frames,
    pattern_frame,
    read_all,
    write_clip,
)

if TYPE_CHECKING:
    from tests.support.fake_td import FakeTD

ROOT = Path(__file__).resolve().parent.parent
SRC = noise_frames(40)  # 64x48, unique frames: exact equality tells which source frame it is


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """40 lossless frames at 30 fps."""
    return write_clip(tmp_path / "src.mkv", SRC, fps=30)


def run(src: Path, out: Path, **params: Any) -> tuple[list[np.ndarray], float]:
    result = preprocess.run(src, out, **params)
    assert result.outputs[0].parent == out
    frames, fps = read_all(result.outputs[0])
    assert result.frames == len(frames)
    return frames, fps


def source_indices(frames: list[np.ndarray]) -> list[int]:
    lookup = {f.tobytes(): i for i, f in enumerate(SRC)}
    return [lookup[f.tobytes()] for f in frames]


def test_importing_the_stage_is_cheap_and_codecs_match() -> None:
    """The orchestrator imports stage modules to read PARAMS: no numpy/OpenCV at import time."""
    code = "import sys, stages.preprocess; print(sorted({'cv2', 'numpy'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stderr
    assert set(preprocess.CODECS) <= {c.value for c in Codec} and preprocess.CODECS[0] == next(iter(Codec)).value
    assert not any(Codec(c).is_sequence for c in preprocess.CODECS)


def test_defaults_copy_the_clip_losslessly(clip: Path, tmp_path: Path) -> None:
    result = preprocess.run(clip, tmp_path / "out")
    assert result.outputs == (tmp_path / "out" / "preprocessed.mkv",) and result.frames == 40
    frames, fps = read_all(result.outputs[0])
    assert fps == 30.0 and source_indices(frames) == list(range(40))


def test_trim_by_frames(clip: Path, tmp_path: Path) -> None:
    frames, _ = run(clip, tmp_path / "out", start_frame=5, end_frame=17)
    assert source_indices(frames) == list(range(5, 17))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"start_seconds": 0.5, "end_seconds": 1.0}, range(15, 30)),  # 0.5 s = frame 15, end exclusive
        ({"start_seconds": 0.51}, range(16, 40)),  # first frame at or after 0.51 s
        ({"end_seconds": 0.1}, range(0, 3)),  # 0.1 * 30 is 3.0000000000000004 in floats
        ({"start_frame": 10, "end_seconds": 0.5}, range(10, 15)),
    ],
)
def test_trim_by_seconds(clip: Path, tmp_path: Path, params: dict[str, float], expected: range) -> None:
    frames, _ = run(clip, tmp_path / "out", **params)
    assert source_indices(frames) == list(expected)


def test_ntsc_rate_is_kept_exactly(tmp_path: Path) -> None:
    src = write_clip(tmp_path / "ntsc.mkv", SRC, fps=30000 / 1001)
    frames, fps = run(src, tmp_path / "out", start_seconds=1.0)
    assert fps == 30000 / 1001
    assert source_indices(frames) == list(range(30, 40))  # frame 29 is at 0.9676 s, frame 30 at 1.001 s


def test_fps_30_to_15_keeps_every_other_frame(clip: Path, tmp_path: Path) -> None:
    frames, fps = run(clip, tmp_path / "out", fps=15, start_frame=3)
    assert fps == 15.0
    # 37 frames after the trim: 37 * 15 / 30 = 18.5 output frames, rounded half up to 19
    assert source_indices(frames) == [3 + 2 * k for k in range(19)]


def test_fps_24_to_30_repeats_frames_from_a_lossy_h264_source(tmp_path: Path) -> None:
    src = write_clip(tmp_path / "src.mp4", [pattern_frame(i) for i in range(24)], fps=24, codec=Codec.H264)
    frames, fps = run(src, tmp_path / "out", fps=30)
    assert fps == 30.0 and len(frames) == 30  # one second either way
    assert [frame_index(f) for f in frames] == [math.floor(k * 24 / 30) for k in range(30)]


def test_fps_with_trim_by_seconds(clip: Path, tmp_path: Path) -> None:
    frames, fps = run(clip, tmp_path / "out", start_seconds=0.2, end_seconds=1.2, fps=10)
    assert fps == 10.0 and source_indices(frames) == [6 + 3 * k for k in range(10)]


def test_stretch(clip: Path, tmp_path: Path) -> None:
    frames, _ = run(clip, tmp_path / "out", width=32, height=32, fit="stretch", end_frame=2)
    assert np.array_equal(frames[1], cv2.resize(SRC[1], (32, 32), interpolation=cv2.INTER_AREA))


def test_crop_keeps_the_centre(clip: Path, tmp_path: Path) -> None:
    frames, _ = run(clip, tmp_path / "out", width=48, height=48, fit="crop", end_frame=2)
    assert frames[0].shape == (48, 48, 3) and np.array_equal(frames[1], SRC[1][:, 8:56])


def test_pad_letterboxes_with_the_colour(clip: Path, tmp_path: Path) -> None:
    frames, _ = run(clip, tmp_path / "out", width=64, height=64, pad_color="#102030", end_frame=2)
    frame = frames[1]
    assert frame.shape == (64, 64, 3)
    assert np.array_equal(frame[8:56], SRC[1])  # centred, unscaled
    bars = np.concatenate([frame[:8], frame[56:]]).reshape(-1, 3)
    assert (bars == (0x30, 0x20, 0x10)).all()  # BGR of #102030


def test_pad_is_the_default_fit(clip: Path, tmp_path: Path) -> None:
    frames, _ = run(clip, tmp_path / "out", width=96, height=48, end_frame=1)
    assert (frames[0][:, :16] == 0).all() and (frames[0][:, 80:] == 0).all()
    assert np.array_equal(frames[0][:, 16:80], SRC[0])


@pytest.mark.parametrize(
    ("params", "size"), [({"width": 32}, (32, 24)), ({"height": 30}, (40, 30)), ({"width": 50}, (50, 38))]
)
def test_one_side_keeps_the_aspect_ratio(clip: Path, tmp_path: Path, params: dict[str, int],
                                         size: tuple[int, int]) -> None:
    frames, _ = run(clip, tmp_path / "out", end_frame=1, **params)
    assert (frames[0].shape[1], frames[0].shape[0]) == size


def test_rotate_90_then_resize(clip: Path, tmp_path: Path) -> None:
    frames, _ = run(clip, tmp_path / "out", rotate=90, end_frame=2)
    assert np.array_equal(frames[1], cv2.rotate(SRC[1], cv2.ROTATE_90_CLOCKWISE))
    frames, _ = run(clip, tmp_path / "out2", rotate=270, height=32, end_frame=1)
    assert frames[0].shape == (32, 24, 3)  # rotated 48x64 source, scaled by 1/2


def test_image_folder_input(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        cv2.imwrite(str(folder / f"img{i:d}.png"), SRC[i])
    frames, fps = run(folder, tmp_path / "out", image_fps=12)
    assert fps == 12.0 and source_indices(frames) == list(range(10))


def test_h264_output(clip: Path, tmp_path: Path) -> None:
    result = preprocess.run(clip, tmp_path / "out", codec="h264", end_frame=5)
    assert result.outputs[0].name == "preprocessed.mp4"
    frames, fps = read_all(result.outputs[0])
    assert len(frames) == 5 and fps == 30.0


def test_h264_of_an_odd_source_asks_for_even_sizes(tmp_path: Path) -> None:
    src = write_clip(tmp_path / "odd.mkv", noise_frames(3, width=65, height=48))
    with pytest.raises(StageError) as err:
        preprocess.run(src, tmp_path / "out", codec="h264")
    assert err.value.kind is ErrorKind.BAD_ARGUMENT and "even" in err.value.message
    assert preprocess.run(src, tmp_path / "out", codec="h264", width=64).frames == 3


def test_audio_of_the_trimmed_range_is_kept(tmp_path: Path) -> None:
    """Silence for 1 s, then a sine: trimming to either half must carry exactly that half's audio."""
    src = av_clip(tmp_path / "talk.mp4", seconds=2.0,
                  audio="aevalsrc=exprs='if(lt(t,1),0,0.5*sin(2*PI*440*t))':d=2:s=44100")
    for name, params, loud in (("late", {"start_seconds": 1.0}, True),
                               ("early", {"end_frame": 30, "fps": 15}, False),
                               ("mid", {"start_frame": 15, "end_frame": 45}, None)):
        result = preprocess.run(src, tmp_path / name, **params)
        info = probe(result.outputs[0], count_frames=True)
        seconds = info.frames / info.fps
        assert seconds == pytest.approx(1.0) and info.audio_codec == "pcm_s16le"
        assert info.duration == pytest.approx(seconds, abs=0.02)  # audio ends with the video
        sound = np.abs(audio_samples(result.outputs[0])) > 0.05
        assert len(sound) / 8000 == pytest.approx(seconds, abs=0.02)
        if loud is None:  # 0.5 s .. 1.5 s: silent first half, sine second half
            assert not sound[:3800].any() and sound[4200:].mean() > 0.5
        else:
            assert sound[200:-200].mean() > 0.5 if loud else not sound.any()


def test_silent_sources_and_image_folders_have_no_audio(clip: Path, tmp_path: Path) -> None:
    silent = av_clip(tmp_path / "silent.mp4", seconds=0.5, audio=None)
    assert not has_audio(preprocess.run(silent, tmp_path / "a").outputs[0])
    assert not has_audio(preprocess.run(clip, tmp_path / "b", end_frame=3).outputs[0])


@pytest.mark.parametrize(
    ("params", "kind", "text"),
    [
        ({"pad_color": "red"}, ErrorKind.BAD_ARGUMENT, "--pad-color"),
        ({"width": -5}, ErrorKind.BAD_ARGUMENT, "--width"),
        ({"fps": 0}, ErrorKind.BAD_ARGUMENT, "--fps"),
        ({"start_frame": 10, "end_frame": 10}, ErrorKind.BAD_ARGUMENT, "not before"),
        ({"start_seconds": 1.0, "end_frame": 30}, ErrorKind.BAD_ARGUMENT, "not before"),
        ({"start_frame": 1, "start_seconds": 1.0}, ErrorKind.BAD_ARGUMENT, "not both"),
        ({"fit": "squash"}, ErrorKind.BAD_ARGUMENT, "--fit"),
        ({"colour": "#000000"}, ErrorKind.BAD_ARGUMENT, "colour"),
        ({"start_frame": 100}, ErrorKind.INPUT_INVALID, "selects no frames"),
        ({"start_seconds": 0.01, "end_seconds": 0.02}, ErrorKind.INPUT_INVALID, "selects no frames"),
        ({"end_frame": 1, "fps": 10}, ErrorKind.INPUT_INVALID, "selects no frames"),  # 1/3 frame
    ],
)
def test_errors(clip: Path, tmp_path: Path, params: dict[str, Any], kind: ErrorKind, text: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(StageError) as err:
        preprocess.run(clip, out, **params)
    assert err.value.kind is kind and text in err.value.message
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("which", "kind"),
    [("missing", ErrorKind.INPUT_MISSING), ("text", ErrorKind.INPUT_INVALID),
     ("empty", ErrorKind.INPUT_INVALID)],
)
def test_bad_inputs(tmp_path: Path, which: str, kind: ErrorKind) -> None:
    src = bad_input(tmp_path, which)
    with pytest.raises(StageError) as err:
        preprocess.run(src, tmp_path / "out")
    assert err.value.kind is kind and str(src) in err.value.message


def test_unwritable_output_dir_is_an_output_error(clip: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(StageError) as err:
        preprocess.run(clip, blocker / "out")
    assert err.value.kind is ErrorKind.OUTPUT_ERROR and str(blocker) in err.value.message


def test_writer_failure_mid_run_leaves_no_output(clip: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = VideoWriter.write

    def failing_write(self: VideoWriter, frame: np.ndarray) -> None:
        if self.frames_written == 7:
            raise OSError("disk full (simulated)")
        real_write(self, frame)

    monkeypatch.setattr(VideoWriter, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        preprocess.run(clip, out, passthrough="never")  # the transcode's writer (nothing to change otherwise)
    assert list(out.iterdir()) == []  # neither preprocessed.mkv nor its .part file


def test_a_clip_with_nothing_to_change_is_handed_on_as_it_is(clip: Path, tmp_path: Path) -> None:
    """No trim, re-time, rotation or resize: the input is linked (same file, no transcode), not re-encoded."""
    rec = Recorder()
    result = preprocess.run(clip, tmp_path / "out", events=StageEvents("preprocess", rec))  # type: ignore[arg-type]
    (output,) = result.outputs
    assert output == tmp_path / "out" / f"preprocessed{clip.suffix}" and output.read_bytes() == clip.read_bytes()
    assert os.path.samefile(output, clip)  # a hard link: instant, no second copy on disk
    assert result.frames == 40 and json.loads(rec.sent[0][1]["info"])["passthrough"] is True
    assert [p.name for p in (tmp_path / "out").iterdir()] == [output.name]  # no .part left
    never = preprocess.run(clip, tmp_path / "never", passthrough="never").outputs[0]
    assert never.name == "preprocessed.mkv" and not os.path.samefile(never, clip)
    assert preprocess.run(clip, tmp_path / "trim", end_frame=5).frames == 5  # any change: the transcode


def test_pass_through_copies_when_it_cannot_link(clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError("cross-device link (simulated)")

    monkeypatch.setattr(os, "link", no_links)
    output = preprocess.run(clip, tmp_path / "out").outputs[0]
    assert output.read_bytes() == clip.read_bytes() and not os.path.samefile(output, clip)


class Recorder:
    """Stands in for EventSender: keeps what StageEvents sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, spec: MessageSpec, **fields: Any) -> None:
        self.sent.append((spec.name, fields))


def test_events_expected_frames_and_final_progress(clip: Path, tmp_path: Path) -> None:
    rec = Recorder()
    result = preprocess.run(clip, tmp_path / "out", events=StageEvents("preprocess", rec),  # type: ignore[arg-type]
                            fps=15, width=32, end_seconds=1.0)
    assert [name for name, _ in rec.sent if name != "stage/progress"] == ["stage/started"]
    info = json.loads(rec.sent[0][1]["info"])
    assert info == {"input": str(clip), "width": 32, "height": 24, "fps": 15.0, "frames": 15,
                    "source_width": 64, "source_height": 48, "source_fps": 30.0, "codec": "utvideo"}
    progress = [f for name, f in rec.sent if name == "stage/progress"]
    assert progress and (progress[-1]["frame"], progress[-1]["total"]) == (15, 15) == (result.frames, 15)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cuepipe.stages.preprocess", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_reports_started_progress_done(clip: Path, tmp_path: Path, fake_td: FakeTD) -> None:
    out = tmp_path / "out"
    proc = cli("--input", str(clip), "--output-dir", str(out), "--report", fake_td.address,
               "--fps", "15", "--width", "32", "--height", "32", "--fit", "crop")
    assert proc.returncode == 0, proc.stderr
    done = fake_td.wait_for("stage/done")
    names = fake_td.names()
    assert names[0] == "stage/started" and names[-1] == "stage/done"
    assert set(names[1:-1]) == {"stage/progress"} and len(names) >= 3
    assert done["outputs"] == (str(out / "preprocessed.mkv"),) and done["frames"] == 20
    assert json.loads(fake_td.events[0]["info"])["frames"] == 20
    assert fake_td.events[-2]["frame"] == 20 and fake_td.events[-2]["fraction"] == 1.0
    frames, fps = read_all(out / "preprocessed.mkv")
    assert len(frames) == 20 and fps == 15.0 and frames[0].shape == (32, 32, 3)


def test_cli_missing_input_fails_with_input_missing(tmp_path: Path, fake_td: FakeTD) -> None:
    proc = cli("--input", str(tmp_path / "gone.mp4"), "--output-dir", str(tmp_path / "out"),
               "--report", fake_td.address)
    assert proc.returncode == 1
    failed = fake_td.wait_for("stage/failed")
    assert failed["kind"] == "input_missing" and "gone.mp4" in failed["message"]
    assert "stage/done" not in fake_td.names()


def test_cli_bad_argument_exits_2(clip: Path, tmp_path: Path, fake_td: FakeTD) -> None:
    proc = cli("--input", str(clip), "--output-dir", str(tmp_path / "out"), "--report", fake_td.address,
               "--pad-color", "#12345")
    assert proc.returncode == 2
    failed = fake_td.wait_for("stage/failed")
    assert failed["kind"] == "bad_argument" and "--pad-color" in failed["message"]
