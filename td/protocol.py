"""The part of ``docs/protocol.md`` the TouchDesigner side speaks, declared without python-osc.

TD's Python cannot import ``stages.events`` (it needs python-osc), so the Job Events, Commands and
Replies are declared again here in the same ``name:tag`` shorthand; ``tests/test_td_jobs.py``
checks this table against the orchestrator's, so the two can never drift apart silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import osc

PREFIX = "/cuepipe/v1"


class ProtocolError(ValueError):
    """A message has an unknown address, or arguments that do not match its spec."""


@dataclass(frozen=True)
class Spec:
    """One address: its fixed arguments as (name, tag) pairs and an optional tail of strings."""

    address: str
    args: tuple[tuple[str, str], ...]
    tail: str | None = None

    @property
    def name(self) -> str:
        return self.address.removeprefix(PREFIX + "/")

    @property
    def tags(self) -> str:
        return "".join(tag for _, tag in self.args)


def spec_of(path: str, args: str, tail: str | None = None) -> Spec:
    return Spec(f"{PREFIX}/{path}", tuple((a.split(":")[0], a.split(":")[1]) for a in args.split()), tail)


JOB_QUEUED = spec_of("job/queued", "job:s pipeline:s input:s priority:i")
JOB_STARTED = spec_of("job/started", "job:s pipeline:s input:s stages:i")
JOB_STAGE_STARTED = spec_of("job/stage_started", "job:s index:i stage:s attempt:i pid:i info:s")
JOB_PROGRESS = spec_of("job/progress", "job:s index:i stage:s fraction:f frame:i total:i fps:f overall:f")
JOB_STAGE_DONE = spec_of("job/stage_done", "job:s index:i stage:s frames:i seconds:f", tail="outputs")
JOB_STAGE_FAILED = spec_of(
    "job/stage_failed", "job:s index:i stage:s attempt:i exit_code:i kind:s message:s stderr:s retrying:i"
)
JOB_DONE = spec_of("job/done", "job:s seconds:f", tail="outputs")
JOB_FAILED = spec_of("job/failed", "job:s index:i stage:s exit_code:i kind:s message:s")
JOB_CANCELLED = spec_of("job/cancelled", "job:s index:i stage:s")
JOB_WARNING = spec_of("job/warning", "job:s index:i stage:s kind:s message:s")
JOB_EVENTS = (JOB_QUEUED, JOB_STARTED, JOB_STAGE_STARTED, JOB_PROGRESS, JOB_STAGE_DONE, JOB_STAGE_FAILED,
              JOB_DONE, JOB_FAILED, JOB_CANCELLED, JOB_WARNING)

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

#: What TD receives on its OSC In / UDP In port.
INCOMING = {s.address: s for s in JOB_EVENTS + REPLIES}


def _checked(spec: Spec, name: str, tag: str, value: Any) -> Any:
    """``value`` as the Python type of ``tag``; TD may hand integral numbers over as floats."""
    if tag == "s" and isinstance(value, str):
        return value
    if tag == "i" and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if tag == "f" and not isinstance(value, bool) and isinstance(value, int | float):
        return float(value) if math.isfinite(value) else 0.0
    raise ProtocolError(f"{spec.name}: argument {name!r} must be {tag}, got {value!r}")


def parse(address: Any, args: Sequence[Any], specs: dict[str, Spec] = INCOMING) -> tuple[Spec, dict[str, Any]]:
    """Match a message (address + argument list, as an OSC In DAT gives them) to its spec.

    Returns (spec, fields by name; the tail as a tuple). Raises ProtocolError, never anything else.
    """
    spec = specs.get(address) if isinstance(address, str) else None
    if spec is None:
        raise ProtocolError(f"unknown address {address!r}")
    try:
        values = list(args)
    except TypeError:
        raise ProtocolError(f"{spec.name}: arguments are not a list: {args!r}") from None
    if len(values) < len(spec.args) or (len(values) > len(spec.args) and not spec.tail):
        raise ProtocolError(f"{spec.name}: expected {len(spec.args)} arguments, got {len(values)}")
    fields = {name: _checked(spec, name, tag, v) for (name, tag), v in zip(spec.args, values, strict=False)}
    if spec.tail:
        tail = values[len(spec.args) :]
        if not all(isinstance(v, str) for v in tail):
            raise ProtocolError(f"{spec.name}: {spec.tail} must be strings")
        fields[spec.tail] = tuple(tail)
    return spec, fields


def encode(spec: Spec, **fields: Any) -> bytes:
    """One message of ``spec`` as an OSC datagram (e.g. a Command for ``cuepipe serve``)."""
    missing = [name for name, _ in spec.args if name not in fields]
    if missing:
        raise ProtocolError(f"{spec.name}: missing argument(s) {missing}")
    extra = set(fields) - {name for name, _ in spec.args} - ({spec.tail} if spec.tail else set())
    if extra:
        raise ProtocolError(f"{spec.name}: unknown argument(s) {sorted(extra)}")
    tail = [str(v) for v in fields.get(spec.tail, ())] if spec.tail else []
    values = [fields[name] for name, _ in spec.args] + tail
    try:
        return osc.encode_message(spec.address, values, spec.tags + "s" * len(tail))
    except osc.OSCError as exc:
        raise ProtocolError(f"{spec.name}: {exc}") from None
