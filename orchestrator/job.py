"""Job: one run of a Pipeline on one input — stages in order, supervised, Events relayed.

Each stage runs as a Worker in the Job's work folder and reports to a UDP socket the Job owns on
127.0.0.1. A stage attempt succeeds only if it exits 0 *and* sent ``done`` naming outputs that
exist; anything else (crash, signal, timeout, stall, no ``done``) becomes one ``stage_failed`` Event
carrying the exit code and the tail of the stage's log. Final outputs are published only after the
last stage succeeded, all or nothing and each by an atomic rename (``publish_all``), so no partial
file or partial set ever sits at the final paths. A Job that sent ``started`` always ends with
exactly one of ``done``, ``failed``, ``cancelled``, whatever fails in the launcher.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cuepipe.orchestrator import defaults
from cuepipe.orchestrator.pipeline import Pipeline, Step
from cuepipe.orchestrator.resident import ResidentTask, WorkerPool
from cuepipe.orchestrator.transport import EventSocket
from cuepipe.orchestrator.worker import ProcessRegistry, Task, Worker, WorkerError, stage_env
from cuepipe.stages import STAGES
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import CuepipeError, ErrorKind
from cuepipe.stages.protocol import (
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_LIVE,
    JOB_PROGRESS,
    JOB_STAGE_DONE,
    JOB_STAGE_FAILED,
    JOB_STAGE_STARTED,
    JOB_STARTED,
    JOB_WARNING,
    NO_EXIT_CODE,
    STAGE_EVENTS,
    MessageSpec,
    new_job_id,
)
from cuepipe.stages.stage import option

log = logging.getLogger(__name__)

EventSink = Callable[[Message], None]


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


class PublishError(CuepipeError, OSError):
    """Publishing failed and was rolled back; ``index`` is the (src, dst) pair that failed."""

    kind = ErrorKind.OUTPUT_ERROR

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class _Output:
    """One output being published, and how far it got (what a rollback must undo)."""

    src: Path
    dst: Path
    part: Path  # hidden temporary beside dst: same file system, so phase 2 is renames only
    copied: bool = False  # phase 1 copied src (another file system) instead of renaming it
    staged: bool = False  # part holds the whole output
    old: Path | None = None  # the previous output at dst, renamed aside in phase 2
    placed: bool = False  # part was renamed to dst


def _beside(dst: Path, tag: str) -> Path:
    return dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.{tag}")


def _remove(path: Path) -> None:
    """Remove a file, link or folder (a PNG sequence); a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _stage(src: Path, part: Path) -> bool:
    """Put ``src`` at ``part``: a rename on one file system, else a copy that leaves ``src`` in place
    (so a failed publish keeps it in the work folder). Returns whether it copied."""
    try:
        os.rename(src, part)
        return False
    except OSError:  # EXDEV (another file system), or a rename this file system refuses: copy
        pass
    if src.is_dir():
        shutil.copytree(src, part, copy_function=shutil.copy2)
    else:
        shutil.copy2(src, part)
    return True


def _roll_back(outputs: list[_Output]) -> list[str]:
    """Undo a partial publish, last output first: previous outputs back at their final paths, renamed
    sources back in the work folder, copies removed. Returns what could not be undone."""
    problems: list[str] = []
    for out in reversed(outputs):
        try:
            if out.placed:
                os.rename(out.dst, out.part)
                out.placed = False
            if out.old is not None:
                os.rename(out.old, out.dst)
                out.old = None
        except OSError as exc:
            problems.append(f"{out.dst}: {exc}" + (f" (previous output kept at {out.old})" if out.old else ""))
        if out.placed:  # the new output could not be taken back: nothing is at out.part
            continue
        try:
            if out.staged and not out.copied:
                try:
                    os.rename(out.part, out.src)
                    continue
                except OSError:
                    log.warning("cannot move %s back to %s; removing it", out.part, out.src, exc_info=True)
            if os.path.lexists(out.part):
                _remove(out.part)
        except OSError as exc:
            problems.append(f"{out.part}: {exc}")
    return problems


