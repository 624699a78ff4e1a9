"""The ``/cuepipe/v1`` address space as the TouchDesigner side speaks it, without python-osc.

The address space is declared once, in ``stages/protocol.py`` (standard library only). TD's Python
cannot import ``stages`` (the package needs python-osc and more, and inside TD the rest of cuepipe
is not installed), so this module loads that one file by its path, next to this ``td/`` folder in
the repository, the way ``td/boot.py`` loads ``td/`` itself, and uses its specs as they are:
nothing is declared twice. What is TD's own is the stdlib codec (``td/osc.py``), ``parse`` (the
arguments an OSC In DAT hands over) and ``encode``. ``tests/test_td_osc.py`` checks that these are
the orchestrator's very specs and that ``encode`` is byte-identical to python-osc's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from . import boot, osc
from .errors import CuepipeError, ErrorKind

#: The one declaration of the address space, in the repository this ``td/`` folder belongs to.
SOURCE = boot.SHARED / "protocol.py"
_space = boot.shared(__package__, "protocol")


class Spec(Protocol):
    """What the TD side reads of an ``MessageSpec`` (``stages/protocol.py``): for type checking only."""

    @property
    def address(self) -> str: ...

    @property
    def args(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def tail(self) -> str | None: ...

    @property
    def name(self) -> str: ...

    @property
    def tags(self) -> str: ...


PREFIX: str = _space.PREFIX
new_job_id: Callable[..., str] = _space.new_job_id
STAGE_EVENTS: tuple[Spec, ...] = _space.STAGE_EVENTS
JOB_EVENTS: tuple[Spec, ...] = _space.JOB_EVENTS
COMMANDS: tuple[Spec, ...] = _space.COMMANDS
REPLIES: tuple[Spec, ...] = _space.REPLIES
# The specs TD code and its tests name; every one is the object stages/protocol.py declares.
JOB_QUEUED: Spec = _space.JOB_QUEUED
JOB_STARTED: Spec = _space.JOB_STARTED
JOB_STAGE_STARTED: Spec = _space.JOB_STAGE_STARTED
JOB_PROGRESS: Spec = _space.JOB_PROGRESS
JOB_STAGE_DONE: Spec = _space.JOB_STAGE_DONE
JOB_STAGE_FAILED: Spec = _space.JOB_STAGE_FAILED
JOB_DONE: Spec = _space.JOB_DONE
JOB_FAILED: Spec = _space.JOB_FAILED
JOB_CANCELLED: Spec = _space.JOB_CANCELLED
JOB_WARNING: Spec = _space.JOB_WARNING
JOB_LIVE: Spec = _space.JOB_LIVE
CMD_RUN: Spec = _space.CMD_RUN
CMD_CANCEL: Spec = _space.CMD_CANCEL
CMD_STATUS: Spec = _space.CMD_STATUS
CMD_LIST: Spec = _space.CMD_LIST
CMD_PING: Spec = _space.CMD_PING
CMD_SUBSCRIBE: Spec = _space.CMD_SUBSCRIBE
CMD_UNSUBSCRIBE: Spec = _space.CMD_UNSUBSCRIBE
REPLY_ACK: Spec = _space.REPLY_ACK
REPLY_ERROR: Spec = _space.REPLY_ERROR
REPLY_STATUS: Spec = _space.REPLY_STATUS
REPLY_PIPELINES: Spec = _space.REPLY_PIPELINES
REPLY_PONG: Spec = _space.REPLY_PONG
HEARTBEAT: Spec = _space.HEARTBEAT

#: What TD receives on its OSC In / UDP In port.
INCOMING: dict[str, Spec] = {s.address: s for s in JOB_EVENTS + REPLIES}


class ProtocolError(CuepipeError, ValueError):
    """A message has an unknown address, or arguments that do not match its spec."""

    kind = ErrorKind.BAD_ARGUMENT


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
