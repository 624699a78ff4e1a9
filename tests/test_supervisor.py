"""``cuepipe supervise``: the daemon comes back after it dies; restart loops cool down."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import psutil
import pytest

from cuepipe.orchestrator.supervisor import Backoff, Supervisor
from tests.support.daemon_peer import PIPELINES, Client
from tests.support.env import subprocess_env


def test_backoff_doubles_resets_after_a_stable_run_and_flapping_cools_down() -> None:
    t = [0.0]
    policy = Backoff(backoff_start=1, backoff_max=8, stable_after=30, flap_window=100, flap_limit=5,
                           flap_cooldown=300)
    sup = Supervisor(["x"], Path("."), Path("log"), policy, now=lambda: t[0])
    recent: deque[float] = deque()
    waits, backoff = [], 1.0
    for ran_for in [0.1, 0.1, 0.1, 0.1]:
        t[0] += 1
        wait, backoff = sup.next_wait(recent, backoff, ran_for)
        waits.append(wait)
    assert waits == [1, 2, 4, 8]
    t[0] += 1
    assert sup.next_wait(recent, backoff, 0.1) == (300, 1)  # 5 restarts within 100 s: flapping
    t[0] += 1000
    assert sup.next_wait(recent, 8.0, 45.0) == (1, 2)  # a 45 s run was stable: back to the start


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_daemon_is_revived_after_sigkill(tmp_path: Path) -> None:
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    log = tmp_path / "serve.log"
    sup = subprocess.Popen([sys.executable, "-m", "cuepipe.orchestrator.cli",
                            "--pipelines", str(tmp_path / "pipelines.toml"),
                            "supervise", "--log", str(log), "--", "--port", "0", "--root", str(tmp_path),
                            "--state", str(tmp_path / "state")], env=subprocess_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def ports(count: int) -> list[int]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [int(line.rsplit(":", 1)[1]) for line in (log.read_text().splitlines() if log.exists() else [])
                     if "listening on" in line]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"the daemon did not (re)start: {log.read_text() if log.exists() else 'no log'}")

    try:
        first = Client(ports(1)[0])
        try:
            first.send("cmd/ping", tag="before")
            first.wait("reply/pong", tag="before")
        finally:
            first.close()
        [daemon] = psutil.Process(sup.pid).children()
        daemon.kill()
        second = ports(2)[1]
        [revived] = psutil.Process(sup.pid).children()
        assert revived.pid != daemon.pid
        client = Client(second)
        try:
            client.send("cmd/ping", tag="alive")
            client.wait("reply/pong", tag="alive")
        finally:
            client.close()
        sup.send_signal(signal.SIGINT)
        assert sup.wait(timeout=20) == 0
        assert not revived.is_running() or revived.status() == psutil.STATUS_ZOMBIE
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
