"""Benchmark of the generate stage: bare onnxruntime vs the stage, whole frame and person only.

    python bench/generate.py [--frames 48] [--rounds 3] [--threads 0] [--hidden 32] [--quick]

Prints one table (medians over ``rounds`` interleaved rounds) for two models:

- ``conv``: a test-built random conv generator (``tests/support/genmodels.py``: 3x3 conv -> ReLU ->
  3x3 conv -> sigmoid, ``hidden`` channels, NCHW RGB [0,1], dynamic size; needs the ``onnx``
  package), at 320x180, 640x360 and 1280x720;
- ``multistyle26``: the trained 26-style network (``cuepipe models fetch multistyle26``) with the
  ``stylize`` pipeline's settings (style 19, held box, denoise 0.8, smoothing 0.8, motion 12), at
  640x360 and 1280x720.

The input is ``cuepipe.stages.democlip``'s
figure with its exact mask as a BGRA UT Video clip, as ``matting``'s ``rgba`` output holds it.
CPU ms/frame counts this process and its ffmpeg children; frames/s is sensitive to load from
elsewhere: the load average is printed at the start and the end.

- bare: ``Generator.run`` (the stage's session: ORT_ENABLE_ALL, idle threads sleep) on tensors
  prepared beforehand exactly as the stage prepares them (whole frames, or the person crops);
  inference and un-packing only, first frame excluded (warm-up).
- stage: ``cuepipe.stages.generate.run`` writing ``generated_rgba.mkv`` (decode in ffmpeg, crop / resize /
  packing in the reader thread, inference and paste-back in order, BGRA conversion and encoding in
  the writer's thread and ffmpeg): steady frames/s from the first to the last frame out of
  inference; "tail" is from there to the return of ``run`` (last frames encoded, files published).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support.genmodels, when run as a script

from cuepipe.models import load_manifest, resolve
from cuepipe.models.contract import GeneratorContract
from cuepipe.stages import generate
from cuepipe.stages.democlip import render_frames
from cuepipe.stages.framing import FramePass
from cuepipe.stages.generator import Generator
from cuepipe.stages.rgba import RgbaReader
from cuepipe.stages.stage import StageEvents
from cuepipe.stages.video import Codec, VideoWriter
from tests.support import genmodels

SIZES = [(320, 180), (640, 360), (1280, 720)]
MODES = ["frame", "person"]
#: model -> (sizes, the stage's parameters); multistyle26's are the stylize pipeline's
MODELS: dict[str, tuple[list[tuple[int, int]], dict[str, Any]]] = {
    "conv": (SIZES, {}),
    "multistyle26": (SIZES[1:], {"style": "19", "denoise": 0.8, "smoothing": 0.8, "motion": 12.0}),
}


class _Timed(StageEvents):
    """Records when the first and the last frame left inference."""

    def __init__(self) -> None:
        super().__init__(generate.NAME, None)
        self.first: float | None = None
        self.last = 0.0

    def progress(self, frame: int, total: int) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the ffmpeg decoder and encoder)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def make_clip(path: Path, width: int, height: int, frames: int) -> Path:
    with VideoWriter(path, width, height, 24, codec=Codec.UTVIDEO, channels=4) as writer:
        for frame, mask in render_frames(width, height, frames, seed=1):
            writer.write(np.dstack([frame, mask]))
    return path


def bare(model: Path, clip: Path, mode: str, threads: int, params: dict[str, Any]) -> tuple[float, float]:
    """Inference + un-packing only, on the tensors the stage would feed (prepared beforehand)."""
    spec = load_manifest().get(model.stem)
    gen = Generator(model, spec.generator if spec and spec.generator else GeneratorContract(), "cpu", threads=threads)
    weights = gen.weights(params.get("style"))
    with RgbaReader(clip) as reader:
        framer = FramePass(gen, mode, reader.width, reader.height, hold=True, weights=weights)
        prepared = [framer.prepare((f, None)) for f in reader]
    tensors = [p.x for p in prepared if p.x is not None]
    gen.run([tensors[0]], [None], weights)
    start, cpu = time.perf_counter(), cpu_seconds()
    for x in tensors[1:]:
        gen.run([x], [None], weights)
    n = len(tensors) - 1
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n * 1000


def stage(model: Path, clip: Path, mode: str, threads: int, work: Path,
          params: dict[str, Any]) -> tuple[float, float, float]:
    """Steady frames/s (first to last frame out of inference), CPU ms/frame (whole run), tail seconds."""
    events, cpu = _Timed(), cpu_seconds()
    name = model.stem if model.stem in load_manifest() else str(model)  # a manifest name brings its contract
    result = generate.run(clip, work / "stage", events, model=name, mode=mode, provider="cpu",
                          threads=threads, outputs="rgba", **params)
    tail = time.perf_counter() - events.last
    assert events.first is not None
    fps = (result.frames - 1) / (events.last - events.first)
    return fps, (cpu_seconds() - cpu) / result.frames * 1000, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48, help="frames per clip")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are printed)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden channels of the conv generator")
    parser.add_argument("--quick", action="store_true", help="only the two smaller sizes, 1 round")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--sizes", default="", help="only these sizes, e.g. 1280x720 (default: each model's)")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    print(f"# {platform.machine()}, {os.cpu_count()} logical cores, {platform.system()}, onnxruntime "
          f"{ort.__version__} CPU, intra-op threads {args.threads or 'default'}, conv generator with "
          f"{args.hidden} hidden channels, {args.frames} frames/clip, {rounds} round(s); load average at start "
          f"{_load()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cuepipe-bench-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            sizes, params = MODELS[name]
            sizes = [s for s in sizes if s[0] <= 640] if args.quick else sizes
            sizes = [s for s in sizes if not args.sizes or f"{s[0]}x{s[1]}" in args.sizes.split(",")]
            model = genmodels.conv(work / "conv.onnx", seed=0, hidden=args.hidden) if name == "conv" else resolve(name)
            for w, h in sizes:
                clip = work / f"clip_{w}x{h}.mkv"
                if not clip.is_file():
                    make_clip(clip, w, h, args.frames)
                for mode in args.modes.split(","):
                    res: dict[str, list[tuple[float, ...]]] = {"bare": [], "stage": []}
                    for _ in range(rounds):  # interleaved, so that load from elsewhere hits both alike
                        res["bare"].append(bare(model, clip, mode, args.threads, params))
                        res["stage"].append(stage(model, clip, mode, args.threads, work, params))
                    med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in res.items()}
                    rows.append((name, f"{w}x{h}", mode, med["bare"], med["stage"]))
                    print(f"  {name} {w}x{h} {mode}: " + "; ".join(
                        f"{k} " + " ".join(f"{r[0]:.1f}fps/{r[1]:.0f}ms" for r in v) for k, v in res.items()),
                        flush=True)
    print()
    print("| model | size | mode | bare ORT fps | stage fps | **stage / bare** | CPU ms/frame bare / stage "
          "| stage tail s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, mode, b, s in rows:
        print(f"| {name} | {size} | {mode} | {b[0]:.1f} | {s[0]:.1f} | **{s[0] / b[0]:.2f}** | {b[1]:.0f} / {s[1]:.0f} "
              f"| {s[2]:.2f} |")
    print(f"# load average at end {_load()}")
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    sys.exit(main())
