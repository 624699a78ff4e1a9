"""Live matting: a 30 fps source in -> the matting stage -> NDI out, against bare inference.

    python bench/live.py [--seconds 60] [--size 640x360] [--fps 30]

Writes a synthetic clip (``cuepipe.stages.democlip``), plays it in real time and looped
(``play://``) into the real ``matting`` stage in live mode (RVM, CPU, the size's default ratio),
which sends the person with alpha as an NDI source; this script receives it on loopback. Reported:

- output fps (the stage's ``stage/live`` Events) against bare inference fps (``RVM.infer`` on the
  same frames at the same ratio, in this process, before the run);
- added latency p50 / p95: from when a frame arrived from the source to when it was sent on, as the
  stage measures it (median of its per-second windows), against one bare inference + 15 ms;
- frames dropped (the source ran faster than inference), frames received out of order (NDI
  timecodes that do not increase), and the stage's RSS at start and end (memory flat?).

Needs the ``ndi`` extra. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cuepipe.models import load_manifest, resolve  # noqa: E402
from cuepipe.stages.codec import decode  # noqa: E402
from cuepipe.stages.democlip import render_frames, write_clip  # noqa: E402
from cuepipe.stages.ndi import NdiReceiver, parse_ndi_url  # noqa: E402
from cuepipe.stages.protocol import STAGE_EVENTS  # noqa: E402
from cuepipe.stages.rvm import RVM, InputBuffer  # noqa: E402

MODEL = "rvm_mobilenetv3_fp32"


def bare_fps(width: int, height: int, ratio: float, frames: int = 150, warmup: int = 20) -> tuple[float, float]:
    """(frames/s, median ms) of RVM.infer alone on the clip's frames, after ``warmup`` frames (fps from
    the median: a stray slow frame, load from elsewhere, does not count)."""
    model = RVM(resolve(MODEL), "cpu")
    buffer = InputBuffer(width, height, model.input_dtype)
    images = [f for f, _ in render_frames(width, height, frames + warmup, seed=0)]
    for image in images[:warmup]:
        model.infer(buffer.fill(image), ratio)
    times = []
    for image in images[warmup:]:
        t = time.perf_counter()
        model.infer(buffer.fill(image), ratio)
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times), statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the live run lasts")
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--fps", type=float, default=30.0, help="the source's frame rate")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    ratio = load_manifest()[MODEL].recommended_downsample_ratio(width, height)
    print(f"# {platform.machine()}, {os.cpu_count()} logical cores, {platform.system()}; {MODEL} CPU, "
          f"{width}x{height} ratio {ratio}, source {args.fps:g} fps, {args.seconds:g} s live")
    bare, infer_ms = bare_fps(width, height, ratio)
    events = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    events.bind(("127.0.0.1", 0))
    events.settimeout(0.5)
    lives: list[dict[str, float]] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                data, _ = events.recvfrom(65536)
            except TimeoutError:
                continue
            lives.extend(dict(m.fields) for m in decode(data, STAGE_EVENTS) if m.spec.name == "stage/live")

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    name = f"bench-live-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="cuepipe-bench-live-") as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_clip(clip, None, width, height, frames=int(args.fps * 4), fps=args.fps)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cuepipe.stages.matting", "--input", f"play://{clip}", "--output-dir", tmp,
             "--outputs", "ndi", "--ndi-name", name, "--provider", "cpu", "--log-level", "WARNING",
             "--report", f"127.0.0.1:{events.getsockname()[1]}"], cwd=ROOT)
        out_of_order = received = 0
        rss: list[float] = []
        try:
            with NdiReceiver(parse_ndi_url(f"ndi://{name}?ip=127.0.0.1"), connect_timeout_s=60) as receiver:
                start, last_tc, next_sample = time.monotonic(), -1, 0.0
                while time.monotonic() - start < args.seconds:
                    frame = receiver.read(1.0)
                    if frame is not None:
                        received += 1
                        out_of_order += frame.timecode <= last_tc
                        last_tc = frame.timecode
                    if time.monotonic() - start >= next_sample:
                        rss.append(psutil.Process(proc.pid).memory_info().rss / 2**20)
                        next_sample += max(1.0, args.seconds / 20)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            stop.set()
            listener.join(timeout=2)
            events.close()
    steady = lives[2:] or lives  # the first windows include the model's first, slower frames
    fps = statistics.median(w["fps"] for w in steady)
    p50 = statistics.median(w["latency_p50"] for w in steady)
    p95 = statistics.median(w["latency_p95"] for w in steady)
    dropped = int(lives[-1]["dropped"]) if lives else -1
    print()
    print("| bare inference fps | live output fps | **output / bare** | bare inference ms | latency p50 / p95 ms "
          "| **p50 - (inference + 15 ms)** | dropped | out of order | received | RSS MiB first / last / max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {bare:.1f} | {fps:.1f} | **{fps / bare:.2f}** | {infer_ms:.0f} | {p50:.0f} / {p95:.0f} "
          f"| **{p50 - infer_ms - 15:+.0f} ms** | {dropped} | {out_of_order} | {received} "
          f"| {rss[0]:.0f} / {rss[-1]:.0f} / {max(rss):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
