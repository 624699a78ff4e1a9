"""The visual report of a batch run: one page an operator opens to see which clips went wrong and why.

    page = write_report(summary, out)   # out/report.html, its images in out/report/

``summary`` is what ``cuepipe batch`` writes to ``<out>/batch_summary.json`` (``orchestrator/batch.py``).
The page shows the batch's numbers, the failed clips first (kind and message), where the time went
(an inline SVG chart: per stage, and per clip stacked by stage) and a card per clip with its numbers,
its outputs as relative links and, for a clip done (in this run or one before), a contact sheet: the first, middle and
last frame of the source, the alpha and the result side by side.

Self-contained, so the output folder can be copied or mailed as it is: no CDN, no web font, no script;
CSS and SVG are inline and the sheets are PNGs in ``report/``, linked relatively. Written atomically:
the images go to a hidden folder that replaces ``report/`` by rename, then the page to a hidden file
renamed onto ``report.html``; a reader never sees a half-written page. A clip whose videos cannot be
decoded is shown without its sheet (a warning is logged): one broken clip must not cost the report.
"""

from __future__ import annotations

import html
import logging
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np

from cuepipe.stages.contactsheet import grid, pick_frames, write_png
from cuepipe.stages.errors import CuepipeError
from cuepipe.stages.rgba import RgbaReader
from cuepipe.stages.video import VideoReader

__all__ = ["ROWS", "TILE_HEIGHT", "write_report"]

log = logging.getLogger(__name__)

