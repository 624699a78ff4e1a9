"""The matting stage on the real RVM model: exactness, quality, CLI contract, failures, state handling."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from cuepipe.models import resolve
from cuepipe.stages import inference, matting, rvm
from cuepipe.stages.democlip import render_frames, write_clip
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.framepipe import Sink
from cuepipe.stages.matting import Matte, matte_frames
from cuepipe.stages.stage import StageError
from cuepipe.stages.video import VideoReader, ffmpeg_exe, has_audio, probe
from tests.support.env import ROOT, subprocess_env
from tests.support.fake_td import FakeTD
from tests.support.fakes import InterruptAt

W, H = 320, 192  # <= 512 px: RVM's table gives ratio 1.0; multiples of 4 for HAP
MODEL = "rvm_mobilenetv3_fp32"


@pytest.fixture(scope="module")
def model_path() -> Path:
    return resolve(MODEL)


def frames_of(seed: int, n: int, background_only: bool = False) -> list[np.ndarray]:
    return [f for f, _ in render_frames(W, H, n, seed=seed, background_only=background_only)]


def image_folder(folder: Path, frames: list[np.ndarray]) -> Path:
    """A lossless input: the stage and the reference loop see exactly the same pixels."""
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"f{i:04d}.png"), f)
    return folder


def reference_alphas(model_path: Path, frames: list[np.ndarray], ratio: float) -> list[np.ndarray]:
    """RVM's documented ONNX usage, written out plainly: fresh session, zero states fed back."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rec = [np.zeros((1, 1, 1, 1), np.float32)] * 4
    out = []
    for frame in frames:
        src = (frame[:, :, ::-1].transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
        feeds = {"src": src, "downsample_ratio": np.array([ratio], np.float32)}
        feeds.update({f"r{i + 1}i": r for i, r in enumerate(rec)})
        _fgr, pha, *rec = session.run(None, feeds)
        out.append(np.clip(np.rint(pha[0, 0] * 255.0), 0, 255).astype(np.uint8))
    return out


def png_alphas(folder: Path) -> list[np.ndarray]:
    images = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))]
    assert all(i is not None and i.ndim == 3 and i.shape[2] == 4 for i in images)
    return [i[:, :, 3] for i in images]


