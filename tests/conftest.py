"""Shared fixtures only: a fake-TD OSC receiver on loopback and a leak check on every test.

What tests share besides fixtures (fakes, builders, the misbehaving stage) lives in ``tests/support``."""

from __future__ import annotations

import os

from tests.support.env import TEST_STAGES

# Registered before `stages` is first imported, for this process and every subprocess it starts.
os.environ["CUEPIPE_STAGES"] = TEST_STAGES

import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.support.fake_td import FakeTD, all_specs


@pytest.fixture
def fake_td() -> Iterator[FakeTD]:
    td = FakeTD(all_specs())
    yield td
    td.close()


def _ray_own(proc: psutil.Process) -> bool:
    """A process of the one local Ray that tests/test_ray.py starts for the whole run (its workers come and
    go as Ray likes): not a leak of the test that happened to be running. Stage processes under a Ray
    actor are still caught: they run ``cuepipe.stages``."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "cuepipe.stages" not in cmdline and (proc.name().startswith("ray::") or "site-packages/ray/" in cmdline
                                                 or "raylet" in cmdline or "gcs_server" in cmdline)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a child process or a non-daemon thread behind."""
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    before_threads = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before_children and not _ray_own(p)]
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        threads = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()
                   and not t.name.startswith("ray_")]
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
