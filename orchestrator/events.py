"""Job Events: what the launcher sends to TouchDesigner (``docs/protocol.md``).

Stage Events are relayed with the job id and stage index added; the launcher adds the Job's own
``started`` / ``done`` / ``failed`` / ``cancelled``. Same codec as ``stages.events``.
"""

from __future__ import annotations

from stages.events import spec_of

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

JOB_EVENTS = (
    JOB_QUEUED, JOB_STARTED, JOB_STAGE_STARTED, JOB_PROGRESS, JOB_STAGE_DONE, JOB_STAGE_FAILED,
    JOB_DONE, JOB_FAILED, JOB_CANCELLED, JOB_WARNING,
)

#: exit_code value when a stage never ran or its code is unknown.
NO_EXIT_CODE = -1
