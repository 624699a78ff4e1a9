"""The batch report (``orchestrator/report.py``): a page that shows every clip escaped, failures first,
contact sheets of real clips, a source that cannot be decoded, atomic replacement, and the page as
headless Chromium draws it (where one is installed)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cuepipe.orchestrator.report import ROWS, TILE_HEIGHT, write_report
from cuepipe.stages.democlip import render_frames, write_clip
from cuepipe.stages.video import VideoWriter
from tests.support.rgba import person_frames, write_rgba

W, H, FPS, FRAMES = 160, 96, 24.0, 12
GAP = 4  # contactsheet._GAP: pixels between tiles
SHEET = (ROWS * (TILE_HEIGHT + GAP) - GAP, 3 * (round(W * TILE_HEIGHT / H) + GAP) - GAP, 3)  # 3 x 3 tiles
MESSAGE = 'not a video: <script>alert("x")</script> & moov atom not found'


def _item(root: Path, relative: str, status: str, outputs: list[Path] | None = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "input": str(root / "in" / relative), "relative": relative, "status": status, "frames": FRAMES,
        "fps": 11.5, "seconds": 1.2, "outputs": [str(o) for o in outputs or ()],
        "bytes": sum(o.stat().st_size for o in outputs or () if o.exists()), "error": "", "kind": "",
        "stages": [{"index": 0, "stage": "preprocess", "seconds": 0.2},
                   {"index": 1, "stage": "matting", "seconds": 1.0}],
    }
    item.update(extra)
    return item


def _matte_outputs(source: Path, out: Path, seed: int) -> list[Path]:
    """``<stem>_alpha.mp4`` (gray H.264) and ``<stem>_composite.mp4`` (the figure over green), as matte writes."""
    out.mkdir(parents=True, exist_ok=True)
    alpha, comp = out / f"{source.stem}_alpha.mp4", out / f"{source.stem}_composite.mp4"
    with VideoWriter(alpha, W, H, FPS, codec="h264", channels=1) as a, \
            VideoWriter(comp, W, H, FPS, codec="h264", channels=3) as c:
        for frame, mask in render_frames(W, H, FRAMES, seed=seed):
            a.write(mask)
            weight = mask[:, :, None].astype(np.float32) / 255
            c.write((frame * weight + np.array([40, 200, 40]) * (1 - weight)).astype(np.uint8))
    return [alpha, comp]


def batch(root: Path) -> dict[str, Any]:
    """A summary as ``cuepipe batch`` writes it, over real clips in ``root/in`` and outputs in ``root/out``."""
    inp, out = root / "in", root / "out"
    done = inp / "a b" / "clip é.mp4"
    write_clip(done, None, width=W, height=H, frames=FRAMES, fps=FPS, seed=1)
    rgba = inp / "take <2> & more.mp4"
    write_clip(rgba, None, width=W, height=H, frames=FRAMES, fps=FPS, seed=2)
    frames = person_frames(FRAMES, seed=2, width=W, height=H)
    matte_rgba = write_rgba(out / f"{rgba.stem}_matte_rgba.mkv", frames, FPS)
    generated = out / f"{rgba.stem}_generated.mp4"
    with VideoWriter(generated, W, H, FPS, codec="h264", channels=3) as writer:
        for frame in frames:
            writer.write(np.ascontiguousarray(255 - frame[:, :, :3]))
    corrupt = inp / "corrupt" / "ñame.mp4"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a video")
    return {
        "pipeline": "matte", "definition": "3f2a" * 16, "out": str(out), "started": "2026-11-30T14:00:00",
        "seconds": 9.5,
        "items": [
            _item(root, "a b/clip é.mp4", "done", _matte_outputs(done, out / "a b", seed=1)),
            _item(root, "broken/bad clip.mp4", "failed", error=MESSAGE + "\nsecond line", kind="input_invalid",
                  frames=0, fps=0.0, bytes=0, stages=[{"index": 0, "stage": "preprocess", "seconds": 0.3}]),
            _item(root, "old/take 1.mp4", "skipped", [out / "old" / "take 1_alpha.mp4"]),  # an earlier run's times
            _item(root, rgba.name, "done", [matte_rgba, generated]),
            _item(root, "corrupt/ñame.mp4", "done", [], seconds=0.4),
            _item(root, "late.mp4", "cancelled", [], frames=0, stages=[]),
        ],
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    root = tmp_path_factory.mktemp("batch")
    summary = batch(root)
    page = write_report(summary, root / "out")
    return summary, page, page.read_text(encoding="utf-8")


def _sheets(text: str) -> list[str]:
    return re.findall(r'<img src="(report/[^"]+\.png)"', text)


def test_every_clip_is_shown_escaped_with_failures_first(report: tuple[dict[str, Any], Path, str]) -> None:
    summary, page, text = report
    assert page == Path(summary["out"]) / "report.html"
    for item in summary["items"]:
        assert f">{item['relative'].replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}<" in text
    assert "take <2>" not in text and "<script>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; moov atom not found" in text
    assert "input_invalid" in text and "already done" in text
    alarm = text.index('class="alarm"')
    assert "1 of 6 clips failed" in text and text.index('href="#clip-1"', alarm) < text.index('class="card')
    cards = re.findall(r'<div class="card (\w+)" id="clip-(\d+)"', text)
    assert cards == [("failed", "1"), ("cancelled", "5"), ("done", "0"), ("done", "3"), ("done", "4"),
                     ("skipped", "2")]
    assert 'href="a%20b/clip%20%C3%A9_alpha.mp4"' in text  # relative, percent-encoded


def test_the_timing_chart_sums_this_runs_seconds_per_stage(report: tuple[dict[str, Any], Path, str]) -> None:
    """Three done clips (0.2 + 1.0 s) and a failure (0.3 s); the skipped clip's times are an earlier run's."""
    _, _, text = report
    svg = text[text.index("<svg"):text.index("</svg>")]
    assert ">0 preprocess</text>" in svg and ">1 matting</text>" in svg
    assert ">0.9 s (23 %)</text>" in svg and ">3.0 s (77 %)</text>" in svg
    assert ">1.2 s</text>" in svg and ">0.3 s (failed)</text>" in svg and ">already done</text>" in svg
    assert ">0 s</text>" in svg and ">1 s</text>" in svg  # the seconds axis


def test_the_page_is_self_contained_and_leaves_no_temporary_files(report: tuple[dict[str, Any], Path, str]) -> None:
    _, page, text = report
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text, re.IGNORECASE)
    assert "@import" not in text and "<script" not in text.lower() and "<link" not in text.lower()
    urls = {u for u in re.findall(r"https?://[^\s\"'<>]+", text)}
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace is a name, never fetched
    hidden = [p.name for p in page.parent.iterdir() if p.name.startswith(".") and p.name != ".cuepipe-work"]
    assert hidden == []
    assert sorted(p.name for p in (page.parent / "report").iterdir()) == [
        ".cuepipe-report", "clip_0000.png", "clip_0003.png"]


def test_contact_sheets_show_source_alpha_and_result_at_three_frames(
        report: tuple[dict[str, Any], Path, str]) -> None:
    _, page, text = report
    sheets = _sheets(text)
    assert sheets == ["report/clip_0000.png", "report/clip_0003.png"]
    for name in sheets:
        image = cv2.imread(str(page.parent / name))
        assert image is not None and image.shape == SHEET
    # the second clip's alpha column comes from the 4th channel of its _matte_rgba.mkv: gray, with the figure
    image = cv2.imread(str(page.parent / sheets[1]))
    tile_w = (SHEET[1] - 2 * GAP) // 3
    alpha = image[30:TILE_HEIGHT, tile_w + GAP: 2 * tile_w + GAP].astype(int)  # below the label
    assert np.abs(alpha[:, :, 0] - alpha[:, :, 2]).max() <= 2  # gray
    assert (alpha > 200).mean() > 0.03 and (alpha < 50).mean() > 0.3  # a figure on a black background


def test_an_rgba_output_without_alpha_gives_no_alpha_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A ``_source_rgba.mkv`` stored without alpha is no matte: the sheet shows source and result only."""
    source = tmp_path / "in" / "s.mp4"
    write_clip(source, None, width=W, height=H, frames=FRAMES, fps=FPS, seed=4)
    rgba = tmp_path / "out" / "s_source_rgba.mkv"
    rgba.parent.mkdir()
    with VideoWriter(rgba, W, H, FPS, codec="utvideo", channels=3) as writer:
        for frame, _ in render_frames(W, H, FRAMES, seed=4):
            writer.write(frame)
    summary = {"pipeline": "p", "seconds": 1.0, "items": [_item(tmp_path, "s.mp4", "done", [rgba])]}
    with caplog.at_level(logging.WARNING, logger="cuepipe.orchestrator.report"):
        page = write_report(summary, tmp_path / "out")
    [sheet] = _sheets(page.read_text(encoding="utf-8"))
    image = cv2.imread(str(page.parent / sheet))
    assert image is not None and image.shape == (SHEET[0], 2 * (round(W * TILE_HEIGHT / H) + GAP) - GAP, 3)
    assert any("no alpha column" in r.getMessage() for r in caplog.records)


