"""Supervisor: ``cuepipe supervise`` keeps the daemon alive for unattended exhibitions.

supervisord and systemd do not exist on the Windows machines most TouchDesigner installations
run on, so cuepipe brings its own: the daemon runs as a Worker (own process group, whole-tree kill,
log file), is restarted when it exits for any reason, with exponential backoff that resets after a
stable run, and *flapping* — too many restarts in a window — switches to a long cool-down instead
of burning the CPU in a restart loop. It never gives up: an exhibition must come back by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cuepipe.orchestrator.worker import Worker, WorkerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """How the Supervisor spaces restarts of the daemon (not to be confused with the Scheduler's
    ``RestartPolicy``, which says what happens to a job the daemon was running)."""

    backoff_start: float = 1.0  # seconds before the first restart
    backoff_max: float = 60.0
    stable_after: float = 30.0  # a run this long resets the backoff
    flap_window: float = 120.0
    flap_limit: int = 5  # restarts within flap_window that count as flapping
    flap_cooldown: float = 300.0  # wait this long when flapping, then try again


class Supervisor:
    def __init__(self, argv: Sequence[str], cwd: Path, log_path: Path, policy: Backoff = Backoff(),
                 now: Callable[[], float] = time.monotonic) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.log_path = log_path
        self.policy = policy
        self.now = now
        self.starts = 0
        self.pid = -1  # of the current child, for status and tests
        self.waits: list[float] = []  # every pause taken before a restart, for status and tests

    def next_wait(self, recent: deque[float], backoff: float, ran_for: float) -> tuple[float, float]:
        """(how long to wait now, the backoff to use next time) after a child exited."""
        p = self.policy
        t = self.now()
        recent.append(t)
        while recent and t - recent[0] > p.flap_window:
            recent.popleft()
        if ran_for >= p.stable_after:
            backoff = p.backoff_start
        if len(recent) >= p.flap_limit:
            log.error("flapping: %d restarts within %.0fs; cooling down for %.0fs", len(recent), p.flap_window,
                      p.flap_cooldown)
            recent.clear()
            return p.flap_cooldown, p.backoff_start
        return backoff, min(backoff * 2, p.backoff_max)

    def run(self, stop: threading.Event) -> int:
        """Keep the child running until ``stop`` is set; then stop its whole tree."""
        recent: deque[float] = deque()
        backoff = self.policy.backoff_start
        while not stop.is_set():
            worker = Worker(self.argv, self.cwd, self.log_path, now=self.now)
            try:
                worker.start()
            except WorkerError as exc:
                log.error("%s", exc)
                code, ran_for = -1, 0.0
            else:
                self.starts += 1
                self.pid = worker.pid
                log.info("started %s (pid %d, start %d)", " ".join(self.argv[:4]), worker.pid, self.starts)
                while worker.poll() is None and not stop.wait(0.2):
                    worker.scan(every=1.0)
                if stop.is_set():
                    worker.stop()
                    return 0
                code = worker.poll() or 0
                ran_for = self.now() - worker.started_at
                worker.cleanup()
                log.warning("child exited with %d after %.1fs; log: %s", code, ran_for, self.log_path)
            wait, backoff = self.next_wait(recent, backoff, ran_for)
            self.waits.append(wait)
            stop.wait(wait)
        return 0
