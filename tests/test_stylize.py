"""Issue 11: the trained 26-style generator (``multistyle26``) through the real ``generate`` stage.

Every stage test here runs the REAL model (models/weights/multistyle26.onnx) on small synthetic clips:
democlip's figure with its exact, soft-edged mask as alpha (``tests/support/rgba.py``), at sizes whose
sides are multiples of 4 and sizes whose sides are not. Besides them: the style parser and the new
contract keys (``models/contract.py``), reflect padding (``stages/framing.py``: ``plan`` /
``Placement``), the steady person box (``BoxHold``), a resident worker's style change, and the shipped
``stylize`` pipeline end to end. The contact sheet has its own file (tests/test_contactsheet.py).

Thresholds come from measured numbers (2 CPU cores, onnxruntime CPU), noted where they are used.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from cuepipe import models
from cuepipe.models.contract import CONTRACT_KEYS, ContractError, GeneratorContract, parse_weights
from cuepipe.stages import generate
from cuepipe.stages.democlip import write_clip
from cuepipe.stages.errors import EXIT_BAD_ARGUMENT, ErrorKind
from cuepipe.stages.framing import Box, BoxHold, FramePass, plan
from cuepipe.stages.generator import Generator
from cuepipe.stages.protocol import WarningKind
from cuepipe.stages.stage import StageError, StageEvents
from cuepipe.stages.video import VideoReader, probe
from tests.support import genmodels
from tests.support.env import ROOT, subprocess_env
from tests.support.fake_td import FakeTD
from tests.support.rgba import person_frames, read_all, write_rgba

MODEL = "multistyle26"
STYLES = 26
A, B = "19", "7"  # two styles that look clearly different (measured below)
Frames = list[np.ndarray]


def clip(folder: Path, width: int = 96, height: int = 64, n: int = 4, seed: int = 1) -> tuple[Path, Frames]:
    """A small BGRA clip (UT Video, lossless): the figure with its soft-edged mask as alpha."""
    frames = person_frames(n, seed=seed, width=width, height=height)
    return write_rgba(folder / f"in_{width}x{height}.mkv", frames), frames


def stylize(src: Path, out: Path, **params: Any) -> Frames:
    """The stage on the real model (CPU, rgba output); the frames it wrote."""
    result = generate.run(src, out, **{"model": MODEL, "provider": "cpu", "outputs": "rgba", **params})
    assert result.outputs[0] == out / "generated_rgba.mkv"
    return read_all(result.outputs[0])


def inside(frames: Frames) -> list[np.ndarray]:
    """Where each input frame is fully the person (alpha 255)."""
    return [f[:, :, 3] == 255 for f in frames]


def distance(a: Frames, b: Frames, where: list[np.ndarray]) -> float:
    """Mean absolute colour difference of two clips over ``where`` (0..255)."""
    return float(np.mean([np.abs(x[m][:, :3].astype(int) - y[m][:, :3]).mean() for x, y, m in zip(a, b, where,
                                                                                                    strict=True)]))


def empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# --- the real model through the stage ---------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(96, 64), (90, 62)])
def test_a_style_restyles_the_person_and_keeps_the_background_byte_for_byte(tmp_path: Path, width: int,
                                                                            height: int) -> None:
    src, frames = clip(tmp_path, width, height)
    got = stylize(src, tmp_path / "out", style=A)
    assert len(got) == len(frames)
    for f, g in zip(frames, got, strict=True):
        assert g.shape == f.shape  # 90x62 is not a multiple of 4: padded for the model, cropped back
        outside = f[:, :, 3] == 0
        assert outside.mean() > 0.5 and (f[:, :, 3] == 255).mean() > 0.1  # a real person on a real background
        assert np.array_equal(g[outside], f[outside])  # colours AND alpha, every pixel outside the person
        assert np.array_equal(g[:, :, 3], f[:, :, 3])  # the alpha is the input's everywhere
    # measured: 46.5 (96x64), 43.7 (90x62) with style 19; an untouched person: 0
    assert distance(frames, got, inside(frames)) > 25


def test_two_styles_give_different_results(tmp_path: Path) -> None:
    src, frames = clip(tmp_path)
    a, b = stylize(src, tmp_path / "a", style=A), stylize(src, tmp_path / "b", style=B)
    # measured d(19, 7) = 83.5 at 96x64 (67 - 78 at the other test sizes); the same style twice: 0
    assert distance(a, b, inside(frames)) > 40
    outside = [f[:, :, 3] == 0 for f in frames]  # where both keep the input
    assert all(np.array_equal(x[m], y[m]) for x, y, m in zip(a, b, outside, strict=True))


def test_a_blend_lies_between_its_two_styles(tmp_path: Path) -> None:
    """The network is nonlinear, so no pixelwise betweenness: instead, sliding the weight from style A
    to style B moves the result steadily away from A and towards B, and a 50/50 blend is nearer to each
    pure style than the two styles are to each other. Weights are normalised (2:2 is 0.5:0.5)."""
    src, frames = clip(tmp_path)
    where = inside(frames)
    cache: dict[str, Any] = {}  # one session for every run: only the weights differ
    pure_a, pure_b = (stylize(src, tmp_path / s, style=s, cache=cache) for s in (A, B))
    blends = {w: stylize(src, tmp_path / f"blend{w}", style=f"{A}:{w},{B}:{1 - w:g}", cache=cache)
              for w in (0.8, 0.5, 0.2)}
    path = [pure_a, blends[0.8], blends[0.5], blends[0.2], pure_b]
    to_a = [distance(x, pure_a, where) for x in path]
    to_b = [distance(x, pure_b, where) for x in path]
    # measured at 96x64: to A 0, 20.3, 36.9, 63.6, 83.5; to B 83.5, 74.8, 58.8, 25.6, 0
    assert all(p < q for p, q in itertools.pairwise(to_a)), to_a
    assert all(p > q for p, q in itertools.pairwise(to_b)), to_b
    between = to_a[-1]  # d(A, B)
    assert to_a[2] < between and to_b[2] < between
    assert min(to_a[2], to_b[2]) > 10  # a blend is neither pure style
    # the weights are normalised before they reach the model: 2:2 is exactly 0.5:0.5
    doubled = stylize(src, tmp_path / "doubled", style=f"{A}:2,{B}:2", cache=cache)
    assert all(np.array_equal(x, y) for x, y in zip(doubled, blends[0.5], strict=True))


@pytest.mark.parametrize("style", ["40", "26", "-1", "19,19", "19:-0.5", "19:0,7:0", "19:nan", "nineteen", "19;7"])
def test_a_bad_style_is_refused_before_any_output(tmp_path: Path, style: str) -> None:
    src, _ = clip(tmp_path, n=2)
    with pytest.raises(StageError) as err:
        generate.run(src, tmp_path / "out", model=MODEL, provider="cpu", style=style)
    assert err.value.kind is ErrorKind.BAD_ARGUMENT
    assert err.value.message.startswith("style: ") and style.split(",")[0].split(":")[0] in err.value.message
    assert empty(tmp_path / "out")


def test_cli_refuses_style_40_with_exit_2_and_names_the_range(tmp_path: Path, fake_td: FakeTD) -> None:
    src, _ = clip(tmp_path, n=2)
    cmd = [sys.executable, "-m", "cuepipe.stages.generate", "--input", str(src), "--output-dir", str(tmp_path / "out"),
           "--report", fake_td.address, "--model", MODEL, "--provider", "cpu", "--style", "40"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_BAD_ARGUMENT == 2, proc.stderr
    failed = fake_td.wait_for("stage/failed")
    assert failed["kind"] == "bad_argument"
    assert "index 40 is out of range" in failed["message"] and "0..25" in failed["message"]
    assert "0..25" in proc.stderr  # the person at the terminal reads it too
    assert fake_td.names() == ["stage/failed"]  # refused before started: nothing was decoded or written
    assert empty(tmp_path / "out")


class Recorder(StageEvents):
    """The stage's Events, kept instead of sent."""

    def __init__(self) -> None:
        super().__init__(generate.NAME, None)
        self.info: dict[str, Any] = {}
        self.warnings: list[tuple[WarningKind, str]] = []

    def started(self, **info: Any) -> None:
        self.info = info

    def warning(self, kind: WarningKind, message: str) -> None:
        self.warnings.append((kind, message))


