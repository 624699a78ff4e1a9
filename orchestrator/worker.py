"""Worker: one supervised stage process, started in its own process group, killed as a whole tree.

Why not ``Popen.kill()``: a stage spawns ffmpeg and onnxruntime threads; killing only the Python
process leaves ffmpeg running (and holding the output file open on Windows). The Worker therefore

- POSIX: starts the child in a new session (``start_new_session``; its own process group), stops it
  with SIGTERM to the group, then SIGKILL to the group after a grace period;
- Windows: starts it with ``CREATE_NEW_PROCESS_GROUP`` (so TD's / the console's Ctrl-C does not
  reach it), stops it with CTRL_BREAK_EVENT, then kills every process of its tree;
- both: remembers every descendant it has seen (psutil, pid + creation time against pid reuse),
  so grandchildren that outlive their parent or leave the group are killed too.

If the launcher itself dies hard (``kill -9``), nothing above runs. Then: every stage watches its
launcher, named in ``CUEPIPE_PARENT``, and stops its own tree (``stages/parentwatch.py``); on Windows
every stage is also in a kill-on-close Job Object of this process; and a ``ProcessRegistry`` lets the
daemon's next start kill whatever is still left (``reap_leftovers``).

The child's stdout and stderr go to a log file, not a pipe: nothing can block on an unread pipe,
and the tail of the log becomes the ``stderr`` of a ``failed`` Event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol

import psutil

from cuepipe.orchestrator import defaults
from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.parentwatch import PARENT_ENV, parent_token, same_creation, same_process

log = logging.getLogger(__name__)
IS_WINDOWS = sys.platform == "win32"


class WorkerError(CuepipeError):
    """The stage process could not be started."""

    kind = ErrorKind.CRASHED


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


def _resource_tracker(proc: psutil.Process) -> bool:
    try:
        return any("multiprocessing.resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False


class ProcessRegistry:
    """The stage processes Workers have started and not yet reaped: one JSON file each in ``folder``.

    Why: after the daemon is killed hard, its next start kills what it left running
    (``reap_leftovers``). One file per process, written under a temporary name and renamed, is
    crash-safe at any instant (no record or a whole one) and needs no lock between job threads.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def record(self, pid: int, created: float, argv: Sequence[str]) -> None:
        path = self.folder / f"{pid}.json"
        part = path.with_suffix(".part")
        try:
            part.write_text(json.dumps({"pid": pid, "created": created, "argv": list(argv)}), encoding="utf-8")
            os.replace(part, path)
        except OSError as exc:
            log.warning("cannot record stage process %d in %s: %s", pid, self.folder, exc)

    def forget(self, pid: int, created: float) -> None:
        """Remove the record of that process (not that of a later process with the same pid)."""
        path = self.folder / f"{pid}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if same_creation(float(json.loads(path.read_text(encoding="utf-8"))["created"]), created):
                path.unlink()


def _kill_leftover(pid: int, created: float) -> bool:
    """Kill that process and its tree if it still runs (same pid *and* creation time)."""
    try:
        leader = psutil.Process(pid)
        if not same_process(leader, created) or leader.status() == psutil.STATUS_ZOMBIE:
            return False
        tree = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return False
    if sys.platform != "win32":  # its own group (start_new_session): also members that left the tree
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(tree, timeout=3)
    log.warning("killed leftover stage process %d and %d of its descendants", pid, len(tree) - 1)
    return True


