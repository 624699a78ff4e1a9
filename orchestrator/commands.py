"""Command handlers: one function per Command address, in one table (docs/protocol.md).

The Commands and Replies themselves are declared in ``stages/protocol.py`` with the rest of the
address space; the daemon decodes datagrams into Events of ``COMMANDS`` and ``orchestrator/daemon.py``
calls the one handler ``TABLE`` names for each address.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from cuepipe.orchestrator.journal import JobRecord
from cuepipe.orchestrator.scheduler import Scheduler
from cuepipe.stages.codec import Message
from cuepipe.stages.protocol import (
    CMD_CANCEL,
    CMD_LIST,
    CMD_PING,
    CMD_RUN,
    CMD_STATUS,
    CMD_SUBSCRIBE,
    CMD_UNSUBSCRIBE,
    REPLY_ACK,
    REPLY_PIPELINES,
    REPLY_PONG,
    REPLY_STATUS,
    MessageSpec,
)


class Context(Protocol):
    """What command handlers may touch: the domain (scheduler) and the daemon's reply registry."""

    scheduler: Scheduler

    def uptime(self) -> float: ...

    def subscribe(self, address: tuple[str, int]) -> None: ...

    def unsubscribe(self, address: tuple[str, int]) -> None: ...

    def pipelines_json(self) -> str: ...


Reply = tuple[MessageSpec, dict[str, Any]]


def _ack(e: Message, job: str = "", detail: str = "") -> Reply:
    return REPLY_ACK, {"tag": e["tag"], "command": e.spec.name.removeprefix("cmd/"), "job": job, "detail": detail}


def _status(e: Message, r: JobRecord) -> Reply:
    return REPLY_STATUS, {"tag": e["tag"], "job": r.id, "pipeline": r.pipeline, "state": r.state.value,
                          "index": r.index, "overall": r.overall, "input": r.input, "message": r.message}


def run(ctx: Context, e: Message, reply_to: tuple[str, int]) -> list[Reply]:
    record = ctx.scheduler.submit(e["pipeline"], e["input"], e["sets"], e["priority"], e["tag"], reply_to)
    return [_ack(e, record.id, "queued")]


def cancel(ctx: Context, e: Message, reply_to: tuple[str, int]) -> list[Reply]:
    record = ctx.scheduler.cancel(e["job"])
    return [_ack(e, record.id, "cancelling")]


def status(ctx: Context, e: Message, reply_to: tuple[str, int]) -> list[Reply]:
    if e["job"]:
        return [_status(e, ctx.scheduler.get(e["job"]))]
    records = ctx.scheduler.records()
    return [_status(e, r) for r in records] + [_ack(e, detail=f"{len(records)} jobs")]


def list_pipelines(ctx: Context, e: Message, reply_to: tuple[str, int]) -> list[Reply]:
    return [(REPLY_PIPELINES, {"tag": e["tag"], "pipelines": ctx.pipelines_json()})]


def ping(ctx: Context, e: Message, reply_to: tuple[str, int]) -> list[Reply]:
    return [(REPLY_PONG, {"tag": e["tag"], "uptime": ctx.uptime()})]


def subscribe(ctx: Context, e: Message, reply_to: tuple[str, int]) -> list[Reply]:
    ctx.subscribe(reply_to)
    return [_ack(e, detail=f"{reply_to[0]}:{reply_to[1]}")]


def unsubscribe(ctx: Context, e: Message, reply_to: tuple[str, int]) -> list[Reply]:
    ctx.unsubscribe(reply_to)
    return [_ack(e, detail=f"{reply_to[0]}:{reply_to[1]}")]


Handler = Callable[[Context, Message, tuple[str, int]], list[Reply]]

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