TILE_HEIGHT = 120  # pixels of one contact-sheet tile
ROWS = 3  # frames per sheet: first, middle, last
_IMAGES = ("report", "report_cuepipe")  # the image folder; the second if an input folder is called "report"
_MARKER = ".cuepipe-report"  # in our image folder: only a folder holding it is ever replaced
_VIDEO = (".mp4", ".mkv", ".mov", ".avi", ".webm")
_RESULTS = ("composite.mp4", "generated.mp4", "foreground.mp4")
_RGBA = ("_matte_rgba.mkv", "_generated_rgba.mkv", "_rgba.mkv")  # the matte's own alpha first
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f")
_ORDER = {"failed": 0, "cancelled": 1, "done": 2, "skipped": 3}  # the cards' order; any other status last
_DECODE_ERRORS = (CuepipeError, OSError, ValueError, cv2.error)

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;padding:16px 24px;
background:#f4f5f7;color:#1d2330}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 8px}
.meta{color:#5b6475;font-size:13px}.meta code{font-size:12px}
.counts{display:flex;flex-wrap:wrap;gap:8px;margin:12px 0}
.count{background:#fff;border:1px solid #d9dde4;border-radius:6px;padding:6px 12px}
.count b{font-size:18px;display:block}
.count.alarm{padding:6px 12px}.count.failed b{color:#c62828}.count.cancelled b{color:#ef6c00}
.count.done b{color:#2e7d32}.count.skipped b{color:#757575}
.alarm{background:#fdecea;border:2px solid #c62828;border-radius:6px;padding:8px 14px}
.alarm h2{color:#c62828;margin:4px 0}.alarm li{margin:2px 0}
.ok{background:#e8f5e9;border:1px solid #2e7d32;border-radius:6px;padding:8px 14px;color:#1b5e20}
.card{display:flex;flex-wrap:wrap;gap:16px;background:#fff;border:1px solid #d9dde4;border-left:8px solid #9e9e9e;
border-radius:6px;padding:10px 14px;margin:10px 0}
.card.failed{border-left-color:#c62828;background:#fffafa}.card.done{border-left-color:#2e7d32}
.card.skipped{color:#5b6475}.card.cancelled{border-left-color:#ef6c00}
.info{flex:1 1 340px;min-width:300px}
.name{font-size:15px;font-weight:600;word-break:break-all;margin:0 0 6px}
.badge{display:inline-block;border-radius:4px;padding:1px 8px;font-size:12px;font-weight:700;color:#fff;
margin-right:8px;vertical-align:1px;text-transform:uppercase}
.badge.failed{background:#c62828}.badge.done{background:#2e7d32}.badge.skipped{background:#9e9e9e}
.badge.cancelled{background:#ef6c00}.badge.pending{background:#607d8b}
table.nums{border-collapse:collapse;margin:4px 0}table.nums td{padding:1px 12px 1px 0}
table.nums td:first-child{color:#5b6475}
.outputs{margin:6px 0 0;padding-left:18px;word-break:break-all}
.error{background:#fdecea;border:1px solid #ef9a9a;border-radius:4px;padding:6px 10px;margin:6px 0;
white-space:pre-wrap;word-break:break-word;font:13px/1.35 ui-monospace,"DejaVu Sans Mono",monospace;color:#8e0000}
.kind{font-weight:700;color:#c62828}
.note{color:#8a6d00;font-size:13px}
.sheet img{display:block;border-radius:3px;max-width:100%}
.chart{background:#fff;border:1px solid #d9dde4;border-radius:6px;padding:8px;overflow-x:auto}
.legend span{display:inline-block;margin-right:14px;font-size:13px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
a{color:#1a57b5}
"""


def write_report(summary: Mapping[str, Any], out: Path) -> Path:
    """Write ``out/report.html`` and its images in ``out/report/`` for a batch ``summary``; the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = next((out / n for n in _IMAGES if not (out / n).exists() or (out / n / _MARKER).exists()), None)
    if folder is None:
        raise FileExistsError(f"{out}: {' and '.join(_IMAGES)} exist and are not a report's images")
    if folder.name != _IMAGES[0]:
        log.warning("%s is not a report's folder (an input folder of that name?): images go to %s",
                    out / _IMAGES[0], folder)
    page = out / "report.html"
    part = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=out))
    old = out / f".{folder.name}.{secrets.token_hex(4)}.old"
    page_part: Path | None = None
    try:
        os.chmod(part, 0o755)  # mkdtemp makes it 0700: the page is for everyone who can read out/
        (part / _MARKER).write_text("the images of report.html, replaced by every report\n", encoding="utf-8")
        items = [dict(item) for item in summary.get("items") or ()]
        # done in this run or before (a resumed batch): its outputs are there either way
        sheets = {n: _sheet(item, part / f"clip_{n:04d}.png") for n, item in enumerate(items)
                  if item.get("status") in ("done", "skipped")}
        page_part = _write_part(out, ".report.html.", _page(summary, items, sheets, out, folder.name))
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(part, folder)
        except OSError:
            if old.exists():
                os.replace(old, folder)  # the previous page keeps its images
            raise
        os.replace(page_part, page)
    finally:
        shutil.rmtree(part, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        if page_part is not None:
            page_part.unlink(missing_ok=True)
    log.info("batch report: %s", page)
    return page


def _write_part(folder: Path, prefix: str, text: str) -> Path:
    """``text`` in a new hidden temporary file in ``folder`` (UTF-8, mode 0644), to be renamed into place."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(name, 0o644)  # mkstemp makes it 0600
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


# --- contact sheets ------------------------------------------------------------------------------------


def _thumb(image: np.ndarray, alpha: bool = False) -> np.ndarray:
    """``image`` (its 4th channel if ``alpha``) scaled to the tile height now: a 4K clip's sheet stays small."""
    if alpha:
        image = np.ascontiguousarray(image[:, :, 3])
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, round(w * TILE_HEIGHT / h)), TILE_HEIGHT), interpolation=cv2.INTER_AREA)


def _frames_at(path: Path, wanted: Sequence[int], alpha: bool = False) -> list[np.ndarray]:
    """Thumbnails of frames ``wanted`` (sorted) of ``path``; ``alpha``: the 4th channel, via RgbaReader.

    One sequential pass up to the last wanted frame. Where the clip ends early (a frame count is an
    estimate), its last frame stands in for the frames it does not have.
    """
    picked: list[np.ndarray] = []
    last: np.ndarray | None = None
    reader: RgbaReader | VideoReader = RgbaReader(path) if alpha else VideoReader(path)
    with reader:
        if isinstance(reader, RgbaReader) and not reader.has_alpha:
            raise ValueError(f"{path} has no alpha channel")
        for index, frame in enumerate(reader):
            last = frame
            if index in wanted:
                picked.append(_thumb(frame, alpha))
            if index >= wanted[-1]:
                break
    if last is None:
        raise ValueError(f"no frames in {path}")
    return picked + [_thumb(last, alpha)] * (len(wanted) - len(picked))


def _columns(item: Mapping[str, Any]) -> list[tuple[str, Path, bool]]:
    """(name, path, read alpha) of the sheet's columns: source, alpha, result; those the item has."""
    outputs = [Path(o) for o in item.get("outputs") or ()]
    videos = [o for o in outputs if o.suffix.lower() in _VIDEO or o.is_dir()]
    columns = [("source", Path(str(item.get("input", ""))), False)]
    alpha = next((o for o in videos if o.name.endswith("alpha.mp4")), None)
    rgba = next((o for name in _RGBA for o in videos if o.name.endswith(name)), None)
    if alpha is not None:
        columns.append(("alpha", alpha, False))
    elif rgba is not None:
        columns.append(("alpha", rgba, True))
    result = next((o for name in _RESULTS for o in videos if o.name.endswith(f"_{name}")), None)
    result = result or next((o for o in videos if o != alpha), None)
    if result is not None:
        columns.append(("result", result, False))
    return columns


def _sheet(item: Mapping[str, Any], path: Path) -> Path | str:
    """The contact sheet of a done item written at ``path``; else why there is none (for the page)."""
    columns = _columns(item)
    try:
        frames = int(item.get("frames") or 0)
        if frames <= 0:
            with VideoReader(columns[0][1]) as reader:
                frames = reader.frame_count
        wanted = pick_frames(frames, ROWS) or (0,)
        images = [_frames_at(columns[0][1], wanted)]
    except _DECODE_ERRORS as exc:
        log.warning("no contact sheet for %s: the source cannot be decoded: %s", item.get("relative"), exc)
        return f"no contact sheet: the source cannot be decoded ({exc})"
    names = ["source"]
    for name, video, alpha in columns[1:]:
        try:
            images.append(_frames_at(video, wanted, alpha))
            names.append(name)
        except _DECODE_ERRORS as exc:
            log.warning("contact sheet of %s: no %s column, %s cannot be decoded: %s",
                        item.get("relative"), name, video, exc)
    tiles = [(f"{name} {index}", column[row]) for row, index in enumerate(wanted)
             for name, column in zip(names, images, strict=True)]
    return write_png(path, grid(tiles, len(names), TILE_HEIGHT))


# --- the page ------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _first_line(text: object) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0] if lines else "(no message)"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(round(s), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {sec:02d} s"


def _href(target: Path, out: Path) -> str:
    """A relative, percent-encoded link from the page in ``out`` to ``target`` (a file URI across drives)."""
    try:
        return quote(Path(os.path.relpath(target, out)).as_posix())
    except ValueError:
        return target.absolute().as_uri()


def _stage_keys(items: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """The pipeline's (index, stage) pairs as the items report them, in order."""
    return sorted({(int(s.get("index", 0)), str(s.get("stage", "?"))) for i in items for s in i.get("stages") or ()})


def _tick(top: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about five ticks up to ``top``."""
    raw = top / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _chart(items: Sequence[Mapping[str, Any]], keys: Sequence[tuple[int, str]]) -> str:
    """Inline SVG: seconds per stage (summed over clips), then per clip stacked by stage, on one axis each."""
    colour = {k: _PALETTE[n % len(_PALETTE)] for n, k in enumerate(keys)}
    per_stage = {k: 0.0 for k in keys}
    rows = []
    for n, item in enumerate(items):
        stages = () if item.get("status") == "skipped" else item.get("stages") or ()  # an earlier run's time
        parts = [((int(s.get("index", 0)), str(s.get("stage", "?"))), float(s.get("seconds") or 0.0)) for s in stages]
        for key, sec in parts:
            per_stage[key] += sec
        rows.append((n, str(item.get("relative", "")), parts))
    left, width, row_h = 300, 520, 20
    svg: list[str] = []
    y = 0

    def axis(top: float) -> None:
        nonlocal y
        step = _tick(top)
        for t in range(int(top / step) + 1):
            x = left + t * step * width / top
            svg.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 5}" stroke="#888"/>'
                       f'<text x="{x:.1f}" y="{y + 17}" text-anchor="middle" class="t">{t * step:g} s</text>')
        svg.append(f'<line x1="{left}" y1="{y}" x2="{left + width}" y2="{y}" stroke="#888"/>')
        y += 34

    def heading(text: str) -> None:
        nonlocal y
        svg.append(f'<text x="0" y="{y + 14}" class="h">{_e(text)}</text>')
        y += 24

    total = sum(per_stage.values())
    if total <= 0:
        return ('<p class="note">No stage finished in this run: every clip was done before, or failed in its first '
                "stage (the cards below say why).</p>")
    top = max([*per_stage.values(), 1e-3])
    heading("Seconds per stage, summed over all clips")
    for key in keys:
        sec = per_stage[key]
        w = sec * width / top
        svg.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{_e(f"{key[0]} {key[1]}")}</text>'
                   f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}" fill="{colour[key]}">'
                   f'<title>{_e(key[1])}: {sec:.2f} s</title></rect>'
                   f'<text x="{left + w + 6:.1f}" y="{y + 14}">{sec:.1f} s ({100 * sec / (total or 1):.0f} %)</text>')
        y += row_h
    axis(top)
    top = max([sum(sec for _, sec in parts) for _, _, parts in rows] + [1e-3])
    heading("Seconds per clip, by stage")
    for n, name, parts in rows:
        label = name if len(name) <= 42 else "…" + name[-41:]
        svg.append(f'<a href="#clip-{n}"><text x="{left - 8}" y="{y + 14}" text-anchor="end">{_e(label)}'
                   f'<title>{_e(name)}</title></text></a>')
        x = float(left)
        for key, sec in parts:
            w = sec * width / top
            svg.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}" fill="{colour[key]}">'
                       f'<title>{_e(name)} — {_e(key[1])}: {sec:.2f} s</title></rect>')
            x += w
        status = str(items[n].get("status", ""))
        note = {"skipped": "already done", "failed": " (failed)", "cancelled": " (cancelled)"}.get(status, "")
        if status != "skipped":  # a clip that failed in its first stage has no stage time: its Job's own counts
            seconds = sum(sec for _, sec in parts) if parts else float(items[n].get("seconds") or 0.0)
            note = f"{seconds:.1f} s{note}"
        svg.append(f'<text x="{x + 6:.1f}" y="{y + 14}" class="{_e(status)}">{_e(note)}</text>')
        y += row_h
    axis(top)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 130}" height="{y}" '
            f'font-size="12" font-family="system-ui,DejaVu Sans,sans-serif">'
            '<style>.t{fill:#555}.h{font-weight:700;font-size:13px}.failed{fill:#c62828}.skipped{fill:#777}'
            '</style>' + "".join(svg) + "</svg>")


def _card(n: int, item: Mapping[str, Any], sheet: Path | str | None, out: Path, folder: str) -> str:
    """One clip: status, name, numbers, outputs, the failure or the contact sheet."""
    status = str(item.get("status", "?"))
    label = {"skipped": "already done"}.get(status, status)
    seconds, frames = float(item.get("seconds") or 0.0), int(item.get("frames") or 0)
    fps, written = float(item.get("fps") or 0.0), float(item.get("bytes") or 0)
    nums = [("frames", f"{frames}", frames), ("fps", f"{fps:.1f}", fps), ("seconds", _seconds(seconds), True),
            ("written", _bytes(written), written)]
    nums = [(k, v, shown) for k, v, shown in nums if shown or status != "failed"]  # no zeros on a failure
    parts = [f'<div class="card {_e(status)}" id="clip-{n}"><div class="info">',
             f'<p class="name"><span class="badge {_e(status)}">{_e(label)}</span>'
             f'<span title="{_e(item.get("input", ""))}">{_e(item.get("relative", ""))}</span></p>']
    if status == "failed":
        parts.append(f'<div><span class="kind">{_e(item.get("kind") or "failed")}</span></div>'
                     f'<div class="error">{_e(item.get("error") or "(no message)")}</div>')
    if status != "skipped":
        parts.append('<table class="nums">' + "".join(f"<tr><td>{k}</td><td>{_e(v)}</td></tr>" for k, v, _ in nums)
                     + "</table>")
    outputs = [Path(o) for o in item.get("outputs") or ()]
    if outputs:
        parts.append('<ul class="outputs">' + "".join(
            f'<li><a href="{_e(_href(o, out))}">{_e(o.name)}</a></li>' for o in outputs) + "</ul>")
    if isinstance(sheet, str):
        parts.append(f'<p class="note">{_e(sheet)}</p>')
    parts.append("</div>")
    if isinstance(sheet, Path):
        src = _e(f"{folder}/{quote(sheet.name)}")
        parts.append(f'<div class="sheet"><a href="{src}"><img src="{src}" alt="contact sheet: source, alpha and '
                     f'result at the first, middle and last frame"></a></div>')
    parts.append("</div>")
    return "".join(parts)


def _page(summary: Mapping[str, Any], items: Sequence[Mapping[str, Any]], sheets: Mapping[int, Path | str],
          out: Path, folder: str) -> str:
    """The whole HTML page."""
    count = {s: sum(1 for i in items if i.get("status") == s) for s in ("done", "failed", "skipped", "cancelled")}
    seconds = float(summary.get("seconds") or 0.0)
    written = sum(int(i.get("bytes") or 0) for i in items if i.get("status") == "done")
    frames = sum(int(i.get("frames") or 0) for i in items if i.get("status") == "done")

    def rate(n: float) -> float:
        return n / seconds if seconds > 0 else 0.0

    pipeline = str(summary.get("pipeline", "?"))
    head = [("failed alarm" if count["failed"] else "failed", count["failed"], "failed"),
            ("done", count["done"], "done"), ("skipped", count["skipped"], "already done (skipped)"),
            *([("cancelled", count["cancelled"], "cancelled")] if count["cancelled"] else []),
            ("", _seconds(seconds), "total time"),
            ("", _bytes(written), "written"), ("", f"{_bytes(rate(written))}/s", "write rate"),
            ("", f"{rate(count['done']) * 3600:.1f}", "clips per hour"), ("", f"{rate(frames):.1f}", "frames / s")]
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
             '<meta name="viewport" content="width=device-width, initial-scale=1">'
             f"<title>cuepipe batch {_e(pipeline)}: {count['failed']} failed, {count['done']} done</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>cuepipe batch — pipeline <code>{_e(pipeline)}</code></h1>",
             f'<div class="meta">started {_e(summary.get("started", "?"))} · {len(items)} clips · output '
             f'<code>{_e(summary.get("out", out))}</code> · definition '
             f'<code title="{_e(summary.get("definition", ""))}">{_e(str(summary.get("definition", ""))[:12])}'
             "</code></div>",
             '<div class="counts">' + "".join(f'<div class="count {css}"><b>{_e(value)}</b>{_e(label)}</div>'
                                              for css, value, label in head) + "</div>"]
    failed = [(n, i) for n, i in enumerate(items) if i.get("status") == "failed"]
    if failed:
        parts.append(f'<div class="alarm"><h2>{len(failed)} of {len(items)} clips failed</h2><ul>' + "".join(
            f'<li><a href="#clip-{n}">{_e(i.get("relative", ""))}</a> — <span class="kind">'
            f'{_e(i.get("kind") or "failed")}</span>: {_e(_first_line(i.get("error")))}</li>'
            for n, i in failed) + "</ul></div>")
    else:
        parts.append('<div class="ok">No clip failed.</div>')
    keys = _stage_keys(items)
    if keys:
        parts.append('<h2>Where the time went</h2><div class="chart"><div class="legend">' + "".join(
            f'<span><i style="background:{_PALETTE[n % len(_PALETTE)]}"></i>{_e(f"{k[0]} {k[1]}")}</span>'
            for n, k in enumerate(keys)) + f"</div>{_chart(items, keys)}</div>")
    parts.append("<h2>Clips (failed first)</h2>")
    order = sorted(range(len(items)), key=lambda n: (_ORDER.get(str(items[n].get("status")), 3), n))
    parts += [_card(n, items[n], sheets.get(n), out, folder) for n in order]
    parts.append("</body></html>\n")
    return "\n".join(parts)
