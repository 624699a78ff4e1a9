"""The contact sheet (``stages/contactsheet.py``): which frames, the PNG's layout, atomic writing, and
the ``generate`` stage's ``contact_sheet`` parameter on the real ``multistyle26`` model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cuepipe.stages import generate
from cuepipe.stages.blend import composite
from cuepipe.stages.contactsheet import SKIP, ContactSheet, pick_frames
from tests.support.fakes import InterruptAt
from tests.support.rgba import person_frames, read_all, write_rgba

TILE = 180  # ContactSheet's default tile height
HEADER, GAP = 26, 4  # the column-name strip and the space between tiles (contactsheet._HEADER / _GAP)
LABEL = (slice(0, 30), slice(0, 70))  # where "frame N" is drawn in a row's first tile (measured: 4..25, 4..64)


# --- which frames --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "rows", "want"), [
    (10, 4, (0, 3, 6, 9)),
    (100, 4, (0, 33, 66, 99)),
    (5, 3, (0, 2, 4)),
    (8, 4, (0, 2, 5, 7)),
    (4, 4, (0, 1, 2, 3)),
    (2, 2, (0, 1)),
    (9, 1, (0,)),
    (1, 4, (0,)),
    (0, 4, ()),
    (5, 0, ()),
    (-1, 3, ()),  # a container that does not know its frame count
])
def test_pick_frames_spreads_evenly_first_and_last_included(total: int, rows: int, want: tuple[int, ...]) -> None:
    assert pick_frames(total, rows) == want


@pytest.mark.parametrize(("total", "rows"), [(3, 5), (2, 4), (6, 24)])
def test_pick_frames_with_more_rows_than_frames_takes_every_frame(total: int, rows: int) -> None:
    """More rows than frames once dropped the last frame (3 frames, 5 rows gave (0, 1))."""
    assert pick_frames(total, rows) == tuple(range(total))


def test_picked_frames_are_sorted_unique_and_in_range() -> None:
    for total in range(1, 40):
        for rows in range(1, 12):
            picked = pick_frames(total, rows)
            assert picked[0] == 0 and list(picked) == sorted(set(picked)) and picked[-1] <= total - 1
            if rows <= total:
                assert len(picked) == rows, (total, rows, picked)
            if 2 <= rows <= total:
                assert picked[-1] == total - 1, (total, rows, picked)
                steps = np.diff(picked)
                assert steps.max() - steps.min() <= 1, (total, rows, picked)  # evenly spread


# --- the sheet -------------------------------------------------------------------------------------------


def images(seed: int, width: int = 48, height: int = 32) -> list[np.ndarray]:
    """One image per column, each kind a sheet takes: BGR, gray and BGRA."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8), rng.integers(0, 256, (height, width),
            dtype=np.uint8), rng.integers(0, 256, (height, width, 4), dtype=np.uint8)]


def test_the_sheet_has_one_row_per_picked_frame_and_one_tile_per_column(tmp_path: Path) -> None:
    path = tmp_path / "sheet" / "contact.png"  # its folder is made
    with ContactSheet(path, ("source", "matte", "result"), total=10, rows=4, tile_height=64) as sheet:
        assert sheet.frames == (0, 3, 6, 9)
        for i in range(10):
            sheet.write(sheet.row(i, images(i)) if sheet.wanted(i) else SKIP)  # SKIP rows are ignored
    png = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert png is not None and png.dtype == np.uint8
    tile_w = 96  # 48x32 at a tile height of 64
    assert png.shape == (HEADER + 4 * 64 + 3 * GAP, 3 * tile_w + 2 * GAP, 3)
    for r, i in enumerate((0, 3, 6, 9)):  # each row shows its own frame's images, scaled, in column order
        top = HEADER + r * (64 + GAP)
        for c, image in enumerate(images(i)):
            tile = png[top : top + 64, c * (tile_w + GAP) : c * (tile_w + GAP) + tile_w]
            want = cv2.resize(image if image.ndim == 2 else image[:, :, :3], (tile_w, 64), interpolation=cv2.INTER_AREA)
            want = cv2.cvtColor(want, cv2.COLOR_GRAY2BGR) if want.ndim == 2 else want
            keep = np.ones((64, tile_w), bool)
            if c == 0:
                keep[LABEL] = False  # the frame number
            assert np.array_equal(tile[keep], want[keep]), (i, c)
    assert not [p.name for p in path.parent.iterdir() if p.name != "contact.png"]  # no temporary file left


