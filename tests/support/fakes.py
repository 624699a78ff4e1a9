"""In-memory stand-ins for the expensive parts: a JobRunner that starts no process, a settable clock,
and stage Events that interrupt a stage at a chosen frame (as Ctrl-C would)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cuepipe.orchestrator.job import JobResult, JobState
from cuepipe.orchestrator.journal import JobRecord
from cuepipe.orchestrator.pipeline import Pipeline
from cuepipe.stages.codec import Message
from cuepipe.stages.protocol import JOB_CANCELLED, JOB_DONE, JOB_FAILED, JOB_STARTED
from cuepipe.stages.stage import StageEvents


class InterruptAt(StageEvents):
    """A stage's Events that raise KeyboardInterrupt when ``frame`` is reported done."""

    def __init__(self, stage: str, frame: int) -> None:
        super().__init__(stage, None)
        self.frame = frame

    def progress(self, frame: int, total: int) -> None:
        if frame == self.frame:
            raise KeyboardInterrupt


class FakeClock:
    """``clock()`` returns ``now``; the test moves it with ``advance``. Nothing ever sleeps."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRunner:
    """A ``Scheduler`` JobRunner: each job sends ``job/started`` and then blocks, on its scheduler
    thread, until the test ends it with ``finish`` or the scheduler sets its ``cancel`` (then it sends
    ``job/cancelled`` and returns CANCELLED, as the real Job does after killing its stage tree)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.started: list[str] = []  # job ids, in the order they started
        self.cancels: dict[str, threading.Event] = {}
        self.saw_cancel: set[str] = set()  # jobs whose runner returned because cancel was set
        self._outcomes: dict[str, JobState] = {}
        self._returned: set[str] = set()

    def __call__(self, pipeline: Pipeline, record: JobRecord, on_event: Callable[[Message], None],
                 cancel: threading.Event) -> JobResult:
        with self._cond:
            self.started.append(record.id)
            self.cancels[record.id] = cancel
            self._cond.notify_all()
        on_event(Message(JOB_STARTED, {"job": record.id, "pipeline": pipeline.name, "input": record.input,
                                     "stages": len(pipeline.stages)}))
        with self._cond:
            while record.id not in self._outcomes and not cancel.is_set():
                self._cond.wait(0.01)  # cancel is a threading.Event: poll it, briefly
            state = self._outcomes.get(record.id, JobState.CANCELLED)
        if state is JobState.CANCELLED:
            self.saw_cancel.add(record.id)
            on_event(Message(JOB_CANCELLED, {"job": record.id, "index": 0, "stage": pipeline.stages[0].name}))
        elif state is JobState.DONE:
            on_event(Message(JOB_DONE, {"job": record.id, "seconds": 0.0, "outputs": ()}))
        else:
            on_event(Message(JOB_FAILED, {"job": record.id, "index": 0, "stage": pipeline.stages[0].name,
                                        "exit_code": 3, "kind": "crashed", "message": "fake failure"}))
        with self._cond:
            self._returned.add(record.id)
            self._cond.notify_all()
        return JobResult(record.id, state, message="" if state is JobState.DONE else f"fake {state.value}")

    def running(self) -> list[str]:
        """Jobs started and not yet returned, in start order."""
        with self._cond:
            return [j for j in self.started if j not in self._returned]

    def wait_started(self, count: int, timeout: float = 5.0) -> list[str]:
        """Block until ``count`` jobs have started in all; return the ids of all started ones."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.started) >= count, timeout):
                raise AssertionError(f"{count} jobs should have started within {timeout}s, got {self.started}")
            return list(self.started)

    def finish(self, job_id: str, state: JobState = JobState.DONE, timeout: float = 5.0) -> None:
        """End a running job with ``state`` and wait until the runner has returned it."""
        with self._cond:
            self._outcomes[job_id] = state
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: job_id in self._returned, timeout):
                raise AssertionError(f"job {job_id} did not return within {timeout}s")


def settle(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` is true (the scheduler finishes a job on its own thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled within {timeout}s")
        time.sleep(0.001)
