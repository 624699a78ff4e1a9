"""Scheduler recovery from the Journal, in process, with an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.job import JobState
from orchestrator.journal import JobRecord, Journal
from orchestrator.pipeline import ConfigError, parse
from orchestrator.scheduler import RestartPolicy, Scheduler, under_roots

TOML = """
[pipelines.a]
[[pipelines.a.stages]]
stage = "misbehaving"
[pipelines.g]
resource = "gpu"
[[pipelines.g.stages]]
stage = "misbehaving"
"""


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
