"""Job: one run of a Pipeline on one input — stages in order, supervised, Events relayed.

Each stage runs as a Worker in the Job's work folder and reports to a UDP socket the Job owns on
127.0.0.1. A stage attempt succeeds only if it exits 0 *and* sent ``done`` naming outputs that
exist; anything else (crash, signal, timeout, stall, no ``done``) becomes one ``stage_failed`` Event
carrying the exit code and the tail of the stage's log. Final outputs are published only after the
last stage succeeded, each by an atomic rename, so no partial file ever sits at a final path.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from orchestrator import defaults
from orchestrator.events import (
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_PROGRESS,
    JOB_STAGE_DONE,
    JOB_STAGE_FAILED,
    JOB_STAGE_STARTED,
    JOB_STARTED,
    NO_EXIT_CODE,
)
from orchestrator.pipeline import Pipeline, Stage
from orchestrator.transport import EventSocket
from orchestrator.worker import Task, Worker, WorkerError, stage_env
from orchestrator.worker_pool import ResidentTask, WorkerPool
from stages import STAGES
from stages.events import STAGE_EVENTS, ErrorKind, Event, EventSpec
from stages.stage import option

log = logging.getLogger(__name__)

EventSink = Callable[[Event], None]


class JobState(StrEnum):
    """Every state a Job can be in (the daemon adds queueing; see docs/protocol.md)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


@dataclass
class Attempt:
    """What one stage attempt did, as seen from outside the process."""

    exit_code: int = NO_EXIT_CODE
    kind: ErrorKind | None = None
    message: str = ""
    outputs: tuple[Path, ...] = ()
    frames: int = 0
    seconds: float = 0.0
    done: bool = False
    stderr: str = ""
    reported: tuple[ErrorKind, str] | None = None  # the stage's own failed Event

    @property
    def ok(self) -> bool:
        return self.kind is None


@dataclass
class JobResult:
    job_id: str
    state: JobState
    outputs: list[Path] = field(default_factory=list)
    exit_code: int = 0
    kind: ErrorKind | None = None
    message: str = ""
    stage_index: int = -1
    work_dir: Path | None = None


