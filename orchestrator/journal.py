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
from typing import Any

from cuepipe.orchestrator.job import JobState
from cuepipe.stages.errors import CuepipeError

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

# Inputs a batch finished (``cuepipe batch``, orchestrator/batch.py): what makes re-running it resume.
# ``identity``: the input's content as batch.identity reads it; ``definition``: the pipeline's, hashed.
_FINISHED = """
CREATE TABLE IF NOT EXISTS finished (
    input TEXT NOT NULL,
    definition TEXT NOT NULL,
    identity TEXT NOT NULL,
    item TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (input, definition)
)
"""

# The one row of ``opened``: written at every start, to prove the journal is writable.
_PROBE = """
CREATE TABLE IF NOT EXISTS opened (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
INSERT OR REPLACE INTO opened VALUES (1, julianday('now'));
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


class JournalError(CuepipeError):
    """The journal cannot be opened, is corrupt, or cannot be written; the message says which and where."""


class Journal:
    """Opening checks the file completely (readable, intact, writable) so a daemon refuses to start
    on a journal it could not keep, instead of failing at its first job."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the journal {path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            problems = [row[0] for row in self._db.execute("PRAGMA integrity_check").fetchall()]
            if problems != ["ok"]:
                raise JournalError(f"the journal {path} is corrupt ({problems[0]}); move it aside to start with "
                                   "an empty one (its jobs are then forgotten)")
            self._db.execute(_SCHEMA)
            self._db.execute(_FINISHED)
            self._db.executescript(_PROBE)  # a real write: a read-only file fails here, not at the first job
        except sqlite3.Error as exc:
            self._db.close()
            if any(word in str(exc) for word in ("not a database", "malformed")):
                raise JournalError(f"the journal {path} is corrupt ({exc}); move it aside to start with an empty "
                                   "one (its jobs are then forgotten)") from None
            raise JournalError(f"the journal {path} cannot be written ({exc}); check the permissions and free "
                               "space of its folder (--state)") from None
        except JournalError:
            self._db.close()
            raise

    def save(self, r: JobRecord) -> None:
        """Write one record now; JournalError if it cannot be written (the caller decides what it means)."""
        row = (r.id, r.seq, r.pipeline, r.input, json.dumps(r.sets), r.priority, r.state.value, r.created,
               r.updated, r.index, r.overall, r.message, json.dumps(r.outputs), r.tag,
               json.dumps(r.reply_to), r.restarts)
        try:
            with self._lock:
                self._db.execute(f"INSERT OR REPLACE INTO jobs VALUES ({','.join('?' * len(row))})", row)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot write the journal {self.path}: {exc}") from None

    def load(self) -> list[JobRecord]:
        try:
            with self._lock:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
            out = []
            for row in rows:
                (id_, seq, pipeline, input_, sets, priority, state, created, updated, index, overall, message,
                 outputs, tag, reply_to, restarts) = row
                reply = json.loads(reply_to)
                out.append(JobRecord(id_, seq, pipeline, input_, tuple(json.loads(sets)), priority,
                                     JobState(state), created, updated, index, overall, message,
                                     tuple(json.loads(outputs)), tag, (reply[0], reply[1]) if reply else None,
                                     restarts))
        except (sqlite3.Error, ValueError, TypeError, IndexError) as exc:
            raise JournalError(f"the journal {self.path} holds a job it cannot read ({exc}); move it aside to "
                               "start with an empty one") from None
        return out

    def remember(self, input: str, definition: str, identity: str, item: dict[str, Any]) -> None:
        """Record that ``input`` (with this content) was finished by this pipeline definition."""
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO finished VALUES (?, ?, ?, ?, julianday('now'))",
                                 (input, definition, identity, json.dumps(item)))
        except sqlite3.Error as exc:
            raise JournalError(f"cannot write the journal {self.path}: {exc}") from None

    def recall(self, input: str, definition: str) -> tuple[str, dict[str, Any]] | None:
        """(identity, item) of ``input``'s last finish by this definition, if any."""
        try:
            with self._lock:
                row = self._db.execute("SELECT identity, item FROM finished WHERE input = ? AND definition = ?",
                                       (input, definition)).fetchone()
            return None if row is None else (str(row[0]), dict(json.loads(row[1])))
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise JournalError(f"cannot read the journal {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