def test_a_style_for_a_model_without_a_vector_input_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """``--set generate.model=cuepipe_toon`` on the stylize pipeline (whose params carry style 19) must
    still run: the stage says parameter_ignored and runs the model as without a style. (The Generator
    itself refuses a style it cannot take: test_generator_weights_and_the_vector_input_check.)"""
    src, _ = clip(tmp_path, n=2)
    events = Recorder()
    with_style = generate.run(src, tmp_path / "styled", events, model="cuepipe_toon", provider="cpu", style="3")
    assert [k for k, _ in events.warnings] == [WarningKind.PARAMETER_IGNORED]
    assert "style '3' ignored" in events.warnings[0][1] and "no vector_input" in events.warnings[0][1]
    assert events.info["style"] == ""  # what ran: no style
    plain = generate.run(src, tmp_path / "plain", model="cuepipe_toon", provider="cpu")
    assert all(np.array_equal(a, b) for a, b in zip(read_all(with_style.outputs[0]), read_all(plain.outputs[0]),
                                                    strict=True))
    styled = Recorder()
    generate.run(src, tmp_path / "multi", styled, model=MODEL, provider="cpu", style="3")
    assert styled.warnings == [] and styled.info["style"] == "3"


# --- sizes that are not multiples of 4 ------------------------------------------------------------


