"""The daemon path of the TD side, against a fake ``cuepipe serve`` that speaks docs/protocol.md.

The fake daemon is a UDP socket: what TD sends is decoded with the orchestrator's own codec
(``cuepipe.stages.codec.decode(data, COMMANDS)``), and its answers are encoded with it too, so the TD
side's separate stdlib codec is checked against the real one in both directions.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cuepipe.stages.codec import Message, decode, encode
from cuepipe.stages.protocol import (
    COMMANDS,
    HEARTBEAT,
    JOB_DONE,
    JOB_PROGRESS,
    JOB_STARTED,
    REPLY_ACK,
    REPLY_ERROR,
    REPLY_PIPELINES,
    REPLY_STATUS,
    MessageSpec,
)
from cuepipe.td.extension import CuepipeExt
from tests.support.env import subprocess_env
from tests.support.pipelines import pipelines_toml, step
from tests.support.td_fakes import FakeComp, TDPort, frame


class FakeDaemon:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port: int = self.sock.getsockname()[1]

    def command(self) -> Message:
        data, _ = self.sock.recvfrom(65536)
        (event,) = decode(data, COMMANDS)
        return event

    def no_command(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recvfrom(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(5)
        return False

    def send(self, port: int, spec: MessageSpec, **fields: Any) -> None:
        self.sock.sendto(encode(spec, **fields), ("127.0.0.1", port))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    yield fake
    fake.close()


@pytest.fixture
def port() -> Iterator[TDPort]:
    td_port = TDPort()
    yield td_port
    td_port.close()


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


def daemon_comp(daemon: FakeDaemon, port: TDPort, clock: Clock, tmp_path: Path) -> FakeComp:
    comp = FakeComp(Mode="daemon", Daemonhost="127.0.0.1", Daemonport=daemon.port, Oscinport=port.port,
                    Pipeline="matte", Input=str(tmp_path / "take1.mp4"), Sets="matting.ratio=0.5", Priority=10,
                    Python=sys.executable, Heartbeats=3)
    comp.ext.Cuepipe = CuepipeExt(comp, now=clock, auto_refresh=False)
    return comp


def feed(port: TDPort, comp: FakeComp, count: int) -> None:
    """Deliver ``count`` datagrams to the COMP's OSC In DAT path (decoded, as TD's OSC In DAT does)."""
    before = len(port.received)
    port.pump([], [comp], until=lambda: len(port.received) >= before + count, timeout=5)


def test_run_command_ack_and_job_events(daemon: FakeDaemon, port: TDPort, tmp_path: Path) -> None:
    clock = Clock()
    comp = daemon_comp(daemon, port, clock, tmp_path)
    ext: CuepipeExt = comp.ext.Cuepipe
    frame(comp)
    assert daemon.command().spec.name == "cmd/subscribe"  # heartbeats and Job Events, please
    started = time.perf_counter()
    tag = comp.pulse("Start") or next(iter(ext.Jobs.rows))
    assert time.perf_counter() - started < 0.05
    run = daemon.command()
    assert run.spec.name == "cmd/run"
    assert dict(run.fields) == {"tag": tag, "reply_port": port.port, "pipeline": "matte",
                                "input": str(tmp_path / "take1.mp4"), "priority": 10, "sets": ("matting.ratio=0.5",)}
    assert comp.jobs.row(tag)["state"] == "starting"
    job = "20261122-031500-a1b2"
    daemon.send(port.port, REPLY_ACK, tag=tag, command="run", job=job, detail="queued")
    feed(port, comp, 1)
    assert tag not in ext.Jobs.rows and comp.jobs.row(job)["state"] == "queued"
    assert comp.jobs.row(job)["pipeline"] == "matte"
    daemon.send(port.port, JOB_STARTED, job=job, pipeline="matte", input="take1.mp4", stages=2)
    daemon.send(port.port, JOB_PROGRESS, job=job, index=1, stage="matting", fraction=0.25, frame=12, total=48,
                fps=9.5, overall=0.625)
    feed(port, comp, 2)
    row = comp.jobs.row(job)
    assert (row["state"], row["stage"], row["progress"], row["fps"]) == ("running", "2/2 matting", "0.625", "9.5")
    daemon.send(port.port, JOB_DONE, job=job, seconds=3.0, outputs=["/renders/take1_matte.mov"])
    feed(port, comp, 1)
    assert comp.jobs.row(job)["state"] == "done" and comp.jobs.row(job)["output"] == "/renders/take1_matte.mov"


def test_refused_run_shows_reason(daemon: FakeDaemon, port: TDPort, tmp_path: Path) -> None:
    comp = daemon_comp(daemon, port, Clock(), tmp_path)
    tag = comp.ext.Cuepipe.Start(pipeline="nope")
    assert daemon.command().spec.name == "cmd/run"
    daemon.send(port.port, REPLY_ERROR, tag=tag, command="run", reason="unknown_pipeline",
                message="no pipeline 'nope'")
    feed(port, comp, 1)
    row = comp.jobs.row(tag)
    assert row["state"] == "failed" and row["error"] == "unknown_pipeline: no pipeline 'nope'"


def test_cancel_before_ack_is_sent_with_the_job_id(daemon: FakeDaemon, port: TDPort, tmp_path: Path) -> None:
    comp = daemon_comp(daemon, port, Clock(), tmp_path)
    tag = comp.ext.Cuepipe.Start()
    daemon.command()
    comp.pulse("Cancel")
    assert comp.jobs.row(tag)["state"] == "cancelling" and daemon.no_command()  # no job id yet
    daemon.send(port.port, REPLY_ACK, tag=tag, command="run", job="J1", detail="")
    feed(port, comp, 1)
    cancel = daemon.command()
    assert (cancel.spec.name, cancel["job"], cancel["reply_port"]) == ("cmd/cancel", "J1", port.port)


def test_heartbeats_offline_and_back(daemon: FakeDaemon, port: TDPort, tmp_path: Path) -> None:
    clock = Clock()
    comp = daemon_comp(daemon, port, clock, tmp_path)
    ext: CuepipeExt = comp.ext.Cuepipe
    tag = ext.Start()
    daemon.command()
    daemon.send(port.port, REPLY_ACK, tag=tag, command="run", job="J1", detail="")
    daemon.send(port.port, HEARTBEAT, uptime=10.0, queued=1, running=0, workers="[]")
    feed(port, comp, 2)
    assert ext.Daemon.val == "alive" and ext.Jobs.daemon.queued == 1
    clock.t += 2.9  # under 3 heartbeats of silence: still alive
    frame(comp)
    assert ext.Daemon.val == "alive"
    clock.t += 0.2
    frame(comp)
    assert ext.Daemon.val == "offline" and comp.jobs.row("J1")["state"] == "offline"
    assert daemon.command().spec.name == "cmd/subscribe"  # offline: subscribe again (daemon restarted?)
    daemon.send(port.port, HEARTBEAT, uptime=0.5, queued=0, running=1, workers="[]")
    feed(port, comp, 1)
    assert ext.Daemon.val == "alive" and comp.jobs.row("J1")["state"] == "queued"
    status = daemon.command()
    assert (status.spec.name, status["job"]) == ("cmd/status", "")  # back: resync every job
    daemon.send(port.port, REPLY_STATUS, tag=status["tag"], job="J1", pipeline="matte", state="interrupted",
                index=0, overall=0.1, input="take1.mp4", message="the daemon was killed while it ran")
    feed(port, comp, 1)
    assert comp.jobs.row("J1")["state"] == "interrupted"


def test_pipelines_menu_from_daemon(daemon: FakeDaemon, port: TDPort, tmp_path: Path) -> None:
    comp = daemon_comp(daemon, port, Clock(), tmp_path)
    comp.pulse("Refresh")
    listing = daemon.command()
    assert listing.spec.name == "cmd/list"
    text = '{"file": "p.toml", "pipelines": [{"name": "matte", "stages": [{"stage": "matting"}]}]}'
    daemon.send(port.port, REPLY_PIPELINES, tag=listing["tag"], pipelines=text)
    feed(port, comp, 1)
    assert comp.par.Pipeline.menuNames == ["matte"] and comp.par.Pipeline.menuLabels == ["matte (matting)"]


REAL_PIPELINES = pipelines_toml({"stall_timeout": 0}, one=[step()], slow=[step("hang_silent")])


def test_against_a_real_cuepipe_serve(port: TDPort, tmp_path: Path) -> None:
    """The same COMP against the real daemon: menu, run to done, cancel, refusal, offline."""
    (tmp_path / "pipelines.toml").write_text(REAL_PIPELINES)
    (tmp_path / "clip.txt").write_text("pretend video")
    cmd = [sys.executable, "-m", "cuepipe.orchestrator.cli", "--pipelines", str(tmp_path / "pipelines.toml"), "serve",
           "--port", "0", "--root", str(tmp_path), "--state", str(tmp_path / "state")]
    serve = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = serve.stdout.readline() if serve.stdout else ""
        assert "listening on" in line, line
        comp = FakeComp(Mode="daemon", Daemonhost="127.0.0.1", Daemonport=int(line.rsplit(":", 1)[1]),
                        Oscinport=port.port, Pipeline="one", Input=str(tmp_path / "clip.txt"), Heartbeats=1)
        ext = comp.ext.Cuepipe = CuepipeExt(comp)  # refreshes the menu by cmd/list on the first frame
        port.pump([], [comp], until=lambda: ext.Daemon.val == "alive" and ext.Pipelines.val == ["one", "slow"])
        done = ext.Start()
        port.pump([], [comp], until=lambda: any(r.state == "done" for r in ext.Jobs.rows.values()))
        (row,) = [r for r in ext.Jobs.rows.values() if r.state == "done"]
        assert row.job != done and row.output == str(tmp_path / "out" / "clip_copy.txt")  # tag -> job id
        slow = ext.Start(pipeline="slow")

        def running() -> bool:  # acked (the tag became a job id) and running
            return slow not in ext.Jobs.rows and [r.state for r in ext.Jobs.active()] == ["running"]

        port.pump([], [comp], until=running)
        assert ext.Cancel()
        port.pump([], [comp], until=lambda: not ext.Jobs.active())
        assert [r.state for r in ext.Jobs.rows.values()] == ["done", "cancelled"]
        refused = ext.Start(pipeline="nope")
        port.pump([], [comp], until=lambda: ext.Jobs.rows[refused].final)
        assert comp.jobs.row(refused)["error"].startswith("unknown_pipeline: ")
        serve.terminate()
        serve.wait(timeout=20)
        port.pump([], [comp], until=lambda: ext.Daemon.val == "offline", timeout=10)
        ext.Close()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        if serve.stdout:
            serve.stdout.close()
