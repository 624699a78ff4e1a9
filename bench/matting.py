"""Benchmark of the matting stage: bare onnxruntime vs the stage pipeline vs a sequential loop.

    python bench/matting.py [--frames 48] [--rounds 3] [--threads 0] [--long 300] [--quick]

Prints the process's resident memory over a long 640x360 stage run, then one table (medians over
``rounds`` interleaved rounds). Input clips come from ``cuepipe.stages.democlip`` (H.264, 24 fps).
CPU ms/frame counts this process and its ffmpeg children, so it is robust to load from elsewhere;
frames/s is not: the load average is printed at the start and the end.

- bare: ``cuepipe.stages.rvm.RVM.infer`` on pre-converted tensors, same session settings as the stage
  (ORT_ENABLE_ALL, idle threads sleep); inference only, first frame excluded (warm-up). "bare, ORT
  spinning": the same with onnxruntime's default of spinning idle threads, for comparison.
- stage: ``cuepipe.stages.matting.run`` with the given outputs (decode, inference, post-processing,
  compositing and encoding in its threads and ffmpeg processes): steady frames/s from the first to
  the last frame out of inference (queues are bounded, so inference cannot run ahead of the
  encoders by more than a few frames); "tail" is the time from there to the return of ``run``
  (the last frames encoded, ffmpeg flushed, files published).
- sequential: one thread doing decode -> naive float pre-processing -> inference -> numpy float
  composite -> in-process OpenCV mp4v encode of composite and alpha, as typical public scripts do.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import psutil

from cuepipe.models import resolve
from cuepipe.stages import matting
from cuepipe.stages.democlip import write_clip
from cuepipe.stages.rvm import RVM, InputBuffer
from cuepipe.stages.stage import StageEvents
from cuepipe.stages.video import VideoReader

CONFIGS = [(640, 360, 1.0), (1280, 720, 0.25), (1280, 720, 0.375), (1920, 1080, 0.25)]
OUTPUTS = ["alpha,composite", "alpha"]
MODEL = "rvm_mobilenetv3_fp32"


class _Timed(StageEvents):
    """Records when the first and the last frame left inference; calls ``on_progress`` for each."""

    def __init__(self, on_progress: Callable[[int], None] | None = None) -> None:
        super().__init__(matting.NAME, None)
        self.first: float | None = None
        self.last = 0.0
        self._on_progress = on_progress

    def progress(self, frame: int, total: int) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last
        if self._on_progress is not None:
            self._on_progress(frame)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the ffmpeg encoders)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _session(threads: int) -> ort.InferenceSession:
    """A session with onnxruntime's defaults (idle threads spin) but the stage's optimisation level."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(resolve(MODEL)), options, providers=["CPUExecutionProvider"])


def bare(clip: Path, ratio: float, threads: int, spinning: bool = False) -> tuple[float, float]:
    """Inference only on pre-converted frames: the stage's ``RVM`` session, or ORT's defaults."""
    with VideoReader(clip) as reader:
        buf = InputBuffer(reader.width, reader.height)
        tensors = [buf.fill(f).copy() for f in reader]
    if spinning:
        session, rec = _session(threads), [np.zeros((1, 1, 1, 1), np.float32)] * 4
        r = np.array([ratio], np.float32)

        def infer(x: np.ndarray) -> None:
            nonlocal rec
            _, _, *rec = session.run(None, {"src": x, "downsample_ratio": r, "r1i": rec[0], "r2i": rec[1],
                                            "r3i": rec[2], "r4i": rec[3]})
    else:
        model = RVM(resolve(MODEL), "cpu", threads=threads)

        def infer(x: np.ndarray) -> None:
            model.infer(x, ratio)
    infer(tensors[0])
    start, cpu = time.perf_counter(), cpu_seconds()
    for x in tensors[1:]:
        infer(x)
    n = len(tensors) - 1
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) / n * 1000


