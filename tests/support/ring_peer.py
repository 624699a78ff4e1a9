"""The other end of a frame ring for tests/test_ring.py: a writer or a reader process, reporting in JSON lines.

    python -m tests.support.ring_peer write NAME REPORT [--frames 10] [--slots 4] [--size 64x48x4]
        [--policy block] [--pattern random] [--interval 0] [--wait-reader] [--then close|hold|abort]
    python -m tests.support.ring_peer read NAME REPORT [--frames 0] [--delay 0] [--pattern random]
        [--then close|hold]

Frame seq s is ``frame_for(s, shape, pattern)`` with the timestamp ``stamp_for(s)``, so either end can
check every frame bit for bit. REPORT receives one JSON object a line, each flushed at once:
``{"event": "ready"}`` once the ring is created / attached, ``{"event": "done", ...}`` after the work
(writer: its stats and the longest put; reader: the seqs it got and which frames were wrong), and
``{"event": "error", "type": ..., "message": ...}`` (exit 1). ``--then hold`` keeps the process, and
the ring, alive afterwards for the test to kill it; a peer never lives longer than ``LIFETIME_S``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cuepipe.stages.ring import EndOfStream, RingError, RingReader, RingWriter

LIFETIME_S = 60.0


def frame_for(seq: int, shape: tuple[int, ...], pattern: str) -> np.ndarray:
    """``random``: seeded noise (bit-exact checks); ``uniform``: every byte ``seq % 251`` (torn-read checks)."""
    if pattern == "uniform":
        return np.full(shape, seq % 251, np.uint8)
    return np.random.default_rng(seq).integers(0, 256, shape, dtype=np.uint8)


def stamp_for(seq: int) -> int:
    return 1_700_000_000_000_000_000 + seq * 16_666_667


def frame_ok(seq: int, image: np.ndarray, pattern: str) -> bool:
    if pattern == "uniform":
        return bool(image.min() == image.max() == seq % 251)
    return bool(np.array_equal(image, frame_for(seq, image.shape, pattern)))


class Report:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, **fields}) + "\n")
        self._file.flush()


def write(args: argparse.Namespace, report: Report) -> None:
    width, height, channels = (int(v) for v in args.size.split("x"))
    with RingWriter.create(args.slots, width, height, channels, args.policy, name=args.name) as ring:
        report("ready")
        if args.wait_reader:
            ring.wait_for_reader()
        longest = 0.0
        for seq in range(1, args.frames + 1):
            frame = frame_for(seq, ring.geometry.shape, args.pattern)
            start = time.monotonic()
            ring.put(frame, timestamp_ns=stamp_for(seq))
            longest = max(longest, time.monotonic() - start)
            time.sleep(args.interval)
        stats = ring.stats
        report("done", frames=stats.frames, dropped=stats.dropped, waited_s=stats.waited_s, longest_put_s=longest)
        if args.then == "hold":
            time.sleep(LIFETIME_S)
        elif args.then == "abort":
            ring.abort()


def read(args: argparse.Namespace, report: Report) -> None:
    with RingReader.attach(args.name) as ring:
        report("ready")
        seqs, bad, stamps_ok, end = [], [], True, False
        while not args.frames or len(seqs) < args.frames:
            try:
                frame = ring.get()
            except EndOfStream:
                end = True
                break
            seqs.append(frame.seq)
            stamps_ok &= frame.timestamp_ns == stamp_for(frame.seq)
            if not frame_ok(frame.seq, frame.image, args.pattern):
                bad.append(frame.seq)
            time.sleep(args.delay)
        stats = ring.stats
        report("done", seqs=seqs, bad=bad, stamps_ok=stamps_ok, end_of_stream=end, dropped=stats.dropped,
               torn=stats.torn)
        if args.then == "hold":
            time.sleep(LIFETIME_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("role", choices=["write", "read"])
    parser.add_argument("name")
    parser.add_argument("report", type=Path)
    parser.add_argument("--frames", type=int, default=10, help="write: how many; read: 0 = until end of stream")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--size", default="64x48x4", help="WxHxC")
    parser.add_argument("--policy", default="block")
    parser.add_argument("--pattern", choices=["random", "uniform"], default="random")
    parser.add_argument("--interval", type=float, default=0.0, help="write: seconds between two puts")
    parser.add_argument("--delay", type=float, default=0.0, help="read: seconds after each frame")
    parser.add_argument("--wait-reader", action="store_true")
    parser.add_argument("--then", choices=["close", "hold", "abort"], default="close")
    args = parser.parse_args(argv)
    report = Report(args.report)
    try:
        (write if args.role == "write" else read)(args, report)
    except RingError as exc:
        report("error", type=type(exc).__name__, message=str(exc), kind=str(exc.kind))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