def test_a_source_that_cannot_be_decoded_is_shown_without_a_sheet(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.mp4").write_bytes(b"not a video")
    summary = {"pipeline": "matte", "definition": "", "out": str(tmp_path / "out"), "started": "", "seconds": 1.0,
               "items": [_item(tmp_path, "x.mp4", "done", []), _item(tmp_path, "gone.mp4", "done", [])]}
    with caplog.at_level(logging.WARNING, logger="cuepipe.orchestrator.report"):
        text = write_report(summary, tmp_path / "out").read_text(encoding="utf-8")
    assert _sheets(text) == []
    assert text.count("no contact sheet: the source cannot be decoded") == 2
    assert sum("no contact sheet" in r.getMessage() for r in caplog.records) == 2


def test_a_new_report_replaces_the_old_one_and_never_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "report" / "clip_alpha.mp4").write_bytes(b"an output of an input folder called report")
    summary = {"pipeline": "p", "items": [_item(tmp_path, "a.mp4", "failed", error="boom", kind="stage_crashed")]}
    for _ in range(2):
        page = write_report(summary, out)
    assert (out / "report" / "clip_alpha.mp4").read_bytes().startswith(b"an output")  # untouched
    assert sorted(p.name for p in out.iterdir()) == ["report", "report.html", "report_cuepipe"]
    assert "stage_crashed" in page.read_text(encoding="utf-8")
    assert 'class="ok"' not in page.read_text(encoding="utf-8")


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_headless_chromium_draws_the_page(report: tuple[dict[str, Any], Path, str], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium / google-chrome on PATH")
    shot = tmp_path / "page.png"
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,1600",
           report[1].as_uri()]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: a hung browser is killed with its helpers
    try:
        proc.wait(timeout=90)
    finally:
        if os.name == "posix":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (1600, 1280)
    assert float(image.std()) > 20  # not blank: text, colours and sheets on the page
    assert (np.abs(image.astype(int) - (40, 40, 198)).sum(axis=2) < 60).sum() > 500  # the failed clips' red
