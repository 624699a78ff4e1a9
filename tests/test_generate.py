"""The generate stage on real (test-built) ONNX generators: exactness, geometry, person mode, contracts."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from cuepipe import models
from cuepipe.models.contract import ContractError, GeneratorContract, parse_range
from cuepipe.stages import generate, inference
from cuepipe.stages.democlip import render_frames
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.framing import Box, fit_aspect, person_box, plan
from cuepipe.stages.generator import Generator
from cuepipe.stages.stage import StageError
from tests.support import genmodels
from tests.support.env import ROOT, subprocess_env
from tests.support.fake_td import FakeTD
from tests.support.rgba import image_folder, person_frames, read_all, write_rgba

W, H = 160, 96


def every_value_image(width: int = 32, height: int = 24) -> np.ndarray:
    """BGR uint8 holding every value 0..255 in every channel (shifted per channel)."""
    flat = np.arange(width * height * 3) % 256
    image = flat.reshape(height, width, 3).astype(np.uint8)
    image[:, :, 1] = np.roll(image[:, :, 1], 7)
    image[:, :, 2] = image[:, :, 2][::-1]
    return image


def contract(**keys: object) -> GeneratorContract:
    return GeneratorContract.from_mapping(keys)


# --- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "channels"), list(itertools.product(("nchw", "nhwc"), ("rgb", "bgr"))))
def test_identity_round_trips_every_layout_order_and_range(tmp_path: Path, layout: str, channels: str) -> None:
    image = every_value_image()
    model = genmodels.identity(tmp_path / f"identity_{layout}.onnx", layout)
    for value_range in ("[0,1]", "[-1,1]", "[0,255]"):
        gen = Generator(model, contract(layout=layout, channels=channels, input_range=value_range), "cpu")
        x, _ = gen.pack(image)
        assert x.shape == ((3, 24, 32) if layout == "nchw" else (24, 32, 3))
        assert np.array_equal(gen.run([x], [None])[0], image), (layout, channels, value_range)


@pytest.mark.parametrize(("dtype", "value_range"), [("float16", "[0,1]"), ("float16", "[-1,1]"), ("uint8", "[0,255]")])
def test_identity_round_trips_other_dtypes(tmp_path: Path, dtype: str, value_range: str) -> None:
    image = every_value_image()
    model = genmodels.identity(tmp_path / "id.onnx", "nchw", dtype)
    gen = Generator(model, contract(dtype=dtype, input_range=value_range))
    assert np.array_equal(gen.run([gen.pack(image)[0]], [None])[0], image)


def test_the_model_sees_the_declared_layout_order_and_range(tmp_path: Path) -> None:
    """Channel order / layout / range reach the model as declared: its input, read back with numpy."""
    image = every_value_image()
    gen = Generator(genmodels.identity(tmp_path / "id.onnx", "nhwc"),
                    contract(layout="nhwc", channels="rgb", input_range="[-1,1]"))
    x, _ = gen.pack(image)
    assert np.allclose(x, image[:, :, ::-1] / 127.5 - 1.0, atol=1e-6)


def test_stage_identity_whole_frame_is_bit_exact(tmp_path: Path) -> None:
    frames = person_frames(4)
    src = write_rgba(tmp_path / "in.mkv", frames)
    model = genmodels.identity(tmp_path / "id.onnx", "nhwc")
    result = generate.run(src, tmp_path / "out", model=str(model), mode="frame", layout="nhwc", channels="bgr",
                          input_range="[-1,1]", provider="cpu")
    assert result.frames == 4 and result.outputs == (tmp_path / "out" / "generated_rgba.mkv",)
    assert all(np.array_equal(a, b) for a, b in zip(read_all(result.outputs[0]), frames, strict=True))


def test_conv_generator_equals_a_plain_onnxruntime_reference(tmp_path: Path) -> None:
    """A random conv net (NHWC, tanh, [-1,1]): stage output == numpy + onnxruntime written out plainly."""
    model = genmodels.conv(tmp_path / "conv.onnx", seed=7, layout="nhwc", out_activation="Tanh")
    frames = [f for f, _ in render_frames(W, H, 5, seed=2)]
    src = image_folder(tmp_path / "in", frames)
    result = generate.run(src, tmp_path / "out", model=str(model), mode="frame", layout="nhwc",
                          input_range="[-1,1]", outputs="rgba_png", provider="cpu")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for frame, got in zip(frames, read_all(result.outputs[0]), strict=True):
        x = (frame[:, :, ::-1] / 127.5 - 1.0).astype(np.float32)[None]
        y = session.run(None, {"image": x})[0][0]
        want = np.clip(np.rint((y + 1.0) * 127.5), 0, 255).astype(np.uint8)[:, :, ::-1]
        assert np.abs(got[:, :, :3].astype(int) - want).max() <= 1
        assert (got[:, :, 3] == 255).all()  # an opaque input stays opaque


# --- geometry ------------------------------------------------------------------------------------


def blocks(width: int = 96, height: int = 48) -> np.ndarray:
    """Flat colour blocks (left/right, top/middle/bottom): resampling keeps their interiors exact."""
    image = np.zeros((height, width, 3), np.uint8)
    colours = [(20, 40, 200), (200, 30, 60), (40, 180, 90), (250, 250, 10), (90, 10, 250), (10, 120, 120)]
    for i, (x0, y0) in enumerate(itertools.product((0, width // 2), (0, height // 3, 2 * height // 3))):
        image[y0 : y0 + height // 3, x0 : x0 + width // 2] = colours[i]
    return image


def test_fixed_size_model_is_letterboxed_and_unletterboxed(tmp_path: Path) -> None:
    """96x48 into a 64x64 model that inverts: 64x32 at y=16 inside it, and back over the whole frame."""
    placement = plan(96, 48, (64, 64), fit="letterbox")
    assert (placement.model, placement.inner) == ((64, 64), (0, 16, 64, 32))
    image = blocks()
    model = genmodels.invert(tmp_path / "invert64.onnx", size=(64, 64), batch=1)
    result = generate.run(image_folder(tmp_path / "in", [image]), tmp_path / "out", model=str(model), mode="frame",
                          outputs="rgba_png", provider="cpu")
    got = read_all(result.outputs[0])[0][:, :, :3]
    want = cv2.resize(255 - cv2.resize(image, (64, 32), interpolation=cv2.INTER_AREA), (96, 48),
                      interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(got, want)
    interior = np.zeros((48, 96), bool)
    for x0, y0 in itertools.product((0, 48), (0, 16, 32)):
        interior[y0 + 3 : y0 + 13, x0 + 4 : x0 + 44] = True
    assert np.abs(got.astype(int) - (255 - image))[interior].max() <= 1  # inverted where it was, top rows included
    assert not (got[:2] > 250).all()  # the black letterbox bars (white once inverted) never show


def test_dynamic_sizes_are_padded_to_the_multiple_and_outputs_may_be_larger(tmp_path: Path) -> None:
    placement = plan(100, 50, None, multiple=32, fit="letterbox")
    assert (placement.model, placement.inner) == ((128, 64), (14, 7, 100, 50))
    assert plan(100, 50, None, multiple=32, fit="resize").model == (96, 64)
    assert plan(1000, 500, None, multiple=8, max_side=400).inner[2:] == (400, 200)
    image = blocks(100, 50)
    gen = Generator(genmodels.upscale2x(tmp_path / "up.onnx"), contract(multiple=32), "cpu")
    out = gen.run([gen.pack(placement.to_model(image))[0]], [None])[0]
    assert out.shape == (128, 256, 3)  # twice the model's input
    assert np.array_equal(placement.from_model(out), image)  # cut at 2x and scaled back: exact for nearest x2


def test_person_box_and_aspect() -> None:
    alpha = np.zeros((100, 200), np.uint8)
    alpha[40:60, 90:100] = 200
    alpha[0, 0] = 5  # below the threshold: noise, not the person
    box = person_box(alpha, 8, 0.5)
    assert box == Box(80, 30, 110, 70)
    assert person_box(np.zeros((10, 10), np.uint8), 8, 0.1) is None
    wide = fit_aspect(box, 2.0, 200, 100)
    assert (wide.width, wide.height) == (80, 40) and wide.y0 == 30 and wide.x0 == 55
    assert fit_aspect(Box(0, 0, 10, 90), 4.0, 200, 100) == Box(0, 0, 200, 90)  # clipped at the frame


# --- person mode ---------------------------------------------------------------------------------


def test_person_mode_changes_only_the_person(tmp_path: Path) -> None:
    frames = person_frames(6)
    frames[3][:, :, 3] = 0  # a frame without anybody passes through untouched
    src = write_rgba(tmp_path / "in.mkv", frames)
    model = genmodels.conv(tmp_path / "conv.onnx", seed=3)
    result = generate.run(src, tmp_path / "out", model=str(model), provider="cpu", smoothing=0.5,
                          outputs="rgba,video")
    got = read_all(result.outputs[0])
    assert len(got) == 6 and (tmp_path / "out" / "generated.mp4").is_file()
    for i, (a, b) in enumerate(zip(frames, got, strict=True)):
        assert np.array_equal(a[:, :, 3], b[:, :, 3])  # the alpha is the input's
        outside = a[:, :, 3] == 0
        assert np.array_equal(a[outside], b[outside])  # every pixel outside the alpha, exactly
        if i != 3:
            assert (a[~outside, :3] != b[~outside, :3]).any(axis=1).mean() > 0.9  # the person was transformed
    assert np.array_equal(got[3], frames[3])


def test_condition_input_gets_the_alpha(tmp_path: Path) -> None:
    frames = person_frames(3)
    src = write_rgba(tmp_path / "in.mkv", frames)
    model = genmodels.masked(tmp_path / "masked.onnx")
    result = generate.run(src, tmp_path / "out", model=str(model), mode="frame", condition_input="condition",
                          provider="cpu")
    for a, b in zip(frames, read_all(result.outputs[0]), strict=True):
        want = a[:, :, :3] * (a[:, :, 3:] / 255.0)
        assert np.abs(b[:, :, :3] - want).max() <= 1.0


def test_fixed_batch_model_gets_full_batches(tmp_path: Path) -> None:
    frames = [f for f, _ in render_frames(64, 64, 5, seed=4)]
    model = genmodels.invert(tmp_path / "invert_b2.onnx", size=(64, 64), batch=2)
    result = generate.run(image_folder(tmp_path / "in", frames), tmp_path / "out", model=str(model),
                          mode="frame", batch=2, outputs="rgba_png", provider="cpu")
    assert result.frames == 5
    assert all(np.array_equal(g[:, :, :3], 255 - f) for f, g in zip(frames, read_all(result.outputs[0]), strict=True))


def test_smoothing_averages_consecutive_frames(tmp_path: Path) -> None:
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (0, 200, 200)]
    model = genmodels.identity(tmp_path / "id.onnx")
    result = generate.run(image_folder(tmp_path / "in", frames), tmp_path / "out", model=str(model), mode="frame",
                          smoothing=0.5, motion=0, outputs="rgba_png", provider="cpu")  # motion 0: a plain EMA
    assert [int(g[0, 0, 0]) for g in read_all(result.outputs[0])] == [0, 100, 150]


def test_motion_gated_smoothing_takes_a_change_at_once_and_averages_the_still(tmp_path: Path) -> None:
    """With a motion threshold a jump of 200 levels is motion (taken at once, no trail); later still
    frames are averaged: the identity model's output follows the input, then smooths its noise."""
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (0, 200, 200, 204, 200)]
    model = genmodels.identity(tmp_path / "id.onnx")
    result = generate.run(image_folder(tmp_path / "in", frames), tmp_path / "out", model=str(model), mode="frame",
                          smoothing=0.5, motion=12, outputs="rgba_png", provider="cpu")
    got = [int(g[16, 16, 0]) for g in read_all(result.outputs[0])]
    # 204 after 200 is 4 levels (still 2/3): w = 0.5 * 2/3, 200 + (1 - w) * 4 = 202.67 -> 203
    assert got == [0, 200, 200, 203, 201]


