"""Benchmark: ``cuepipe batch`` (local engine, and on Ray) against the same clips run one by one.

    python bench/batch.py [--clips 20] [--frames 48] [--size 640x360] [--jobs 1] [--no-ray]

In one run, on the same clips (``cuepipe.stages.democlip``, H.264, 24 fps) through the shipped ``matte``
pipeline: (1) the sum of single ``cuepipe run matte CLIP`` processes, as a shell loop would do; (2)
``cuepipe batch`` with the local engine; (3) ``cuepipe batch --engine ray`` on a local Ray started for it
(``ray.init`` included in its time, as a user of one machine pays it). Prints one table: seconds, clips
per hour, MB written and MB/s, and each method's overhead per clip against the local engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cuepipe.stages.democlip import write_clip

CLI = [sys.executable, "-m", "cuepipe.orchestrator.cli"]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout)[-2000:]}")
    return time.perf_counter() - start


def written(out: Path) -> int:
    data = json.loads((out / "batch_summary.json").read_text(encoding="utf-8"))
    return sum(int(i["bytes"]) for i in data["items"] if i["status"] == "done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"# bench/batch.py: {args.clips} clips of {args.frames} frames at {w}x{h}, matte, --jobs {args.jobs}; "
          f"{platform.machine()}, {os.cpu_count()} cores{load}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clips = work / "clips"
        for n in range(args.clips):
            write_clip(clips / f"clip{n:02d}.mp4", None, width=w, height=h, frames=args.frames, seed=n)
        single = sum(timed([*CLI, "run", "matte", str(c), "--out", str(work / "single"), "--json"])
                     for c in sorted(clips.iterdir()))
        rows.append(("single `cuepipe run`s, summed", single, None))
        local = timed([*CLI, "batch", "matte", str(clips), "--out", str(work / "local"), "--jobs", str(args.jobs),
                       "--json"])
        rows.append(("`cuepipe batch` (local engine)", local, written(work / "local")))
        if not args.no_ray:
            ray = timed([*CLI, "batch", "matte", str(clips), "--out", str(work / "ray"), "--engine", "ray",
                         "--jobs", str(args.jobs), "--json"])
            rows.append(("`cuepipe batch --engine ray` (local Ray, started by it)", ray, written(work / "ray")))
    print()
    print("| method | seconds | clips / hour | MB written | MB/s | **s per clip vs local engine** |")
    print("|---|---|---|---|---|---|")
    for name, seconds, size in rows:
        mb = "" if size is None else f"{size / 1e6:.1f}"
        rate = "" if size is None else f"{size / 1e6 / seconds:.2f}"
        print(f"| {name} | {seconds:.1f} | {args.clips * 3600 / seconds:.0f} | {mb} | {rate} | "
              f"**{(seconds - local) / args.clips:+.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
