"""Issue 9 regressions for the daemon and the pipelines file: each test reproduces one hole found by
an adversarial pass and checks the documented behaviour (docs/failures.md)."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuepipe.orchestrator.cli import main as cli_main
from cuepipe.orchestrator.daemon import Daemon, DaemonConfig
from cuepipe.orchestrator.journal import JobRecord, Journal, JournalError
from cuepipe.orchestrator.pipeline import ConfigError, apply_overrides, named_file, parse
from cuepipe.orchestrator.refusal import JobRefused, Refusal
from cuepipe.orchestrator.scheduler import Scheduler
from cuepipe.stages import load
from cuepipe.stages.codec import Message, decode, encode
from cuepipe.stages.protocol import CMD_PING, CMD_RUN, JOB_EVENTS, REPLIES
from cuepipe.stages.stage import StageError
from tests.support.daemon_peer import PIPELINES, Client, Server
from tests.support.env import subprocess_env

TOML = PIPELINES


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    (folder / "pipelines.toml").write_text(TOML)
    (folder / "clip.txt").write_text("pretend video")
    return folder


def _raw(address: str, *args: tuple[str, object]) -> bytes:
    """An OSC message built by hand, byte for byte, with exactly the given type tags."""

    def padded(b: bytes) -> bytes:
        b += b"\0"
        return b + b"\0" * (-len(b) % 4)

    tags = "," + "".join(t for t, _ in args)
    body = b""
    for tag, value in args:
        if tag == "s":
            body += padded(str(value).encode())
        elif tag == "i":
            body += int(value).to_bytes(4, "big", signed=True)  # type: ignore[call-overload]
        elif tag == "f":
            import struct

            body += struct.pack(">f", value)
    return padded(address.encode()) + padded(tags.encode()) + body


# --- 1. one datagram must not kill the daemon -------------------------------------------------


def test_hostile_reply_port_neither_kills_the_daemon_nor_its_running_job(root: Path) -> None:
    server = Server(root)
    client = Client(server.port)
    try:
        job, _ = client.run_until_started("slowish", root / "clip.txt", "job")
        for i, port in enumerate((-1, 70000, 2**31 - 1)):  # `oscsend ... /cuepipe/v1/cmd/ping si tag -1`
            client.sock.sendto(_raw("/cuepipe/v1/cmd/ping", ("s", f"bad{i}"), ("i", port)), client.daemon)
            error = client.wait("reply/error", tag=f"bad{i}")  # answered on the sender's own port
            assert (error["command"], error["reason"]) == ("ping", "bad_arguments")
            assert str(port) in error["message"]
        assert server.proc.poll() is None, "the daemon died of one datagram"
        client.send("cmd/ping", tag="alive")
        client.wait("reply/pong", tag="alive")
        done = client.wait("job/done", job=job)  # the running job was not disturbed
        assert done["outputs"]
    finally:
        client.close()
        assert server.stop() == 0


# --- 10. error replies echo the tag and the command ------------------------------------------


@pytest.fixture
def daemon(root: Path, tmp_path: Path) -> Iterator[Daemon]:
    config = DaemonConfig(port=0, roots=(root,), state_dir=tmp_path / "state")
    d = Daemon(config, parse(TOML, root / "pipelines.toml"))
    yield d
    d.close()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def _reply(sock: socket.socket) -> Message:
    data, _ = sock.recvfrom(65536)
    (event,) = decode(data, REPLIES + JOB_EVENTS)
    return event


@pytest.mark.parametrize(("packet", "command", "reason"), [
    # reply_port sent as a string: wrong type tag
    (_raw("/cuepipe/v1/cmd/ping", ("s", "T1"), ("s", "7000")), "ping", "bad_arguments"),
    # too few arguments for run
    (_raw("/cuepipe/v1/cmd/run", ("s", "T1"), ("i", 0), ("s", "quick")), "run", "bad_arguments"),
    # a float priority
    (_raw("/cuepipe/v1/cmd/run", ("s", "T1"), ("i", 0), ("s", "quick"), ("s", "/x"), ("f", 1.0)), "run",
     "bad_arguments"),
    # an unknown command still gets its tag back
    (_raw("/cuepipe/v1/cmd/dance", ("s", "T1"), ("i", 0)), "dance", "unknown_command"),
])
def test_error_replies_echo_tag_and_command(daemon: Daemon, peer: socket.socket, packet: bytes, command: str,
                                            reason: str) -> None:
    daemon.handle(packet, peer.getsockname())
    error = _reply(peer)
    assert error.spec.name == "reply/error"
    assert (error["tag"], error["command"], error["reason"]) == ("T1", command, reason)


def test_error_reply_goes_to_the_readable_reply_port(daemon: Daemon, peer: socket.socket) -> None:
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    other.settimeout(5)
    try:
        packet = _raw("/cuepipe/v1/cmd/run", ("s", "T2"), ("i", other.getsockname()[1]), ("s", "quick"))
        daemon.handle(packet, peer.getsockname())
        assert _reply(other)["tag"] == "T2"
    finally:
        other.close()


def test_handle_contains_any_exception(daemon: Daemon, peer: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise OverflowError("a bug in a reply path")

    monkeypatch.setattr(daemon.socket, "send", broken)
    daemon.handle(encode(CMD_PING, tag="p", reply_port=0), peer.getsockname())  # must not raise
    assert daemon.counters["internal"] == 1
    monkeypatch.undo()
    daemon.handle(encode(CMD_PING, tag="p2", reply_port=0), peer.getsockname())
    assert _reply(peer)["tag"] == "p2"


# --- 2. --root holds for every value that names a file ------------------------------------------


def _scheduler(root: Path, journal: Journal) -> Scheduler:
    return Scheduler(parse(TOML, root / "pipelines.toml"), journal, lambda e, r: None, {"cpu": 1, "gpu": 1},
                     [root])


@pytest.mark.parametrize("sets", [
    ["matting.background=/outside/x.png", "matting.outputs=composite"],  # the reported bypass
    ["composite.background=/outside/bg.mp4"],
    ["composite.audio=/outside/music.wav"],
    ["matting.model=/etc/passwd"],  # exists
    ["matting.model=/etc/no-such-model"],  # does not: same answer
    ["matting.model=~/../../etc/passwd"],
    ["composite.background=../outside.png"],  # relative to the daemon's folder
])
def test_every_file_parameter_obeys_the_roots(root: Path, tmp_path: Path, sets: list[str]) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        s = _scheduler(root, journal)
        with pytest.raises(JobRefused) as refused:
            s.submit("matte", str(root / "clip.txt"), sets)
        assert refused.value.reason is Refusal.NOT_ALLOWED
        assert "outside the allowed roots" in refused.value.message
        assert "exist" not in refused.value.message and "missing" not in refused.value.message
        assert s.records() == []
    finally:
        journal.close()


def test_refusal_does_not_tell_whether_a_file_exists(root: Path, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        s = _scheduler(root, journal)
        answers = []
        for path in ("/etc/passwd", "/etc/no-such-file-here"):
            with pytest.raises(JobRefused) as refused:
                s.submit("matte", str(root / "clip.txt"), [f"matting.model={path}"])
            answers.append((refused.value.reason, refused.value.message.replace(path, "PATH")))
        assert answers[0] == answers[1]
    finally:
        journal.close()


def test_words_colours_and_manifest_names_are_not_files() -> None:
    matting, composite = load("matting").PARAMS, load("composite").PARAMS
    assert named_file(matting["background"], "#102030") is None
    assert named_file(matting["background"], "Black") is None
    assert named_file(matting["model"], "rvm_mobilenetv3_fp32") is None  # a manifest name
    assert named_file(composite["audio"], "input") is None
    assert named_file(composite["background"], "none") is None
    assert named_file(matting["ratio"], "0.5") is None  # not a file parameter
    assert named_file(matting["background"], "takes/bg.png") == Path("takes/bg.png")
    assert named_file(matting["model"], "/etc/passwd") == Path("/etc/passwd")
    assert named_file(composite["audio"], "~/a.wav") == Path("~/a.wav").expanduser()


def test_daemon_refuses_the_reported_background_bypass(daemon: Daemon, peer: socket.socket, root: Path,
                                                       tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not really a png")
    packet = encode(CMD_RUN, tag="r", reply_port=0, pipeline="matte", input=str(root / "clip.txt"), priority=0,
                    sets=[f"matting.background={outside}", "matting.outputs=composite"])
    daemon.handle(packet, peer.getsockname())
    error = _reply(peer)
    assert (error.spec.name, error["tag"], error["reason"]) == ("reply/error", "r", "not_allowed")
    assert daemon.scheduler.records() == []


# --- 4. the journal ---------------------------------------------------------------------------


def _serve(root: Path, state: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cuepipe.orchestrator.cli",
                           "--pipelines", str(root / "pipelines.toml"),
                           "serve", "--port", "0", "--root", str(root), "--state", str(state)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_corrupt_journal_refuses_to_start_with_one_sentence(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "journal.sqlite3").write_bytes(b"this is not sqlite" * 100)
    result = _serve(root, state)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "corrupt" in lines[0] and "journal.sqlite3" in lines[0] and "move it aside" in lines[0]


def _chattr(flag: str, path: Path) -> bool:
    chattr = shutil.which("chattr")
    return chattr is not None and subprocess.run([chattr, flag, str(path)], capture_output=True).returncode == 0


def test_unwritable_journal_refuses_to_start(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    Journal(state / "journal.sqlite3").close()
    if not _chattr("+i", state / "journal.sqlite3"):
        pytest.skip("chattr +i is not permitted here (needs root and a file system with the immutable flag)")
    try:
        result = _serve(root, state)
    finally:
        _chattr("-i", state / "journal.sqlite3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be written" in lines[0], result.stderr


def test_journal_failing_later_refuses_new_jobs_and_keeps_serving(daemon: Daemon, peer: socket.socket,
                                                                  root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_gone(record: JobRecord) -> None:
        raise JournalError("cannot write the journal: disk I/O error")

    monkeypatch.setattr(daemon.journal, "save", disk_gone)
    packet = encode(CMD_RUN, tag="r1", reply_port=0, pipeline="quick", input=str(root / "clip.txt"), priority=0,
                    sets=[])
    daemon.handle(packet, peer.getsockname())
    error = _reply(peer)
    assert (error.spec.name, error["reason"]) == ("reply/error", "unavailable")
    assert "journal" in error["message"]
    assert daemon.scheduler.records() == [], "a job that could not be journaled must not be kept"
    daemon.scheduler.dispatch()  # used to raise here and end `cuepipe serve`
    daemon.handle(encode(CMD_PING, tag="p", reply_port=0), peer.getsockname())
    assert _reply(peer).spec.name == "reply/pong"
    monkeypatch.undo()  # the disk is back: jobs are accepted again
    daemon.handle(encode(CMD_RUN, tag="r2", reply_port=0, pipeline="quick", input=str(root / "clip.txt"),
                         priority=0, sets=[]), peer.getsockname())
    replies = [_reply(peer) for _ in range(2)]  # job/queued to the requester, then the ack
    assert {e.spec.name for e in replies} == {"job/queued", "reply/ack"}


# --- 7. a graceful stop re-queues ------------------------------------------------------------


def test_sigterm_requeues_the_running_job_and_it_finishes_after_restart(root: Path) -> None:
    server = Server(root)
    client = Client(server.port)
    try:
        job, _ = client.run_until_started("slowish", root / "clip.txt", "a")
        assert server.stop() == 0  # SIGTERM (CTRL_BREAK on Windows)
        client.pump(0.3)
        mine = [e.spec.name for e in client.events if e.fields.get("job") == job]
        assert "job/cancelled" not in mine, "a re-queued job is not over: no terminal Event yet"
        assert mine.count("job/queued") == 2  # accepted, and waiting again
        server = Server(root)
        client.daemon = ("127.0.0.1", server.port)
        client.wait("job/done", job=job, timeout=60)  # the same job id runs again after the restart
        client.send("cmd/status", tag="s", job=job)
        assert client.wait("reply/status", tag="s")["state"] == "done"
        terminal = [e for e in client.events if e.fields.get("job") == job
                    and e.spec.name in ("job/done", "job/failed", "job/cancelled")]
        assert len(terminal) == 1
    finally:
        client.close()
        server.stop()


def test_sigterm_under_interrupted_policy_marks_interrupted(root: Path) -> None:
    server = Server(root, "--on-restart", "interrupted")
    client = Client(server.port)
    try:
        job, _ = client.run_until_started("slowish", root / "clip.txt", "a")
        assert server.stop() == 0
        server = Server(root, "--on-restart", "interrupted")
        client.daemon = ("127.0.0.1", server.port)
        client.send("cmd/status", tag="s", job=job)
        assert client.wait("reply/status", tag="s")["state"] == "interrupted"
    finally:
        client.close()
        server.stop()


# --- 8. validation gaps ----------------------------------------------------------------------


@pytest.mark.parametrize(("line", "problem"), [
    ("timeout = 0", "timeout must be a finite number > 0"),
    ("timeout = nan", "timeout must be a finite number > 0"),
    ("timeout = inf", "timeout must be a finite number > 0"),
    ("timeout = -5", "timeout must be a finite number > 0"),
    ("stall_timeout = nan", "stall_timeout must be a finite number >= 0"),
    ("stall_timeout = inf", "stall_timeout must be a finite number >= 0"),
])
def test_bad_timeouts_are_config_errors(tmp_path: Path, line: str, problem: str) -> None:
    text = f'[pipelines.p]\n[[pipelines.p.stages]]\nstage = "misbehaving"\n{line}\n'
    with pytest.raises(ConfigError, match=problem):
        parse(text, tmp_path / "pipelines.toml")


def test_cuepipe_check_refuses_a_zero_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipelines.toml"
    path.write_text('[defaults]\ntimeout = 0\n[pipelines.p]\n[[pipelines.p.stages]]\nstage = "misbehaving"\n')
    assert cli_main(["--pipelines", str(path), "check"]) == 2
    assert "timeout must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "problem"), [
    ("preprocess.fps=inf", "finite"),
    ("preprocess.fps=nan", "finite"),
    ("preprocess.start_seconds=-inf", "finite"),
    ("matting.ratio=nan", "finite"),
    ("preprocess.width=100000", "<= 8192"),
    ("preprocess.height=8193", "<= 8192"),
])
def test_non_finite_and_oversized_overrides_are_refused(tmp_path: Path, override: str, problem: str) -> None:
    text = ('[pipelines.p]\n[[pipelines.p.stages]]\nstage = "preprocess"\n'
            '[[pipelines.p.stages]]\nstage = "matting"\n')
    pipelines = parse(text, tmp_path / "pipelines.toml")
    with pytest.raises(ConfigError, match=problem):
        apply_overrides(pipelines, pipelines.pipelines["p"], [override])


def test_run_refuses_an_infinite_fps_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipelines.toml"
    path.write_text('[pipelines.p]\n[[pipelines.p.stages]]\nstage = "preprocess"\n')
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    code = cli_main(["--pipelines", str(path), "run", "p", str(clip), "--set", "preprocess.fps=inf"])
    assert code == 2
    assert "finite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.log")), "no stage may start"


def test_composite_canvas_size_is_bounded() -> None:
    composite = load("composite")
    with pytest.raises(StageError, match="at most 8192"):
        composite._coerce({"size": "100000x720"})
    assert composite._coerce({"size": "8192x4320"})["size"] == (8192, 4320)


def test_finite_floats_still_pass() -> None:
    param = load("preprocess").PARAMS["fps"]
    assert param.coerce("25") == 25.0 and math.isfinite(param.coerce(29.97))

