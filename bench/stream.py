"""Benchmark: streamed jobs (``stream = true``) against sequential ones, and both against bare inference.

    python bench/stream.py [--frames 300] [--rounds 2] [--quick]

Each case runs the same Job both ways, interleaved, ``rounds`` times (medians), on a clip from
``cuepipe.stages.democlip`` (H.264, 24 fps), through the real launcher (``orchestrator.job.Job``: stage
processes, Events, publishing). Seconds are the Job's own (``job/done``: process starts and model loads
included). "bare" is RVM alone on pre-converted tensors of the clip's first 60 frames (``bench/matting.py``;
the case's thread count),
so "job / bare" says how close the whole job comes to inference alone (issue 12: >= 0.85 for ``matte``).

Cases:
- matte: the shipped ``matte`` pipeline, 1280x720 source, ratio 0.25, outputs alpha,composite,hap_alpha
  (preprocess changes nothing: sequential hands the file on; streamed decodes it in preprocess).
- matte-alpha: the same with outputs = alpha (one cheap encode).
- matte-1thread: matte with onnxruntime on one thread, against bare inference on one thread: what the job
  costs when a core is left for decoding and encoding (a machine with more cores than inference uses).
- matte-resized: a 1920x1080 source conformed to 1280x720 by preprocess (sequential: a lossless Ut Video
  intermediate written and decoded again; streamed: no intermediate).
- stylize: preprocess -> matting (source_rgba) -> generate (multistyle26, style 19, person), 640x360.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from cuepipe.orchestrator.job import Job, JobState
from cuepipe.orchestrator.pipeline import Pipeline, parse
from cuepipe.stages.codec import Message
from cuepipe.stages.democlip import write_clip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matting import bare

CASES: dict[str, dict[str, Any]] = {
    "matte": dict(size=(1280, 720), ratio=0.25, stages=[
        ("preprocess", {}), ("matting", {"ratio": 0.25, "outputs": "alpha,composite,hap_alpha"})]),
    "matte-alpha": dict(size=(1280, 720), ratio=0.25, stages=[
        ("preprocess", {}), ("matting", {"ratio": 0.25, "outputs": "alpha"})]),
    "matte-1thread": dict(size=(1280, 720), ratio=0.25, threads=1, stages=[
        ("preprocess", {}), ("matting", {"ratio": 0.25, "outputs": "alpha,composite,hap_alpha", "threads": 1})]),
    "matte-resized": dict(size=(1920, 1080), ratio=0.25, stages=[
        ("preprocess", {"width": 1280, "height": 720}), ("matting", {"ratio": 0.25, "outputs": "alpha,composite"})]),
    "stylize": dict(size=(640, 360), ratio=0.5, stages=[
        ("preprocess", {}), ("matting", {"ratio": 0.5, "outputs": "source_rgba"}),
        ("generate", {"model": "multistyle26", "style": "19", "mode": "person", "denoise": 0.8, "smoothing": 0.8,
                      "outputs": "video,rgba"})]),
    "stylize-1thread": dict(size=(640, 360), ratio=0.5, stages=[
        ("preprocess", {}), ("matting", {"ratio": 0.5, "outputs": "source_rgba", "threads": 1}),
        ("generate", {"model": "multistyle26", "style": "19", "mode": "person", "denoise": 0.8, "smoothing": 0.8,
                      "outputs": "video,rgba", "threads": 1})]),
}


def _toml(stages: list[tuple[str, dict[str, Any]]], stream: bool) -> str:
    lines = ["version = 1", "[defaults]", "stall_timeout = 0", "[pipelines.p]", f"stream = {str(stream).lower()}"]
    for name, params in stages:
        lines += ["[[pipelines.p.stages]]", f'stage = "{name}"']
        if params:
            lines.append("params = { " + ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in params.items()) + " }")
    return "\n".join(lines) + "\n"


def run_job(pipeline: Pipeline, clip: Path, out: Path) -> tuple[float, dict[str, float]]:
    """The Job's seconds (job/done) and each stage's (job/stage_done)."""
    events: list[Message] = []
    result = Job(pipeline, clip, events.append, out_dir=out, cancel=threading.Event()).run()
    if result.state is not JobState.DONE:
        raise RuntimeError(f"job failed: {[e.fields for e in events if e.spec.name == 'job/failed']}")
    stages = {f"{e['index']} {e['stage']}": e["seconds"] for e in events if e.spec.name == "job/stage_done"}
    return next(e["seconds"] for e in events if e.spec.name == "job/done"), stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--quick", action="store_true", help="60 frames, one round (a smoke run)")
    args = parser.parse_args()
    frames, rounds = (60, 1) if args.quick else (args.frames, args.rounds)
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"# bench/stream.py: {frames} frames, {rounds} round(s); {platform.machine()}, {os.cpu_count()} cores{load}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.cases.split(","):
            case = CASES[name]
            w, h = case["size"]
            clip = work / f"clip_{w}x{h}.mp4"
            if not clip.exists():
                write_clip(clip, None, width=w, height=h, frames=frames, fps=24.0, seed=7)
            pipelines = {s: next(iter(parse(_toml(case["stages"], s), work / "p.toml").pipelines.values()))
                         for s in (False, True)}
            times: dict[bool, list[float]] = {False: [], True: []}
            stage_times: dict[bool, dict[str, float]] = {}
            for r in range(rounds):
                for s in (False, True):
                    seconds, stage_times[s] = run_job(pipelines[s], clip, work / f"out_{r}_{s}")
                    times[s].append(seconds)
                    print(f"  {name}: {'streamed' if s else 'sequential'} {seconds:.2f} s  {stage_times[s]}",
                          flush=True)
            bare_w, bare_h = case["size"] if name != "matte-resized" else (1280, 720)
            bare_clip = work / f"bare_{bare_w}x{bare_h}.mp4"
            if not bare_clip.exists():
                write_clip(bare_clip, None, width=bare_w, height=bare_h, frames=60, fps=24.0, seed=7)
            bare_fps = bare(bare_clip, case["ratio"], case.get("threads", 0))[0]
            seq, st = statistics.median(times[False]), statistics.median(times[True])
            rows.append((name, f"{w}x{h}", seq, st, bare_fps, frames))
    print()
    print("| case | source | sequential s | streamed s | **sequential / streamed** | job fps: sequential, streamed "
          "| bare RVM fps | **streamed job / bare** |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, seq, st, bare_fps, n in rows:
        print(f"| {name} | {size} | {seq:.2f} | {st:.2f} | **{seq / st:.2f}** | {n / seq:.1f}, {n / st:.1f} "
              f"| {bare_fps:.1f} | **{n / st / bare_fps:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
