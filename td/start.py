"""Starting cuepipe from TouchDesigner without ever blocking TD's main thread.

The successor of the copied ``td_utils.py``. Two ways to run a job, both returning at once:

- ``start_job`` starts ``cuepipe run`` (``python -m cuepipe.orchestrator.cli``) with the venv's interpreter
  — never TD's own ``sys.executable`` — and ``--report 127.0.0.1:<OSC In port> --job-id <id>``, so
  TD knows the job id before the first Event. The handle is polled from a frame callback.
- ``DaemonClient`` sends Commands (``/cuepipe/v1/cmd/run`` ...) to ``cuepipe serve``; the replies
  arrive on TD's OSC In DAT like every Event.

Everywhere: argv lists (never a shell string), output to a log file (never a pipe nobody reads),
no ``wait()``, no ``sleep``, no blocking socket reads. ``cuepipe run`` gets a stdin pipe that TD
never writes: closing it is the cancel (``--cancel-on-eof``) — it works on Windows, where TD (a GUI
process without a console) cannot send CTRL_BREAK, and if TD itself dies the pipe closes and the
job is cancelled instead of running on as an orphan.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol
from .errors import CuepipeError, ErrorKind
from .protocol import new_job_id

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
IS_WINDOWS = sys.platform == "win32"
#: Inherited variables that would make the venv's python load TD's own standard library.
_TD_PYTHON_VARS = ("PYTHONHOME", "PYTHONPATH")


class LaunchError(CuepipeError, RuntimeError):
    """A job could not be started (interpreter missing, log folder unwritable, daemon unreachable)."""

    kind = ErrorKind.CRASHED


def default_python(root: Path = REPO_ROOT, windows: bool = IS_WINDOWS) -> Path:
    """The interpreter of the ``.venv`` in the repository: the one with cuepipe installed."""
    return root / ".venv" / ("Scripts/python.exe" if windows else "bin/python")


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for cuepipe: TD's, minus what points Python at TD's own libraries."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _TD_PYTHON_VARS}
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows Events as they happen
    return env


def _spawn_flags() -> dict[str, Any]:
    if IS_WINDOWS:  # no console window pops up; CTRL_BREAK_EVENT can target the group
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}  # TD's terminal signals do not reach the launcher


@dataclass(frozen=True)
class LaunchOptions:
    """Everything ``start_job`` needs besides the pipeline and input. ``env`` None: ``child_env()``."""

    python: str | os.PathLike[str]
    report_port: int
    report_host: str = "127.0.0.1"
    pipelines: str | os.PathLike[str] | None = None
    out: str | os.PathLike[str] | None = None
    cwd: str | os.PathLike[str] | None = None
    env: Mapping[str, str] | None = None
    log_dir: str | os.PathLike[str] | None = None  # None: <temp>/cuepipe-td
    reports: tuple[str, ...] = ()  # more HOST:PORT report addresses


def build_command(options: LaunchOptions, pipeline: str, input: str, job_id: str,
                  sets: Sequence[str] = ()) -> list[str]:
    """The argv of ``cuepipe run`` (as ``python -m cuepipe.orchestrator.cli``, so only the venv is needed)."""
    cmd = [os.fspath(options.python), "-m", "cuepipe.orchestrator.cli"]
    if options.pipelines:
        cmd += ["--pipelines", os.fspath(options.pipelines)]
    cmd += ["run", pipeline, input, "--report", f"{options.report_host}:{options.report_port}",
            "--job-id", job_id, "--json", "--cancel-on-eof"]
    for address in options.reports:
        cmd += ["--report", address]
    for item in sets:
        cmd += ["--set", item]
    if options.out:
        cmd += ["--out", os.fspath(options.out)]
    return cmd


class ProcessJob:
    """A running ``cuepipe run``: ``poll()`` it from a frame callback, ``cancel()`` it; never wait."""

    def __init__(self, job_id: str, pipeline: str, input: str, process: subprocess.Popen[bytes],
                 command: list[str], log_path: Path) -> None:
        self.job_id, self.pipeline, self.input = job_id, pipeline, input
        self.process, self.command, self.log_path = process, command, log_path
        self.cancel_sent = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs (non-blocking)."""
        return self.process.poll()

    def cancel(self) -> bool:
        """Ask the launcher to stop by closing its stdin: it kills the stage tree and sends
        ``job/cancelled`` itself. False if it had already exited."""
        if self.process.poll() is not None:
            return False
        self.cancel_sent = True
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
                return True
        except OSError as exc:
            log.warning("closing the stdin of %s failed (%s); killing its process tree", self.pid, exc)
        self.kill_tree()
        return True

    def stop(self) -> None:
        """The polite stop of a process that does not read its stdin (``cuepipe serve``): SIGTERM, or on
        Windows CTRL_BREAK to its process group (both end it as Ctrl-C would)."""
        if self.process.poll() is not None:
            return
        try:
            if IS_WINDOWS:
                os.kill(self.pid, signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                self.process.terminate()
        except OSError as exc:
            log.warning("stopping %s failed (%s); killing it", self.pid, exc)
            self.kill_tree()

    def kill_tree(self) -> None:
        """Last resort: kill the launcher (and on Windows its whole tree); no Event is sent then."""
        if self.process.poll() is not None:
            return
        if IS_WINDOWS:
            subprocess.Popen(["taskkill", "/T", "/F", "/PID", str(self.pid)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_spawn_flags())
        else:
            self.process.kill()


def start_job(options: LaunchOptions, pipeline: str, input: str, sets: Sequence[str] = (),
              job_id: str | None = None) -> ProcessJob:
    """Start ``cuepipe run`` and return at once. Raises LaunchError if it cannot even start."""
    job_id = job_id or new_job_id()
    command = build_command(options, pipeline, input, job_id, sets)
    folder = Path(options.log_dir) if options.log_dir else Path(tempfile.gettempdir()) / "cuepipe-td"
    return _start(job_id, pipeline, input, command, folder / f"{job_id}.log", options.env, options.cwd)


def _start(name: str, pipeline: str, input: str, command: list[str], log_path: Path,
           env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
           fresh: bool = False) -> ProcessJob:
    """Start ``command`` in the background, its output appended to ``log_path`` (``fresh``: the log starts
    empty); LaunchError if it cannot."""
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb" if fresh else "ab") as log_file:  # the child keeps its handle; ours closes
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log_file,
                                       stderr=subprocess.STDOUT, cwd=cwd,
                                       env=child_env() if env is None else dict(env), close_fds=True,
                                       **_spawn_flags())
    except OSError as exc:
        raise LaunchError(f"cannot start {command[0]!r}: {exc}") from exc
    log.info("started %s (pid %s), log %s", name, process.pid, log_path)
    return ProcessJob(name, pipeline, input, process, command, log_path)


def start_daemon(options: LaunchOptions, port: int, state: str | os.PathLike[str],
                 roots: Sequence[str | os.PathLike[str]] = ()) -> ProcessJob:
    """Start ``cuepipe serve --port PORT --state STATE`` with the venv's interpreter, in the background (the
    COMP's Start daemon pulse); ``ProcessJob.stop`` ends it. Inputs must lie under ``roots`` (its ``--root``).
    Its log, ``serve.log`` beside the jobs' logs, starts empty at each start."""
    cmd = [os.fspath(options.python), "-m", "cuepipe.orchestrator.cli"]
    if options.pipelines:
        cmd += ["--pipelines", os.fspath(options.pipelines)]
    cmd += ["serve", "--port", str(port), "--state", os.fspath(state)]
    for root in roots:
        cmd += ["--root", os.fspath(root)]
    folder = Path(options.log_dir) if options.log_dir else Path(tempfile.gettempdir()) / "cuepipe-td"
    return _start("daemon", "", "", cmd, folder / "serve.log", options.env, options.cwd, fresh=True)


#: The script a system Python runs to make the venv: create it, then install cuepipe into it with pip.
_SETUP_SCRIPT = """import subprocess, sys, venv
from pathlib import Path
repo, target, extra = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
print("creating", target, flush=True)
venv.create(target, with_pip=True)
python = target / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
print("installing cuepipe into", target, flush=True)
sys.exit(subprocess.call([str(python), "-m", "pip", "install", "--progress-bar", "off", *extra, "-e", str(repo)]))
"""


def base_python(windows: bool = IS_WINDOWS) -> list[str]:
    """A system Python 3.11+ to create the venv with (never TD's own): ``py -3.11`` on Windows, else
    ``python3.11`` or ``python3``. LaunchError naming what to install when there is none."""
    for candidate in ([["py", "-3.11"]] if windows else [["python3.11"], ["python3"]]):
        if shutil.which(candidate[0]) and _is_311_or_newer(candidate):
            return candidate
    raise LaunchError("no system Python 3.11 found to make the venv with: install Python 3.11 from "
                      "python.org, or make the venv by hand (README) and set the Python parameter")


def _is_311_or_newer(command: list[str]) -> bool:
    """Whether ``command`` runs a Python >= 3.11 (one short run, once a Setup venv press)."""
    try:
        probe = subprocess.run([*command, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                               capture_output=True, text=True, timeout=10, env=child_env(), **_spawn_flags())
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.stdout.strip() == "True"


def setup_venv(repo: Path = REPO_ROOT, base: Sequence[str] | None = None, pip_args: Sequence[str] = (),
               log_dir: str | os.PathLike[str] | None = None) -> ProcessJob:
    """Create ``<repo>/.venv`` and install cuepipe into it, as a logged background process (the COMP's
    Setup venv pulse); poll it like a job. ``pip_args`` go to pip (tests: ``--no-deps``, offline)."""
    base = list(base) if base is not None else base_python()
    command = [*base, "-c", _SETUP_SCRIPT, os.fspath(repo), os.fspath(repo / ".venv"), *pip_args]
    return _start("setup-venv", "", "", command, Path(log_dir or repo) / ".venv-setup.log")


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a log file (what Status shows while a helper process runs)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class DaemonClient:
    """Sends Commands to ``cuepipe serve`` over UDP; replies go to ``reply_port`` (TD's OSC In DAT).

    Every method returns the Command's tag at once; the matching ``reply/...`` arrives later through
    the OSC In DAT. Use an IP address for ``host``: it is resolved once, here.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9000, reply_port: int = 7000) -> None:
        self.address: Any
        try:
            family, _, _, _, self.address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except (OSError, UnicodeError) as exc:
            raise LaunchError(f"cannot resolve daemon address {host}:{port}: {exc}") from exc
        self.host, self.port, self.reply_port = host, port, reply_port
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self._tags = itertools.count(1)
        self._prefix = f"td{secrets.token_hex(2)}-"

    def send(self, spec: protocol.Spec, **fields: Any) -> str:
        """Send one Command; returns its tag. Raises LaunchError when the datagram cannot be sent."""
        tag = f"{self._prefix}{next(self._tags)}"
        data = protocol.encode(spec, tag=tag, reply_port=self.reply_port, **fields)
        try:
            self.sock.sendto(data, self.address)
        except OSError as exc:
            raise LaunchError(f"cannot send {spec.name} to {self.host}:{self.port}: {exc}") from exc
        return tag

    def run(self, pipeline: str, input: str, priority: int = 10, sets: Sequence[str] = ()) -> str:
        return self.send(protocol.CMD_RUN, pipeline=pipeline, input=input, priority=priority, sets=tuple(sets))

    def cancel(self, job: str) -> str:
        return self.send(protocol.CMD_CANCEL, job=job)

    def status(self, job: str = "") -> str:
        return self.send(protocol.CMD_STATUS, job=job)

    def list(self) -> str:
        return self.send(protocol.CMD_LIST)

    def ping(self) -> str:
        return self.send(protocol.CMD_PING)

    def subscribe(self) -> str:
        return self.send(protocol.CMD_SUBSCRIBE)

    def unsubscribe(self) -> str:
        return self.send(protocol.CMD_UNSUBSCRIBE)

    def close(self) -> None:
        self.sock.close()


def _temp_path(suffix: str) -> Path:
    handle, name = tempfile.mkstemp(prefix="cuepipe-pipelines-", suffix=suffix)
    os.close(handle)
    return Path(name)


class PipelinesQuery:
    """``cuepipe pipelines --json`` in the background, for the pipeline menu; ``poll()`` per frame."""

    def __init__(self, python: str | os.PathLike[str], pipelines: str | os.PathLike[str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.command = [os.fspath(python), "-m", "cuepipe.orchestrator.cli"]
        if pipelines:
            self.command += ["--pipelines", os.fspath(pipelines)]
        self.command += ["pipelines", "--json"]
        self.result: dict[str, Any] | None = None
        self.error = ""
        self.done = False
        self._files = [_temp_path(suffix) for suffix in (".json", ".log")]
        try:
            with open(self._files[0], "wb") as out, open(self._files[1], "wb") as err:  # the child has its own
                self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                                cwd=cwd, close_fds=True,
                                                env=child_env() if env is None else dict(env), **_spawn_flags())
        except OSError as exc:
            self._remove()
            raise LaunchError(f"cannot start {self.command[0]!r}: {exc}") from exc

    def _read(self, index: int) -> str:
        try:
            return self._files[index].read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return str(exc)

    def _remove(self) -> None:
        for path in self._files:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # Windows: a just-killed child may hold it for a moment
                log.debug("could not remove %s", path)

    def poll(self) -> bool:
        """True once finished: then ``result`` holds the JSON, or ``error`` says what went wrong."""
        if self.done:
            return True
        code = self.process.poll()
        if code is None:
            return False
        self.done = True
        text, errors = self._read(0), self._read(1)
        self._remove()
        try:
            if code != 0:
                raise ValueError(f"exit {code}")
            result = json.loads(text)
            if not isinstance(result, dict) or not isinstance(result.get("pipelines"), list):
                raise ValueError("no 'pipelines' list")
            self.result = result
        except ValueError as exc:
            self.error = f"cuepipe pipelines failed ({exc}): {(errors or text).strip()[-500:]}"
            log.warning("%s", self.error)
        return True

    def names(self) -> list[str]:
        return [str(p.get("name", "")) for p in (self.result or {}).get("pipelines", [])]

    def close(self) -> None:
        """Stop it if it still runs (no waiting: the exit is collected by the OS / a later poll)."""
        if self.process.poll() is None:
            self.process.kill()
        self.done = True
        self._remove()
