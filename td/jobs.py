"""The job table model: Job Events and daemon Replies in, one row per job out, for a Table DAT.

Plain Python with an injectable clock, so all of it runs and is tested without TouchDesigner.
Input from the network never raises: malformed messages are counted in ``malformed``, well-formed
ones for other addresses in ``unknown``, and both are otherwise ignored. Hooks (``JobTable.hooks``)
are called on transitions — a stage or job finished, the daemon went silent or came back — and an
exception inside a hook is logged, never raised into TD's callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import osc, protocol
from .link import DaemonLink
from .rows import COLUMNS, FINAL, JobRow, fire, write_table

__all__ = ["COLUMNS", "FINAL", "Hooks", "JobRow", "JobTable", "write_table"]

log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """Lists of functions the model calls; append your own (the extension wires its defaults here)."""

    stage_done: list[Callable[[JobRow, int, str, tuple[str, ...]], None]] = field(default_factory=list)
    job_end: list[Callable[[JobRow], None]] = field(default_factory=list)
    offline: list[Callable[[DaemonLink], None]] = field(default_factory=list)
    online: list[Callable[[DaemonLink], None]] = field(default_factory=list)
    pipelines: list[Callable[[str], None]] = field(default_factory=list)
    acked: list[Callable[[JobRow], None]] = field(default_factory=list)  # a daemon run got its job id


class JobTable:
    """One row per job, updated by Events; ``tick()`` from a frame callback applies the time rules."""

    def __init__(self, now: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time, *,
                 max_rows: int = 100, heartbeat_interval: float = 1.0, offline_after: int = 3,
                 exit_grace: float = 2.0, no_event_warning: float = 10.0) -> None:
        self.now, self.wall = now, wall
        self.max_rows, self.exit_grace, self.no_event_warning = max_rows, exit_grace, no_event_warning
        self.rows: dict[str, JobRow] = {}
        self.hooks = Hooks()
        self.daemon = DaemonLink(self, heartbeat_interval, offline_after)
        self.malformed = self.unknown = self.received = 0
        self.version = 0  # bumped on every change, so a view redraws only when needed
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "job/queued": self._job_queued, "job/started": self._job_started, "job/stage_started": self._stage_started,
            "job/progress": self._progress, "job/stage_done": self._stage_done,
            "job/stage_failed": self._stage_failed, "job/done": self._job_done,
            "job/failed": self._job_failed, "job/cancelled": self._job_cancelled, "job/warning": self._job_warning,
            "job/live": self._job_live,
            **self.daemon.handlers(),
        }

    # ------------------------------------------------------------------------------ rows and queries

    def add(self, job: str, pipeline: str = "", input: str = "", source: str = "run",
            state: str = "starting") -> JobRow:
        """Create (or return) the row for ``job``; the launcher calls this before its first Event."""
        row = self.rows.get(job)
        if row is None:
            row = self.rows[job] = JobRow(job, pipeline, input, source, state, created=self.now())
            self._trim()
            self.version += 1
        return row

    def get(self, job: str) -> JobRow | None:
        return self.rows.get(job)

    def active(self) -> list[JobRow]:
        return [row for row in self.rows.values() if not row.final]

    def clear_finished(self) -> None:
        for job in [j for j, row in self.rows.items() if row.final]:
            del self.rows[job]
        self.version += 1

    def table(self) -> list[list[str]]:
        """Header plus one line per job, oldest first: what the Table DAT shows."""
        return [list(COLUMNS)] + [row.cells() for row in self.rows.values()]

    def request_cancel(self, job: str) -> None:
        row = self.rows.get(job)
        if row is not None and not row.final:
            row.cancel_requested, row.state = True, "cancelling"
            self.version += 1

    def fail(self, job: str, error: str) -> None:
        """Mark a job failed from the TD side (e.g. its launcher could not even start)."""
        row = self.rows.get(job)
        if row is not None:
            self.finish(row, "failed", error=error)

    def process_exited(self, job: str, code: int) -> None:
        """The ``cuepipe run`` of ``job`` exited; ``tick`` settles rows whose final Event never came."""
        row = self.rows.get(job)
        if row is not None and row.exit_code is None:
            row.exit_code, row.exited_at = code, self.now()
            self.version += 1

    def _trim(self) -> None:
        for job in [j for j, row in self.rows.items() if row.final][: max(0, len(self.rows) - self.max_rows)]:
            del self.rows[job]

    # ------------------------------------------------------------------------------------- input

    def receive(self, address: Any, args: Any) -> bool:
        """One OSC message as an OSC In DAT delivers it. False (and counted) when it was not applied."""
        self.received += 1
        try:
            spec, fields = protocol.parse(address, args)
        except protocol.ProtocolError as exc:
            known = isinstance(address, str) and address in protocol.INCOMING
            if known or not isinstance(address, str) or not address.startswith("/"):
                self.malformed += 1
            else:
                self.unknown += 1
            log.debug("ignored OSC message: %s", exc)
            return False
        try:
            self._handlers[spec.name](fields)
        except Exception:  # a bug here must not raise into TD's callback
            log.exception("cuepipe could not apply %s", spec.name)
            self.malformed += 1
            return False
        self.version += 1
        return True

    def receive_bytes(self, data: Any) -> int:
        """A raw datagram as a UDP In DAT delivers it; returns how many messages were applied."""
        try:
            messages = osc.decode(data)
        except osc.OSCError as exc:
            self.received += 1
            self.malformed += 1
            log.debug("ignored malformed datagram: %s", exc)
            return 0
        return sum(self.receive(m.address, m.args) for m in messages)

    # ------------------------------------------------- what the daemon link reports (td/link.py)

    def daemon_offline(self, error: str) -> None:
        """The daemon went silent: its open rows show ``offline`` (with ``error``); ``offline`` hooks run."""
        for row in self.active():
            if row.source == "daemon":
                row.state_before_offline, row.state = row.state, "offline"
                row.error = error
        self.version += 1
        fire(self.hooks.offline, self.daemon)

    def daemon_online(self) -> None:
        """The daemon is heard from again: offline rows get their state back; ``online`` hooks run."""
        for row in self.active():
            if row.state == "offline":
                row.state, row.error = row.state_before_offline or "running", ""
        fire(self.hooks.online, self.daemon)

    def adopt(self, tag: str, job: str) -> None:
        """The daemon acked a run: the row keyed by the Command's ``tag`` becomes job ``job``.

        An Event that overtook the ack already made a row for ``job``: it keeps what the Event said
        and gains what TD knew. ``acked`` hooks run. Nothing happens when there is no ``tag`` row.
        """
        placeholder = self.rows.pop(tag, None)
        if placeholder is None:
            return
        placeholder.job = job
        row = self.rows.get(job)
        if row is not None:
            row.pipeline, row.input = row.pipeline or placeholder.pipeline, row.input or placeholder.input
            row.source, row.chained = "daemon", placeholder.chained
            row.cancel_requested = row.cancel_requested or placeholder.cancel_requested
        else:
            row = self.rows[job] = placeholder
            if row.state == "starting":
                row.state = "queued"
        fire(self.hooks.acked, row)

    def pipelines_listed(self, text: str) -> None:
        """The daemon's pipelines (JSON text) arrived: ``pipelines`` hooks run."""
        fire(self.hooks.pipelines, text)

    # ----------------------------------------------------------------------------------- time rules

    def tick(self) -> None:
        """Apply everything that depends on time: daemon offline, exited launchers, missing Events."""
        now = self.now()
        self.daemon.check(now)
        for row in self.active():
            if row.exited_at is not None and now - row.exited_at >= self.exit_grace:
                self._settle_exit(row)
            elif (row.source == "run" and row.state == "starting" and not row.error and row.last_event is None
                  and now - row.created > self.no_event_warning):
                row.error = (f"no Events after {self.no_event_warning:.0f} s: is the OSC In DAT active on the "
                             "--report port (firewall?)")
                self.version += 1

    def _settle_exit(self, row: JobRow) -> None:
        code = row.exit_code
        where = f" (log: {row.log})" if row.log else ""
        if row.cancel_requested or code == 130:
            self.finish(row, "cancelled", error="" if code == 130 else f"stopped (exit {code}), no job/cancelled")
        elif code == 0:
            self.finish(row, "failed", error="cuepipe run exited 0 but job/done never arrived: check the "
                                              f"OSC In DAT port{where}")
        elif code == 2:
            self.finish(row, "failed", error=f"cuepipe run rejected the request (exit 2){where}")
        else:
            self.finish(row, "failed", error=f"cuepipe run exited {code} without a final Event{where}")

    # ------------------------------------------------------------------------------------ handlers

    def event_row(self, job: str, initial: str = "running") -> JobRow:
        """The row an Event is about (created for jobs this TD did not start), marked as heard from."""
        row = self.rows.get(job) or self.add(job, source="seen", state=initial)
        row.last_event, row.last_event_wall = self.now(), self.wall()
        if row.state == "offline":  # the daemon is evidently talking again
            row.state, row.error = row.state_before_offline or "running", ""
        return row

    def _running(self, row: JobRow) -> None:
        if row.state in ("starting", "queued"):
            row.state = "cancelling" if row.cancel_requested else "running"

    def finish(self, row: JobRow, state: str, **changes: Any) -> None:
        """Put ``row`` into a final state (once) and call the ``job_end`` hooks."""
        if row.final:  # the first final state wins; a duplicate (report + subscriber) changes nothing
            return
        for key, value in changes.items():
            setattr(row, key, value)
        row.state = state
        self.version += 1
        fire(self.hooks.job_end, row)

    def _job_queued(self, f: dict[str, Any]) -> None:
        row = self.event_row(f["job"], "queued")
        row.pipeline, row.input = row.pipeline or f["pipeline"], row.input or f["input"]
        if row.state == "starting":
            row.state = "queued"

    def _job_started(self, f: dict[str, Any]) -> None:
        row = self.event_row(f["job"])
        row.pipeline, row.input, row.stages = f["pipeline"], f["input"], f["stages"]
        self._running(row)

    def _stage_started(self, f: dict[str, Any]) -> None:
        row = self.event_row(f["job"])
        row.index, row.stage = f["index"], f["stage"]
        if row.stages and not row.final:
            row.progress = f["index"] / row.stages
        self._running(row)

    def _progress(self, f: dict[str, Any]) -> None:
        row = self.event_row(f["job"])
        if not row.final:
            row.index, row.stage, row.progress, row.fps = f["index"], f["stage"], f["overall"], f["fps"]
            self._running(row)

    def _job_live(self, f: dict[str, Any]) -> None:
        """A live job (runs until cancelled): its rate and latency, in the fps and output columns."""
        row = self.event_row(f["job"])
        if not row.final:
            row.index, row.stage, row.fps = f["index"], f["stage"], f["fps"]
            row.live = (f"live: {f['frames']} frames, {f['dropped']} dropped, latency {f['latency_p50']:.0f} / "
                        f"{f['latency_p95']:.0f} ms (p50 / p95)")
            self._running(row)

    def _stage_done(self, f: dict[str, Any]) -> None:
        row = self.event_row(f["job"])
        if not row.final and row.stages:
            row.progress = (f["index"] + 1) / row.stages
        fire(self.hooks.stage_done, row, f["index"], f["stage"], f["outputs"])

    def _stage_failed(self, f: dict[str, Any]) -> None:
        row = self.event_row(f["job"])
        again = " — retrying" if f["retrying"] else ""
        row.error = f"{f['stage']} attempt {f['attempt']}: {f['kind']} (exit {f['exit_code']}): {f['message']}{again}"
        row.stderr = f["stderr"]

    def _job_done(self, f: dict[str, Any]) -> None:
        self.finish(self.event_row(f["job"]), "done", outputs=f["outputs"], progress=1.0, error="")

    def _job_failed(self, f: dict[str, Any]) -> None:
        where = f" at {f['stage']} (exit {f['exit_code']})" if f["index"] >= 0 else ""
        self.finish(self.event_row(f["job"]), "failed", error=f"{f['kind']}{where}: {f['message']}")

    def _job_cancelled(self, f: dict[str, Any]) -> None:
        self.finish(self.event_row(f["job"]), "cancelled")

    def _job_warning(self, f: dict[str, Any]) -> None:
        row, text = self.event_row(f["job"]), f"{f['stage']}: {f['kind']}: {f['message']}"
        if text not in row.warnings:  # the same Event by report and as a subscriber counts once
            row.warnings += (text,)
