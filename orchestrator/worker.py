"""Worker: one supervised stage process, started in its own process group, killed as a whole tree.

Why not ``Popen.kill()``: a stage spawns ffmpeg and onnxruntime threads; killing only the Python
process leaves ffmpeg running (and holding the output file open on Windows). The Worker therefore

- POSIX: starts the child in a new session (``start_new_session``; its own process group), stops it
  with SIGTERM to the group, then SIGKILL to the group after a grace period;
- Windows: starts it with ``CREATE_NEW_PROCESS_GROUP`` (so TD's / the console's Ctrl-C does not
  reach it), stops it with CTRL_BREAK_EVENT, then kills every process of its tree;
- both: remembers every descendant it has seen (psutil, pid + creation time against pid reuse),
  so grandchildren that outlive their parent or leave the group are killed too.

The child's stdout and stderr go to a log file, not a pipe: nothing can block on an unread pipe,
and the tail of the log becomes the ``stderr`` of a ``failed`` Event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol

import psutil

from orchestrator import defaults

log = logging.getLogger(__name__)
IS_WINDOWS = sys.platform == "win32"


class WorkerError(Exception):
    """The stage process could not be started."""


class WorkerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"  # ended by itself
    KILLED = "killed"  # ended by stop()


class Task(Protocol):
    """What a Job needs from a running stage attempt: a Worker, or a job on a resident Worker."""

    started_at: float

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def scan(self, every: float = 0.5) -> None: ...

    def stop(self, grace: float = defaults.KILL_GRACE) -> int: ...

    def cleanup(self) -> None: ...

    def tail(self, lines: int = defaults.STDERR_TAIL_LINES) -> str: ...


class Worker:
    """A stage subprocess and everything it spawns."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        now: Callable[[], float] = time.monotonic,
        pipes: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.pipes = pipes  # stdin/stdout as text pipes (resident workers); stderr always to the log
        self.cwd = cwd
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.state = WorkerState.CREATED
        self.started_at = 0.0
        self._now = now
        self._proc: subprocess.Popen[Any] | None = None
        self._log: IO[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._last_scan = 0.0

    @property
    def stdin(self) -> IO[str] | None:
        return self._proc.stdin if self._proc and self.pipes else None

    @property
    def stdout(self) -> IO[str] | None:
        return self._proc.stdout if self._proc and self.pipes else None

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else -1

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        self._log = self.log_path.open("ab")
        try:
            if self.pipes:
                kwargs.update(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                              encoding="utf-8", bufsize=1)
            else:
                kwargs.update(stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
            self._proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, **kwargs)
        except OSError as exc:
            self._log.close()
            raise WorkerError(f"cannot start {self.argv[0]}: {exc}") from exc
        self.state = WorkerState.RUNNING
        self.started_at = self._now()
        self._remember(self._proc.pid)

    def _remember(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            self._seen.setdefault(pid, proc)

    def scan(self, every: float = 0.5) -> None:
        """Record the current descendants (cheap enough to call from the launcher's loop)."""
        t = self._now()
        if self._proc is None or t - self._last_scan < every:
            return
        self._last_scan = t
        leader = self._seen.get(self._proc.pid)
        if leader is None:
            return
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                self._seen.setdefault(child.pid, child)

    def poll(self) -> int | None:
        """The exit code once the stage process has exited (negative: killed by that signal)."""
        if self._proc is None:
            return None
        code = self._proc.poll()
        if code is not None and self.state is WorkerState.RUNNING:
            self.state = WorkerState.EXITED
        return code

    def _alive(self) -> list[psutil.Process]:
        alive = []
        for proc in self._seen.values():
            with contextlib.suppress(psutil.Error):
                # is_running() compares creation time: a reused pid is not ours.
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def _signal_group(self, hard: bool) -> None:
        if self._proc is None:
            return
        if sys.platform == "win32":  # spelled out so that type checkers see the platform branch
            if not hard and self._proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(self._proc.pid, signal.CTRL_BREAK_EVENT)
        else:
            # The group id is the leader's pid (new session); the group outlives the leader.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL if hard else signal.SIGTERM)

    def stop(self, grace: float = defaults.KILL_GRACE) -> int:
        """Stop the whole tree: polite signal, ``grace`` seconds, then kill. Returns the exit code.

        The leader is only ever waited for through ``Popen`` (psutil reaping it would make Popen
        report exit code 0 for a killed stage).
        """
        if self._proc is None:
            return 0
        self.scan(every=0.0)
        leader = self._proc
        was_running = leader.poll() is None
        self._signal_group(hard=False)
        others = [p for p in self._alive() if p.pid != leader.pid]
        for proc in others:  # descendants that left the group (or Windows, which has no groups)
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        deadline = self._now() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=grace)
        _, survivors = psutil.wait_procs(others, timeout=max(0.0, deadline - self._now()))
        if leader.poll() is None or survivors:
            log.warning("stage tree did not stop in %.1fs; killing it", grace)
            self._signal_group(hard=True)
            for proc in survivors:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            if leader.poll() is None:
                leader.kill()
            psutil.wait_procs(survivors, timeout=grace)
        code = leader.wait()
        if was_running:
            self.state = WorkerState.KILLED
        self.close()
        return code

    def cleanup(self) -> None:
        """After the stage exited by itself: kill anything of its tree still running, close the log."""
        if self._alive():
            self.stop(grace=0.5)
        else:
            if self._proc is not None:
                self._proc.wait()
            self.close()

    def close(self) -> None:
        if self._proc is not None and self.pipes:
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._log is not None and not self._log.closed:
            self._log.close()

    def tail(self, lines: int = defaults.STDERR_TAIL_LINES) -> str:
        """The last lines the stage wrote to stdout/stderr."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 16384))
                data = f.read()
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


def stage_env() -> dict[str, str]:
    """The environment stages run in: this one, unbuffered, with this cuepipe first on the path."""
    path = os.pathsep.join(filter(None, [str(defaults.REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
