"""Journal: every Job the daemon accepted, in SQLite, so a killed daemon loses nothing.

A row is written when a Job is accepted and at every state or stage change (not at every progress
Event). SQLite's WAL mode with ``synchronous=NORMAL`` keeps each commit durable against a killed
process (SIGKILL), which is the failure the daemon must survive; a power cut may lose the last
commit. One connection, guarded by a lock: job threads and the command loop both write.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.job import JobState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    input TEXT NOT NULL,
    sets TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    stage_index INTEGER NOT NULL,
    overall REAL NOT NULL,
    message TEXT NOT NULL,
    outputs TEXT NOT NULL,
    tag TEXT NOT NULL,
    reply_to TEXT NOT NULL,
    restarts INTEGER NOT NULL
)
"""


@dataclass
class JobRecord:
    """What the daemon knows about one Job; mutated only under the Scheduler's lock."""

    id: str
    seq: int
    pipeline: str
    input: str
    sets: tuple[str, ...]
    priority: int
    state: JobState
    created: float
    updated: float
    index: int = -1
    overall: float = 0.0
    message: str = ""
    outputs: tuple[str, ...] = ()
    tag: str = ""
    reply_to: tuple[str, int] | None = None
    restarts: int = 0
    resource: str = field(default="cpu", compare=False)
    not_before: float = field(default=0.0, compare=False)  # keep_running restart backoff (not journaled)

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED)


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def save(self, r: JobRecord) -> None:
        row = (r.id, r.seq, r.pipeline, r.input, json.dumps(r.sets), r.priority, r.state.value, r.created,
               r.updated, r.index, r.overall, r.message, json.dumps(r.outputs), r.tag,
               json.dumps(r.reply_to), r.restarts)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs VALUES ({','.join('?' * len(row))})", row)

    def load(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        out = []
        for row in rows:
            (id_, seq, pipeline, input_, sets, priority, state, created, updated, index, overall, message,
             outputs, tag, reply_to, restarts) = row
            reply = json.loads(reply_to)
            out.append(JobRecord(id_, seq, pipeline, input_, tuple(json.loads(sets)), priority, JobState(state),
                                 created, updated, index, overall, message, tuple(json.loads(outputs)), tag,
                                 (reply[0], reply[1]) if reply else None, restarts))
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