def reap_leftovers(folder: Path) -> list[int]:
    """Kill, each as a whole tree, the recorded stage processes under ``folder`` that still run, and
    clear every record. For the daemon's start: a previous daemon died without stopping them.
    Returns the pids of the recorded processes it killed."""
    killed: list[int] = []
    if not folder.is_dir():
        return killed
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            pid, created = int(record["pid"]), float(record["created"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable process record %s: %s", path, exc)
        else:
            if _kill_leftover(pid, created):
                killed.append(pid)
        with contextlib.suppress(OSError):
            path.unlink()
    for part in folder.glob("*.part"):
        with contextlib.suppress(OSError):
            part.unlink()
    return killed


if sys.platform == "win32":  # spelled out so that type checkers on other systems skip it
    import ctypes
    from ctypes import wintypes

    class _BasicLimits(ctypes.Structure):  # JOBOBJECT_BASIC_LIMIT_INFORMATION
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                    ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                    ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD),
                    ("SchedulingClass", wintypes.DWORD)]

    class _ExtendedLimits(ctypes.Structure):  # JOBOBJECT_EXTENDED_LIMIT_INFORMATION
        _fields_ = [("BasicLimitInformation", _BasicLimits), ("IoInfo", ctypes.c_uint64 * 6),  # IO_COUNTERS
                    ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                    ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]

    _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
    _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION = 9  # JOBOBJECTINFOCLASS
    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    _kernel32.CreateJobObjectW.argtypes = (ctypes.c_void_p, wintypes.LPCWSTR)
    _kernel32.SetInformationJobObject.restype = wintypes.BOOL
    _kernel32.SetInformationJobObject.argtypes = (wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD)
    _kernel32.AssignProcessToJobObject.restype = wintypes.BOOL
    _kernel32.AssignProcessToJobObject.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
    _kill_job: list[int] = []  # this process's one Job Object, made on first use and never closed
    _kill_job_lock = threading.Lock()

    def _kill_job_handle() -> int:
        with _kill_job_lock:
            if not _kill_job:
                handle = _kernel32.CreateJobObjectW(None, None)  # not inheritable: only we hold it
                if not handle:
                    raise ctypes.WinError(ctypes.get_last_error())
                info = _ExtendedLimits()
                info.BasicLimitInformation.LimitFlags = _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
                if not _kernel32.SetInformationJobObject(handle, _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION,
                                                         ctypes.byref(info), ctypes.sizeof(info)):
                    raise ctypes.WinError(ctypes.get_last_error())
                _kill_job.append(handle)
            return _kill_job[0]

    def _assign_to_kill_job(proc: subprocess.Popen[Any]) -> None:
        """Put the stage in the Job Object: when this process dies, however, Windows kills the stage and
        everything it starts afterwards (ffmpeg). A child started in the first instant, before this
        call, would escape it; the parent watch covers that. Failures are logged, not fatal."""
        try:
            if not _kernel32.AssignProcessToJobObject(_kill_job_handle(), int(proc._handle)):
                raise ctypes.WinError(ctypes.get_last_error())
        except OSError as exc:
            log.warning("cannot put stage process %d in the kill-on-close Job Object: %s", proc.pid, exc)


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
        registry: ProcessRegistry | None = None,
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
        self.registry = registry  # records the started process until it is reaped (reap_leftovers)
        self._recorded: tuple[int, float] | None = None

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
            env = dict(os.environ if self.env is None else self.env)
            env[PARENT_ENV] = parent_token()  # the stage dies with this process (stages/parentwatch.py)
            self._proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, **kwargs)
        except OSError as exc:
            self._log.close()
            raise WorkerError(f"cannot start {self.argv[0]}: {exc}") from exc
        if sys.platform == "win32":
            _assign_to_kill_job(self._proc)
        self.state = WorkerState.RUNNING
        self.started_at = self._now()
        self._remember(self._proc.pid)
        leader = self._seen.get(self._proc.pid)
        if self.registry is not None and leader is not None:
            with contextlib.suppress(psutil.Error):
                self._recorded = (leader.pid, leader.create_time())
                self.registry.record(*self._recorded, self.argv)

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
        """After the stage exited by itself: kill anything of its tree still running, close the log.

        Python's ``multiprocessing`` resource tracker (started by a stage that made or attached a frame
        ring) is left alone: it ends by itself once its stage has, after unlinking whatever a crashed stage
        left; it ignores SIGTERM, so stopping it would only cost the grace time and that cleanup."""
        if [p for p in self._alive() if not _resource_tracker(p)]:
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
        if self.registry is not None and self._recorded is not None and self._proc and self._proc.poll() is not None:
            self.registry.forget(*self._recorded)
            self._recorded = None

    def log_size(self) -> int:
        """Bytes in the log so far: where the next job of a resident worker starts writing."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def tail(self, lines: int = defaults.STDERR_TAIL_LINES, since: int = 0, until: int | None = None) -> str:
        """The last lines the stage wrote to stdout/stderr, between byte offsets ``since`` and ``until``
        (a resident worker's log holds every job's lines; each job's tail must be its own)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell() if until is None else min(until, f.tell())
                start = max(since, end - 16384)
                f.seek(start)
                data = f.read(max(0, end - start))
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


def stage_env() -> dict[str, str]:
    """The environment stages run in: this one, unbuffered, with this cuepipe first on the path."""
    path = os.pathsep.join(filter(None, [str(defaults.REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