def stage(clip: Path, ratio: float, threads: int, outputs: str, work: Path) -> tuple[float, float, float]:
    """Steady frames/s (first to last frame out of inference), CPU ms/frame, tail seconds."""
    events, cpu = _Timed(), cpu_seconds()
    result = matting.run(clip, work / "stage", events, outputs=outputs, ratio=ratio, provider="cpu", threads=threads)
    tail = time.perf_counter() - events.last  # the last frames' encoding, ffmpeg flushing, renames
    assert events.first is not None
    fps = (result.frames - 1) / (events.last - events.first)
    return fps, (cpu_seconds() - cpu) / result.frames * 1000, tail  # CPU: the whole run, start-up included


def sequential(clip: Path, ratio: float, threads: int, work: Path) -> tuple[float, float]:
    session = _session(threads)
    cap = cv2.VideoCapture(str(clip))
    fps = cap.get(cv2.CAP_PROP_FPS)
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fourcc = cv2.VideoWriter.fourcc(*"mp4v")
    comp_out = cv2.VideoWriter(str(work / "seq_composite.mp4"), fourcc, fps, (w, h))
    alpha_out = cv2.VideoWriter(str(work / "seq_alpha.mp4"), fourcc, fps, (w, h))
    green = np.array([0, 177, 64], np.float32) / 255.0  # RGB
    rec: list[Any] = [np.zeros((1, 1, 1, 1), np.float32)] * 4
    n, start, cpu = 0, 0.0, 0.0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        src = (frame[:, :, ::-1].transpose(2, 0, 1)[None] / 255.0).astype(np.float32)
        fgr, pha, *rec = session.run(None, {"src": src, "r1i": rec[0], "r2i": rec[1], "r3i": rec[2],
                                            "r4i": rec[3], "downsample_ratio": np.array([ratio], np.float32)})
        fg, a = fgr[0].transpose(1, 2, 0), pha[0].transpose(1, 2, 0)
        com = (fg * a + green * (1 - a)) * 255.0
        comp_out.write(np.ascontiguousarray(com[:, :, ::-1]).astype(np.uint8))
        alpha_out.write(cv2.cvtColor((a[:, :, 0] * 255.0).astype(np.uint8), cv2.COLOR_GRAY2BGR))
        n += 1
        if n == 1:
            start, cpu = time.perf_counter(), cpu_seconds()
    comp_out.release()
    alpha_out.release()
    cap.release()
    return (n - 1) / (time.perf_counter() - start), (cpu_seconds() - cpu) / (n - 1) * 1000


def memory_run(work: Path, frames: int, threads: int) -> list[tuple[int, float]]:
    """RSS (MiB) of this process after every 50 frames of a long 640x360 stage run (auto ratio)."""
    clip = work / "long_640x360.mp4"
    write_clip(clip, None, 640, 360, frames=frames)
    me, samples = psutil.Process(), []
    peak = [0.0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], me.memory_info().rss / 2**20)

    def sample(frame: int) -> None:
        if frame % 50 == 0 or frame == frames:
            samples.append((frame, me.memory_info().rss / 2**20))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        matting.run(clip, work / "long", _Timed(sample), outputs="alpha,composite", provider="cpu", threads=threads)
    finally:
        stop.set()
        watcher.join()
    samples.append((-1, peak[0]))
    return samples


def thread_profile(clip: Path, ratio: float, threads: int, work: Path) -> list[tuple[str, float]]:
    """CPU ms/frame per thread (and per ffmpeg child) of one stage run with alpha,composite."""
    me, main_id, names = psutil.Process(), threading.get_native_id(), {}
    before = {t.id: t.user_time + t.system_time for t in me.threads()}
    reaped = me.cpu_times().children_user + me.cpu_times().children_system
    last: dict[int, float] = {}
    children: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
            last.update({t.id: t.user_time + t.system_time for t in me.threads()})
            for c in me.children():
                try:
                    out = Path(c.cmdline()[-1]).name.split(".")[1]  # ffmpeg writes .<stem>.<random>.part<ext>
                    children[f"ffmpeg {out}"] = sum(c.cpu_times()[:2])
                except (psutil.Error, IndexError):
                    pass

    watcher = threading.Thread(target=watch, name="profiler", daemon=True)
    watcher.start()
    try:
        frames = matting.run(clip, work / "profile", outputs="alpha,composite", ratio=ratio, provider="cpu",
                             threads=threads).frames
    finally:
        stop.set()
        watcher.join()
    names[main_id] = "calling thread (inference, post-processing)"
    rows = [(names.get(tid, f"native thread {tid}"), (cpu - before.get(tid, 0.0)) * 1000 / frames)
            for tid, cpu in last.items()]
    rows += [(f"{name} (sampled)", cpu * 1000 / frames) for name, cpu in children.items()]
    reaped = me.cpu_times().children_user + me.cpu_times().children_system - reaped
    rows.append(("all ffmpeg processes (exact, incl. probes)", reaped * 1000 / frames))
    return sorted((r for r in rows if r[1] >= 0.5 and r[0] != "profiler"), key=lambda r: -r[1])


