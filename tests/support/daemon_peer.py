"""A real ``cuepipe serve`` subprocess and a TouchDesigner-like client for it, over loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from cuepipe.stages.codec import Message, decode, encode
from cuepipe.stages.protocol import COMMANDS, JOB_EVENTS, REPLIES
from tests.support.env import subprocess_env
from tests.support.pipelines import pipelines_toml, step

#: Pipelines of the misbehaving test stage (and one real one), shared by the daemon and failure tests.
PIPELINES = pipelines_toml(
    {"stall_timeout": 0},
    quick=[step()],
    slow=[step("hang_silent")],
    warm=[step(warm=True)],
    live={"keep_running": True, "stages": [step("exit3")]},
    crashy=[step("slow", frames=200, retries=1)],
    slowish=[step("slow", frames=60)],
    stubborn=[step("stubborn")],
    matte=[step(stage="matting"), step(stage="composite")],
)

BY_NAME = {spec.name: spec for spec in COMMANDS}


class Client:
    """What TouchDesigner does: an OSC Out (commands) and an OSC In (replies, Events) on one socket."""

    def __init__(self, port: int, bind: str = "127.0.0.1") -> None:
        self.daemon = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((bind, 0))
        self.events: list[Message] = []

    def send(self, name: str, tag: str = "t", **fields: object) -> None:
        self.sock.sendto(encode(BY_NAME[name], tag=tag, reply_port=0, **fields), self.daemon)

    def pump(self, timeout: float = 0.05) -> None:
        self.sock.settimeout(timeout)
        while True:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                return
            self.events.extend(decode(data, REPLIES + JOB_EVENTS))

    def wait(self, name: str, timeout: float = 30, **match: object) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.spec.name == name and all(e.fields.get(k) == v for k, v in match.items()):
                    return e
            self.pump()
        raise AssertionError(f"no {name} {match} in {timeout}s; got {[e.spec.name for e in self.events]}")

    def run(self, pipeline: str, input: Path, tag: str, sets: tuple[str, ...] = ()) -> str:
        """Send ``cmd/run`` and return the job id from its ack."""
        self.send("cmd/run", tag=tag, pipeline=pipeline, input=str(input), priority=0, sets=list(sets))
        job: str = self.wait("reply/ack", tag=tag)["job"]
        return job

    def run_until_started(self, pipeline: str, input: Path, tag: str) -> tuple[str, Message]:
        """Send ``cmd/run`` and wait until its stage runs; the job id and the stage_started Event."""
        job = self.run(pipeline, input, tag)
        return job, self.wait("job/stage_started", job=job)

    def close(self) -> None:
        self.sock.close()


class Server:
    def __init__(self, root: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(root / "pipelines.toml"), "serve",
               "--port", "0", "--root", str(root), "--state", str(root / "state"), *extra]
        kwargs: dict[str, object] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        self.proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, **kwargs)  # type: ignore[call-overload]
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on" in line, f"daemon did not start: {line!r}"
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGTERM)  # type: ignore[attr-defined]
        code = self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def kill_hard(self) -> None:
        """SIGKILL the daemon (as an OOM killer would); its stage trees die with their Job threads? No:
        they are separate process groups, so kill them too, as the next start expects to find nothing."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        self.proc.wait()
        for child in children:
            child.kill()
        psutil.wait_procs(children, timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
