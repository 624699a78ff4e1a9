"""``cuepipe serve`` as TD sees it: liveness from heartbeats, Commands awaiting replies, replies applied.

Part of the job table model (``JobTable.daemon``). TD never reads a socket itself: the daemon's
replies and heartbeats arrive through the OSC In DAT like every Event, and ``check(now)`` — from
the frame callback, with an injectable clock — turns "no heartbeat for N intervals" into offline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .rows import FINAL, fire

if TYPE_CHECKING:
    from .jobs import JobTable

log = logging.getLogger(__name__)

MAX_PENDING = 1000  # Command tags remembered until their reply; the oldest are forgotten beyond this


class DaemonLink:
    """State ``unknown`` until the daemon is first heard from, then ``alive`` / ``offline``."""

    def __init__(self, table: JobTable, heartbeat_interval: float = 1.0, offline_after: int = 3) -> None:
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
        for row in self.table.active():
            if row.source == "daemon":
                row.state_before_offline, row.state = row.state, "offline"
                row.error = f"daemon silent for {self.offline_after} heartbeats"
        self.table.version += 1
        fire(self.table.hooks.offline, self)

    def seen(self) -> None:
        """Anything from the daemon proves it is alive; coming back from offline restores its rows."""
        was = self.state
        self.state, self.last_seen = "alive", self.table.now()
        if was == "offline":
            for row in self.table.active():
                if row.state == "offline":
                    row.state, row.error = row.state_before_offline or "running", ""
            fire(self.table.hooks.online, self)

    # ------------------------------------------------------------------------------------ replies

    def _ack(self, f: dict[str, Any]) -> None:
        self.seen()
        command = self.pending.pop(f["tag"], f["command"])
        rows = self.table.rows
        placeholder = rows.get(f["tag"])
        if command != "run" or not f["job"] or placeholder is None:
            return
        del rows[f["tag"]]  # the row keyed by the Command's tag becomes the daemon's job id
        placeholder.job = f["job"]
        row = rows.get(f["job"])
        if row is not None:  # an Event overtook the ack: keep what it said, add what TD knew
            row.pipeline, row.input = row.pipeline or placeholder.pipeline, row.input or placeholder.input
            row.source, row.chained = "daemon", placeholder.chained
            row.cancel_requested = row.cancel_requested or placeholder.cancel_requested
        else:
            row = rows[f["job"]] = placeholder
            if row.state == "starting":
                row.state = "queued"
        fire(self.table.hooks.acked, row)

    def _error(self, f: dict[str, Any]) -> None:
        self.seen()
        command = self.pending.pop(f["tag"], f["command"])
        self.last_error = f"{command}: {f['reason']}: {f['message']}"
        row = self.table.rows.get(f["tag"])
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
        fire(self.table.hooks.pipelines, f["pipelines"])

    def _heartbeat(self, f: dict[str, Any]) -> None:
        self.uptime, self.queued, self.running, self.workers = f["uptime"], f["queued"], f["running"], f["workers"]
        self.seen()
