"""The two things a new user runs first: ``cuepipe run prep`` on a real video, and ``cuepipe demo``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2

from cuepipe.stages.democlip import write_clip
from tests.support.env import ROOT, subprocess_env
from tests.support.fake_td import FakeTD


def test_run_prep_on_a_real_video(tmp_path: Path, fake_td: FakeTD) -> None:
    clip = tmp_path / "walk.mp4"
    write_clip(clip, None, width=320, height=180, frames=24, fps=24.0)
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(ROOT / "pipelines.toml"), "run", "prep",
           str(clip), "--set", "preprocess.width=256", "--set", "preprocess.height=256", "--set",
           "preprocess.fps=12", "--out", str(tmp_path / "renders"), "--report", fake_td.address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    done = fake_td.wait_for("job/done")
    out = Path(done["outputs"][0])
    assert out == tmp_path / "renders" / "walk_preprocessed.mkv"
    assert proc.stdout.strip() == str(out)  # the CLI prints the final outputs
    cap = cv2.VideoCapture(str(out))
    try:
        size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        fps = cap.get(cv2.CAP_PROP_FPS)
        frames = 0
        while cap.read()[0]:
            frames += 1
    finally:
        cap.release()
    assert (size, fps, frames) == ((256, 256), 12.0, 12)  # 1 s of 24 fps resampled to 12 fps
    names = fake_td.names()
    assert names[0] == "job/started" and names[1] == "job/stage_started" and names[-1] == "job/done"
    assert "job/progress" in names and names.index("job/stage_done") == len(names) - 2


def test_demo_runs_the_embedded_default(tmp_path: Path, fake_td: FakeTD) -> None:
    out = tmp_path / "demo"
    # a relative --out, as in the README: stages run in their own folders, so paths must be resolved
    proc = subprocess.run([sys.executable, "-m", "cuepipe.orchestrator.cli", "demo", "--out", "demo", "--report",
                           fake_td.address], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rvm_mobilenetv3_fp32.onnx" in proc.stdout  # the real model was obtained
    done = fake_td.wait_for("job/done")
    for path in done["outputs"]:
        assert Path(path).is_file() and str(path) in proc.stdout
    # the demo prints every Event its own listener received: the same sequence TD got
    assert f"{len(fake_td.events)} events received" in proc.stdout
    assert (out / "demo_clip.mp4").is_file() and (out / "demo_clip_mask.mkv").is_file()
    # the default pipeline is matte: the real model's alpha matches the clip's ground truth
    names = sorted(Path(p).name for p in done["outputs"])
    assert names == ["demo_clip_alpha.mp4", "demo_clip_composite.mp4", "demo_clip_matte.mov"]
    iou = float(proc.stdout.split("IoU mean ")[1].split(",")[0])
    assert iou >= 0.9


def test_shipped_stylize_pipeline(tmp_path: Path, fake_td: FakeTD) -> None:
    """The issue's "done": `cuepipe run stylize clip.mp4` restyles only the person with the trained
    multistyle26, over the clip's own background, and writes a contact sheet, from the repo's file."""
    import numpy as np

    clip = tmp_path / "take.mp4"
    write_clip(clip, tmp_path / "mask.mkv", width=320, height=192, frames=12, fps=24.0, seed=2)
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(ROOT / "pipelines.toml"), "run",
           "stylize", str(clip), "--out", str(tmp_path / "out"), "--report", fake_td.address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    outputs = [Path(p) for p in fake_td.wait_for("job/done")["outputs"]]
    assert [p.name for p in outputs] == ["take_generated.mp4", "take_generated_rgba.mkv", "take_contact.png"]
    sheet = cv2.imread(str(outputs[2]))
    assert sheet is not None and sheet.shape[0] > 4 * 180  # four rows of frames under the column names
    video, source, mask = (cv2.VideoCapture(str(p)) for p in (outputs[0], clip, tmp_path / "mask.mkv"))
    try:
        assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
        frame, original, truth = video.read()[1], source.read()[1], mask.read()[1][..., 0]
    finally:
        for cap in (video, source, mask):
            cap.release()
    far = cv2.dilate((truth > 0).astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
    difference = np.abs(frame.astype(int) - original.astype(int)).mean(axis=2)
    assert difference[far].mean() < 4  # the background is the clip's own (H.264 noise: 2.4 measured)
    assert difference[truth > 250].mean() > 15  # the person is restyled (27.9 measured)