def reference(session: ort.InferenceSession, frame: np.ndarray, style: int) -> np.ndarray:
    """The whole frame through the model, written out plainly: mirrored (reflect-101) up to multiples of
    4, centred, RGB in [0,1], one-hot weights; the output cut back and rounded. BGR uint8."""
    h, w = frame.shape[:2]
    mh, mw = 4 * math.ceil(h / 4), 4 * math.ceil(w / 4)
    top, left = (mh - h) // 2, (mw - w) // 2
    padded = np.pad(frame[:, :, 2::-1], ((top, mh - h - top), (left, mw - w - left), (0, 0)), mode="reflect")
    weights = np.zeros(STYLES, np.float32)
    weights[style] = 1.0
    x = (padded.transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
    y = session.run(["stylized"], {"image": x, "style_weights": weights})[0][0]
    out = np.clip(np.rint(y.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out[top : top + h, left : left + w, ::-1])


@pytest.mark.parametrize(("width", "height"), [(90, 62), (70, 54), (89, 61)])
def test_frame_mode_pads_by_reflection_and_crops_back_exactly(tmp_path: Path, width: int, height: int) -> None:
    """Frame mode = the reference above within rounding (measured: max 1, on < 0.01 % of the values), so
    the mirrored border is cut off exactly where it was added: a 1 px shift differs by ~10 on average,
    and black (zero) padding instead by 12 - 19 on average, up to 160 (the network normalises over its
    whole input, so the padding changes every pixel)."""
    src, frames = clip(tmp_path, width, height, n=2)
    got = stylize(src, tmp_path / "out", mode="frame", style="5")
    session = ort.InferenceSession(str(models.resolve(MODEL)), providers=["CPUExecutionProvider"])
    for f, g in zip(frames, got, strict=True):
        assert g.shape == (height, width, 4)
        want = reference(session, f, 5)
        assert np.abs(g[:, :, :3].astype(int) - want).max() <= 1
        assert np.abs(np.roll(want, 1, axis=1).astype(int) - g[:, :, :3]).mean() > 3  # the check can tell
        assert np.array_equal(g[:, :, 3], f[:, :, 3])


@pytest.mark.parametrize(("width", "height"), [(90, 62), (70, 54)])
def test_person_mode_keeps_the_exact_size_for_sides_not_multiple_of_4(tmp_path: Path, width: int,
                                                                      height: int) -> None:
    src, frames = clip(tmp_path, width, height, n=3)
    got = stylize(src, tmp_path / "out", mode="person", style=A, smoothing=0.5)
    assert [g.shape for g in got] == [(height, width, 4)] * 3
    outside = [f[:, :, 3] == 0 for f in frames]
    assert all(np.array_equal(g[m], f[m]) for f, g, m in zip(frames, got, outside, strict=True))
    assert distance(frames, got, inside(frames)) > 25  # measured 42.2 (90x62), 45.4 (70x54)


def test_plan_pads_by_reflection_to_a_multiple_and_round_trips_exactly() -> None:
    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (61, 89, 3), dtype=np.uint8)  # odd sides: 3 px to add on each axis
    placement = plan(89, 61, None, multiple=4, pad="reflect")
    assert placement.model == (92, 64) and placement.inner == (1, 1, 89, 61)
    model_input = placement.to_model(crop)
    assert model_input.shape == (64, 92, 3)
    # BORDER_REFLECT_101 = numpy's "reflect": mirrored about the edge pixel, which is not repeated
    assert np.array_equal(model_input, np.pad(crop, ((1, 2), (1, 2), (0, 0)), mode="reflect"))
    assert np.array_equal(model_input[0, 1:90], crop[1]) and np.array_equal(model_input[1:62, 91], crop[:, 86])
    assert np.array_equal(placement.from_model(model_input), crop)  # cut back: the crop, exactly
    alpha = crop[:, :, 0]  # a gray (condition) image is padded the same way
    assert np.array_equal(placement.to_model(alpha), np.pad(alpha, ((1, 2), (1, 2)), mode="reflect"))
    zero = plan(89, 61, None, multiple=4).to_model(crop)  # the default stays black
    assert zero[0].max() == 0 and zero[:, -2:].max() == 0 and np.array_equal(zero[1:62, 1:90], crop)
    # a job scale: the crop is resized into the model's input and back to its own size
    half = plan(89, 61, None, multiple=4, scale=0.5, pad="reflect")
    assert half.model == (44, 32) and half.inner == (0, 1, 44, 30)  # 44.5 x 30.5 rounds to 44 x 30
    assert all(v % 4 == 0 for v in half.model)
    assert half.from_model(half.to_model(crop)).shape == crop.shape
    assert plan(88, 60, None, multiple=4, pad="reflect").to_model(crop[:60, :88]).shape == (60, 88, 3)  # no pad


# --- the style parser and the contract keys ---------------------------------------------------------


def one_hot(index: int, size: int = STYLES) -> tuple[float, ...]:
    return tuple(1.0 if i == index else 0.0 for i in range(size))


def test_parse_weights_normalises() -> None:
    assert parse_weights("19", STYLES) == one_hot(19)
    assert parse_weights(19, STYLES) == one_hot(19)  # an int from a TOML file
    assert parse_weights(" 0 ", STYLES) == one_hot(0)
    blend = parse_weights("19:0.7,7:0.3", STYLES)
    assert len(blend) == STYLES and math.isclose(sum(blend), 1.0)
    assert blend[19] == pytest.approx(0.7) and blend[7] == pytest.approx(0.3)
    assert sum(1 for w in blend if w) == 2
    assert parse_weights("19:3, 7:1", STYLES) == pytest.approx(parse_weights("19:0.75,7:0.25", STYLES))
    assert parse_weights("1,2", 4) == pytest.approx((0.0, 0.5, 0.5, 0.0))  # an index alone weighs 1
    assert parse_weights("2:0,3", 4) == one_hot(3, 4)  # a zero weight is allowed beside others


@pytest.mark.parametrize(("text", "needle"), [
    ("26", "index 26 is out of range: this model has 26 (0..25)"),
    ("-1", "index -1 is out of range"),
    ("19,7,19", "index 19 appears twice"),
    ("19:-0.5", "must be a number >= 0"),
    ("19:nan", "must be a number >= 0"),
    ("19:inf", "must be a number >= 0"),
    ("19:0,7:0", "all zero"),
    ("", "expected an index 0..25 or a blend like 19:0.7,7:0.3"),
    ("   ", "expected an index"),
    (None, "expected an index"),
    (1.5, "expected an index"),
    (True, "expected an index"),
    ("abc", "'abc' is not INDEX or INDEX:WEIGHT"),
    ("19:x", "'19:x' is not INDEX or INDEX:WEIGHT"),
    ("19;7", "is not INDEX or INDEX:WEIGHT"),
    ("19,,7", "is not INDEX or INDEX:WEIGHT"),
    ("1.5", "is not INDEX or INDEX:WEIGHT"),
])
def test_parse_weights_refuses(text: Any, needle: str) -> None:
    with pytest.raises(ContractError) as err:
        parse_weights(text, STYLES, key="look")
    assert err.value.kind is ErrorKind.BAD_ARGUMENT
    assert err.value.message.startswith("look: ") and needle in err.value.message


def test_parse_weights_huge_weights_still_sum_to_one() -> None:
    """Two huge finite weights once summed to inf and normalised to all zeros (no style at all)."""
    weights = parse_weights("19:1e308,7:1e308", STYLES)
    assert math.isclose(sum(weights), 1.0) and weights[19] == weights[7] == 0.5


def test_contract_keys_pad_and_vector_input() -> None:
    assert CONTRACT_KEYS[-2:] == ("pad", "vector_input")
    default = GeneratorContract()
    assert (default.pad, default.vector_input) == ("zero", None)
    c = GeneratorContract.from_mapping({"pad": " Reflect ", "vector_input": " style_weights "})
    assert (c.pad, c.vector_input) == ("reflect", "style_weights")
    assert c.to_mapping()["pad"] == "reflect" and c.to_mapping()["vector_input"] == "style_weights"
    assert default.to_mapping()["vector_input"] == ""
    assert "reflect padding" in c.describe() and "weights style_weights" in c.describe()
    assert "padding" not in default.describe() and "weights" not in default.describe()
    assert GeneratorContract.from_mapping({"vector_input": ""}).vector_input is None
    for bad, needle in (({"pad": "edge"}, "pad: expected one of zero, reflect"), ({"pad": 1}, "pad:"),
                        ({"vector_input": 26}, "vector_input: expected a tensor name"),
                        ({"input_name": "x", "vector_input": "x"}, "vector_input: must differ"),
                        ({"condition_input": "c", "vector_input": "c"}, "vector_input: must differ")):
        with pytest.raises(ContractError, match=needle):
            GeneratorContract.from_mapping(bad)


def test_the_manifest_declares_multistyle26() -> None:
    spec = models.load_manifest()[MODEL]
    assert spec.family == "multistyle" and spec.file == "multistyle26.onnx"
    assert spec.generator == GeneratorContract.from_mapping({
        "input_name": "image", "output_name": "stylized", "size": "dynamic", "multiple": 4, "pad": "reflect",
        "vector_input": "style_weights", "input_range": "[0,1]", "output_range": "[0,1]"})


def test_generator_weights_and_the_vector_input_check(tmp_path: Path) -> None:
    path, contract = generate.resolve_contract(generate._coerce({"model": MODEL}))
    gen = Generator(path, contract, "cpu")
    assert (gen.io.vector_name, gen.io.vector_size) == ("style_weights", STYLES)
    w = gen.weights("19")
    assert w is not None and w.dtype == np.float32 and w.shape == (STYLES,) and tuple(w) == one_hot(19)
    default = gen.weights(None)
    assert default is not None and tuple(default) == one_hot(0)  # unset: style 0
    with pytest.raises(StageError) as err:
        gen.weights("26")
    assert err.value.kind is ErrorKind.BAD_ARGUMENT and "0..25" in err.value.message
    x, _ = gen.pack(np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(ValueError, match="weight vector"):
        gen.run([x], [None])  # the vector is an argument of every run, never forgotten state
    assert gen.run([x], [None], w)[0].shape == (8, 12, 3)
    # the real model's second input must be declared, and declared by its real name
    no_vector = GeneratorContract.from_mapping({"vector_input": ""}, contract)
    with pytest.raises(StageError, match="not fed by the contract") as err:
        Generator(path, no_vector, "cpu")
    assert err.value.kind is ErrorKind.MODEL_INVALID
    with pytest.raises(StageError, match="no input 'weights'"):
        Generator(path, GeneratorContract.from_mapping({"vector_input": "weights"}, contract), "cpu")
    # a model without one: no vector, and a style is refused
    toon = Generator(*generate.resolve_contract(generate._coerce({"model": "cuepipe_toon"})), "cpu")
    assert toon.weights(None) is None
    with pytest.raises(StageError) as err:
        toon.weights("0")
    assert err.value.kind is ErrorKind.BAD_ARGUMENT


# --- the steady person box ----------------------------------------------------------------------------


def test_a_jittering_box_is_held_identically() -> None:
    hold = BoxHold(160, 96)
    first = hold(Box(60, 10, 100, 90))  # 40x80: room round(0.05 * 80) = 4 on every side
    assert first == Box(56, 6, 104, 94) and hold.changes == 1
    rng = np.random.default_rng(0)
    for _ in range(50):
        dx0, dy0, dx1, dy1 = (int(v) for v in rng.integers(-2, 3, 4))
        assert hold(Box(60 + dx0, 10 + dy0, 100 + dx1, 90 + dy1)) == first
    assert hold.changes == 1


def test_moving_out_or_shrinking_takes_a_new_box_and_reset_forgets() -> None:
    hold = BoxHold(160, 96)
    first = hold(Box(60, 10, 100, 90))
    moved = hold(Box(70, 10, 110, 90))  # out of the held box on the right
    assert moved != first and moved.contains(Box(70, 10, 110, 90)) and hold.changes == 2
    small = Box(75, 30, 95, 60)  # inside, but 600 px^2 where the held box has 48 x 88
    assert moved.contains(small)
    shrunk = hold(small)
    assert shrunk == Box(73, 28, 97, 62) and hold.changes == 3  # room round(0.05 * 30) = 2
    assert hold(Box(75, 30, 95, 60)) == shrunk  # and then held
    assert hold(Box(74, 29, 96, 61)) == shrunk and hold.changes == 3  # a little bigger: still held
    hold.reset()  # e.g. a frame without anybody
    assert hold(Box(74, 29, 96, 61)) == Box(72, 27, 98, 63) and hold.changes == 4  # its own box, not the old one


def test_held_boxes_stay_inside_the_frame() -> None:
    hold = BoxHold(160, 96)
    for box in (Box(0, 0, 30, 96), Box(130, 0, 160, 50), Box(0, 40, 160, 96), Box(2, 2, 158, 94)):
        hold.reset()
        held = hold(box)
        assert held.contains(box) and Box(0, 0, 160, 96).contains(held), (box, held)


def shifted(frame: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``frame`` moved by (dy, dx) pixels; what comes in is transparent black (nothing wraps round)."""
    h, w = frame.shape[:2]
    out = np.zeros_like(frame)
    out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = frame[max(0, -dy) : h - max(0, dy),
                                                                           max(0, -dx) : w - max(0, dx)]
    return out


def test_the_frame_pass_holds_the_person_box(tmp_path: Path) -> None:
    """Wired into the stage's per-frame work: a person swaying by a pixel keeps one crop (hold), while
    without the hold every frame gets its own box."""
    gen = Generator(genmodels.identity(tmp_path / "id.onnx"), GeneratorContract(), "cpu")
    base = person_frames(1, seed=1)[0]
    frames = [shifted(base, dy, dx) for dy, dx in ((0, 0), (1, 0), (1, 1), (0, 1), (-1, 0), (0, -2), (-1, -1))]
    boxes = {}
    for hold in (True, False):
        framer = FramePass(gen, "person", base.shape[1], base.shape[0], hold=hold)
        boxes[hold] = [framer.prepare((f, None)).box for f in frames]
    assert len(set(boxes[True])) == 1 and boxes[True][0] is not None
    assert len(set(boxes[False])) > 1
    assert all(boxes[True][0].contains(b) for b in boxes[False] if b is not None)


# --- resident workers ---------------------------------------------------------------------------------


def test_a_resident_worker_changes_style_without_reloading_the_model(tmp_path: Path) -> None:
    src, frames = clip(tmp_path)
    cache: dict[str, Any] = {}
    a = stylize(src, tmp_path / "a", style=A, cache=cache)
    [gen] = cache.values()
    b = stylize(src, tmp_path / "b", style=B, cache=cache)
    [again] = cache.values()
    assert again is gen  # the same loaded Generator (its session) served both jobs
    assert distance(a, b, inside(frames)) > 40  # ... with each job's own style (measured 83.5)
    with pytest.raises(StageError):  # a refused style does not cost the loaded model either
        generate.run(src, tmp_path / "c", model=MODEL, provider="cpu", style="99", cache=cache)
    assert list(cache.values()) == [gen]
    back = stylize(src, tmp_path / "a2", style=A, cache=cache)
    assert all(np.array_equal(x, y) for x, y in zip(a, back, strict=True))  # nothing of style B stuck


# --- the shipped pipeline -----------------------------------------------------------------------------


def test_the_stylize_pipeline_end_to_end(tmp_path: Path, fake_td: FakeTD) -> None:
    """``cuepipe run stylize`` from the repository's pipelines.toml: preprocess, matting (source_rgba),
    generate (multistyle26). Outside the matte, the published rgba holds the input's decoded pixels
    exactly: preprocess and source_rgba are lossless, and generate keeps every pixel with alpha 0."""
    clip_path = tmp_path / "take.mp4"
    write_clip(clip_path, None, width=160, height=96, frames=8, fps=24.0, seed=2)
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(ROOT / "pipelines.toml"), "run",
           "stylize", str(clip_path), "--out", str(tmp_path / "out"), "--report", fake_td.address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    outputs = [Path(p) for p in fake_td.wait_for("job/done")["outputs"]]
    out = tmp_path / "out"
    assert outputs == [out / "take_generated.mp4", out / "take_generated_rgba.mkv", out / "take_contact.png"]
    assert all(p.is_file() for p in outputs)
    assert probe(outputs[0], count_frames=True).frames == 8
    sheet = cv2.imread(str(outputs[2]))
    assert sheet is not None and sheet.shape == (26 + 4 * 180 + 3 * 4, 3 * 300 + 2 * 4, 3)  # 4 rows of 3 tiles
    with VideoReader(clip_path) as reader:
        source = list(reader)
    got = read_all(outputs[1])
    assert len(got) == len(source) == 8
    for s, g in zip(source, got, strict=True):
        clear = g[:, :, 3] == 0
        person = g[:, :, 3] == 255
        assert clear.mean() > 0.5 and person.mean() > 0.05  # measured: 85 % clear, 13 % person
        assert np.array_equal(g[clear][:, :3], s[clear])  # the background, byte for byte
        assert np.abs(g[person][:, :3].astype(int) - s[person]).mean() > 10  # restyled (measured 25 - 29)


def test_styles_command_renders_every_style_and_refuses_a_model_without_styles(tmp_path: Path) -> None:
    """`cuepipe styles multistyle26` is how to choose among 26 unnamed styles: one labelled tile each."""
    from cuepipe.orchestrator.cli import main

    picture = tmp_path / "frame.png"
    cv2.imwrite(str(picture), person_frames(1, width=96, height=64)[0][:, :, :3])
    out = tmp_path / "styles.png"
    assert main(["styles", "multistyle26", "--image", str(picture), "--out", str(out)]) == 0
    sheet = cv2.imread(str(out))
    assert sheet is not None and sheet.shape[:2] == (7 * 64 + 6 * 4, 4 * 96 + 3 * 4)  # 26 styles + original, 4 across
    tiles = [sheet[r * 68 + 20 : r * 68 + 64, c * 100 : c * 100 + 96] for r, c in ((0, 0), (0, 1), (4, 3))]
    assert min(float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in
               ((tiles[0], tiles[1]), (tiles[0], tiles[2]), (tiles[1], tiles[2]))) > 5  # styles 0, 1, 19 differ
    assert main(["styles", "cuepipe_toon", "--image", str(picture), "--out", str(tmp_path / "no.png")]) == 2
    assert not (tmp_path / "no.png").exists()