def publish_all(pairs: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Publish each ``(src, dst)`` pair (files, or folders such as PNG sequences): all or nothing.

    Phase 1 puts every source at a hidden temporary beside its final path (a rename, or a copy across
    file systems, where a full disk shows). Phase 2 renames any previous output aside (a folder cannot
    be replaced in one rename on every OS) and each temporary into place. On any failure both phases
    are undone — previous outputs restored, nothing new at a final path, no temporary left — and
    ``PublishError`` names the output and the error. Previous outputs are deleted only at the end.
    """
    outputs = [_Output(src, dst, _beside(dst, "part")) for src, dst in pairs]
    failed = 0
    try:
        for failed, out in enumerate(outputs):  # noqa: B007 - read in the except clause
            out.dst.parent.mkdir(parents=True, exist_ok=True)
            out.copied = _stage(out.src, out.part)
            out.staged = True
        for failed, out in enumerate(outputs):  # noqa: B007
            if os.path.lexists(out.dst):
                old = _beside(out.dst, "old")
                os.rename(out.dst, old)
                out.old = old
            os.replace(out.part, out.dst)
            out.placed = True
    except BaseException as exc:
        problems = _roll_back(outputs)
        if not isinstance(exc, Exception):
            raise
        out = outputs[failed]
        message = f"cannot publish {out.src.name} as {out.dst}: {exc}; nothing was published"
        if problems:
            message += f"; rollback incomplete: {'; '.join(problems)}"
        raise PublishError(message, failed) from exc
    for out in outputs:  # committed: what is left is cleanup, whose failure only leaves a hidden file
        for leftover in (out.old, out.src if out.copied else None):
            if leftover is not None:
                try:
                    _remove(leftover)
                except OSError:
                    log.warning("cannot remove %s", leftover, exc_info=True)
    return [out.dst for out in outputs]


def publish(src: Path, dst: Path) -> Path:
    """Move ``src`` (a file, or a folder such as a PNG sequence) to ``dst`` atomically (``publish_all``)."""
    return publish_all([(src, dst)])[0]


class Job:
    """Runs a Pipeline on one input. ``run()`` blocks; ``cancel`` (a threading.Event) stops it."""

    def __init__(
        self,
        pipeline: Pipeline,
        input: Path | str,  # a path, or a live URL (ndi://, camera://, play://: stages.stage.is_live)
        sink: EventSink,
        out_dir: Path | None = None,
        job_id: str | None = None,
        python: str = sys.executable,
        cancel: threading.Event | None = None,
        keep_work: bool = False,
        pool: WorkerPool | None = None,
        registry: ProcessRegistry | None = None,
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
        # Where started stage processes are recorded for reap_leftovers; by default the pool's.
        self.registry = registry if registry is not None else (pool.registry if pool is not None else None)
        self.now = now
        self.work_dir = self.out_dir / defaults.WORK_DIR_NAME / self.job_id
        self._ended = False  # a terminal Event (done, failed, cancelled) was emitted

    def _emit(self, spec: MessageSpec, **fields: Any) -> None:
        if spec in (JOB_DONE, JOB_FAILED, JOB_CANCELLED):
            self._ended = True
        self.sink(Message(spec, {"job": self.job_id, **fields}))

    def reject(self, kind: ErrorKind, message: str) -> JobResult:
        """Fail before any stage ran: one ``job/failed`` Event with index -1."""
        self._emit(JOB_FAILED, index=-1, stage="", exit_code=NO_EXIT_CODE, kind=kind.value, message=message)
        return JobResult(self.job_id, JobState.FAILED, [], NO_EXIT_CODE, kind, message)

    def run(self) -> JobResult:
        if not isinstance(self.input, str) and not self.input.exists():
            return self.reject(ErrorKind.INPUT_MISSING, f"input not found: {self.input}")
        try:
            self.work_dir.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            return self.reject(ErrorKind.OUTPUT_ERROR, f"cannot create work folder {self.work_dir}: {exc}")
        started = self.now()
        n = len(self.pipeline.stages)
        self._emit(JOB_STARTED, pipeline=self.pipeline.name, input=str(self.input), stages=n)
        index = 0
        try:
            sock = EventSocket(STAGE_EVENTS)
            try:
                current: Path | str = self.input if isinstance(self.input, str) else self.input.resolve()
                to_publish: list[tuple[int, Path]] = []  # (index of the stage that made it, output)
                for index, stage in enumerate(self.pipeline.stages):
                    attempt = self._stage(sock, index, stage, current)
                    if not attempt.ok:
                        return self._finish_failed(index, stage, attempt)
                    current = attempt.outputs[0]
                    if stage.keep or index == n - 1:
                        to_publish.extend((index, p) for p in attempt.outputs)
            finally:
                sock.close()
            try:
                outputs = publish_all([(p, self._destination(p)) for _, p in to_publish])
            except PublishError as exc:
                return self._fail(to_publish[exc.index][0], ErrorKind.OUTPUT_ERROR, str(exc))
            if not self.keep_work:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            self._emit(JOB_DONE, seconds=self.now() - started, outputs=[str(p) for p in outputs])
            return JobResult(self.job_id, JobState.DONE, outputs, work_dir=self.work_dir)
        except Exception as exc:  # no socket, a full disk, a bug: the Job still ends with one Event
            if self._ended:
                raise  # the terminal Event is out (the sink itself failed): never a second one
            log.exception("job %s: launcher error", self.job_id)
            return self._fail(index, ErrorKind.INTERNAL, f"launcher error: {type(exc).__name__}: {exc}")

    def _destination(self, src: Path) -> Path:
        """The final path of output ``src``: ``<out>/<input stem>_<output name>`` (a live input: ``live_...``)."""
        stem = "live" if isinstance(self.input, str) else self.input.stem
        return self.out_dir / f"{stem}_{src.name}"

    def _fail(self, index: int, kind: ErrorKind, message: str) -> JobResult:
        """End with ``job/failed`` after the stages' own checks passed (publishing, a launcher error):
        there is no stage exit code to blame. The work folder stays, for diagnosis."""
        stage = self.pipeline.stages[index].name
        self._emit(JOB_FAILED, index=index, stage=stage, exit_code=NO_EXIT_CODE, kind=kind.value, message=message)
        return JobResult(self.job_id, JobState.FAILED, [], NO_EXIT_CODE, kind, message, index, self.work_dir)

    def _finish_failed(self, index: int, stage: Step, attempt: Attempt) -> JobResult:
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

    def _stage(self, sock: EventSocket, index: int, stage: Step, source: Path | str) -> Attempt:
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

    def argv(self, stage: Step, source: Path | str, out: Path, port: int) -> list[str]:
        args = [self.python, "-m", STAGES[stage.name], "--input", str(source), "--output-dir", str(out),
                "--report", f"127.0.0.1:{port}"]
        for key, value in stage.params.items():
            if value is not None:  # --key=value: a value such as "[-1,1]" must not look like an option
                args.append(f"{option(key)}={str(value).lower() if isinstance(value, bool) else value}")
        return args

    def _attempt(self, sock: EventSocket, index: int, stage: Step, number: int, source: Path | str) -> Attempt:
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

    def _launch(self, stage: Step, source: Path | str, out: Path, port: int, tag: str) -> Task:
        """Start the stage: on a resident Worker from the pool when the stage is ``warm``, else cold."""
        if self.pool is not None and stage.warm:
            resident = self.pool.lease(stage.name, self.cancel)
            if not resident.submit(self.job_id, source, out, port, stage.params):
                self.pool.release(resident, crashed=True)
                raise WorkerError(f"the resident {stage.name} worker died before taking the job")
            return ResidentTask(self.pool, resident, self.now)
        worker = Worker(self.argv(stage, source, out, port), out, self.work_dir / f"{tag}.log",
                        env=stage_env(), now=self.now, registry=self.registry)
        worker.start()
        return worker

    def _stop_reason(self, stage: Step, started_at: float, last_event: float) -> tuple[ErrorKind, str] | None:
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

    def _on_event(self, event: Message, index: int, stage: Step, number: int, result: Attempt) -> None:
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
        elif name == "stage/warning":  # relayed as it comes, also from an attempt that fails later
            self._emit(JOB_WARNING, index=index, stage=stage.name, kind=event["kind"], message=event["message"])
        elif name == "stage/live":
            self._emit(JOB_LIVE, index=index, stage=stage.name, frames=event["frames"], fps=event["fps"],
                       dropped=event["dropped"], latency_p50=event["latency_p50"], latency_p95=event["latency_p95"])


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code} without reporting why"
