"""The Scheduler in process: recovery from the Journal, and the queue (priorities, slots, cancel,
keep_running, a graceful stop) with an injected JobRunner and clock — no process, no socket, no sleep."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cuepipe.orchestrator.job import JobResult, JobState
from cuepipe.orchestrator.journal import JobRecord, Journal
from cuepipe.orchestrator.pipeline import ConfigError, parse, under_roots
from cuepipe.orchestrator.refusal import JobRefused, Refusal
from cuepipe.orchestrator.scheduler import RestartPolicy, Scheduler
from tests.support.fakes import FakeClock, FakeRunner, settle
from tests.support.pipelines import pipelines_toml, step

TOML = pipelines_toml(a=[step()], g={"resource": "gpu", "stages": [step()]})


def record(job: str, seq: int, state: JobState, restarts: int = 0) -> JobRecord:
    return JobRecord(job, seq, "a", "/in.mp4", ("0.frames=2",), 0, state, 1.0, 1.0, index=0, overall=0.5,
                     restarts=restarts)


def scheduler(tmp_path: Path, policy: RestartPolicy, journal: Journal) -> Scheduler:
    pipelines = parse(TOML, tmp_path / "pipelines.toml")
    return Scheduler(pipelines, journal, lambda e, r: None, {"cpu": 1, "gpu": 1}, [tmp_path], policy=policy,
                     clock=lambda: 42.0)


@pytest.mark.parametrize("policy", list(RestartPolicy))
def test_recovery(tmp_path: Path, policy: RestartPolicy) -> None:
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    journal.save(record("done-1", 1, JobState.DONE))
    journal.save(record("run-1", 2, JobState.RUNNING))
    journal.save(record("run-again", 3, JobState.RUNNING, restarts=1))  # it already killed a daemon once
    journal.save(record("queued-1", 4, JobState.QUEUED))
    work = tmp_path / "out" / ".cuepipe-work" / "run-1"
    work.mkdir(parents=True)
    s = scheduler(tmp_path, policy, journal)
    states = {r.id: r.state for r in s.records()}
    expected_run1 = JobState.QUEUED if policy is RestartPolicy.REQUEUE else JobState.INTERRUPTED
    assert states == {"done-1": JobState.DONE, "run-1": expected_run1, "run-again": JobState.INTERRUPTED,
                      "queued-1": JobState.QUEUED}
    assert not work.exists(), "the interrupted attempt's partial work must be discarded"
    recovered = s.get("run-1")
    assert (recovered.index, recovered.overall, recovered.updated) == (-1, 0.0, 42.0)
    journal.close()
    reread = {r.id: r.state for r in Journal(tmp_path / "state" / "journal.sqlite3").load()}
    assert reread == states, "recovery decisions must be journaled"


def test_resource_without_slots_is_a_config_error(tmp_path: Path) -> None:
    pipelines = parse(TOML, tmp_path / "pipelines.toml")
    journal = Journal(tmp_path / "j.sqlite3")
    with pytest.raises(ConfigError, match="resource 'gpu' has no slots"):
        Scheduler(pipelines, journal, lambda e, r: None, {"cpu": 2}, [tmp_path])
    journal.close()


def test_under_roots(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    assert under_roots(tmp_path / "in" / "a.mp4", [tmp_path])
    assert not under_roots(tmp_path / "in" / ".." / ".." / "a.mp4", [tmp_path])
    assert not under_roots(Path("/etc/passwd"), [tmp_path])


# --- the queue, in memory: a fake JobRunner (no process, no socket) and a fake clock ------------------

LIVE = pipelines_toml(a=[step()], g={"resource": "gpu", "stages": [step()]},
                      live={"keep_running": True, "stages": [step()]})

TERMINAL = ("job/done", "job/failed", "job/cancelled")


class Queue:
    """A Scheduler wired to a FakeRunner and a FakeClock, with every Event it sends."""

    def __init__(self, tmp_path: Path, policy: RestartPolicy = RestartPolicy.REQUEUE, max_queue: int = 100) -> None:
        self.tmp_path = tmp_path
        self.clip = tmp_path / "clip.txt"
        self.clip.write_text("pretend video")
        self.journal_path = tmp_path / "state" / "journal.sqlite3"
        self.journal = Journal(self.journal_path)
        self.runner = FakeRunner()
        self.clock = FakeClock()
        self.events: list[tuple[str, str]] = []  # (event name, job id)
        self.scheduler = self.start(policy, max_queue)

    def start(self, policy: RestartPolicy = RestartPolicy.REQUEUE, max_queue: int = 100) -> Scheduler:
        return Scheduler(parse(LIVE, self.tmp_path / "pipelines.toml"), self.journal,
                         lambda e, r: self.events.append((e.spec.name, e["job"])), {"cpu": 1, "gpu": 1},
                         [self.tmp_path], max_queue=max_queue, policy=policy, clock=self.clock, runner=self.runner)

    def submit(self, pipeline: str = "a", priority: int = 0) -> str:
        return self.scheduler.submit(pipeline, str(self.clip), priority=priority).id

    def state(self, job: str) -> JobState:
        return self.scheduler.get(job).state

    def settle(self, job: str, state: JobState) -> None:
        settle(lambda: self.state(job) is state)

    def wait_records(self, count: int) -> None:
        settle(lambda: len(self.scheduler.records()) == count)

    def of(self, job: str) -> list[str]:
        return [name for name, j in self.events if j == job]

    def close(self) -> None:
        self.scheduler.stop()
        self.journal.close()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    q = Queue(tmp_path)
    yield q
    q.close()


def test_higher_priority_first_then_first_come(queue: Queue) -> None:
    holder = queue.submit()
    queue.runner.wait_started(1)
    batch1, batch2 = queue.submit(priority=0), queue.submit(priority=0)
    live1, live2 = queue.submit(priority=10), queue.submit(priority=10)
    assert [queue.state(j) for j in (batch1, batch2, live1, live2)] == [JobState.QUEUED] * 4
    for n, job in enumerate((holder, live1, live2, batch1), 2):
        queue.runner.finish(job)
        queue.runner.wait_started(n)
    queue.runner.finish(batch2)
    assert queue.runner.started == [holder, live1, live2, batch1, batch2]
    queue.settle(batch2, JobState.DONE)
    assert queue.scheduler.get(batch2).overall == 1.0


def test_slots_are_per_resource(queue: Queue) -> None:
    cpu1 = queue.submit("a")
    gpu1 = queue.submit("g")
    queue.runner.wait_started(2)
    cpu2, gpu2 = queue.submit("a"), queue.submit("g")
    assert queue.runner.running() == [cpu1, gpu1]  # the gpu job runs beside the cpu job
    assert (queue.state(cpu2), queue.state(gpu2)) == (JobState.QUEUED, JobState.QUEUED)
    assert queue.scheduler.counts() == (2, 2)
    queue.runner.finish(cpu1)  # frees the cpu slot only
    queue.runner.wait_started(3)
    assert queue.runner.running() == [gpu1, cpu2] and queue.state(gpu2) is JobState.QUEUED
    queue.runner.finish(gpu1)
    queue.runner.wait_started(4)
    assert queue.runner.running() == [cpu2, gpu2]


def test_cancel_a_queued_job_it_never_runs(queue: Queue) -> None:
    holder = queue.submit()
    queue.runner.wait_started(1)
    waiting = queue.submit()
    assert queue.scheduler.cancel(waiting).state is JobState.CANCELLED
    assert queue.of(waiting) == ["job/queued", "job/cancelled"]
    with pytest.raises(JobRefused) as again:
        queue.scheduler.cancel(waiting)
    assert again.value.reason is Refusal.BAD_ARGUMENTS
    queue.runner.finish(holder)
    queue.settle(holder, JobState.DONE)
    assert waiting not in queue.runner.started
    assert {r.id: r.state for r in queue.journal.load()}[waiting] is JobState.CANCELLED


def test_cancel_a_running_job_sets_its_cancel(queue: Queue) -> None:
    job = queue.submit()
    queue.runner.wait_started(1)
    queue.scheduler.cancel(job)
    queue.settle(job, JobState.CANCELLED)
    assert job in queue.runner.saw_cancel
    assert [n for n in queue.of(job) if n in TERMINAL] == ["job/cancelled"]
    with pytest.raises(JobRefused) as unknown:
        queue.scheduler.cancel("no-such-job")
    assert unknown.value.reason is Refusal.UNKNOWN_JOB


def test_queue_full_is_refused(tmp_path: Path) -> None:
    q = Queue(tmp_path, max_queue=1)
    try:
        q.submit()
        q.runner.wait_started(1)
        q.submit()  # waits: the one queued job the daemon takes
        with pytest.raises(JobRefused) as full:
            q.submit()
        assert full.value.reason is Refusal.QUEUE_FULL
    finally:
        q.close()


def test_keep_running_restarts_with_backoff_on_the_injected_clock(queue: Queue) -> None:
    job = queue.submit("live", priority=10)
    for restart in range(1, 9):
        queue.runner.wait_started(restart)
        queue.runner.finish(job, JobState.FAILED)
        queue.settle(job, JobState.FAILED)
        queue.wait_records(restart + 1)
        again = queue.scheduler.records()[-1]
        backoff = min(60.0, 2.0 ** (restart - 1))  # 1, 2, 4 ... 60 s
        assert (again.state, again.restarts, again.priority) == (JobState.QUEUED, restart, 10)
        assert again.not_before == queue.clock.now + backoff
        assert queue.of(again.id) == ["job/queued"]
        queue.clock.advance(backoff - 0.01)
        queue.scheduler.dispatch()
        assert len(queue.runner.started) == restart, "started before its backoff passed"
        queue.clock.advance(0.01)
        queue.scheduler.dispatch()
        job = again.id
    queue.runner.wait_started(9)
    queue.scheduler.cancel(job)  # a cancel ends the chain
    queue.settle(job, JobState.CANCELLED)
    queue.clock.advance(3600)
    queue.scheduler.dispatch()
    assert len(queue.scheduler.records()) == 9 and len(queue.runner.started) == 9


def test_a_failed_job_without_keep_running_is_not_restarted(queue: Queue) -> None:
    job = queue.submit("a")
    queue.runner.wait_started(1)
    queue.runner.finish(job, JobState.FAILED)
    queue.settle(job, JobState.FAILED)
    queue.clock.advance(3600)
    queue.scheduler.dispatch()
    assert [r.id for r in queue.scheduler.records()] == [job]


def test_a_runner_that_raises_fails_only_its_job(queue: Queue) -> None:
    def broken(*args: object) -> JobResult:
        raise RuntimeError("a bug in the launcher")

    queue.scheduler.runner = broken
    job = queue.submit()
    queue.settle(job, JobState.FAILED)
    assert queue.scheduler.get(job).message == "internal error: a bug in the launcher"
    queue.scheduler.runner = queue.runner
    second = queue.submit()
    queue.runner.wait_started(1)
    queue.runner.finish(second)
    queue.settle(second, JobState.DONE)


@pytest.mark.parametrize("policy", list(RestartPolicy))
def test_daemon_stop_requeues_or_interrupts_the_running_job(tmp_path: Path, policy: RestartPolicy) -> None:
    q = Queue(tmp_path, policy)
    try:
        running = q.submit()
        q.runner.wait_started(1)
        waiting = q.submit()
        q.scheduler.stop()
        assert running in q.runner.saw_cancel, "a graceful stop cancels the running job's stage tree"
        record = q.scheduler.get(running)
        terminal = [n for n in q.of(running) if n in TERMINAL]
        if policy is RestartPolicy.REQUEUE:
            assert (record.state, record.index, record.overall) == (JobState.QUEUED, -1, 0.0)
            assert terminal == [], "a re-queued job is not over: no terminal Event yet"
            assert q.of(running) == ["job/queued", "job/started", "job/queued"]
        else:
            assert record.state is JobState.INTERRUPTED
            assert terminal == ["job/cancelled"]
        assert q.state(waiting) is JobState.QUEUED
        with pytest.raises(JobRefused) as stopping:
            q.submit()
        assert stopping.value.reason is Refusal.UNAVAILABLE
        q.scheduler.dispatch()
        assert q.runner.started == [running], "a stopping scheduler starts nothing"
        q.journal.close()  # the daemon is gone; the next one reads the journal
        q.journal = Journal(q.journal_path)
        q.scheduler = q.start(policy)
        assert {r.id: r.state for r in q.scheduler.records()} == {running: record.state, waiting: JobState.QUEUED}
        q.scheduler.dispatch()
        if policy is RestartPolicy.REQUEUE:  # the same job id runs again, first (it came first)
            assert q.runner.wait_started(2) == [running, running]
            q.runner.finish(running)
            q.settle(running, JobState.DONE)
            q.runner.wait_started(3)
            q.runner.finish(waiting)
            q.settle(waiting, JobState.DONE)
            assert [n for n in q.of(running) if n in TERMINAL] == ["job/done"]
        else:
            assert q.runner.wait_started(2) == [running, waiting]
    finally:
        q.close()
