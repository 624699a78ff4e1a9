"""Flicker of the ``stylize`` generator on a still person: how much the styled person changes frame to frame.

    python bench/flicker.py [--frames 48] [--size 640x360] [--style 19] [--model multistyle26]

A still synthetic figure (``cuepipe.stages.democlip``, ``still``: only the sensor noise changes) is
written as H.264, matted by the real ``matting`` stage (``source_rgba``: the decoded picture and
RVM's matte, so the matte jitters as a real one does), then restyled by the real ``generate`` stage
in person mode with each steadiness setting. Flicker = the mean absolute difference of consecutive
frames over the figure's pixels (its exact mask, eroded by 4 px so that edges do not count), in
levels of 0..255, averaged over the colour channels and frames. The source's own flicker (noise and
codec) is the floor; "x source" is the styled flicker over it. Deterministic apart from thread
scheduling: the same numbers on every run on one machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from cuepipe.stages import generate, matting
from cuepipe.stages.democlip import render_frames, write_clip
from cuepipe.stages.rgba import RgbaReader

#: (label, generate parameters) in the order of the table; "(stylize)" marks the stylize pipeline's
VARIANTS: list[tuple[str, dict[str, object]]] = [
    ("none (a box per frame, no averaging)", {"hold_box": False, "smoothing": 0.0, "motion": 0}),
    ("hold_box", {"hold_box": True, "smoothing": 0.0, "motion": 0}),
    ("smoothing 0.5, plain (motion 0)", {"hold_box": False, "smoothing": 0.5, "motion": 0}),
    ("hold_box + smoothing 0.5 gated (motion 12)", {"hold_box": True, "smoothing": 0.5, "motion": 12}),
    ("hold_box + smoothing 0.8 gated", {"hold_box": True, "smoothing": 0.8, "motion": 12}),
    ("hold_box + denoise 0.8 gated", {"hold_box": True, "denoise": 0.8, "motion": 12}),
    ("hold_box + denoise 0.8 + smoothing 0.8 gated (stylize)", {"hold_box": True, "denoise": 0.8, "smoothing": 0.8,
                                                      "motion": 12}),
    ("hold_box + denoise 0.9 + smoothing 0.9 gated", {"hold_box": True, "denoise": 0.9, "smoothing": 0.9,
                                                      "motion": 12}),
]


def flicker(path: Path, mask: np.ndarray) -> float:
    """Mean |frame[t] - frame[t-1]| over ``mask`` pixels and colour channels, over all t >= 1."""
    diffs, previous = [], None
    with RgbaReader(path) as reader:
        for frame in reader:
            colour = frame[:, :, :3].astype(np.int16)
            if previous is not None:
                diffs.append(float(np.abs(colour - previous)[mask].mean()))
            previous = colour
    return float(np.mean(diffs))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", default="640x360", help="WxH, even")
    parser.add_argument("--style", default="19")
    parser.add_argument("--model", default="multistyle26")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    _, mask = next(render_frames(width, height, 1, seed=args.seed, still=True))
    inside = cv2.erode(mask, np.ones((9, 9), np.uint8)) == 255
    print(f"# still figure {width}x{height}, {args.frames} frames (H.264), matted by RVM; {args.model} style "
          f"{args.style}, person mode; {int(inside.sum())} figure pixels measured")
    with tempfile.TemporaryDirectory(prefix="cuepipe-flicker-") as tmp:
        work = Path(tmp)
        clip = work / "still.mp4"
        write_clip(clip, None, width, height, args.frames, seed=args.seed, still=True)
        matted = matting.run(clip, work / "matte", outputs="source_rgba", provider="cpu").outputs[0]
        source = flicker(matted, inside)
        rows = [("source (the floor)", source)]
        for label, params in VARIANTS:
            out = generate.run(matted, work / label.replace(" ", "_"), model=args.model, style=args.style,
                               mode="person", provider="cpu", outputs="rgba", **params).outputs[0]
            rows.append((label, flicker(out, inside)))
            print(f"  {label}: {rows[-1][1]:.2f}", flush=True)
    print()
    print("| steadiness | flicker (levels) | x source |")
    print("|---|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.2f} | {value / source:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
