"""Shared fixtures: a fake-TD OSC receiver on loopback and a leak check on every test."""

from __future__ import annotations

import os

# Registered before `stages` is first imported, for this process and every subprocess it starts.
os.environ["CUEPIPE_STAGES"] = "misbehaving=tests.stage_misbehaving"

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stages.events import STAGE_EVENTS, Event, EventError, EventSpec, decode

ROOT = Path(__file__).resolve().parent.parent


class FakeTD:
    """Records every OSC datagram sent to it, as TouchDesigner's OSC In DAT would see them."""

    def __init__(self, specs: tuple[EventSpec, ...]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.specs = specs
        self.events: list[Event] = []
        self.raw: list[bytes] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-td", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.raw.append(data)
            try:
                self.events.extend(decode(data, self.specs))
            except EventError as exc:
                self.errors.append(str(exc))

    def names(self) -> list[str]:
        return [e.spec.name for e in self.events]

    def wait_for(self, name: str, timeout: float = 30.0) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.spec.name == name:
                    return e
            time.sleep(0.01)
        raise AssertionError(f"no {name!r} event within {timeout}s; got {self.names()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def all_specs() -> tuple[EventSpec, ...]:
    try:
        from orchestrator.events import JOB_EVENTS
    except ImportError:  # before the orchestrator side exists
        return STAGE_EVENTS
    return STAGE_EVENTS + JOB_EVENTS


@pytest.fixture
def fake_td() -> Iterator[FakeTD]:
    td = FakeTD(all_specs())
    yield td
    td.close()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a child process or a non-daemon thread behind."""
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    before_threads = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before_children]
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        threads = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
        if not left and not threads:
            return
        if time.monotonic() > deadline:
            for p in left:
                p.kill()
            pytest.fail(f"leaked child processes {[(p.pid, p.name()) for p in left]} / threads {threads}")
        time.sleep(0.05)


@pytest.fixture
def python() -> str:
    return sys.executable


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: the repo importable (for tests.* stages) from any cwd."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