# --- contracts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "needle"), [
    ({"layout": "nchw"}, "declare layout = 'nhwc'"),
    ({"layout": "nhwc", "input_name": "picture"}, "no input 'picture'"),
    ({"layout": "nhwc", "dtype": "float16"}, "is float32, expected float16"),
    ({"layout": "nhwc", "size": "32x32"}, "size is declared 32x32"),
    ({"layout": "nhwc", "size": "dynamic"}, "fixed at 64x64"),
    ({"layout": "nhwc", "batch": 4}, "fixed batch of 1"),
    ({"layout": "nhwc", "output_name": "nope"}, "no output 'nope'"),
])
def test_contract_mismatch_says_declared_and_found(tmp_path: Path, keys: dict[str, object], needle: str) -> None:
    model = genmodels.invert(tmp_path / "nhwc64.onnx", "nhwc", size=(64, 64), batch=1)
    with pytest.raises(StageError) as err:
        Generator(model, contract(**keys), "cpu")
    assert err.value.kind is ErrorKind.MODEL_INVALID
    assert needle in err.value.message and "Declared contract" in err.value.message
    assert "image[1,64,64,3] float32" in err.value.message  # what the model really has


def test_an_undeclared_second_input_and_a_wrong_dynamic_layout_fail(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="not fed by the contract"):
        Generator(genmodels.masked(tmp_path / "masked.onnx"), contract(), "cpu")
    model = genmodels.conv(tmp_path / "conv.onnx")  # NCHW with 3 fixed channels but dynamic H/W
    with pytest.raises(StageError, match="declare layout = 'nchw'"):
        Generator(model, contract(layout="nhwc"), "cpu")