def measure(clip: Path, ratio: float, threads: int, rounds: int, work: Path) -> dict[str, list[tuple[float, ...]]]:
    """(fps, CPU ms/frame[, tail s]) per round for bare, each stage output set and sequential."""
    res: dict[str, list[tuple[float, ...]]] = {}
    for _ in range(rounds):  # interleaved, so that load from elsewhere hits every column alike
        res.setdefault("bare", []).append(bare(clip, ratio, threads))
        res.setdefault("spin", []).append(bare(clip, ratio, threads, spinning=True))
        for outputs in OUTPUTS:
            res.setdefault(outputs, []).append(stage(clip, ratio, threads, outputs, work))
        res.setdefault("seq", []).append(sequential(clip, ratio, threads, work))
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48, help="frames per clip")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are printed)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--long", type=int, default=300, help="frames of the memory run (0: skip)")
    parser.add_argument("--quick", action="store_true", help="only 640x360 and 1280x720 @ 0.25, 1 round")
    args = parser.parse_args()
    configs = CONFIGS[:2] if args.quick else CONFIGS
    rounds = 1 if args.quick else args.rounds
    print(f"# {platform.machine()}, {os.cpu_count()} logical cores, {platform.system()}, onnxruntime "
          f"{ort.__version__} CPU, intra-op threads {args.threads or 'default'}, {args.frames} frames/clip, "
          f"{rounds} round(s); load average at start {_load()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cuepipe-bench-") as tmp:
        work = Path(tmp)
        if args.long:  # first, in a process that has run nothing else yet
            samples = memory_run(work, args.long, args.threads)
            print(f"RSS over a {args.long}-frame 640x360 stage run (alpha,composite): "
                  + ", ".join(f"frame {f}: {m:.0f} MiB" for f, m in samples[:-1])
                  + f"; peak {samples[-1][1]:.0f} MiB", flush=True)
        for w, h, ratio in configs:
            clip = work / f"clip_{w}x{h}.mp4"
            write_clip(clip, None, w, h, frames=args.frames)
            res = measure(clip, ratio, args.threads, rounds, work)
            med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in res.items()}
            for outputs in OUTPUTS:
                rows.append((f"{w}x{h}", ratio, outputs, med["bare"], med[outputs], med["seq"], med["spin"]))
            print(f"  {w}x{h} @ {ratio}: " + "; ".join(
                f"{k} " + " ".join(f"{r[0]:.2f}fps/{r[1]:.0f}ms" for r in v) for k, v in res.items()), flush=True)
            if (w, ratio) == (1280, 0.25):
                profile = thread_profile(clip, ratio, args.threads, work)
                print("  CPU ms/frame by thread, stage alpha,composite at 1280x720 @ 0.25: "
                      + ", ".join(f"{name} {ms:.1f}" for name, ms in profile), flush=True)
    print()
    print("| size | ratio | stage outputs | bare ORT fps | stage fps | **stage / bare** | sequential fps | seq / bare "
          "| CPU ms/frame bare / stage | stage tail s | bare, ORT spinning fps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, ratio, outputs, b, s, q, p in rows:
        print(f"| {size} | {ratio} | {outputs} | {b[0]:.2f} | {s[0]:.2f} | **{s[0] / b[0]:.2f}** | {q[0]:.2f} "
              f"| {q[0] / b[0]:.2f} | {b[1]:.0f} / {s[1]:.0f} | {s[2]:.2f} | {p[0]:.2f} |")
    print(f"# load average at end {_load()}")
    return 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    sys.exit(main())
