"""Job table rows: what TD shows for one job, how hooks are called, and the Table DAT writer.

No dependencies on the rest of the package: the bottom of ``td/``'s model, below the daemon link
(``daemon.py``) and the job table (``jobs.py``, which owns the link and the ``Hooks``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = ("job", "pipeline", "stage", "state", "progress", "fps", "output", "error", "heartbeat")
#: Final states (docs/protocol.md "Job states"). TD-side states besides those: ``starting`` (the
#: launcher was started, no Event yet), ``queued``/``running``, ``cancelling``, ``offline``.
FINAL = frozenset({"done", "failed", "cancelled", "interrupted"})


@dataclass
class JobRow:
    """What TD knows about one job. ``source``: run (our ``cuepipe run``), daemon, or seen (Events only)."""

    job: str
    pipeline: str = ""
    input: str = ""
    source: str = "run"
    state: str = "starting"
    stage: str = ""
    index: int = -1
    stages: int = 0
    progress: float = 0.0
    fps: float = 0.0
    outputs: tuple[str, ...] = ()
    error: str = ""
    warnings: tuple[str, ...] = ()  # job/warning Events: "stage: kind: message"; shown where no error is
    live: str = ""  # a live job's last job/live: frames, drops, latency; shown where an output would be
    stderr: str = ""
    created: float = 0.0
    last_event: float | None = None
    last_event_wall: float | None = None
    exit_code: int | None = None
    exited_at: float | None = None
    cancel_requested: bool = False
    log: str = ""
    chained: bool = False
    state_before_offline: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def output(self) -> str:
        return self.outputs[0] if self.outputs else self.live

    def cells(self) -> list[str]:
        """The row as the strings a Table DAT shows, in ``COLUMNS`` order."""
        stage = f"{self.index + 1}/{self.stages} {self.stage}" if self.stages and self.index >= 0 else self.stage
        beat = (time.strftime("%H:%M:%S", time.localtime(self.last_event_wall))
                if self.last_event_wall is not None else "")
        error = self.error or "; ".join(f"warning: {w}" for w in self.warnings)
        return [self.job, self.pipeline, stage, self.state, f"{self.progress:.3f}",
                f"{self.fps:.1f}" if self.fps else "", self.output, error, beat]


def fire(hooks: Sequence[Callable[..., None]], *args: Any) -> None:
    for hook in list(hooks):
        try:
            hook(*args)
        except Exception:  # a user's hook must never break the model or raise into TD
            log.exception("cuepipe hook %r failed", hook)


def write_table(dat: Any, cells: Sequence[Sequence[str]]) -> int:
    """Make a Table DAT show ``cells``, writing only cells that differ; returns how many it wrote."""
    rows, cols = len(cells), max((len(line) for line in cells), default=0)
    if dat.numRows != rows or dat.numCols != cols:
        dat.setSize(rows, cols)
    written = 0
    for r, line in enumerate(cells):
        for c, value in enumerate(line):
            cell = dat[r, c]
            if cell is None or cell.val != value:
                dat[r, c] = value
                written += 1
    return written
