"""A contact sheet: a few frames of a job side by side in one PNG, to see what it did without a player.

    sheet = ContactSheet(path, ("source", "matte", "styled"), total=expected, rows=4)
    with sheet:                                   # written on a clean exit only, atomically
        for i, frame in enumerate(frames):
            if sheet.wanted(i):
                sheet.write(sheet.row(i, [source, alpha, result]))

Rows are frames spread evenly over the clip (the first and the last included); columns are the
named images of each frame (BGR, BGRA or gray uint8 of any size), scaled to ``tile_height``, with
the column names on top and the frame number in each row's first tile. ``write`` has the
``FrameWriter`` shape (``stages/framepipe.py``), so a sheet can be a sink of the frame pipeline:
its ``convert`` returns ``row(...)`` for a wanted frame and ``SKIP`` for the others.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

__all__ = ["SKIP", "ContactSheet", "grid", "pick_frames", "write_png"]

log = logging.getLogger(__name__)

SKIP = np.empty((0, 0, 3), np.uint8)  # what a sink's convert returns for a frame that is not on the sheet
_HEADER = 26  # pixels of the column-name strip
_GAP = 4  # pixels between tiles
_BACKGROUND = (32, 32, 32)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def pick_frames(total: int, rows: int) -> tuple[int, ...]:
    """``rows`` frame indices spread evenly over ``0 .. total - 1``, first and last included."""
    if total <= 0 or rows <= 0:
        return ()
    n = min(rows, total)
    if n == 1:
        return (0,)
    return tuple(sorted({round(i * (total - 1) / (n - 1)) for i in range(n)}))


def _bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _label(image: np.ndarray, text: str, x: int, y: int, scale: float = 0.5) -> None:
    """White text on a dark box, top-left at (x, y)."""
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    cv2.rectangle(image, (x, y), (x + w + 8, y + h + base + 6), (0, 0, 0), -1)
    cv2.putText(image, text, (x + 4, y + h + 3), _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def grid(tiles: Sequence[tuple[str, np.ndarray]], columns: int, tile_height: int = 180) -> np.ndarray:
    """Labelled images (BGR, BGRA or gray) scaled to ``tile_height``, ``columns`` per row, as one BGR image."""
    if not tiles or columns < 1:
        raise ValueError("a grid needs at least one tile and one column")
    scaled = []
    for label, image in tiles:
        h, w = image.shape[:2]
        tile = cv2.resize(_bgr(image), (max(1, round(w * tile_height / h)), tile_height), interpolation=cv2.INTER_AREA)
        _label(tile, label, 4, 4)
        scaled.append(tile)
    tile_w = max(t.shape[1] for t in scaled)
    rows = -(-len(scaled) // columns)
    out = np.full((rows * (tile_height + _GAP) - _GAP, columns * (tile_w + _GAP) - _GAP, 3), _BACKGROUND, np.uint8)
    for i, tile in enumerate(scaled):
        y, x = (i // columns) * (tile_height + _GAP), (i % columns) * (tile_w + _GAP)
        out[y : y + tile_height, x : x + tile.shape[1]] = tile
    return out


def write_png(path: Path | str, image: np.ndarray) -> Path:
    """``image`` as a PNG at ``path``, atomically (temp file beside it, then rename), mode 0644."""
    path = Path(path)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.tobytes())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a picture is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class ContactSheet:
    """Collects labelled rows of thumbnails and writes them as one PNG at ``path`` (module docstring)."""

    def __init__(self, path: Path | str, columns: Sequence[str], total: int, rows: int = 4,
                 tile_height: int = 180) -> None:
        if not columns:
            raise ValueError("a contact sheet needs at least one column")
        self.path, self.columns, self.tile_height = Path(path), tuple(columns), tile_height
        self.frames = pick_frames(total, rows)
        self._rows: list[np.ndarray] = []

    def wanted(self, index: int) -> bool:
        return index in self.frames

    def row(self, index: int, images: Sequence[np.ndarray]) -> np.ndarray:
        """One labelled row: ``images`` (one per column) scaled to the tile height, side by side."""
        if len(images) != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} images ({', '.join(self.columns)}), got {len(images)}")
        tiles = []
        for image in images:
            h, w = image.shape[:2]
            size = (max(1, round(w * self.tile_height / h)), self.tile_height)
            tiles.append(cv2.resize(_bgr(image), size, interpolation=cv2.INTER_AREA))
        gap = np.full((self.tile_height, _GAP, 3), _BACKGROUND, np.uint8)
        row = np.hstack([part for tile in tiles for part in (tile, gap)][:-1])
        _label(row, f"frame {index}", 4, 4)
        return row

    def write(self, row: np.ndarray) -> None:
        """Keep a row from ``row``; ``SKIP`` (an empty image) is ignored."""
        if row.size:
            self._rows.append(row)

    def abort(self) -> None:
        """Forget every row: nothing is written."""
        self._rows.clear()

    def image(self) -> np.ndarray:
        """The sheet: the column names on top, then every row kept, in order."""
        if not self._rows:
            raise ValueError("no rows: no frame was added")
        width = max(r.shape[1] for r in self._rows)
        gap = np.full((_GAP, width, 3), _BACKGROUND, np.uint8)
        header = np.full((_HEADER, width, 3), _BACKGROUND, np.uint8)
        first = self._rows[0]
        tile_w = (first.shape[1] - _GAP * (len(self.columns) - 1)) // len(self.columns)
        for i, name in enumerate(self.columns):
            cv2.putText(header, name, (i * (tile_w + _GAP) + 6, _HEADER - 8), _FONT, 0.55, (235, 235, 235), 1,
                        cv2.LINE_AA)
        parts = [header]
        for r in self._rows:
            if r.shape[1] < width:
                r = np.hstack([r, np.full((r.shape[0], width - r.shape[1], 3), _BACKGROUND, np.uint8)])
            parts += [r, gap]
        return np.vstack(parts[:-1])

    def close(self) -> Path | None:
        """Write the PNG atomically (temp file, then rename); None when no frame was added."""
        if not self._rows:
            log.info("contact sheet %s: no frames, not written", self.path)
            return None
        return write_png(self.path, self.image())

    def __enter__(self) -> ContactSheet:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
