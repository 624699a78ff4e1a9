"""The whole ``/cuepipe/v1`` OSC address space, declared once (stdlib only, imports nothing of the project).

Every address cuepipe sends or hears, with its argument names and OSC type tags, is an ``MessageSpec``
here, in four tables: ``STAGE_EVENTS`` (a Stage to its ``--report`` addresses), ``JOB_EVENTS`` (the
launcher to TouchDesigner), ``COMMANDS`` (TouchDesigner to ``cuepipe serve``) and ``REPLIES`` (the
daemon's answers and heartbeat). ``docs/protocol.md`` documents the same table and
``tests/test_protocol.py`` checks the two against each other and against fixed byte packets.

Who uses it: stages and the orchestrator import it (``cuepipe.stages.codec`` encodes and decodes these specs
with python-osc); ``td/protocol.py`` loads this very file by its path, so TouchDesigner's Python,
which has neither python-osc nor the rest of cuepipe, speaks the same address space with its own
stdlib codec (``td/osc.py``). Keep it that way: standard library only, no project imports.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

PREFIX = "/cuepipe/v1"


@dataclass(frozen=True)
class MessageSpec:
    """One OSC address and its fixed arguments (name, type tag), plus an optional string tail."""

    address: str
    args: tuple[tuple[str, str], ...]
    tail: str | None = None  # name of a trailing list of strings (e.g. output paths)

    @property
    def name(self) -> str:
        return self.address.removeprefix(PREFIX + "/")

    @property
    def tags(self) -> str:
        """The type tags of the fixed arguments (``"sif"``); the tail adds one ``s`` per string."""
        return "".join(tag for _, tag in self.args)


def spec_of(path: str, args: str, tail: str | None = None) -> MessageSpec:
    """Build a spec from ``"name:tag name:tag"`` shorthand."""
    pairs = tuple((a.split(":")[0], a.split(":")[1]) for a in args.split())
    return MessageSpec(f"{PREFIX}/{path}", pairs, tail)


class WarningKind(StrEnum):
    """What a stage accepted but must not keep quiet about: the ``kind`` of a ``warning`` Event."""

    INPUT_TRUNCATED = "input_truncated"  # fewer frames decoded than the container declares (allow_truncated)
    PARAMETER_IGNORED = "parameter_ignored"  # a parameter that does not apply to this input or model


# -------------------------------------------------------- Stage Events: a stage to its --report addresses

STAGE_STARTED = spec_of("stage/started", "stage:s pid:i info:s")
STAGE_PROGRESS = spec_of("stage/progress", "stage:s fraction:f frame:i total:i fps:f")
STAGE_DONE = spec_of("stage/done", "stage:s frames:i seconds:f", tail="outputs")
STAGE_FAILED = spec_of("stage/failed", "stage:s kind:s message:s")
STAGE_WARNING = spec_of("stage/warning", "stage:s kind:s message:s")
#: a live stage's state, about once a second: frames out, output fps, frames dropped (the source ran
#: ahead), and source-to-output latency in ms (p50, p95 over the last second or so)
STAGE_LIVE = spec_of("stage/live", "stage:s frames:i fps:f dropped:i latency_p50:f latency_p95:f")
STAGE_EVENTS: tuple[MessageSpec, ...] = (
    STAGE_STARTED, STAGE_PROGRESS, STAGE_DONE, STAGE_FAILED, STAGE_WARNING, STAGE_LIVE,
)

# ------------------------------------ Job Events: the launcher (cuepipe run / serve) to every report address
# Stage Events relayed with the job id and stage index added, plus the Job's own queued / started /
# done / failed / cancelled.

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
JOB_LIVE = spec_of("job/live", "job:s index:i stage:s frames:i fps:f dropped:i latency_p50:f latency_p95:f")
JOB_EVENTS: tuple[MessageSpec, ...] = (
    JOB_QUEUED, JOB_STARTED, JOB_STAGE_STARTED, JOB_PROGRESS, JOB_STAGE_DONE, JOB_STAGE_FAILED,
    JOB_DONE, JOB_FAILED, JOB_CANCELLED, JOB_WARNING, JOB_LIVE,
)

#: exit_code value when a stage never ran or its code is unknown.
NO_EXIT_CODE = -1

#: What a job id may be when a client chooses it (``cuepipe run --job-id``): 1-64 of A-Z a-z 0-9 _ . -,
#: no leading dot (it names the Job's work folder).
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def new_job_id(now: Callable[[], datetime] = datetime.now) -> str:
    """A fresh job id, ``YYYYMMDD-HHMMSS-xxxx``: sortable by time, unique enough for one machine."""
    return f"{now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"

# --------------------------------------------------- Commands: TouchDesigner (or any peer) to cuepipe serve
# Every Command starts with the peer's tag (echoed in the Reply) and the port to reply to.

_HEAD = "tag:s reply_port:i"
CMD_RUN = spec_of("cmd/run", f"{_HEAD} pipeline:s input:s priority:i", tail="sets")
CMD_CANCEL = spec_of("cmd/cancel", f"{_HEAD} job:s")
CMD_STATUS = spec_of("cmd/status", f"{_HEAD} job:s")
CMD_LIST = spec_of("cmd/list", _HEAD)
CMD_PING = spec_of("cmd/ping", _HEAD)
CMD_SUBSCRIBE = spec_of("cmd/subscribe", _HEAD)
CMD_UNSUBSCRIBE = spec_of("cmd/unsubscribe", _HEAD)
COMMANDS: tuple[MessageSpec, ...] = (
    CMD_RUN, CMD_CANCEL, CMD_STATUS, CMD_LIST, CMD_PING, CMD_SUBSCRIBE, CMD_UNSUBSCRIBE,
)

# ------------------------------------------------------- Replies: cuepipe serve to a Command's reply port

REPLY_ACK = spec_of("reply/ack", "tag:s command:s job:s detail:s")
REPLY_ERROR = spec_of("reply/error", "tag:s command:s reason:s message:s")
REPLY_STATUS = spec_of("reply/status", "tag:s job:s pipeline:s state:s index:i overall:f input:s message:s")
REPLY_PIPELINES = spec_of("reply/pipelines", "tag:s pipelines:s")
REPLY_PONG = spec_of("reply/pong", "tag:s uptime:f")
HEARTBEAT = spec_of("daemon/heartbeat", "uptime:f queued:i running:i workers:s")  # to every subscriber
REPLIES: tuple[MessageSpec, ...] = (REPLY_ACK, REPLY_ERROR, REPLY_STATUS, REPLY_PIPELINES, REPLY_PONG, HEARTBEAT)
