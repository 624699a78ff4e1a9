"""An NDI peer process for tests/test_ndi.py: a sender (or a finder) on loopback, in its own process.

    python -m tests.support.ndi_peer send NAME [--fps 100] [--bgr] [--unique] [--log TCS.txt] [--seconds 30]
    python -m tests.support.ndi_peer find NAME        # with NDI_CONFIG_DIR set: discovery from the config alone

``send`` prints one JSON line once its source is up, ``{"name", "source", "url"}`` (``url``: the
``127.0.0.1:PORT`` its sender listens on, as a finder looking at 127.0.0.1 would report it), then sends ``pattern()``
frames with ``timecode = ndi_now()``, appending each timecode to ``--log``, until it is killed, its
parent is gone, or ``--seconds`` have passed. ``find`` prints the url of NAME (or null) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import psutil

from cuepipe.stages.ndi import NdiSender, load_ndi, ndi_now


def pattern(height: int = 360, width: int = 640) -> np.ndarray:
    """BGRA test image: smooth colour gradients; alpha 0 (left third), 255 (middle), a vertical ramp (right)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 4), np.uint8)
    image[..., 0] = x * 255 // (width - 1)
    image[..., 1] = y * 255 // (height - 1)
    image[..., 2] = 255 - (x + y) * 255 // (width + height - 2)
    third = width // 48 * 16  # edges on 16-pixel blocks: SpeedHQ keeps flat blocks exact
    image[..., 3] = np.where(x < third, 0, np.where(x < 2 * third, 255, y * 255 // (height - 1)))
    return image


def find_url(name: str, extra_ips: str | None, timeout_s: float = 5.0) -> str | None:
    """NAME's url as discovery sees it. A new finder each half second: one that found nobody at an extra
    IP polls it less and less often, and on Linux each one asks a single NDI process (see docs/live.md)."""
    lib = load_ndi()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finder = lib.find_create_v2(lib.FindCreate(p_extra_ips=extra_ips))
        try:
            for _ in range(5):
                lib.find_wait_for_sources(finder, 100)
                for source in lib.find_get_current_sources(finder):
                    if source.ndi_name == name or source.ndi_name.endswith(f"({name})"):
                        return str(source.url_address)
        finally:
            lib.find_destroy(finder)
    return None


def own_url(timeout_s: float = 2.0) -> str | None:
    """``127.0.0.1:PORT`` of this process's one sender: the TCP port it listens on besides NDI's 5960."""
    me = psutil.Process()
    connections = getattr(me, "net_connections", None) or me.connections  # psutil < 6: connections()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            listening = {c.laddr.port for c in connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # not allowed to look here: let discovery tell
            return None
        if len(listening - {5960}) == 1:
            return f"127.0.0.1:{(listening - {5960}).pop()}"
        time.sleep(0.02)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("send", "find"))
    parser.add_argument("name")
    parser.add_argument("--fps", type=float, default=100.0)
    parser.add_argument("--bgr", action="store_true", help="send BGR (3 channels): arrives with alpha 255")
    parser.add_argument("--unique", action="store_true")
    parser.add_argument("--log", default="")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.mode == "find":
        print(json.dumps({"url": find_url(args.name, None)}), flush=True)
        return 0
    parent = psutil.Process(os.getppid())
    image = pattern()
    frame = np.ascontiguousarray(image[..., :3]) if args.bgr else image
    with NdiSender(args.name, fps=args.fps, unique=args.unique) as sender, \
            open(args.log or os.devnull, "a", encoding="utf-8") as log:
        url = own_url() or find_url(sender.source_name, "127.0.0.1")
        print(json.dumps({"name": sender.name, "source": sender.source_name, "url": url}), flush=True)
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < args.seconds:
            if i % 50 == 0 and not parent.is_running():
                break
            timecode = ndi_now()
            sender.send(frame, timecode=timecode)
            log.write(f"{timecode}\n")
            log.flush()
            i += 1
            time.sleep(max(0.0, start + i / args.fps - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
