"""Commands: the OSC addresses the daemon answers, and their replies (docs/protocol.md).

The transport decodes datagrams into Events of these specs; ``orchestrator/daemon.py`` maps each
Command address to exactly one handler function in one explicit table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from orchestrator.journal import JobRecord
from orchestrator.scheduler import Refusal, Scheduler
from stages.events import Event, EventSpec, spec_of

__all__ = ["COMMANDS", "REPLIES", "Refusal"]

_HEAD = "tag:s reply_port:i"
CMD_RUN = spec_of("cmd/run", f"{_HEAD} pipeline:s input:s priority:i", tail="sets")
CMD_CANCEL = spec_of("cmd/cancel", f"{_HEAD} job:s")
CMD_STATUS = spec_of("cmd/status", f"{_HEAD} job:s")
CMD_LIST = spec_of("cmd/list", _HEAD)
CMD_PING = spec_of("cmd/ping", _HEAD)
CMD_SUBSCRIBE = spec_of("cmd/subscribe", _HEAD)
CMD_UNSUBSCRIBE = spec_of("cmd/unsubscribe", _HEAD)
COMMANDS = (CMD_RUN, CMD_CANCEL, CMD_STATUS, CMD_LIST, CMD_PING, CMD_SUBSCRIBE, CMD_UNSUBSCRIBE)

REPLY_ACK = spec_of("reply/ack", "tag:s command:s job:s detail:s")
REPLY_ERROR = spec_of("reply/error", "tag:s command:s reason:s message:s")
REPLY_STATUS = spec_of("reply/status", "tag:s job:s pipeline:s state:s index:i overall:f input:s message:s")
REPLY_PIPELINES = spec_of("reply/pipelines", "tag:s pipelines:s")
REPLY_PONG = spec_of("reply/pong", "tag:s uptime:f")
HEARTBEAT = spec_of("daemon/heartbeat", "uptime:f queued:i running:i workers:s")
REPLIES = (REPLY_ACK, REPLY_ERROR, REPLY_STATUS, REPLY_PIPELINES, REPLY_PONG, HEARTBEAT)


class Context(Protocol):
    """What command handlers may touch: the domain (scheduler) and the daemon's reply registry."""

    scheduler: Scheduler

    def uptime(self) -> float: ...

    def subscribe(self, address: tuple[str, int]) -> None: ...

    def unsubscribe(self, address: tuple[str, int]) -> None: ...

    def pipelines_json(self) -> str: ...


Reply = tuple[EventSpec, dict[str, Any]]


def _ack(e: Event, job: str = "", detail: str = "") -> Reply:
    return REPLY_ACK, {"tag": e["tag"], "command": e.spec.name.removeprefix("cmd/"), "job": job, "detail": detail}


def _status(e: Event, r: JobRecord) -> Reply:
    return REPLY_STATUS, {"tag": e["tag"], "job": r.id, "pipeline": r.pipeline, "state": r.state.value,
                          "index": r.index, "overall": r.overall, "input": r.input, "message": r.message}


def run(ctx: Context, e: Event, reply_to: tuple[str, int]) -> list[Reply]:
    record = ctx.scheduler.submit(e["pipeline"], e["input"], e["sets"], e["priority"], e["tag"], reply_to)
    return [_ack(e, record.id, "queued")]


def cancel(ctx: Context, e: Event, reply_to: tuple[str, int]) -> list[Reply]:
    record = ctx.scheduler.cancel(e["job"])
    return [_ack(e, record.id, "cancelling")]


def status(ctx: Context, e: Event, reply_to: tuple[str, int]) -> list[Reply]:
    if e["job"]:
        return [_status(e, ctx.scheduler.get(e["job"]))]
    records = ctx.scheduler.records()
    return [_status(e, r) for r in records] + [_ack(e, detail=f"{len(records)} jobs")]


def list_pipelines(ctx: Context, e: Event, reply_to: tuple[str, int]) -> list[Reply]:
    return [(REPLY_PIPELINES, {"tag": e["tag"], "pipelines": ctx.pipelines_json()})]


def ping(ctx: Context, e: Event, reply_to: tuple[str, int]) -> list[Reply]:
    return [(REPLY_PONG, {"tag": e["tag"], "uptime": ctx.uptime()})]


def subscribe(ctx: Context, e: Event, reply_to: tuple[str, int]) -> list[Reply]:
    ctx.subscribe(reply_to)
    return [_ack(e, detail=f"{reply_to[0]}:{reply_to[1]}")]


def unsubscribe(ctx: Context, e: Event, reply_to: tuple[str, int]) -> list[Reply]:
    ctx.unsubscribe(reply_to)
    return [_ack(e, detail=f"{reply_to[0]}:{reply_to[1]}")]


Handler = Callable[[Context, Event, tuple[str, int]], list[Reply]]

#: The one table from Command address to handler.
TABLE: dict[str, Handler] = {
    CMD_RUN.address: run,
    CMD_CANCEL.address: cancel,
    CMD_STATUS.address: status,
    CMD_LIST.address: list_pipelines,
    CMD_PING.address: ping,
    CMD_SUBSCRIBE.address: subscribe,
    CMD_UNSUBSCRIBE.address: unsubscribe,
}
