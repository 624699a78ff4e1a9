"""A contract-following stage that misbehaves on request, for the launcher's failure tests.

    python -m tests.support.misbehaving --input IN --output-dir DIR --report HOST:PORT --mode hang

Registered for tests through ``CUEPIPE_STAGES=misbehaving=tests.support.misbehaving`` (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cuepipe.stages.errors import ErrorKind
from cuepipe.stages.stage import Param, ParamKind, StageError, StageEvents, StageResult, stage_main

NAME = "misbehaving"
MODES = ("ok", "exit3", "sigkill", "hang", "hang_silent", "no_done", "fail", "slow", "outputs", "stubborn")
PARAMS = {
    "mode": Param(str, "ok", "how to misbehave", choices=MODES),
    "frames": Param(int, 5, "frames to pretend to process", minimum=1),
    "pidfile": Param(str, "", "write the pids of this process and its child here"),
    "sizes": Param(str, "", "mode outputs: comma-separated byte counts, one output each (out1.bin, ...); "
                   "a trailing / makes that output a folder out<N> of 4 frame files"),
    "model": Param(str, None, "a model this stage pretends to need", kind=ParamKind.MODEL),
}


def run(input: Path, output_dir: Path, events: StageEvents | None = None, cache: dict[str, Any] | None = None,
        **params: Any) -> StageResult:
    mode, frames = params["mode"], params["frames"]
    runs = 1
    if cache is not None:  # a resident worker: what a real stage keeps here is its loaded model
        runs = cache["runs"] = cache.get("runs", 0) + 1
    if events:
        events.started(input=str(input), frames=frames, mode=mode, runs_in_process=runs)
    if mode in ("hang", "hang_silent", "stubborn"):
        # A grandchild too, so the test can prove the whole tree dies.
        code = "import time; time.sleep(600)"
        if mode == "stubborn":  # deaf to the polite stop, like a stage stuck in native code
            code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        child = subprocess.Popen([sys.executable, "-c", code])
        if params["pidfile"]:
            Path(params["pidfile"]).write_text(f"{os.getpid()} {child.pid}")
        while mode == "stubborn":
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(600)
    for i in range(1, frames + 1):
        if events:
            events.progress(i, frames)
        time.sleep(0.05 if mode == "slow" else 0.0)
        if mode == "hang":
            while True:  # keeps sending progress, so only the total timeout catches it
                time.sleep(0.1)
                if events:
                    events.progress(i, frames + 1)
        if mode == "hang_silent":
            time.sleep(600)
    if mode == "exit3":
        sys.stderr.write("something went badly wrong\nlast words of the stage\n")
        sys.stderr.flush()
        os._exit(3)
    if mode == "sigkill":
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    if mode == "no_done":
        os._exit(0)
    if mode == "fail":
        raise StageError(ErrorKind.INPUT_INVALID, f"{input.name} is not what this stage wants")
    output_dir.mkdir(parents=True, exist_ok=True)
    if mode == "outputs":
        return StageResult(tuple(_write_output(output_dir, n, size) for n, size in
                                 enumerate(params["sizes"].split(","), 1)), frames)
    out = output_dir / f"copy{input.suffix}"
    shutil.copyfile(input, out)
    return StageResult((out,), frames)


def _write_output(output_dir: Path, number: int, size: str) -> Path:
    """Output ``number`` of ``size`` bytes: a file, or a folder of 4 frames (a PNG sequence's shape)."""
    if not size.endswith("/"):
        path = output_dir / f"out{number}.bin"
        path.write_bytes(bytes([number]) * int(size))
        return path
    folder = output_dir / f"out{number}"
    folder.mkdir()
    for frame in range(4):
        (folder / f"frame_{frame:06d}.png").write_bytes(bytes([number]) * (int(size[:-1]) // 4))
    return folder


def main() -> int:
    return stage_main(NAME, PARAMS, run, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