def test_nothing_is_written_when_the_block_fails_or_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "contact.png"
    with pytest.raises(RuntimeError), ContactSheet(path, ("source",), total=3, rows=3) as sheet:
        sheet.write(sheet.row(0, images(0)[:1]))
        raise RuntimeError("the stage failed")
    assert not path.exists() and not list(tmp_path.iterdir())
    with ContactSheet(path, ("source",), total=3, rows=3):
        pass
    assert not path.exists()  # no frame was added: no sheet
    assert ContactSheet(path, ("source",), total=3).close() is None


def test_a_row_needs_one_image_per_column(tmp_path: Path) -> None:
    sheet = ContactSheet(tmp_path / "c.png", ("a", "b"), total=2)
    with pytest.raises(ValueError, match="expected 2 images"):
        sheet.row(0, images(0))
    with pytest.raises(ValueError, match="at least one column"):
        ContactSheet(tmp_path / "c.png", (), total=2)


# --- through the generate stage -------------------------------------------------------------------------


def test_the_stage_writes_a_contact_sheet_of_its_frames(tmp_path: Path) -> None:
    """contact_sheet=3 on 5 frames: rows 0, 2 and 4, each as source / matte / result, where result is
    the ``video`` output's picture: the generated colours over the input under the alpha."""
    frames = person_frames(5, width=96, height=64)
    src = write_rgba(tmp_path / "in.mkv", frames)
    out = tmp_path / "out"
    result = generate.run(src, out, model="multistyle26", style="19", provider="cpu", outputs="rgba",
                          contact_sheet=3)
    assert result.outputs == (out / "generated_rgba.mkv", out / "contact.png")  # the sheet comes last
    generated = read_all(result.outputs[0])
    png = cv2.imread(str(result.outputs[1]), cv2.IMREAD_UNCHANGED)
    tile_w = round(96 * TILE / 64)  # 270
    assert png is not None and png.shape == (HEADER + 3 * TILE + 2 * GAP, 3 * tile_w + 2 * GAP, 3)
    for r, i in enumerate((0, 2, 4)):
        top = HEADER + r * (TILE + GAP)
        source, alpha = frames[i][:, :, :3], frames[i][:, :, 3]
        picture = composite(generated[i][:, :, :3], alpha, source)
        want = [source, cv2.cvtColor(alpha, cv2.COLOR_GRAY2BGR), picture]
        for c, image in enumerate(want):
            tile = png[top : top + TILE, c * (tile_w + GAP) : c * (tile_w + GAP) + tile_w]
            scaled = cv2.resize(image, (tile_w, TILE), interpolation=cv2.INTER_AREA)
            keep = np.ones((TILE, tile_w), bool)
            if c == 0:
                keep[LABEL] = False
            assert np.array_equal(tile[keep], scaled[keep]), (i, c)
        # and the result tile is not the source: the person was restyled
        person = cv2.resize(alpha, (tile_w, TILE), interpolation=cv2.INTER_AREA) == 255
        result_tile = png[top : top + TILE, 2 * (tile_w + GAP) : 2 * (tile_w + GAP) + tile_w]
        source_tile = png[top : top + TILE, 0:tile_w]
        assert np.abs(result_tile[person].astype(int) - source_tile[person]).mean() > 20


def test_an_interrupted_stage_writes_no_contact_sheet(tmp_path: Path) -> None:
    src = write_rgba(tmp_path / "in.mkv", person_frames(4, width=96, height=64))
    with pytest.raises(KeyboardInterrupt):
        generate.run(src, tmp_path / "out", InterruptAt(generate.NAME, 4), model="multistyle26", provider="cpu",
                     contact_sheet=2)
    assert not any((tmp_path / "out").iterdir())  # neither the video nor the sheet, nor a temporary file
