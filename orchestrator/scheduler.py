"""Scheduler: the daemon's queue — priorities, per-resource slots, cancel, and crash recovery.

Jobs wait in priority order (higher first, then first come) until a slot of their pipeline's
resource is free (e.g. ``gpu=1, cpu=2``); each running Job gets its own thread, which only blocks
on its own stage process. Every accepted Job is in the Journal from the moment it is accepted, so
after the daemon is killed the next start re-queues or marks as ``interrupted`` (per policy) what
was running, and still shows what finished.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path

from cuepipe.orchestrator import defaults
from cuepipe.orchestrator.job import Job, JobResult, JobState
from cuepipe.orchestrator.journal import JobRecord, Journal, JournalError
from cuepipe.orchestrator.pipeline import ConfigError, Pipeline, PipelineFile, resolve_request
from cuepipe.orchestrator.refusal import JobRefused, Refusal, refusal_of
from cuepipe.orchestrator.resident import WorkerPool
from cuepipe.stages.codec import Message
from cuepipe.stages.errors import CuepipeError
from cuepipe.stages.protocol import JOB_CANCELLED, JOB_QUEUED, new_job_id
from cuepipe.stages.stage import job_input

log = logging.getLogger(__name__)

Sink = Callable[[Message, JobRecord], None]
#: Runs one accepted job to its end: ``runner(pipeline, record, on_event, cancel) -> JobResult``. It is
#: called on the job's own thread, sends the job's Events to ``on_event`` and stops when ``cancel`` is set.
#: The default builds a real ``Job`` (stage processes); tests inject one that runs in memory.
JobRunner = Callable[[Pipeline, JobRecord, Callable[[Message], None], threading.Event], JobResult]


class RestartPolicy(StrEnum):
    """What happens to a job that was running when the daemon died."""

    REQUEUE = "requeue"  # run it again (once; a job that keeps killing the daemon is then interrupted)
    INTERRUPTED = "interrupted"  # leave it marked interrupted


class Scheduler:
    def __init__(
        self,
        pipelines: PipelineFile,
        journal: Journal,
        sink: Sink,
        slots: Mapping[str, int],
        roots: Sequence[Path],
        max_queue: int = defaults.MAX_QUEUE,
        policy: RestartPolicy = RestartPolicy.REQUEUE,
        python: str = sys.executable,
        clock: Callable[[], float] = time.time,
        pool: WorkerPool | None = None,
        runner: JobRunner | None = None,
    ) -> None:
        self.pipelines = pipelines
        self.journal = journal
        self.sink = sink
        self.slots = dict(slots)
        self.roots = tuple(roots)
        self.max_queue = max_queue
        self.python = python
        self.clock = clock
        self.pool = pool
        self.runner: JobRunner = runner or self._run_job
        self.policy = policy
        self.journal_failures = 0
        self._lock = threading.RLock()
        self._records: dict[str, JobRecord] = {}
        self._running: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._seq = 0
        self._stopping = False
        self._cancelled: set[str] = set()  # running jobs a cancel Command stopped (never re-queued)
        for name, p in pipelines.pipelines.items():
            if self.slots.get(p.resource, 0) < 1:
                raise ConfigError(pipelines.path, f"resource {p.resource!r} has no slots in this daemon "
                                  f"(slots: {self.slots})", name, key="resource")
        self._recover(policy)

    # --- recovery -------------------------------------------------------------------------------

    def _recover(self, policy: RestartPolicy) -> None:
        for r in self.journal.load():
            self._records[r.id] = r
            self._seq = max(self._seq, r.seq)
            if r.pipeline in self.pipelines.pipelines:
                r.resource = self.pipelines.pipelines[r.pipeline].resource
            if r.state is not JobState.RUNNING:
                continue
            self._discard_work(r)
            known = r.pipeline in self.pipelines.pipelines
            live = known and self._keeps_running(r)  # live jobs always come back
            if known and (live or (policy is RestartPolicy.REQUEUE and r.restarts < 1)):
                r.state, r.message, r.restarts = JobState.QUEUED, "re-queued after the daemon restarted", r.restarts + 1
            else:
                r.state, r.message = JobState.INTERRUPTED, "the daemon stopped while this job was running"
            r.index, r.overall, r.updated = -1, 0.0, self.clock()
            self.journal.save(r)  # at start: a failure here refuses to start the daemon
            log.warning("job %s was running when the daemon stopped: now %s", r.id, r.state.value)

    def _discard_work(self, r: JobRecord) -> None:
        pipeline = self.pipelines.pipelines.get(r.pipeline)
        if pipeline is not None:
            shutil.rmtree(pipeline.out / defaults.WORK_DIR_NAME / r.id, ignore_errors=True)

    # --- commands -------------------------------------------------------------------------------

    def _pipeline_for(self, name: str, sets: Sequence[str], input: Path | str | None = None) -> Pipeline:
        """``resolve_request`` under this daemon's roots, its failure as the Refusal a client gets."""
        try:
            return resolve_request(self.pipelines, name, sets, input, self.roots)
        except CuepipeError as exc:
            raise JobRefused(refusal_of(exc.kind), str(exc)) from None

    def submit(self, pipeline: str, input: str, sets: Sequence[str] = (), priority: int = 0, tag: str = "",
               reply_to: tuple[str, int] | None = None) -> JobRecord:
        """Validate and queue a job, or raise JobRefused saying why."""
        path = job_input(input)  # a live URL stays text
        resolved = self._pipeline_for(pipeline, sets, path)
        with self._lock:
            if self._stopping:
                raise JobRefused(Refusal.UNAVAILABLE, "the daemon is stopping")
            if sum(1 for r in self._records.values() if r.state is JobState.QUEUED) >= self.max_queue:
                raise JobRefused(Refusal.QUEUE_FULL, f"{self.max_queue} jobs are already queued")
            self._seq += 1
            now = self.clock()
            where = path if isinstance(path, str) else str(path.resolve())
            record = JobRecord(new_job_id(), self._seq, pipeline, where, tuple(sets), priority,
                               JobState.QUEUED, now, now, tag=tag, reply_to=reply_to, resource=resolved.resource)
            try:  # journaled before it is accepted: a job the daemon could not keep is refused, not lost
                self.journal.save(record)
            except JournalError as exc:
                log.error("refusing a job: %s", exc)
                raise JobRefused(Refusal.UNAVAILABLE, f"{exc}; no new jobs are accepted until it can be written"
                                 ) from None
            self._records[record.id] = record
        self.sink(_queued(record), record)
        self.dispatch()
        return record

    def cancel(self, job_id: str) -> JobRecord:
        with self._lock:
            record = self._records.get(job_id)
            if record is None:
                raise JobRefused(Refusal.UNKNOWN_JOB, f"no job {job_id!r}")
            if record.finished:
                raise JobRefused(Refusal.BAD_ARGUMENTS, f"job {job_id} is already {record.state.value}")
            if record.state is JobState.QUEUED:
                record.state, record.updated, record.message = JobState.CANCELLED, self.clock(), "cancelled"
                self._save(record)
                queued = True
            else:
                self._cancelled.add(job_id)
                self._running[job_id][1].set()  # the Job kills its stage tree and reports job/cancelled
                queued = False
        if queued:
            self.sink(Message(JOB_CANCELLED, {"job": job_id, "index": -1, "stage": ""}), record)
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            if job_id not in self._records:
                raise JobRefused(Refusal.UNKNOWN_JOB, f"no job {job_id!r}")
            return self._records[job_id]

    def records(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.seq)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            queued = sum(1 for r in self._records.values() if r.state is JobState.QUEUED)
            return queued, len(self._running)

    # --- running --------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start queued jobs, highest priority first, while their resource has a free slot."""
        with self._lock:
            if self._stopping:
                return
            now = self.clock()
            queued = sorted((r for r in self._records.values()
                             if r.state is JobState.QUEUED and r.not_before <= now),
                            key=lambda r: (-r.priority, r.seq))
            for record in queued:
                busy = sum(1 for rid in self._running if self._records[rid].resource == record.resource)
                if busy < self.slots.get(record.resource, 0):
                    self._start(record)

    def _start(self, record: JobRecord) -> None:
        try:
            pipeline = self._pipeline_for(record.pipeline, record.sets)
        except JobRefused as exc:  # e.g. the file changed under a re-queued job
            record.state, record.message = JobState.FAILED, exc.message
            self._save(record)
            return
        cancel = threading.Event()
        thread = threading.Thread(target=self._run, args=(record, pipeline, cancel), name=f"cuepipe-job-{record.id}")
        record.state, record.updated = JobState.RUNNING, self.clock()
        self._save(record)
        self._running[record.id] = (thread, cancel)
        thread.start()

    def _run_job(self, pipeline: Pipeline, record: JobRecord, on_event: Callable[[Message], None],
                 cancel: threading.Event) -> JobResult:
        """The default JobRunner: the real Job, its stages as supervised processes."""
        return Job(pipeline, job_input(record.input), on_event, job_id=record.id, python=self.python, cancel=cancel,
                   pool=self.pool).run()

    def _run(self, record: JobRecord, pipeline: Pipeline, cancel: threading.Event) -> None:
        try:
            result = self.runner(pipeline, record, lambda e: self._on_event(record, e), cancel)
            state, outputs, message = result.state, tuple(map(str, result.outputs)), result.message
        except Exception as exc:  # a bug must not take the daemon down; the job is failed and logged
            log.exception("job %s crashed the scheduler thread", record.id)
            state, outputs, message = JobState.FAILED, (), f"internal error: {exc}"
        with self._lock:
            if state is JobState.CANCELLED and self._stopped_by_daemon(record):
                if self.policy is RestartPolicy.REQUEUE:  # a graceful stop of the daemon, not a cancel
                    state, message = JobState.QUEUED, "re-queued: the daemon was stopped while this job was running"
                    record.index, record.overall = -1, 0.0
                else:
                    state, message = JobState.INTERRUPTED, "the daemon was stopped while this job was running"
            record.state, record.outputs, record.updated = state, outputs, self.clock()
            record.message = message or (outputs[0] if outputs else "")
            if state is JobState.DONE:
                record.overall = 1.0
            self._save(record)
            del self._running[record.id]
            self._cancelled.discard(record.id)
            again = state is JobState.FAILED and not self._stopping and self._keeps_running(record)
        if again:
            self._restart(record)
        self.dispatch()

    def _stopped_by_daemon(self, record: JobRecord) -> bool:
        """Whether a running job is being stopped by the daemon's graceful stop, not by a cancel Command."""
        return self._stopping and record.id not in self._cancelled

    def _save(self, record: JobRecord) -> None:
        """Journal a change of an accepted job. If the journal cannot be written, the job goes on (its
        state in memory is right; after a crash it would come back one step behind): logged, counted."""
        try:
            self.journal.save(record)
        except JournalError as exc:
            self.journal_failures += 1
            log.error("job %s: %s", record.id, exc)

    def _keeps_running(self, record: JobRecord) -> bool:
        pipeline = self.pipelines.pipelines.get(record.pipeline)
        return pipeline is not None and pipeline.keep_running

    def _restart(self, failed: JobRecord) -> None:
        """A keep_running pipeline failed: queue it again, after 1, 2, 4 ... 60 s."""
        with self._lock:
            self._seq += 1
            now = self.clock()
            restarts = failed.restarts + 1
            record = JobRecord(new_job_id(), self._seq, failed.pipeline, failed.input, failed.sets, failed.priority,
                               JobState.QUEUED, now, now, tag=failed.tag, reply_to=failed.reply_to,
                               restarts=restarts, resource=failed.resource,
                               not_before=now + min(60.0, 2.0 ** (restarts - 1)),
                               message=f"restart {restarts} of keep_running job {failed.id}")
            self._records[record.id] = record
            self._save(record)
        log.warning("keep_running pipeline %s failed (job %s); restarting as %s", failed.pipeline, failed.id,
                    record.id)
        self.sink(_queued(record), record)

    def _on_event(self, record: JobRecord, event: Message) -> None:
        name = event.spec.name
        if name == "job/cancelled" and self._stopped_by_daemon(record) and self.policy is RestartPolicy.REQUEUE:
            # Stopped by the daemon's own graceful stop: the job is not over, it runs again at the next
            # start, so its one terminal Event is still to come. Tell the client it waits again.
            event = _queued(record)
            name = event.spec.name
        with self._lock:
            if name == "job/stage_started":
                record.index, record.updated = event["index"], self.clock()
                self._save(record)
            elif name == "job/progress":
                record.overall = event["overall"]
            elif name in ("job/failed", "job/stage_failed"):
                record.message = f"{event['kind']}: {event['message']}"
        self.sink(event, record)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel running jobs (their trees are killed), join their threads; queued jobs stay queued."""
        with self._lock:
            self._stopping = True
            running = list(self._running.values())
        for _, cancel in running:
            cancel.set()
        for thread, _ in running:
            thread.join(timeout)


def _queued(record: JobRecord) -> Message:
    """``job/queued`` for a job that waits (again) for a slot."""
    return Message(JOB_QUEUED, {"job": record.id, "pipeline": record.pipeline, "input": record.input,
                                "priority": record.priority})
