"""The built-in ``cuepipe_toon`` generator: a deterministic build, its contract, what it does to frames, fetch."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from cuepipe import models
from cuepipe.models import ModelInvalidError, ModelMissingError, builtin
from cuepipe.models import fetch as fetch_mod
from cuepipe.models.cli import models_command
from cuepipe.models.contract import GeneratorContract
from cuepipe.models.fetch import fetch, sha256_file, verify
from cuepipe.stages import generate
from cuepipe.stages.democlip import render_frames
from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.generator import Generator, check_contract
from cuepipe.stages.stage import StageError
from tests.support.rgba import person_frames, read_all, write_rgba

NAME = "cuepipe_toon"
#: the pixel values of the luma bands (0, 0.2, ..., 1 -> x 255: integers, so no rounding ties)
LEVELS = [round(k * 255 / (builtin.LEVELS - 1)) for k in range(builtin.LEVELS)]


@pytest.fixture
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "weights"
    monkeypatch.setenv("CUEPIPE_MODELS", str(folder))
    return folder


@pytest.fixture(scope="module")
def toon(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toon") / "cuepipe_toon.onnx"
    builtin.build_toon(path)
    return path


@pytest.fixture(scope="module")
def gen(toon: Path) -> Generator:
    contract = models.load_manifest()[NAME].generator
    assert contract is not None
    return Generator(toon, contract, "cpu")


def stylise(gen: Generator, image: np.ndarray) -> np.ndarray:
    x, _ = gen.pack(image)
    [out] = gen.run([x], [None])
    return out


def luma(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float64)


# --- the build ----------------------------------------------------------------------------------


def test_build_is_deterministic_and_pinned_by_the_manifest(tmp_path: Path) -> None:
    spec = models.load_manifest()[NAME]
    a, b = tmp_path / "a" / "toon.onnx", tmp_path / "b.onnx"
    builtin.build_toon(a)
    builtin.build_toon(b)
    assert a.read_bytes() == b.read_bytes() == builtin.toon_bytes() == builtin.build("toon")
    assert (sha256_file(a), a.stat().st_size) == (spec.sha256, spec.size_bytes)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.onnx", "toon.onnx"]  # no temp files left


def test_the_graph_is_a_fixed_filter_network(toon: Path) -> None:
    import onnx

    model = onnx.load(str(toon))
    onnx.checker.check_model(model, full_check=True)
    assert (model.producer_name, model.opset_import[0].version) == (builtin.PRODUCER, builtin.OPSET)
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Pad", "Floor", "Clip", "Sqrt"} <= ops
    assert not ops & {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
    assert "not a GAN" in model.doc_string
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["toon"]


def test_unknown_builtin_and_missing_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(builtin.BuiltinError, match="unknown built-in model 'nope'"):
        builtin.build("nope")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(builtin.BuiltinError, match="pip install onnx"):
        builtin.toon_bytes()


# --- the contract -------------------------------------------------------------------------------


def test_manifest_contract_matches_the_model(toon: Path, gen: Generator) -> None:
    spec = models.load_manifest()[NAME]
    assert spec.generator == GeneratorContract.from_mapping(
        {"input_name": "image", "output_name": "toon", "layout": "nchw", "channels": "rgb", "input_range": "[0,1]",
         "output_range": "[0,1]", "dtype": "float32", "size": "dynamic", "multiple": 1, "batch": 1})
    assert (spec.url, spec.builtin, spec.license) == (None, "toon", "same as cuepipe")
    assert (gen.io.input_name, gen.io.output_name, gen.io.fixed_size, gen.io.fixed_batch) == ("image", "toon", None, 1)
    session = ort.InferenceSession(str(toon), providers=["CPUExecutionProvider"])
    for wrong in ({"layout": "nhwc"}, {"size": "512x512", "batch": 2}, {"input_name": "src"}):
        with pytest.raises(StageError) as err:
            check_contract(session, GeneratorContract.from_mapping(wrong, spec.generator), "toon")
        assert err.value.kind is ErrorKind.MODEL_INVALID


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 5), (37, 61), (360, 640)])
def test_any_size_comes_back_the_same_size_and_in_range(toon: Path, height: int, width: int) -> None:
    session = ort.InferenceSession(str(toon), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(height).random((1, 3, height, width), np.float32)
    x[0, 0, 0, 0], x[0, 1, -1, -1] = -0.5, 1.5  # out-of-range input is clipped first
    [y] = session.run(None, {"image": x})
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.isfinite(y).all() and y.min() >= 0.0 and y.max() <= 1.0


# --- what it does -------------------------------------------------------------------------------


def test_a_smooth_gradient_is_posterised_into_flat_bands(gen: Generator) -> None:
    ramp = np.tile(np.linspace(0, 255, 512).round().astype(np.uint8), (64, 1))
    out = stylise(gen, cv2.merge([ramp, ramp, ramp]))
    assert out.shape == (64, 512, 3)
    assert (out == out[:, :, :1]).all() and (out == out[:1]).all()  # grey stays grey; rows stay identical
    row = out[0, :, 0].astype(int)
    assert (np.diff(row) >= 0).all()  # order kept
    assert len(np.unique(ramp)) == 256
    on_levels = np.isin(row, LEVELS)
    assert on_levels.mean() > 0.6  # input: 256 values spread evenly; output: mostly the band values
    for level in LEVELS:  # every band is a flat run of one value (an interior band ~1/5 of the width)
        run = (row == level).sum()
        assert run >= (0.05 if level in (0, 255) else 0.11) * row.size, (level, run)


def test_flat_regions_stay_flat_and_noise_is_smoothed(gen: Generator) -> None:
    flat = np.full((90, 120, 3), (90, 140, 200), np.uint8)  # BGR; luma in the middle of a band
    out = stylise(gen, flat)
    assert (out == out[0, 0]).all()
    assert luma(out[:1, :1])[0, 0] in [pytest.approx(v, abs=1.5) for v in LEVELS]
    noisy = np.clip(flat + np.random.default_rng(0).normal(0, 4, flat.shape), 0, 255).astype(np.uint8)
    out = stylise(gen, noisy)[8:-8, 8:-8].reshape(-1, 3).astype(np.float64)
    assert (out.std(axis=0) < noisy.reshape(-1, 3).std(axis=0) / 2.5).all()


def test_outlines_are_dark_on_the_dark_side_of_an_edge(gen: Generator) -> None:
    step = np.full((64, 128, 3), 200, np.uint8)
    step[:, :64] = 60
    out = luma(stylise(gen, step))[32]
    dark_flat, bright_flat = out[40], out[100]
    assert dark_flat == pytest.approx(LEVELS[1], abs=1) and bright_flat == pytest.approx(LEVELS[4], abs=1)
    line = out[58:64]
    assert line.min() < 0.4 * dark_flat  # a dark line right at the edge ...
    assert (out[66:] > 0.9 * bright_flat).all()  # ... on the dark side only


def test_a_democlip_frame_is_visibly_stylised(gen: Generator) -> None:
    frame, mask = next(iter(render_frames(640, 360, 1, seed=0)))
    out = stylise(gen, frame)
    assert out.shape == frame.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - frame).max(axis=2)
    assert diff.mean() > 6 and (diff > 8).mean() > 0.4  # most pixels change
    person = mask > 127
    kernel = np.ones((3, 3), np.uint8)
    outline = person & ~(cv2.erode(person.astype(np.uint8), kernel, iterations=2) > 0)  # 2 px inside the edge
    assert luma(out)[outline].mean() < 0.8 * luma(frame)[outline].mean()  # the silhouette is inked
    # flat fills: the brightness of most pixels is now one of the band values (chroma adds no luma)
    def on_a_band(image: np.ndarray) -> float:
        return float((np.abs(luma(image)[..., None] - LEVELS).min(axis=-1) <= 2).mean())

    assert on_a_band(frame) < 0.2 and on_a_band(out) > 0.45


def test_the_generate_stage_runs_it_by_name(weights: Path, tmp_path: Path) -> None:
    fetch(NAME)
    frames = person_frames(3)
    result = generate.run(write_rgba(tmp_path / "in.mkv", frames), tmp_path / "out", model=NAME, mode="person")
    got = read_all(result.outputs[0])
    assert len(got) == 3
    for src, dst in zip(frames, got, strict=True):
        outside = src[:, :, 3] == 0
        assert np.array_equal(dst[outside], src[outside])  # person mode: the background is untouched
        inside = src[:, :, 3] == 255
        assert np.abs(dst[inside][:, :3].astype(int) - src[inside][:, :3]).max(axis=1).mean() > 4


# --- fetch and verify ---------------------------------------------------------------------------


def test_fetch_builds_into_the_model_folder_and_verifies(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelMissingError, match=r"build it .* cuepipe models fetch cuepipe_toon"):
        models.resolve(NAME)
    path = fetch(NAME)
    assert path == weights / "cuepipe_toon.onnx" == models.resolve(NAME)
    assert sorted(p.name for p in weights.iterdir()) == ["cuepipe_toon.onnx"]  # no temp files
    result = verify(NAME)
    assert (result.sha256_ok, result.deep, [t.name for t in result.inputs]) == (True, True, ["image"])

    def no_write(*args: object) -> Path:
        raise AssertionError("a present, valid file must not be built again")

    write_atomic = fetch_mod._write_atomic
    monkeypatch.setattr(fetch_mod, "_write_atomic", no_write)
    assert fetch(NAME) == fetch(NAME, source="builtin") == path
    monkeypatch.setattr(fetch_mod, "_write_atomic", write_atomic)
    path.write_bytes(b"garbage")
    assert fetch(NAME) == path and sha256_file(path) == models.load_manifest()[NAME].sha256
    assert fetch(NAME, force=True, dest_dir=weights / "other") == weights / "other" / "cuepipe_toon.onnx"


def test_fetch_refuses_a_build_with_other_bytes(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(builtin.BUILDERS, "toon", lambda: builtin.toon_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelInvalidError, match=r"sha256 mismatch.*same bytes everywhere"):
        fetch(NAME)
    assert not weights.exists() or not any(weights.iterdir())


def test_fetch_sources_that_do_not_apply(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelMissingError, match="no URL"):
        fetch(NAME, source="url")
    with pytest.raises(ModelMissingError, match="not a built-in model"):
        fetch("rvm_resnet50_fp32", source="builtin")

    def no_onnx() -> bytes:
        raise builtin.BuiltinError("building a built-in model needs the 'onnx' package: pip install onnx")

    monkeypatch.setitem(builtin.BUILDERS, "toon", no_onnx)
    with pytest.raises(ModelMissingError, match="pip install onnx") as err:
        fetch(NAME)
    assert "--wheel" not in str(err.value)  # no "offline? pass a local copy" hint for a model built here


def test_cli_fetch_goes_on_after_a_failing_name(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_command(["fetch", "no_such_model", NAME]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == str(weights / "cuepipe_toon.onnx") and "unknown model 'no_such_model'" in err
    assert models_command(["list"]) == 0
    listing = capsys.readouterr().out
    line = next(ln for ln in listing.splitlines() if NAME in ln)
    assert "present" in line and "built-in" in line and "sha256 known" in line
    assert models_command(["verify", NAME]) == 0
    assert "sha256 ok  onnx ok" in capsys.readouterr().out

