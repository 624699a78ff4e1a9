"""Parent watch: a stage (one-shot or resident) dies with the launcher that started it.

Why: when ``cuepipe run`` or ``cuepipe serve`` is killed hard (``kill -9``, a crash, Task Manager)
nobody stops its stages; they are re-parented and run to the end, holding the GPU, ffmpeg and output
files. The launcher names itself in ``CUEPIPE_PARENT`` (``PID:CREATION_TIME``, see ``parent_token``);
``stage_main`` calls ``watch_parent``, whose daemon thread checks every half second that this
process is still alive. Once it is gone the stage is stopped the polite way first (the same
KeyboardInterrupt path as the launcher's SIGTERM / CTRL_BREAK, so ``with`` blocks delete temp files
and reap ffmpeg), and after a grace period its whole process tree is killed.

Linux's ``PR_SET_PDEATHSIG`` is deliberately not used: it fires when the *thread* that forked the
stage exits, and the daemon starts stages from job threads that end long before their worker does.

No environment variable (a stage started by hand): no watch. This module must not import
``orchestrator`` (stages never do); the orchestrator imports ``PARENT_ENV`` and ``parent_token``.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, MutableMapping

import psutil

from cuepipe.stages.errors import EXIT_INTERRUPTED

log = logging.getLogger(__name__)

PARENT_ENV = "CUEPIPE_PARENT"
CHECK_INTERVAL = 0.5  # seconds between two looks at the parent
GRACE = 3.0  # seconds between the polite stop and the hard kill of the own tree


def parent_token(pid: int | None = None) -> str:
    """``PID:CREATION_TIME`` of this process (or ``pid``): what a launcher puts in ``PARENT_ENV``."""
    proc = psutil.Process(pid)
    return f"{proc.pid}:{proc.create_time()!r}"


def parse_token(text: str) -> tuple[int, float] | None:
    pid, _, created = text.partition(":")
    try:
        return int(pid), float(created)
    except ValueError:
        return None


def same_creation(a: float, b: float) -> bool:
    """Whether two recorded creation times are the same process's (psutil's clock ticks, rounded)."""
    return abs(a - b) < 0.01


def same_process(proc: psutil.Process, created: float) -> bool:
    """Whether ``proc`` is the process created at ``created`` (not a later one that reused its pid)."""
    return same_creation(proc.create_time(), created)


def parent_alive(pid: int, created: float) -> bool:
    """Whether that process still runs: same pid, same creation time, not a zombie."""
    try:
        proc = psutil.Process(pid)
        return same_process(proc, created) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # it exists and is not ours to inspect: assume it is the parent
        return True


def _group_leader() -> bool:
    """POSIX: whether this process leads its own process group (the Worker starts stages that way)."""
    return sys.platform != "win32" and os.getpgrp() == os.getpid()


def kill_descendants(timeout: float = 1.0) -> None:
    """Kill every process this one started that is still attached to it (any OS)."""
    with contextlib.suppress(psutil.Error):
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=timeout)


def stop_tree(grace: float = GRACE) -> None:
    """The parent is gone: interrupt the stage politely, then kill its whole tree after ``grace``."""
    atexit.register(kill_descendants)  # the stage may return quickly, leaving a stubborn child behind
    if sys.platform == "win32":
        _thread.interrupt_main()
    elif _group_leader():
        os.killpg(os.getpgrp(), signal.SIGTERM)  # what the launcher's own stop does: ffmpeg gets it too
    else:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    log.error("still running %.0fs after the launcher died; killing the stage's process tree", grace)
    kill_descendants()
    if _group_leader():
        os.killpg(os.getpgrp(), signal.SIGKILL)  # also whatever of the group left the tree
    os._exit(EXIT_INTERRUPTED)


def _watch(alive: Callable[[], bool], interval: float, grace: float) -> None:
    while alive():
        time.sleep(interval)
    log.warning("the launcher that started this stage is gone; stopping")
    stop_tree(grace)


def watch_parent(environ: MutableMapping[str, str] | None = None, interval: float = CHECK_INTERVAL,
                 grace: float = GRACE) -> bool:
    """Start the watch if ``PARENT_ENV`` names a launcher; False if that launcher is already gone.

    The variable is removed from the environment, so processes the stage starts do not inherit it.
    """
    env = os.environ if environ is None else environ
    token = env.pop(PARENT_ENV, None)
    if not token:
        return True
    parsed = parse_token(token)
    if parsed is None:
        log.warning("ignoring %s=%r: expected PID:CREATION_TIME", PARENT_ENV, token)
        return True
    pid, created = parsed
    if not parent_alive(pid, created):
        return False
    alive: Callable[[], bool]
    if sys.platform != "win32" and os.getppid() == pid:
        alive = lambda: os.getppid() == pid  # noqa: E731 -- the cheap test: re-parented once it died
    else:  # Windows, or started through a wrapper (a venv launcher): ask about the launcher itself
        alive = lambda: parent_alive(pid, created)  # noqa: E731
    threading.Thread(target=_watch, args=(alive, interval, grace), name="cuepipe-parent-watch",
                     daemon=True).start()
    return True
