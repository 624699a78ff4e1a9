"""Job: one run of a Pipeline on one input — stages in order, supervised, Events relayed.

Each stage runs as a Worker in the Job's work folder and reports to its own UDP socket the Job owns
on 127.0.0.1. Steps joined by streams (``stream = true``, ``Pipeline.groups``) run as one group, all
at once, each reading the previous one's frames from a frame ring; the first failure in a group stops
the whole group and is reported under the Step that caused it (``_try``). A stage attempt succeeds
only if it exits 0 *and* sent ``done`` naming outputs that exist (none for one whose first output
went to a stream); anything else (crash, signal, timeout, stall, no ``done``) becomes one ``stage_failed`` Event
carrying the exit code and the tail of the stage's log. Final outputs are published only after the
last stage succeeded, all or nothing and each by an atomic rename (``publish_all``), so no partial
file or partial set ever sits at the final paths. A Job that sent ``started`` always ends with
exactly one of ``done``, ``failed``, ``cancelled``, whatever fails in the launcher.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cuepipe.orchestrator import defaults
from cuepipe.orchestrator.pipeline import Pipeline, Step
from cuepipe.orchestrator.publish import PublishError, publish_all
from cuepipe.orchestrator.resident import ResidentTask, WorkerPool
from cuepipe.orchestrator.transport import EventSocket
from cuepipe.orchestrator.worker import ProcessRegistry, Task, Worker, WorkerError, stage_env
from cuepipe.stages import STAGES
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import ErrorKind
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
        work_root: Path | None = None,  # where its work folder goes (default: <out_dir>/.cuepipe-work)
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
        self.work_dir = (work_root or self.out_dir / defaults.WORK_DIR_NAME) / self.job_id
        self._ended = False  # a terminal Event (done, failed, cancelled) was emitted
        self._fractions = [0.0] * len(pipeline.stages)  # each Step's progress, for the overall fraction

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
            current: Path | str = self.input if isinstance(self.input, str) else self.input.resolve()
            to_publish: list[tuple[int, Path]] = []  # (index of the stage that made it, output)
            for group in self.pipeline.groups():
                index = group[0]
                attempts, failed = self._group(group, current)
                if failed is not None:
                    index = failed
                    return self._finish_failed(failed, self.pipeline.stages[failed], attempts[group.index(failed)])
                for index, attempt in zip(group, attempts, strict=True):
                    if self.pipeline.stages[index].keep or index == n - 1:
                        to_publish.extend((index, p) for p in attempt.outputs)
                current = attempts[-1].outputs[0] if attempts[-1].outputs else current
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

    def _group(self, group: tuple[int, ...], source: Path | str) -> tuple[list[Attempt], int | None]:
        """Run one group of Steps (one Step, or Steps joined by streams) with its retries: the attempts of
        the last try (one a Step that started, in order) and the index of the Step that failed it, if any."""
        number = 1
        while True:
            attempts, failed = self._try(group, number, source)
            if failed is None:
                return attempts, None
            attempt, stage = attempts[group.index(failed)], self.pipeline.stages[failed]
            if attempt.kind is ErrorKind.CANCELLED:
                return attempts, failed
            retrying = number <= stage.retries
            self._emit(JOB_STAGE_FAILED, index=failed, stage=stage.name, attempt=number,
                       exit_code=attempt.exit_code, kind=(attempt.kind or ErrorKind.INTERNAL).value,
                       message=attempt.message, stderr=attempt.stderr, retrying=int(retrying))
            if not retrying:
                return attempts, failed
            number += 1

    def _try(self, group: tuple[int, ...], number: int, source: Path | str) -> tuple[list[Attempt], int | None]:
        """One try of a group: its Steps start together, each streaming to the next through a frame ring.

        The first failure stops every other Step of the group; the index returned with the attempts is the
        Step that caused it (``_root``), so the Job reports the cause, not the broken streams it left
        behind. Any ring a killed stage left is removed at the end (``unlink_orphan``), crash or not.
        """
        from cuepipe.stages.ringshm import new_name, unlink_orphan
        from cuepipe.stages.stream import stream_url

        rings = [new_name() for _ in group[1:]]
        runs: list[_Run] = []
        try:
            for k, index in enumerate(group):
                run = self._start(index, number, source if k == 0 else stream_url(rings[k - 1]),
                                  rings[k] if k < len(rings) else None)
                runs.append(run)
                if run.code is not None:  # could not start
                    break
            first_failure: float | None = None
            while any(run.code is None for run in runs):
                for run in runs:
                    if run.code is None:
                        self._pump(run, defaults.POLL_INTERVAL / len(runs))
                failures = [run for run in runs if run.code is not None and not run.result.ok]
                if failures and first_failure is None:
                    first_failure = self.now()
                if failures and (any(r.result.kind is not ErrorKind.STREAM_BROKEN for r in failures)
                                 or self.now() - (first_failure or 0.0) > _ROOT_GRACE_S or len(runs) < len(group)):
                    failed = self.pipeline.stages[_root(failures).index].name
                    for run in runs:
                        if run.code is None:
                            self._stop(run, ErrorKind.STREAM_BROKEN, f"stopped: stage {failed!r} failed")
        finally:
            for run in runs:
                if run.code is None:  # an exception in the loop itself: never leave a tree running
                    self._stop(run, ErrorKind.INTERNAL, "launcher error")
            for name in rings:
                unlink_orphan(name)
        failures = [run for run in runs if not run.result.ok]
        return [run.result for run in runs], _root(failures).index if failures else None

    def _start(self, index: int, number: int, source: Path | str, stream_out: str | None) -> _Run:
        """Start one attempt of Step ``index`` with its own Event socket (a launch failure: already ended)."""
        stage = self.pipeline.stages[index]
        tag = f"{index:02d}-{stage.name}" + (f"-attempt{number}" if number > 1 else "")
        out = self.work_dir / tag
        out.mkdir()
        params = dict(stage.params) if stream_out is None else {**stage.params, "stream_out": stream_out}
        sock = EventSocket(STAGE_EVENTS)
        try:
            task = self._launch(stage, source, out, sock.port, tag, params)
        except WorkerError as exc:
            sock.close()
            return _Run(index, stage, number, None, None, Attempt(kind=ErrorKind.CRASHED, message=str(exc)),
                        self.now(), NO_EXIT_CODE, streams=stream_out is not None)
        except BaseException:
            sock.close()
            raise
        return _Run(index, stage, number, sock, task, Attempt(), self.now(), streams=stream_out is not None)

    def _pump(self, run: _Run, timeout: float) -> None:
        """Take ``run``'s Events for up to ``timeout`` s, then check its process; end it when it exited or
        must be stopped (cancel, timeout, stall)."""
        assert run.sock is not None and run.task is not None  # a run that never started has its code already
        for event in run.sock.receive(timeout):
            run.last_event = self.now()
            self._on_event(event, run)
        code = run.task.poll()  # (a resident job's completion is handed out once)
        if code is not None:
            for event in run.sock.receive(0.0):  # the stage's last datagrams are queued already
                self._on_event(event, run)
            self._end(run, code)
            return
        run.task.scan()
        reason = self._stop_reason(run.stage, run.task.started_at, run.last_event)
        if reason is not None:
            self._stop(run, *reason)

    def _stop(self, run: _Run, kind: ErrorKind, message: str) -> None:
        assert run.task is not None
        run.result.kind, run.result.message = kind, message
        self._end(run, run.task.stop())

    def _end(self, run: _Run, code: int | None) -> None:
        """The attempt is over: reap, judge, report ``stage_done`` when it succeeded."""
        assert run.sock is not None and run.task is not None
        run.code = NO_EXIT_CODE if code is None else code
        run.task.cleanup()
        run.sock.close()
        run.ended_at = self.now()
        result = run.result
        result.exit_code, result.stderr = run.code, run.task.tail()
        self._judge(result, run.streams)
        if result.ok:
            self._fractions[run.index] = 1.0
            self._emit(JOB_STAGE_DONE, index=run.index, stage=run.stage.name, frames=result.frames,
                       seconds=result.seconds, outputs=[str(p) for p in result.outputs])

    def argv(self, stage: Step, source: Path | str, out: Path, port: int,
             params: Mapping[str, Any] | None = None) -> list[str]:
        args = [self.python, "-m", STAGES[stage.name], "--input", str(source), "--output-dir", str(out),
                "--report", f"127.0.0.1:{port}"]
        for key, value in (stage.params if params is None else params).items():
            if value is not None:  # --key=value: a value such as "[-1,1]" must not look like an option
                args.append(f"{option(key)}={str(value).lower() if isinstance(value, bool) else value}")
        return args

    def _launch(self, stage: Step, source: Path | str, out: Path, port: int, tag: str,
                params: Mapping[str, Any]) -> Task:
        """Start the stage: on a resident Worker from the pool when the stage is ``warm``, else cold."""
        if self.pool is not None and stage.warm:
            resident = self.pool.lease(stage.name, self.cancel)
            if not resident.submit(self.job_id, source, out, port, params):
                self.pool.release(resident, crashed=True)
                raise WorkerError(f"the resident {stage.name} worker died before taking the job")
            return ResidentTask(self.pool, resident, self.now)
        worker = Worker(self.argv(stage, source, out, port, params), out, self.work_dir / f"{tag}.log",
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

    def _judge(self, result: Attempt, streams: bool = False) -> None:
        """Decide success: the launcher's own stop, then the stage's report, exit code, done, files (a stage
        that streamed its first output to the next may name no file)."""
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
        elif not result.outputs and not streams:
            result.kind, result.message = ErrorKind.OUTPUT_ERROR, "done named no output file"
        else:
            missing = [p for p in result.outputs if not (p.is_file() or p.is_dir())]  # dirs: PNG sequences
            if missing:
                result.kind = ErrorKind.OUTPUT_ERROR
                result.message = f"done named missing output(s): {', '.join(map(str, missing))}"

    def _on_event(self, event: Message, run: _Run) -> None:
        name, index, stage, number, result = event.spec.name, run.index, run.stage, run.number, run.result
        if event["stage"] != stage.name:
            log.warning("ignoring %s from stage %r while running %r", name, event["stage"], stage.name)
            return
        n = len(self.pipeline.stages)
        if name == "stage/started":
            self._emit(JOB_STAGE_STARTED, index=index, stage=stage.name, attempt=number, pid=event["pid"],
                       info=event["info"])
        elif name == "stage/progress":
            self._fractions[index] = event["fraction"]  # streamed Steps progress together: the mean of all
            self._emit(JOB_PROGRESS, index=index, stage=stage.name, fraction=event["fraction"],
                       frame=event["frame"], total=event["total"], fps=event["fps"], overall=sum(self._fractions) / n)
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


#: After a Step fails with ``stream_broken``, how long its partners may take to report the failure that
#: broke the stream (the root cause) before the launcher stops them.
_ROOT_GRACE_S = 1.0


@dataclass
class _Run:
    """One Step attempt in flight: its own Event socket and process (or resident job), what it reported."""

    index: int
    stage: Step
    number: int
    sock: EventSocket | None
    task: Task | None
    result: Attempt
    last_event: float
    code: int | None = None  # set once it is over
    streams: bool = False  # its first output goes to the next Step's stream, not to a file
    ended_at: float = 0.0


def _root(failures: list[_Run]) -> _Run:
    """The failure to report: the first to end that is not a stream broken by another's failure."""
    causes = [r for r in failures if r.result.kind is not ErrorKind.STREAM_BROKEN] or failures
    return min(causes, key=lambda r: (r.ended_at, r.index))


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code} without reporting why"
