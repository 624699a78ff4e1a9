"""``cuepipe serve`` as TD sees it: liveness from heartbeats, Commands awaiting replies, replies applied.

Part of the job table model (``JobTable.daemon``). TD never reads a socket itself: the daemon's
replies and heartbeats arrive through the OSC In DAT like every Event, and ``check(now)`` — from
the frame callback, with an injectable clock — turns "no heartbeat for N intervals" into offline.
The link keeps the daemon's state and changes rows only through the table's public API
(``JobModel``, which ``td/jobs.py``'s ``JobTable`` implements), so it never imports the table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from .rows import FINAL, JobRow

log = logging.getLogger(__name__)

MAX_PENDING = 1000  # Command tags remembered until their reply; the oldest are forgotten beyond this


class JobModel(Protocol):
    """What the link asks of the job table (``td/jobs.py``'s ``JobTable``); it touches nothing else."""

    now: Callable[[], float]

    def get(self, job: str) -> JobRow | None: ...
    def event_row(self, job: str, initial: str = "running") -> JobRow: ...
    def finish(self, row: JobRow, state: str, **changes: Any) -> None: ...
    def daemon_offline(self, error: str) -> None: ...
    def daemon_online(self) -> None: ...
    def adopt(self, tag: str, job: str) -> None: ...
    def pipelines_listed(self, text: str) -> None: ...


class DaemonLink:
    """State ``unknown`` until the daemon is first heard from, then ``alive`` / ``offline``."""

    def __init__(self, table: JobModel, heartbeat_interval: float = 1.0, offline_after: int = 3) -> None:
        self.table = table
        self.heartbeat_interval, self.offline_after = heartbeat_interval, offline_after
        self.state = "unknown"
        self.last_seen: float | None = None
        self.uptime, self.queued, self.running, self.workers = 0.0, 0, 0, "[]"
        self.pending: dict[str, str] = {}  # Command tag -> command name, until its reply
        self.last_error = ""

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        """The reply addresses this link applies, for the model's dispatch table."""
        return {"reply/ack": self._ack, "reply/error": self._error, "reply/status": self._status,
                "reply/pipelines": self._pipelines, "reply/pong": lambda f: self.seen(),
                "daemon/heartbeat": self._heartbeat}

    def expect_reply(self, tag: str, command: str) -> None:
        """Remember which Command ``tag`` was until its reply arrives."""
        self.pending[tag] = command
        while len(self.pending) > MAX_PENDING:
            del self.pending[next(iter(self.pending))]

    def check(self, now: float) -> None:
        """Offline once ``offline_after`` heartbeats are missing; the daemon's open rows say so."""
        silent = self.heartbeat_interval * self.offline_after
        if self.state != "alive" or self.last_seen is None or now - self.last_seen <= silent:
            return
        self.state = "offline"
        self.table.daemon_offline(f"daemon silent for {self.offline_after} heartbeats")

    def seen(self) -> None:
        """Anything from the daemon proves it is alive; coming back from offline restores its rows."""
        was = self.state
        self.state, self.last_seen = "alive", self.table.now()
        if was == "offline":
            self.table.daemon_online()

    # ------------------------------------------------------------------------------------ replies

    def _ack(self, f: dict[str, Any]) -> None:
        self.seen()
        command = self.pending.pop(f["tag"], f["command"])
        if command == "run" and f["job"]:
            self.table.adopt(f["tag"], f["job"])  # the row keyed by the Command's tag becomes the job's

    def _error(self, f: dict[str, Any]) -> None:
        self.seen()
        command = self.pending.pop(f["tag"], f["command"])
        self.last_error = f"{command}: {f['reason']}: {f['message']}"
        row = self.table.get(f["tag"])
        if command == "run" and row is not None:
            self.table.finish(row, "failed", error=f"{f['reason']}: {f['message']}")
        log.warning("cuepipe serve refused %s", self.last_error)

    def _status(self, f: dict[str, Any]) -> None:
        self.seen()
        if not f["job"]:
            return
        row = self.table.event_row(f["job"])
        row.pipeline, row.input = row.pipeline or f["pipeline"], row.input or f["input"]
        if f["state"] in FINAL:
            outputs = (f["message"],) if f["state"] == "done" and f["message"] else row.outputs
            error = "" if f["state"] == "done" else f["message"]
            self.table.finish(row, f["state"], outputs=outputs, error=error, progress=f["overall"])
        elif not row.final:
            row.state, row.index, row.progress = f["state"], f["index"], f["overall"]

    def _pipelines(self, f: dict[str, Any]) -> None:
        self.seen()
        self.table.pipelines_listed(f["pipelines"])

    def _heartbeat(self, f: dict[str, Any]) -> None:
        self.uptime, self.queued, self.running, self.workers = f["uptime"], f["queued"], f["running"], f["workers"]
        self.seen()
