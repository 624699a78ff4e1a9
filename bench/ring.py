"""Frame ring throughput: a writer and a reader process through ``stages/ring.py``, against a plain memcpy.

    python bench/ring.py [--frames 300] [--slots 4] [--sizes 1920x1080,1280x720] [--repeat 3]

For each size (BGRA: uint8, 4 channels) this process creates a ``block`` ring and puts ``--frames``
frames into it as fast as it can, while a reader process (this script with ``--read``) takes them:
with ``get()`` (a copy out of the ring) and with ``borrow()`` (zero copy: it reads one byte of each
frame). The reader measures the steady state, from its first frame to its last: frames/s and GB/s
of frame bytes. The baseline is ``np.copyto`` of the same bytes in one process, through the same
working set (2 source frames into ``--slots`` destination frames in rotation, so the caches flatter
neither side). Each figure is the best of ``--repeat`` runs: on a shared machine the slow runs measure
the neighbours.
A ring moves each frame through two such copies (put, and get unless borrowed), in two processes
that run at the same time, plus the polling (sleeps of 0.2-2 ms when one side waits for the other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from cuepipe.stages.ring import EndOfStream, RingReader, RingWriter

CHANNELS = 4


def read(name: str, mode: str) -> int:
    """The reader process: print {"frames", "seconds"} from its first frame to its last."""
    first = last = 0.0
    frames = 0
    with RingReader.attach(name) as ring:
        while True:
            try:
                if mode == "borrow":
                    with ring.borrow() as frame:
                        _ = int(frame.image[0, 0, 0])
                else:
                    ring.get()
            except EndOfStream:
                break
            last = time.perf_counter()
            first = first or last
            frames += 1
    print(json.dumps({"frames": frames, "seconds": last - first}))
    return 0


def ring_rate(width: int, height: int, frames: int, slots: int, mode: str) -> float:
    """Frames per second through a ring, writer here and reader in a process of its own."""
    sources = [np.random.default_rng(i).integers(0, 256, (height, width, CHANNELS), np.uint8) for i in range(2)]
    with RingWriter.create(slots, width, height, CHANNELS, "block", timeout_s=30) as ring:
        reader = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--read", ring.name, "--mode", mode],
                                  stdout=subprocess.PIPE, text=True)
        try:
            ring.wait_for_reader(timeout_s=30)
            for i in range(frames):
                ring.put(sources[i % 2])
        except BaseException:
            reader.kill()
            reader.wait()
            raise
    out, _ = reader.communicate(timeout=60)
    if reader.returncode != 0:
        raise SystemExit(f"the reader failed ({reader.returncode})")
    result = json.loads(out)
    return float((result["frames"] - 1) / result["seconds"])


def memcpy_gbps(width: int, height: int, slots: int, repeats: int = 100) -> float:
    """np.copyto through the ring's working set: 2 source frames into ``slots`` frames, in rotation."""
    sources = [np.random.default_rng(i).integers(0, 256, (height, width, CHANNELS), np.uint8) for i in range(2)]
    targets = [np.empty_like(sources[0]) for _ in range(slots)]
    for target in targets:
        np.copyto(target, sources[0])  # the first touch of the pages is not what we measure
    start = time.perf_counter()
    for i in range(repeats):
        np.copyto(targets[i % slots], sources[i % 2])
    return sources[0].nbytes * repeats / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--sizes", default="1920x1080,1280x720", help="WxH,WxH,...")
    parser.add_argument("--repeat", type=int, default=3, help="runs a figure; the best is shown")
    parser.add_argument("--read", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="get", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        return read(args.read, args.mode)
    print(f"# frame ring, policy block, {args.slots} slots, {args.frames} BGRA frames; writer and reader in two "
          f"processes, best of {args.repeat} | {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    print()
    print("| size | reader | frames/s | GB/s | np.copyto GB/s (one process, same working set) | ring / copyto |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        nbytes = width * height * CHANNELS
        memcpy = max(memcpy_gbps(width, height, args.slots) for _ in range(args.repeat))
        for mode in ("get", "borrow"):
            fps = max(ring_rate(width, height, args.frames, args.slots, mode) for _ in range(args.repeat))
            gbps = fps * nbytes / 1e9
            label = "get (copy)" if mode == "get" else "borrow (zero copy)"
            print(f"| {width}x{height} | {label} | {fps:.0f} | {gbps:.2f} | {memcpy:.2f} | {gbps / memcpy:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
