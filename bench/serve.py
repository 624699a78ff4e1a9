"""Trigger -> first processed frame through ``cuepipe serve``: resident (warm) worker vs cold start.

    python bench/serve.py [--runs 5] [--size 1280x720]

Starts a real daemon, sends ``/cuepipe/v1/cmd/run`` over UDP like TouchDesigner would, and times
until the first ``job/progress`` Event of the matting stage (its first processed frame arrived at
the client). The input is already a lossless intermediate, so no preprocess stage runs: the time
is the daemon's queueing, the stage's start (cold: Python, imports, model load; warm: none), the
first frame's decode and inference, and the Event's way back. One table, medians of ``--runs``.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from cuepipe.models import resolve  # noqa: E402
from cuepipe.stages.codec import decode, encode  # noqa: E402
from cuepipe.stages.democlip import render_frames  # noqa: E402
from cuepipe.stages.protocol import CMD_RUN, JOB_EVENTS, REPLIES  # noqa: E402
from cuepipe.stages.rvm import RVM, InputBuffer  # noqa: E402
from cuepipe.stages.video import Codec, VideoWriter  # noqa: E402

PIPELINES = """
[defaults]
stall_timeout = 0
[pipelines.warm]
[[pipelines.warm.stages]]
stage = "matting"
warm = true
params = {{ outputs = "alpha", ratio = {ratio} }}
[pipelines.cold]
[[pipelines.cold.stages]]
stage = "matting"
params = {{ outputs = "alpha", ratio = {ratio} }}
"""


def first_frame_ms(port: int, pipeline: str, clip: Path, runs: int) -> list[dict[str, float]]:
    """Per run, ms from the trigger to: the ack, the stage's ``started``, the first processed frame."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(120)
    runs_out = []
    for i in range(runs):
        tag = f"{pipeline}{i}"
        t0 = time.perf_counter()
        client.sendto(encode(CMD_RUN, tag=tag, reply_port=0, pipeline=pipeline, input=str(clip), priority=0,
                             sets=[]), ("127.0.0.1", port))
        marks: dict[str, float] = {}
        while True:
            data, _ = client.recvfrom(65536)
            now = (time.perf_counter() - t0) * 1000
            for e in decode(data, REPLIES + JOB_EVENTS):
                if e.spec.name == "reply/error":
                    raise SystemExit(f"refused: {e['message']}")
                if e.spec.name == "reply/ack":
                    marks.setdefault("ack", now)
                if e.spec.name == "job/stage_started":
                    marks.setdefault("started", now)
                if e.spec.name == "job/progress" and e["frame"] >= 1:
                    marks.setdefault("first", now)
                if e.spec.name in ("job/failed", "job/cancelled"):
                    raise SystemExit(f"{pipeline} job failed: {e.fields}")
                if e.spec.name == "job/done":
                    break
            else:
                continue
            break
        if "first" not in marks:
            raise SystemExit("no progress Event arrived")
        runs_out.append(marks)
    client.close()
    return runs_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--ratio", type=float, default=0.375)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between daemon start and first trigger")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="cuepipe-bench-serve-"))
    clip = folder / "clip.mkv"
    with VideoWriter(clip, width, height, 24.0, codec=Codec.UTVIDEO) as writer:
        for frame, _ in render_frames(width, height, args.frames):
            writer.write(frame)
    (folder / "pipelines.toml").write_text(PIPELINES.format(ratio=args.ratio))

    # The floor: one frame of bare inference on a warm session with fresh (zero) state.
    model = RVM(resolve("rvm_mobilenetv3_fp32"))  # via the manifest: $CUEPIPE_MODELS is honoured
    frame = next(render_frames(width, height, 1))[0]
    buf = InputBuffer(width, height)
    bare = []
    for _ in range(args.runs + 1):
        model.reset()
        t0 = time.perf_counter()
        model.infer(buf.fill(frame), args.ratio)
        bare.append((time.perf_counter() - t0) * 1000)
    bare = bare[1:]

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    daemon = subprocess.Popen([sys.executable, "-m", "cuepipe.orchestrator.cli",
                               "--pipelines", str(folder / "pipelines.toml"),
                               "serve", "--port", "0", "--root", str(folder), "--state", str(folder / "state"),
                               "--warm", "matting"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        assert daemon.stdout is not None
        port = int(daemon.stdout.readline().rsplit(":", 1)[1])
        time.sleep(args.settle)  # a show starts its daemon before the first trigger: let the warm worker preload
        warm_marks = first_frame_ms(port, "warm", clip, args.runs)
        cold_marks = first_frame_ms(port, "cold", clip, args.runs)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    print(f"# cuepipe serve: trigger -> first processed frame, {width}x{height}, ratio {args.ratio}, "
          f"{args.runs} runs, medians")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU provider")
    warm, cold = [m["first"] for m in warm_marks], [m["first"] for m in cold_marks]
    floor = statistics.median(bare)
    print("| path | median ms | p95 ms | min ms | max ms | **p95 - bare median** |")
    print("|---|---|---|---|---|---|")
    for name, values in (("bare inference of one frame (floor)", bare), ("warm: resident worker", warm),
                         ("cold: new stage process", cold)):
        p95 = float(np.percentile(values, 95))
        print(f"| {name} | {statistics.median(values):.0f} | {p95:.0f} | {min(values):.0f} | {max(values):.0f} "
              f"| **{p95 - floor:+.0f}** |")
    print(f"\ncold / warm = {statistics.median(cold) / statistics.median(warm):.1f}x")
    print("warm runs in order, ms: " + " ".join(f"{v:.0f}" for v in warm))
    steady = warm_marks[1:] or warm_marks
    print("\nwarm, where the time goes (medians of runs 2..N, ms): trigger -> ack "
          f"{statistics.median(m.get('ack', 0) for m in steady):.0f}; ack -> stage started "
          f"{statistics.median(m['started'] - m.get('ack', 0) for m in steady):.0f}; stage started -> first frame "
          f"{statistics.median(m['first'] - m['started'] for m in steady):.0f} (decode + inference + Event back; "
          f"bare inference {floor:.0f})")


if __name__ == "__main__":
    main()