def test_contract_values_are_validated() -> None:
    assert parse_range("[-1,1]") == (-1.0, 1.0) and parse_range("0..255") == (0.0, 255.0)
    assert parse_range([0, 1]) == (0.0, 1.0) and parse_range("tanh") == (-1.0, 1.0)
    for bad in ({"input_range": "[1,0]"}, {"layout": "chw"}, {"size": "big"}, {"batch": 0}, {"colour": "x"},
                {"dtype": "uint8"}):
        with pytest.raises(ContractError):
            GeneratorContract.from_mapping(bad)
    c = contract(layout="NHWC", size="512x256", input_range="[-1,1]")
    assert (c.layout, c.size, c.out_range) == ("nhwc", (512, 256), (-1.0, 1.0))
    assert "nhwc rgb [-1,1] -> [-1,1] float32, size 512x256" in c.describe()


def test_cli_contract_mismatch_fails_before_the_first_frame(tmp_path: Path, fake_td: FakeTD) -> None:
    src = write_rgba(tmp_path / "in.mkv", person_frames(2))
    model = genmodels.invert(tmp_path / "nhwc64.onnx", "nhwc", size=(64, 64), batch=1)
    cmd = [sys.executable, "-m", "cuepipe.stages.generate", "--input", str(src), "--output-dir", str(tmp_path / "out"),
           "--report", fake_td.address, "--model", str(model), "--input-range", "[-1,1]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    failed = fake_td.wait_for("stage/failed")
    assert failed["kind"] == "model_invalid" and "nhwc" in failed["message"]
    assert fake_td.names() == ["stage/failed"]  # no started, no progress: nothing was decoded or written
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_reports_the_provider_and_contract(tmp_path: Path, fake_td: FakeTD) -> None:
    src = write_rgba(tmp_path / "in.mkv", person_frames(3))
    model = genmodels.conv(tmp_path / "conv.onnx")
    cmd = [sys.executable, "-m", "cuepipe.stages.generate", "--input", str(src), "--output-dir", str(tmp_path / "out"),
           "--report", fake_td.address, "--model", str(model), "--provider", "cpu", "--size", "64x64"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    done = fake_td.wait_for("stage/done")
    info = json.loads(fake_td.events[0]["info"])
    assert (info["provider"], info["mode"], info["model_size"]) == ("CPUExecutionProvider", "person", "64x64")
    assert info["contract"]["layout"] == "nchw" and info["frames"] == 3
    assert list(done["outputs"]) == [str((tmp_path / "out" / "generated_rgba.mkv").resolve())]


def test_manifest_contract_and_parameter_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "weights"
    genmodels.identity(weights / "toy.onnx", "nhwc")
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        'schema = 1\n[families.toy]\nlicense = "MIT"\n'
        '[[families.toy.inputs]]\nname = "image"\nshape = ["N", "H", "W", 3]\ndtype = "float32"\n'
        '[[families.toy.outputs]]\nname = "generated"\nshape = ["N", "H", "W", 3]\ndtype = "float32"\n'
        '[families.toy.generator]\nlayout = "nhwc"\ninput_range = "[-1,1]"\nmultiple = 8\n'
        '[[models]]\nname = "toy"\nfile = "toy.onnx"\nurl = "https://example.invalid/toy.onnx"\n'
        'family = "toy"\nprecision = "fp32"\nbackbone = "none"\n[models.generator]\nchannels = "bgr"\n')
    monkeypatch.setattr(models, "MANIFEST_PATH", manifest)
    monkeypatch.setenv("CUEPIPE_MODELS", str(weights))
    spec = models.load_manifest()["toy"]
    assert spec.generator == contract(layout="nhwc", input_range="[-1,1]", multiple=8, channels="bgr")
    path, declared = generate.resolve_contract(generate._coerce({"model": "toy", "multiple": 16}))
    assert path == weights / "toy.onnx" and (declared.layout, declared.multiple) == ("nhwc", 16)
    frames = person_frames(2)
    result = generate.run(write_rgba(tmp_path / "in.mkv", frames), tmp_path / "out", model="toy", mode="frame")
    assert all(np.array_equal(a, b) for a, b in zip(read_all(result.outputs[0]), frames, strict=True))


def test_a_bad_manifest_contract_names_the_table(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        'schema = 1\n[families.toy]\nlicense = "MIT"\n'
        '[[families.toy.inputs]]\nname = "image"\nshape = ["N", 3, "H", "W"]\ndtype = "float32"\n'
        '[[families.toy.outputs]]\nname = "y"\nshape = ["N", 3, "H", "W"]\ndtype = "float32"\n'
        '[families.toy.generator]\nlayout = "chw"\n'
        '[[models]]\nname = "toy"\nfile = "toy.onnx"\nurl = "https://example.invalid/toy.onnx"\n'
        'family = "toy"\nprecision = "fp32"\nbackbone = "none"\n')
    with pytest.raises(models.ManifestError, match=r"families\.toy\.generator: layout: expected one of nchw, nhwc"):
        models.load_manifest(manifest)


def test_bad_parameters_and_inputs(tmp_path: Path) -> None:
    opaque = image_folder(tmp_path / "opaque", [np.zeros((16, 16, 3), np.uint8)])
    model = str(genmodels.identity(tmp_path / "id.onnx"))
    cases: list[tuple[dict[str, Any], ErrorKind]] = [
        ({}, ErrorKind.BAD_ARGUMENT),  # no model
        ({"model": model, "mode": "person"}, ErrorKind.BAD_ARGUMENT),  # no alpha to find a person in
        ({"model": model, "outputs": "rgba,nope"}, ErrorKind.BAD_ARGUMENT),
        ({"model": model, "input_range": "[1,1]"}, ErrorKind.BAD_ARGUMENT),
        ({"model": str(tmp_path / "missing.onnx")}, ErrorKind.MODEL_MISSING),
    ]
    for params, kind in cases:
        with pytest.raises(StageError) as err:
            generate.run(opaque, tmp_path / "out", **params)
        assert err.value.kind is kind, params
    not_onnx = tmp_path / "bad.onnx"
    not_onnx.write_text("not a model")
    with pytest.raises(StageError) as err:
        generate.run(opaque, tmp_path / "out", model=str(not_onnx))
    assert err.value.kind is ErrorKind.MODEL_INVALID
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_resident_workers_reuse_the_validated_session(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "in", [np.zeros((16, 16, 3), np.uint8)])
    model = str(genmodels.identity(tmp_path / "id.onnx"))
    cache: dict[str, object] = {}
    generate.run(src, tmp_path / "a", model=model, cache=cache, outputs="rgba_png")
    first = dict(cache)
    generate.run(src, tmp_path / "b", model=model, cache=cache, outputs="rgba_png")
    assert len(cache) == 1 and cache == first


# --- providers (stages/inference.py) ----------------------------------------------------------------


def test_provider_rules() -> None:
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert inference.choose_provider("auto", [cpu]) == cpu
    assert inference.choose_provider("auto", [trt, cuda, cpu]) == cuda  # TensorRT only when asked
    assert inference.choose_provider("tensorrt", [trt, cuda, cpu]) == trt
    for provider, kind in (("cuda", ErrorKind.PROVIDER_UNAVAILABLE), ("gpu", ErrorKind.BAD_ARGUMENT)):
        with pytest.raises(StageError) as err:
            inference.choose_provider(provider, [cpu])
        assert err.value.kind is kind
    assert generate.PARAMS["provider"].choices == inference.PROVIDERS


def test_a_silent_fallback_to_cpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = genmodels.identity(tmp_path / "id.onnx")
    session, provider = inference.open_session(model, "cpu", threads=1)
    assert provider == "CPUExecutionProvider" and session.get_providers()[0] == provider
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(StageError) as err, pytest.warns(UserWarning):
        inference.open_session(model, "cuda")
    assert err.value.kind is ErrorKind.PROVIDER_UNAVAILABLE