class Collect:
    """An in-memory writer for pipeline tests."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.frames: list[np.ndarray] = []
        self.fail_at = fail_at

    def write(self, frame: np.ndarray) -> None:
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise StageError(ErrorKind.OUTPUT_ERROR, "disk full (test)")
        self.frames.append(frame.copy())

    def abort(self) -> None:
        pass


def alpha_sink(writer: Collect) -> Sink[Matte]:
    return Sink("alpha", writer, lambda m: m.alpha)


# --- exactness ----------------------------------------------------------------------------------


def test_stage_alpha_equals_the_reference_loop(tmp_path: Path, model_path: Path) -> None:
    frames = frames_of(3, 12)
    src = image_folder(tmp_path / "in", frames)
    result = matting.run(src, tmp_path / "out", outputs="rgba_png", provider="cpu")
    assert result.outputs == (tmp_path / "out" / "rgba",) and result.frames == 12
    got = png_alphas(result.outputs[0])
    want = reference_alphas(model_path, frames, 1.0)
    assert len(got) == len(want) == 12
    worst = max(int(np.abs(g.astype(int) - w).max()) for g, w in zip(got, want, strict=True))
    assert worst <= 1


def test_io_binding_on_cpu_equals_the_plain_path(model_path: Path) -> None:
    frames = frames_of(4, 6)
    results = []
    for binding in (False, True):
        model = rvm.RVM(model_path, "cpu", io_binding=binding)
        buf = rvm.InputBuffer(W, H)
        results.append([tuple(a.copy() for a in model.infer(buf.fill(f), 0.5)) for f in frames])
    for (fgr0, pha0), (fgr1, pha1) in zip(*results, strict=True):
        assert np.array_equal(fgr0, fgr1) and np.array_equal(pha0, pha1)


def test_preprocessing_matches_rvm_usage() -> None:
    frame = frames_of(0, 1)[0]
    want = (frame[:, :, ::-1].transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
    assert np.abs(rvm.InputBuffer(W, H).fill(frame) - want).max() < 1e-6
    half = rvm.InputBuffer(W, H, np.float16).fill(frame)  # what an fp16 model gets
    assert half.dtype == np.float16 and np.abs(half - want).max() < 1e-3
    fgr = np.random.default_rng(0).random((3, H, W), dtype=np.float32)
    assert np.array_equal(rvm.to_foreground(fgr), np.rint(fgr.transpose(1, 2, 0)[:, :, ::-1] * 255).astype(np.uint8))


# --- quality on the synthetic person -------------------------------------------------------------


def test_alpha_matches_the_ground_truth_and_background_stays_clear(tmp_path: Path) -> None:
    clip, mask = tmp_path / "person.mp4", tmp_path / "mask.mkv"
    write_clip(clip, mask, 640, 360, frames=12)
    result = matting.run(clip, tmp_path / "out", outputs="rgba_png", ratio=1.0)
    alphas = png_alphas(result.outputs[0])
    with VideoReader(mask) as reader:
        masks = [m[:, :, 0] for m in reader]
    assert len(alphas) == len(masks) == 12
    for a, m in zip(alphas[2:], masks[2:], strict=True):  # RVM settles within a frame or two
        inter, union = np.logical_and(a > 127, m > 127).sum(), np.logical_or(a > 127, m > 127).sum()
        assert inter / union >= 0.9
    empty = tmp_path / "empty.mp4"
    write_clip(empty, None, 640, 360, frames=8, background_only=True)
    result = matting.run(empty, tmp_path / "out_empty", outputs="rgba_png", ratio=1.0)
    alpha = np.stack(png_alphas(result.outputs[0])).astype(np.float32) / 255.0
    assert alpha.mean() < 0.02 and (alpha > 0.5).mean() < 0.01


# --- the stage program ----------------------------------------------------------------------------


def stage_cli(tmp_path: Path, td: FakeTD, input: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cuepipe.stages.matting", "--input", str(input), "--output-dir", str(tmp_path / "out"),
           "--report", td.address, *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def clip_with_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    silent = folder / "silent.mp4"
    write_clip(silent, None, W, H, frames=12, fps=24.0)
    clip = folder / "clip.mp4"
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:duration=1"]
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(silent), *tone, "-c:v", "copy", "-c:a", "aac", "-shortest",
                    str(clip)], check=True, timeout=60)
    return clip


def test_cli_writes_every_output_kind(tmp_path: Path, fake_td: FakeTD, clip_with_audio: Path) -> None:
    kinds = "composite,alpha,foreground,rgba,rgba_png,hap_alpha,prores4444"
    proc = stage_cli(tmp_path, fake_td, clip_with_audio, "--outputs", kinds, "--provider", "cpu")
    assert proc.returncode == 0, proc.stderr
    done = fake_td.wait_for("stage/done")
    names = fake_td.names()
    assert names[0] == "stage/started" and names[-1] == "stage/done" and "stage/progress" in names
    info = json.loads(fake_td.events[0]["info"])
    assert info["provider"] == "CPUExecutionProvider" and info["ratio"] == 1.0 and info["precision"] == "fp32"
    assert (info["width"], info["height"], info["frames"], info["outputs"]) == (W, H, 12, kinds.split(","))
    out = tmp_path / "out"
    files = ["composite.mp4", "alpha.mp4", "foreground.mp4", "matte_rgba.mkv", "rgba", "matte.mov", "matte_prores.mov"]
    assert list(done["outputs"]) == [str((out / f).resolve()) for f in files]  # the first is the next input
    assert done["frames"] == 12
    for name in files:
        info = probe(out / name, count_frames=True)
        assert (info.width, info.height, info.frames) == (W, H, 12), name
        assert name == "rgba" or info.fps == 24.0, name
    assert probe(out / "matte.mov").codec == "hap"
    assert "a" in probe(out / "matte_prores.mov").pix_fmt  # yuva...
    assert probe(out / "matte_rgba.mkv").pix_fmt == "gbrap"  # lossless with alpha
    alpha = png_alphas(out / "rgba")[6]
    assert alpha.max() == 255  # the person is opaque in the PNGs
    with VideoReader(out / "composite.mp4") as reader:
        composite = list(reader)[6]
    clear = cv2.erode((alpha == 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert clear.mean() > 0.3 and np.abs(composite[clear].astype(int) - (0x40, 0xB1, 0x00)).mean() < 6  # #00b140
    last = [e for e in fake_td.events if e.spec.name == "stage/progress"][-1]
    assert (last["frame"], last["total"]) == (12, 12)
    assert has_audio(out / "composite.mp4") and not has_audio(out / "alpha.mp4")
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no temporary files left


@pytest.mark.parametrize(("args", "kind"), [
    (("--provider", "cuda"), "provider_unavailable"),
    (("--model", "does_not_exist.onnx"), "model_missing"),
    (("--model", "WRONG"), "model_invalid"),
    (("--outputs", "alpha,nonsense"), "bad_argument"),
])
def test_cli_failures(tmp_path: Path, fake_td: FakeTD, args: tuple[str, ...], kind: str) -> None:
    clip = tmp_path / "in.mp4"
    write_clip(clip, None, W, H, frames=2)
    if "WRONG" in args:
        wrong = tmp_path / "wrong.onnx"
        wrong.write_text("this is not an onnx model\n")
        args = ("--model", str(wrong))
    proc = stage_cli(tmp_path, fake_td, clip, *args)
    assert proc.returncode == (2 if kind == "bad_argument" else 1), proc.stderr
    failed = fake_td.wait_for("stage/failed")
    assert failed["kind"] == kind
    if kind == "provider_unavailable":
        assert "onnxruntime-gpu" in failed["message"] and "CPUExecutionProvider" in failed["message"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- providers -------------------------------------------------------------------------------------


def test_provider_choice() -> None:
    assert inference.choose_provider("auto", ["CPUExecutionProvider"]) == "CPUExecutionProvider"
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert inference.choose_provider("auto", gpu) == "CUDAExecutionProvider"  # TensorRT only when asked
    assert inference.choose_provider("tensorrt", gpu) == "TensorrtExecutionProvider"
    with pytest.raises(StageError) as err:
        inference.choose_provider("tensorrt", ["CPUExecutionProvider"])
    assert err.value.kind is ErrorKind.PROVIDER_UNAVAILABLE
    assert matting.PARAMS["provider"].choices == inference.PROVIDERS  # one declaration, stages.stage


def test_a_silent_fallback_to_cpu_is_refused(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime drops a provider it cannot load and runs on the CPU; the adapter notices."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(StageError) as err, pytest.warns(UserWarning):
        rvm.RVM(model_path, "cuda")
    assert err.value.kind is ErrorKind.PROVIDER_UNAVAILABLE


# --- state handling and the pipeline ---------------------------------------------------------------


def test_scene_cut_resets_the_state(model_path: Path) -> None:
    first, second = frames_of(0, 6), frames_of(1, 6)
    model = rvm.RVM(model_path, "cpu")
    runs = {}
    for threshold in (0.0, 0.08):
        sink = Collect()
        stats = matte_frames(first + second, model, 1.0, [alpha_sink(sink)], W, H, scene_cut=threshold)
        model.reset()
        runs[threshold] = (stats.scene_cuts, sink.frames[6:])
    fresh = reference_alphas(model_path, second, 1.0)
    cuts, after = runs[0.08]
    assert cuts == 1
    assert max(int(np.abs(a.astype(int) - f).max()) for a, f in zip(after, fresh, strict=True)) <= 1
    cuts, carried = runs[0.0]
    assert cuts == 0 and not np.array_equal(carried[0], after[0])  # without a reset the state leaks across


def test_size_or_ratio_change_resets_the_state(model_path: Path) -> None:
    frames = frames_of(2, 3)
    model = rvm.RVM(model_path, "cpu")
    buf = rvm.InputBuffer(W, H)
    for f in frames:
        model.infer(buf.fill(f), 1.0)
    fresh = rvm.RVM(model_path, "cpu")
    a = model.infer(buf.fill(frames[0]), 0.5)[1].copy()
    assert np.array_equal(a, fresh.infer(buf.fill(frames[0]), 0.5)[1])


def test_a_failing_writer_stops_everything(model_path: Path) -> None:
    frames = frames_of(0, 30)
    good, bad = Collect(), Collect(fail_at=3)
    with pytest.raises(StageError) as err:
        matte_frames(iter(frames), rvm.RVM(model_path, "cpu"), 1.0, [alpha_sink(good), alpha_sink(bad)], W, H)
    assert err.value.kind is ErrorKind.OUTPUT_ERROR
    assert len(good.frames) < 30  # stopped early; the leak fixture checks every thread was joined


def test_interrupt_stops_every_thread(model_path: Path) -> None:
    def interrupt(n: int) -> None:
        if n == 2:
            raise KeyboardInterrupt

    sink = Collect()
    with pytest.raises(KeyboardInterrupt):
        matte_frames(iter(frames_of(0, 20)), rvm.RVM(model_path, "cpu"), 1.0, [alpha_sink(sink)], W, H,
                     on_frame=interrupt)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is a hard kill on Windows")
def test_sigterm_stops_the_stage_cleanly(tmp_path: Path, fake_td: FakeTD) -> None:
    clip = tmp_path / "in.mp4"
    write_clip(clip, None, W, H, frames=96)
    cmd = [sys.executable, "-m", "cuepipe.stages.matting", "--input", str(clip), "--output-dir", str(tmp_path / "out"),
           "--report", fake_td.address, "--outputs", "alpha,composite", "--ratio", "1.0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        fake_td.wait_for("stage/progress", timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    assert fake_td.wait_for("stage/failed")["kind"] == "cancelled"
    assert not any((tmp_path / "out").iterdir())  # ffmpeg reaped, temporary files removed


def test_an_interrupted_stage_leaves_no_files(tmp_path: Path) -> None:
    clip = tmp_path / "in.mp4"
    write_clip(clip, None, W, H, frames=12)
    with pytest.raises(KeyboardInterrupt):
        matting.run(clip, tmp_path / "out", InterruptAt(matting.NAME, 3),
                    outputs="alpha,composite,rgba_png,hap_alpha")
    assert not any((tmp_path / "out").iterdir())  # ffmpeg killed, temporary files and folders removed


def test_a_resident_worker_reuses_the_session(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "in", frames_of(5, 3))
    cache: dict[str, object] = {}
    first = matting.run(src, tmp_path / "a", outputs="rgba_png", provider="cpu", cache=cache)
    model = next(iter(cache.values()))
    second = matting.run(src, tmp_path / "b", outputs="rgba_png", provider="cpu", cache=cache)
    assert list(cache.values()) == [model]  # loaded once
    for a, b in zip(png_alphas(first.outputs[0]), png_alphas(second.outputs[0]), strict=True):
        assert np.array_equal(a, b)  # the state was reset between the jobs


def test_bad_background_leaves_no_files(tmp_path: Path) -> None:
    clip = tmp_path / "in.mp4"
    write_clip(clip, None, W, H, frames=2)
    with pytest.raises(StageError):
        matting.run(clip, tmp_path / "out", outputs="alpha,composite", background="not-a-colour-or-file")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())



# --- source_rgba (issue 11) -------------------------------------------------------------------------


def test_source_rgba_is_the_decoded_input_with_the_same_alpha(tmp_path: Path, clip_with_audio: Path) -> None:
    """``source_rgba``: the input's own pixels, exactly as decoded (an H.264 clip here), with the matte as
    alpha - the very alpha this run's ``rgba`` output carries - lossless, with the input's audio."""
    from cuepipe.stages.rgba import RgbaReader

    out = tmp_path / "out"
    result = matting.run(clip_with_audio, out, outputs="source_rgba,rgba", provider="cpu")
    assert result.outputs == (out / "source_rgba.mkv", out / "matte_rgba.mkv") and result.frames == 12
    with VideoReader(clip_with_audio) as reader:
        decoded = list(reader)
    with RgbaReader(out / "source_rgba.mkv") as reader:
        assert reader.has_alpha
        source = list(reader)
    with RgbaReader(out / "matte_rgba.mkv") as reader:
        matte = list(reader)
    assert len(decoded) == len(source) == len(matte) == 12
    for d, s, m in zip(decoded, source, matte, strict=True):
        assert np.array_equal(s[:, :, :3], d)  # every pixel, the person's and the background's
        assert np.array_equal(s[:, :, 3], m[:, :, 3])
        assert (s[:, :, 3] == 0).mean() > 0.3 and (s[:, :, 3] == 255).any()  # a real matte, not all or nothing
        clear = m[:, :, 3] == 0
        assert m[clear][:, :3].max() == 0 and d[clear].max() > 0  # unlike rgba, whose colours there are cleared
    info = probe(out / "source_rgba.mkv", count_frames=True)
    assert (info.codec, info.pix_fmt, info.frames, info.width, info.height) == ("utvideo", "gbrap", 12, W, H)
    assert has_audio(out / "source_rgba.mkv")