def new_job_id(now: Callable[[], datetime] = datetime.now) -> str:
    return f"{now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def publish(src: Path, dst: Path) -> Path:
    """Move ``src`` (a file, or a folder such as a PNG sequence) to ``dst`` atomically.

    It is moved (or copied, across file systems) to a hidden temp name beside ``dst`` first, then
    renamed. A folder already at ``dst`` is renamed aside and removed after the new one is in place
    (folders cannot be replaced in one rename on every OS).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f".{dst.name}.part")
    old = dst.with_name(f".{dst.name}.old")
    try:
        shutil.move(str(src), str(part))
        if dst.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(part, dst)
    except BaseException:
        if part.is_dir():
            shutil.rmtree(part, ignore_errors=True)
        else:
            part.unlink(missing_ok=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dst


class Job:
    """Runs a Pipeline on one input. ``run()`` blocks; ``cancel`` (a threading.Event) stops it."""

    def __init__(
        self,
        pipeline: Pipeline,
        input: Path,
        sink: EventSink,
        out_dir: Path | None = None,
        job_id: str | None = None,
        python: str = sys.executable,
        cancel: threading.Event | None = None,
        keep_work: bool = False,
        pool: WorkerPool | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.input = input
        self.sink = sink
        # Absolute: stages run with their own work folder as cwd.
        self.out_dir = (out_dir or pipeline.out).resolve()
        self.job_id = job_id or new_job_id()
        self.python = python
        self.cancel = cancel or threading.Event()
        self.keep_work = keep_work
        self.pool = pool  # resident Workers for stages marked warm (the daemon's); None: always cold
        self.now = now
        self.work_dir = self.out_dir / defaults.WORK_DIR_NAME / self.job_id

    def _emit(self, spec: EventSpec, **fields: Any) -> None:
        self.sink(Event(spec, {"job": self.job_id, **fields}))

    def reject(self, kind: ErrorKind, message: str) -> JobResult:
        """Fail before any stage ran: one ``job/failed`` Event with index -1."""
        self._emit(JOB_FAILED, index=-1, stage="", exit_code=NO_EXIT_CODE, kind=kind.value, message=message)
        return JobResult(self.job_id, JobState.FAILED, [], NO_EXIT_CODE, kind, message)

    def run(self) -> JobResult:
        if not self.input.exists():
            return self.reject(ErrorKind.INPUT_MISSING, f"input not found: {self.input}")
        try:
            self.work_dir.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            return self.reject(ErrorKind.OUTPUT_ERROR, f"cannot create work folder {self.work_dir}: {exc}")
        started = self.now()
        n = len(self.pipeline.stages)
        self._emit(JOB_STARTED, pipeline=self.pipeline.name, input=str(self.input), stages=n)
        sock = EventSocket(STAGE_EVENTS)
        try:
            current = self.input.resolve()
            to_publish: list[Path] = []
            for index, stage in enumerate(self.pipeline.stages):
                attempt = self._stage(sock, index, stage, current)
                if not attempt.ok:
                    return self._finish_failed(index, stage, attempt)
                current = attempt.outputs[0]
                if stage.keep or index == n - 1:
                    to_publish.extend(attempt.outputs)
            outputs = [self._publish(p) for p in to_publish]
        finally:
            sock.close()
        if not self.keep_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self._emit(JOB_DONE, seconds=self.now() - started, outputs=[str(p) for p in outputs])
        return JobResult(self.job_id, JobState.DONE, outputs, work_dir=self.work_dir)

    def _publish(self, src: Path) -> Path:
        return publish(src, self.out_dir / f"{self.input.stem}_{src.name}")

    def _finish_failed(self, index: int, stage: Stage, attempt: Attempt) -> JobResult:
        kind = attempt.kind or ErrorKind.INTERNAL
        if kind is ErrorKind.CANCELLED:
            self._emit(JOB_CANCELLED, index=index, stage=stage.name)
            shutil.rmtree(self.work_dir, ignore_errors=True)
            state = JobState.CANCELLED
        else:
            self._emit(JOB_FAILED, index=index, stage=stage.name, exit_code=attempt.exit_code,
                       kind=kind.value, message=attempt.message)
            state = JobState.FAILED  # the work folder stays, with each stage's log, for diagnosis
        return JobResult(self.job_id, state, [], attempt.exit_code, kind, attempt.message, index, self.work_dir)

    def _stage(self, sock: EventSocket, index: int, stage: Stage, source: Path) -> Attempt:
        """Run one stage with its retries; return the last attempt."""
        for number in range(1, stage.retries + 2):
            attempt = self._attempt(sock, index, stage, number, source)
            if attempt.ok or attempt.kind is ErrorKind.CANCELLED:
                return attempt
            retrying = number <= stage.retries
            self._emit(JOB_STAGE_FAILED, index=index, stage=stage.name, attempt=number,
                       exit_code=attempt.exit_code, kind=(attempt.kind or ErrorKind.INTERNAL).value,
                       message=attempt.message, stderr=attempt.stderr, retrying=int(retrying))
            if not retrying:
                return attempt
        raise AssertionError("unreachable")  # pragma: no cover

    def argv(self, stage: Stage, source: Path, out: Path, port: int) -> list[str]:
        args = [self.python, "-m", STAGES[stage.name], "--input", str(source), "--output-dir", str(out),
                "--report", f"127.0.0.1:{port}"]
        for key, value in stage.params.items():
            if value is not None:  # --key=value: a value such as "[-1,1]" must not look like an option
                args.append(f"{option(key)}={str(value).lower() if isinstance(value, bool) else value}")
        return args

    def _attempt(self, sock: EventSocket, index: int, stage: Stage, number: int, source: Path) -> Attempt:
        tag = f"{index:02d}-{stage.name}" + (f"-attempt{number}" if number > 1 else "")
        out = self.work_dir / tag
        out.mkdir()
        result = Attempt()
        try:
            worker = self._launch(stage, source, out, sock.port, tag)
        except WorkerError as exc:
            return Attempt(kind=ErrorKind.CRASHED, message=str(exc))
        last_event = self.now()
        code: int | None = None
        try:
            while code is None:
                for event in sock.receive(defaults.POLL_INTERVAL):
                    last_event = self.now()
                    self._on_event(event, index, stage, number, result)
                code = worker.poll()
                if code is not None:
                    for event in sock.receive(0.0):  # the stage's last datagrams are queued already
                        self._on_event(event, index, stage, number, result)
                    break
                worker.scan()
                reason = self._stop_reason(stage, worker.started_at, last_event)
                if reason is not None:
                    result.kind, result.message = reason
                    code = worker.stop()
        finally:
            if code is None:  # an exception in the loop itself: never leave the tree running
                code = worker.stop()
            worker.cleanup()
        result.exit_code = code
        result.stderr = worker.tail()
        self._judge(result)
        if result.ok:
            self._emit(JOB_STAGE_DONE, index=index, stage=stage.name, frames=result.frames,
                       seconds=result.seconds, outputs=[str(p) for p in result.outputs])
        return result

    def _launch(self, stage: Stage, source: Path, out: Path, port: int, tag: str) -> Task:
        """Start the stage: on a resident Worker from the pool when the stage is ``warm``, else cold."""
        if self.pool is not None and stage.warm:
            resident = self.pool.lease(stage.name, self.cancel)
            if not resident.submit(self.job_id, source, out, port, stage.params):
                self.pool.release(resident, crashed=True)
                raise WorkerError(f"the resident {stage.name} worker died before taking the job")
            return ResidentTask(self.pool, resident, self.now)
        worker = Worker(self.argv(stage, source, out, port), out, self.work_dir / f"{tag}.log",
                        env=stage_env(), now=self.now)
        worker.start()
        return worker

    def _stop_reason(self, stage: Stage, started_at: float, last_event: float) -> tuple[ErrorKind, str] | None:
        """Why the launcher must stop the running stage now, if it must."""
        t = self.now()
        if self.cancel.is_set():
            return ErrorKind.CANCELLED, "cancelled"
        if t - started_at > stage.timeout:
            return ErrorKind.TIMEOUT, f"killed after its {stage.timeout:g}s timeout"
        if stage.stall_timeout and t - last_event > stage.stall_timeout:
            return ErrorKind.STALLED, f"killed after {stage.stall_timeout:g}s without any event"
        return None

    def _judge(self, result: Attempt) -> None:
        """Decide success: the launcher's own stop, then the stage's report, exit code, done, files."""
        if result.kind is not None:
            return
        code = result.exit_code
        if result.reported is not None:
            result.kind, result.message = result.reported
        elif code != 0:
            result.kind = ErrorKind.CRASHED
            result.message = _describe_exit(code)
        elif not result.done:
            result.kind, result.message = ErrorKind.NO_DONE, "exited with code 0 without sending done"
        elif not result.outputs:
            result.kind, result.message = ErrorKind.OUTPUT_ERROR, "done named no output file"
        else:
            missing = [p for p in result.outputs if not (p.is_file() or p.is_dir())]  # dirs: PNG sequences
            if missing:
                result.kind = ErrorKind.OUTPUT_ERROR
                result.message = f"done named missing output(s): {', '.join(map(str, missing))}"

    def _on_event(self, event: Event, index: int, stage: Stage, number: int, result: Attempt) -> None:
        name = event.spec.name
        if event["stage"] != stage.name:
            log.warning("ignoring %s from stage %r while running %r", name, event["stage"], stage.name)
            return
        n = len(self.pipeline.stages)
        if name == "stage/started":
            self._emit(JOB_STAGE_STARTED, index=index, stage=stage.name, attempt=number, pid=event["pid"],
                       info=event["info"])
        elif name == "stage/progress":
            self._emit(JOB_PROGRESS, index=index, stage=stage.name, fraction=event["fraction"],
                       frame=event["frame"], total=event["total"], fps=event["fps"],
                       overall=(index + event["fraction"]) / n)
        elif name == "stage/done":
            result.done = True
            result.frames, result.seconds = event["frames"], event["seconds"]
            result.outputs = tuple(Path(p) for p in event["outputs"])
        elif name == "stage/failed":
            try:
                kind = ErrorKind(event["kind"])
            except ValueError:
                kind = ErrorKind.INTERNAL
            result.reported = (kind, event["message"])


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code} without reporting why"
