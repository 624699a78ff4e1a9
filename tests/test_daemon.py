"""``cuepipe serve`` over loopback with a fake-TD client: real daemon process, real UDP.

The queue's rules (priorities, slots, cancel, queue full, keep_running backoff, a graceful stop) are
tested in memory in ``tests/test_scheduler.py``; these keep the real processes and sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cuepipe.orchestrator.daemon import Daemon, DaemonConfig
from cuepipe.orchestrator.job import JobState
from cuepipe.orchestrator.pipeline import parse
from cuepipe.stages.codec import MessageError, decode
from cuepipe.stages.protocol import COMMANDS
from tests.support.daemon_peer import PIPELINES, Client, Server
from tests.support.env import subprocess_env
from tests.support.fakes import FakeClock, FakeRunner, settle


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    (tmp_path / "clip.txt").write_text("pretend video")
    return tmp_path


@pytest.fixture
def server(root: Path) -> Iterator[Server]:
    srv = Server(root)
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    c = Client(server.port)
    yield c
    c.close()


def test_run_status_round_trip(root: Path, client: Client) -> None:
    client.send("cmd/ping", tag="p1")
    assert client.wait("reply/pong", tag="p1")["uptime"] >= 0
    client.send("cmd/run", tag="go", pipeline="quick", input=str(root / "clip.txt"), priority=0, sets=["0.frames=3"])
    ack = client.wait("reply/ack", tag="go")
    job = ack["job"]
    client.wait("job/queued", job=job)
    done = client.wait("job/done", job=job)
    assert Path(done["outputs"][0]).read_text() == "pretend video"
    client.send("cmd/status", tag="s1", job=job)
    status = client.wait("reply/status", tag="s1")
    assert (status["state"], status["overall"], status["pipeline"]) == ("done", 1.0, "quick")
    client.send("cmd/list", tag="l1")
    assert '"quick"' in client.wait("reply/pipelines", tag="l1")["pipelines"]


def test_refusals(root: Path, client: Client) -> None:
    outside = root.parent / f"{root.name}-outside.txt"
    outside.write_text("x")
    if sys.platform != "win32":
        (root / "link.txt").symlink_to(outside)
    cases = [
        ("nope", str(root / "clip.txt"), [], "unknown_pipeline"),
        ("quick", str(root / "missing.mp4"), [], "input_missing"),
        ("quick", str(root / ".." / outside.name), [], "not_allowed"),  # `..` escape
        ("quick", "clip.txt", [], "bad_arguments"),  # relative: the daemon's cwd is not TD's
        ("quick", str(root / "clip.txt"), ["0.frames=lots"], "bad_arguments"),
    ]
    if sys.platform != "win32":
        cases.append(("quick", str(root / "link.txt"), [], "not_allowed"))  # symlink escape
    for i, (pipeline, path, sets, reason) in enumerate(cases):
        client.send("cmd/run", tag=f"r{i}", pipeline=pipeline, input=path, priority=0, sets=sets)
        error = client.wait("reply/error", tag=f"r{i}")
        assert error["reason"] == reason, (path, error.fields)
    client.send("cmd/cancel", tag="c", job="no-such-job")
    assert client.wait("reply/error", tag="c")["reason"] == "unknown_job"
    client.sock.sendto(b"/cuepipe/v1/cmd/dance\x00\x00\x00,\x00\x00\x00", client.daemon)
    assert client.wait("reply/error", tag="")["reason"] == "unknown_command"
    assert not [e for e in client.events if e.spec.name == "job/queued"]


def test_cancel_queued_and_running(root: Path, client: Client) -> None:
    client.send("cmd/run", tag="a", pipeline="slow", input=str(root / "clip.txt"), priority=0,
                sets=[f"0.pidfile={root / 'pids.txt'}"])
    running = client.wait("reply/ack", tag="a")["job"]
    client.send("cmd/run", tag="b", pipeline="slow", input=str(root / "clip.txt"), priority=0, sets=[])
    queued = client.wait("reply/ack", tag="b")["job"]  # one cpu slot: this one waits
    client.wait("job/stage_started", job=running)
    client.send("cmd/status", tag="s", job=queued)
    assert client.wait("reply/status", tag="s")["state"] == "queued"
    client.send("cmd/cancel", tag="cq", job=queued)
    client.wait("reply/ack", tag="cq")
    client.wait("job/cancelled", job=queued)
    deadline = time.monotonic() + 10
    while not (root / "pids.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = [int(p) for p in (root / "pids.txt").read_text().split()]
    client.send("cmd/cancel", tag="cr", job=running)
    client.wait("job/cancelled", job=running)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (root / "out" / ".cuepipe-work" / running).exists()  # partial outputs removed
    assert "job/started" not in [e.spec.name for e in client.events if e.fields.get("job") == queued]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_stage_killed_mid_job_is_retried_then_reported(root: Path, client: Client) -> None:
    job, first = client.run_until_started("crashy", root / "clip.txt", "k")
    os.kill(first["pid"], signal.SIGKILL)
    failed = client.wait("job/stage_failed", job=job)
    assert (failed["exit_code"], failed["kind"], failed["retrying"]) == (-signal.SIGKILL, "crashed", 1)
    second = client.wait("job/stage_started", job=job, attempt=2)
    os.kill(second["pid"], signal.SIGKILL)
    assert client.wait("job/failed", job=job)["kind"] == "crashed"
    client.send("cmd/status", tag="s", job=job)
    assert client.wait("reply/status", tag="s")["state"] == "failed"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_daemon_killed_then_restarted_accounts_for_every_job(root: Path) -> None:
    first = Server(root)
    c = Client(first.port)
    try:
        done_job = c.run("quick", root / "clip.txt", "d")
        out = Path(c.wait("job/done", job=done_job)["outputs"][0])
        running_job, _ = c.run_until_started("slow", root / "clip.txt", "r")
        queued_job = c.run("quick", root / "clip.txt", "q")
    finally:
        first.kill_hard()
        c.close()
    second = Server(root, "--on-restart", "interrupted")
    c = Client(second.port)
    try:
        c.send("cmd/subscribe", tag="sub")  # a reconnecting TD subscribes first: re-queued jobs report to it
        c.wait("reply/ack", tag="sub")
        c.send("cmd/status", tag="all", job="")
        c.wait("reply/ack", tag="all")
        states = {e["job"]: e["state"] for e in c.events if e.spec.name == "reply/status"}
        assert states[done_job] == "done" and out.read_text() == "pretend video"
        assert states[running_job] == "interrupted"
        assert states[queued_job] in ("queued", "running", "done")  # re-queued: it runs now
        if states[queued_job] != "done":
            c.wait("job/done", job=queued_job)
    finally:
        second.stop()
        c.close()


def test_serve_loop_starts_keep_running_restarts_once_their_backoff_passed(root: Path, tmp_path: Path) -> None:
    """The serving loop dispatches on its own, so a restart waiting for its backoff starts without any
    Command. In process, with a fake JobRunner and clock; the chain of restarts itself is in
    tests/test_scheduler.py."""
    daemon = Daemon(DaemonConfig(port=0, roots=(root,), state_dir=tmp_path / "state", heartbeat=0.01),
                    parse(PIPELINES, root / "pipelines.toml"))
    runner, clock = FakeRunner(), FakeClock()
    daemon.scheduler.runner, daemon.scheduler.clock = runner, clock
    stop = threading.Event()
    serving = threading.Thread(target=daemon.serve, args=(stop,), name="serve")
    try:
        first = daemon.scheduler.submit("live", str(root / "clip.txt"), priority=10).id
        runner.wait_started(1)
        runner.finish(first, JobState.FAILED)
        settle(lambda: len(daemon.scheduler.records()) == 2)
        serving.start()
        time.sleep(0.1)  # ten beats of the loop before the 1 s backoff passed (on the fake clock)
        assert runner.started == [first]
        clock.advance(1.0)
        assert runner.wait_started(2)[1] == daemon.scheduler.records()[1].id
    finally:
        stop.set()
        if serving.ident is not None:
            serving.join(10)  # serve() closes the daemon as it returns
        else:
            daemon.close()


def test_warm_worker_serves_jobs_and_shows_in_heartbeat(root: Path) -> None:
    srv = Server(root, "--warm", "misbehaving")
    c = Client(srv.port)
    try:
        c.send("cmd/subscribe", tag="sub")
        beat = c.wait("daemon/heartbeat")
        [worker] = json.loads(beat["workers"])
        assert (worker["stage"], worker["state"], worker["jobs"]) == ("misbehaving", "idle", 0)
        pids = []
        for tag in ("w1", "w2"):
            c.send("cmd/run", tag=tag, pipeline="warm", input=str(root / "clip.txt"), priority=0, sets=[])
            job = c.wait("reply/ack", tag=tag)["job"]
            pids.append(c.wait("job/stage_started", job=job)["pid"])
            c.wait("job/done", job=job)
        assert pids == [worker["pid"], worker["pid"]]  # the pre-started process took both jobs
    finally:
        srv.stop()
        c.close()


def test_heartbeat_to_subscribers(client: Client) -> None:
    client.send("cmd/subscribe", tag="sub")
    client.wait("reply/ack", tag="sub")
    beats = []
    deadline = time.monotonic() + 5
    while len(beats) < 2 and time.monotonic() < deadline:
        client.pump(0.2)
        beats = [e for e in client.events if e.spec.name == "daemon/heartbeat"]
    assert len(beats) >= 2 and beats[1]["uptime"] > beats[0]["uptime"]
    assert (beats[0]["queued"], beats[0]["running"], beats[0]["workers"]) == (0, 0, "[]")
    client.send("cmd/unsubscribe", tag="unsub")
    client.wait("reply/ack", tag="unsub")
    client.pump(0.1)
    count = len([e for e in client.events if e.spec.name == "daemon/heartbeat"])
    client.pump(1.5)
    assert len([e for e in client.events if e.spec.name == "daemon/heartbeat"]) == count


def test_burst_of_10000_half_malformed(client: Client) -> None:
    """5,000 valid pings interleaved with 5,000 bad datagrams, sent as fast as Python can.

    Oversized (20 KB) datagrams are 1 in 100 of the bad ones: 50 of them test that they are refused
    without disturbing anything. (A burst of thousands of them is tens of MB, more than any socket
    buffer holds; UDP then drops datagrams in the kernel before any server sees them.)
    """
    garbage = [b"", b"\x00" * 7, b"#bundle\x00garbage", b"/cuepipe/v1/cmd/ping\x00\x00\x00\x00,s\x00\x00",
               b"/\xff\xfe\x00,\x00\x00\x00"]
    valid = 0
    for i in range(10_000):
        if i % 2:
            client.sock.sendto(b"x" * 20000 if i % 200 == 1 else garbage[i % len(garbage)], client.daemon)
        else:
            client.send("cmd/ping", tag=f"b{i}")
            valid += 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(e.spec.name == "reply/pong" for e in client.events) < valid:
        client.pump(0.2)
    pongs = {e["tag"] for e in client.events if e.spec.name == "reply/pong"}
    assert len(pongs) == valid, f"lost {valid - len(pongs)} of {valid} valid commands"
    client.send("cmd/ping", tag="after")
    client.wait("reply/pong", tag="after")


@pytest.mark.skipif(sys.platform != "linux", reason="needs the whole 127/8 loopback (Linux)")
def test_peer_outside_allow_list_is_refused(root: Path) -> None:
    srv = Server(root, "--allow", "127.0.0.2")
    stranger, friend = Client(srv.port), Client(srv.port, bind="127.0.0.2")
    try:
        stranger.send("cmd/ping", tag="s")
        friend.send("cmd/ping", tag="f")
        friend.wait("reply/pong", tag="f")
        stranger.pump(0.5)
        assert stranger.events == []  # no reply at all: not even an error to a stranger
    finally:
        srv.stop()
        stranger.close()
        friend.close()


def test_non_loopback_bind_needs_allow_list(root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cuepipe.orchestrator.cli",
                           "--pipelines", str(root / "pipelines.toml"),
                           "serve", "--host", "0.0.0.0", "--port", "0"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--allow" in proc.stderr


def test_garbage_never_decodes_as_a_command() -> None:
    with pytest.raises(MessageError):
        decode(b"/cuepipe/v1/cmd/ping\x00\x00\x00\x00,s\x00\x00", COMMANDS)
